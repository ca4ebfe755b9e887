"""Validated, memory-mapped access to ds4 GGUF files, on top of `gguf.GGUFReader`.

`open_gguf(path) -> DS4File` checks the magic, the header, the architecture and the
`deepseek4.*` metadata (exact types, as ds4 requires); `DS4File.validate(layers)` checks that
a slice's tensors are present with the right dims and an accepted type. Nothing here reads
tensor data: `gguf.GGUFReader` maps the file and tensor `.data` are views into the map.
"""

from __future__ import annotations

import collections
import hashlib
import json
import mmap
import os
import threading
from typing import Any

import numpy as np
import gguf
from gguf import GGUFValueType as VT

from ds4jax.config import METADATA_KEYS, ConfigError, LayerRange, ModelConfig
from ds4jax.gguf import names
from ds4jax.gguf.lean import LeanReader
from ds4jax.gguf.errors import (ArchitectureError, GGUFError, MetadataError, MissingTensorError,
                                NotGGUFError, ShapeError, TensorTypeError, TruncatedError)

ARCH = "deepseek4"
FINGERPRINT_KEY = "ds4jax.fingerprint"
LAYERS_KEY = "ds4jax.layers"

# GGUF value types each METADATA_KEYS kind accepts (ds4's `required_u32` takes only UINT32).
_KINDS: dict[str, tuple[tuple[VT, ...], ...]] = {
    "u32": ((VT.UINT32,),),
    "u64": ((VT.UINT64,), (VT.UINT32,)),
    "f32": ((VT.FLOAT32,),),
    "bool": ((VT.BOOL,),),
    "u32[]": ((VT.ARRAY, VT.UINT32), (VT.ARRAY, VT.INT32)),
    "f32[]": ((VT.ARRAY, VT.FLOAT32),),
}
_INT_TYPES = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)


def _type_str(types) -> str:
  return "[".join(VT(t).name for t in types) + "]" * (len(types) - 1)


# Messages numpy gives when gguf-py's views run past the end of the map.
_SHORT_READ = ("cannot reshape", "larger dtype", "out of bounds", "not enough values to unpack")


def _open_reader(path: str) -> gguf.GGUFReader:
  """A `LeanReader` (gguf-py's reader, lazy array fields) with its failures turned into
  one-line GGUFErrors."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
      magic = fh.read(4)
  except OSError as e:
    raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from None
  if magic != b"GGUF":
    what = "empty file" if size == 0 else f"magic {magic!r}, expected b'GGUF'"
    raise NotGGUFError(f"{path}: not a GGUF file ({what})")
  try:
    return LeanReader(path, "r")
  except (IndexError, ValueError) as e:
    msg = str(e)
    # gguf-py reads through numpy views of the map; a short file surfaces as one of these.
    if isinstance(e, IndexError) or any(s in msg for s in _SHORT_READ):
      raise TruncatedError(f"{path}: truncated GGUF file ({size} bytes): it ends before the "
                           f"header or tensor data it declares") from None
    if "version" in msg:
      raise GGUFError(f"{path}: unsupported GGUF version ({msg})") from None
    raise GGUFError(f"{path}: corrupt GGUF file: {msg}") from None
  except (OverflowError, KeyError, MemoryError, UnicodeDecodeError) as e:
    raise GGUFError(f"{path}: corrupt GGUF file: {type(e).__name__}: {e}") from None


def _py(v: Any) -> Any:
  # FLOAT32 values come back as the shortest decimal that rounds to the same float32, so a
  # config read from a file equals the one it was written from (1e-6, not 9.99999997e-07).
  if isinstance(v, (float, np.floating)):
    return float(str(np.float32(v)))
  return v.item() if isinstance(v, np.generic) else v


def _field_value(field) -> Any:
  value = field.contents()
  if isinstance(value, list):
    return [_py(v) for v in value]
  return _py(value)


def check_architecture(reader: gguf.GGUFReader, path: str = "") -> None:
  field = reader.fields.get("general.architecture")
  where = f"{path}: " if path else ""
  if field is None:
    raise ArchitectureError(f"{where}missing GGUF metadata key 'general.architecture'")
  if field.types != [VT.STRING]:
    raise ArchitectureError(f"{where}GGUF metadata key 'general.architecture' has type "
                            f"{_type_str(field.types)}, expected STRING")
  arch = _field_value(field)
  if arch != ARCH:
    raise ArchitectureError(f"{where}general.architecture is {arch!r}, expected {ARCH!r}")


def read_metadata(reader: gguf.GGUFReader, path: str = "") -> dict[str, Any]:
  """The `deepseek4.*` config keys as python values, after exact type checks."""
  where = f"{path}: " if path else ""
  meta: dict[str, Any] = {}
  for key, (_field, kind, required) in METADATA_KEYS.items():
    field = reader.fields.get(key)
    if field is None:
      if required:
        raise MetadataError(f"{where}missing GGUF metadata key {key!r}")
      continue
    if tuple(field.types) not in _KINDS[kind]:
      want = " or ".join(_type_str(t) for t in _KINDS[kind])
      raise MetadataError(f"{where}GGUF metadata key {key!r} has type {_type_str(field.types)}, "
                          f"expected {want}")
    meta[key] = _field_value(field)
    if kind == "u32[]" and any(v < 0 for v in meta[key]):
      raise MetadataError(f"{where}GGUF metadata key {key!r} has negative entries")
  for key in ("deepseek4.expert_group_count", "deepseek4.expert_group_used_count"):
    field = reader.fields.get(key)
    if field is not None:
      if len(field.types) != 1 or field.types[0] not in _INT_TYPES:
        raise MetadataError(f"{where}GGUF metadata key {key!r} has type {_type_str(field.types)}, "
                            f"expected an integer")
      meta[key] = _field_value(field)
  k, v = "deepseek4.attention.key_length", "deepseek4.attention.value_length"
  if meta[k] != meta[v]:
    raise MetadataError(f"{where}{k}={meta[k]} differs from {v}={meta[v]} (ds4 needs K = V)")
  return meta


def read_config(path_or_reader, **overrides) -> ModelConfig:
  """ModelConfig from a GGUF path, `gguf.GGUFReader` or `DS4File`, with exact type checks."""
  if isinstance(path_or_reader, DS4File):
    return path_or_reader.cfg.replace(**overrides) if overrides else path_or_reader.cfg
  if not isinstance(path_or_reader, gguf.GGUFReader):
    return read_config(open_gguf(path_or_reader), **overrides)
  reader, path = path_or_reader, ""
  check_architecture(reader, path)
  meta = read_metadata(reader, path)
  try:
    return ModelConfig.from_metadata(meta, **overrides)
  except ConfigError as e:
    raise MetadataError(f"{path}: {e}" if path else str(e)) from None


class DS4File:
  """An open, header-validated ds4 GGUF. Tensor data stay in the memory map until asked for."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.reader = _open_reader(self.path)
    self.cfg = self._read_config()
    self.tensors: dict[str, Any] = {t.name: t for t in self.reader.tensors}
    # A split file says which slice it holds: the loader's default slice, and clearer errors.
    self.held: LayerRange | None = None
    held = self.metadata(LAYERS_KEY)
    if held is not None:
      try:
        self.held = LayerRange.parse(str(held), self.cfg.n_layers)
      except ValueError as e:
        raise MetadataError(f"{self.path}: GGUF metadata key {LAYERS_KEY!r}: {e}") from None

  def _read_config(self) -> ModelConfig:
    check_architecture(self.reader, self.path)
    try:
      return ModelConfig.from_metadata(read_metadata(self.reader, self.path))
    except ConfigError as e:
      raise MetadataError(f"{self.path}: {e}") from None

  def metadata(self, key: str, default=None):
    field = self.reader.fields.get(key)
    return default if field is None else _field_value(field)

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def tensor(self, name: str):
    """The gguf ReaderTensor (memory-mapped `.data`); MissingTensorError if absent."""
    t = self.tensors.get(name)
    if t is None:
      held = f" (split file holds layers {self.held.describe()})" if self.held else ""
      raise MissingTensorError(f"{self.path}: missing tensor {name!r}{held}")
    return t

  def check(self, entry: names.Entry) -> None:
    """Dims and type of one present tensor against the name table."""
    t = self.tensor(entry.name)
    dims = tuple(int(d) for d in t.shape)
    want = entry.ggml_dims(self.cfg)
    if dims != want:
      raise ShapeError(f"{self.path}: tensor {entry.name!r} has GGUF dims {list(dims)}, "
                       f"expected {list(want)}")
    if t.tensor_type not in entry.spec.types:
      ok = ", ".join(sorted(q.name for q in entry.spec.types))
      raise TensorTypeError(f"{self.path}: tensor {entry.name!r} has unsupported type "
                            f"{t.tensor_type.name} (accepted: {ok})")

  def validate(self, layers: LayerRange | str) -> list[names.Entry]:
    """Checks a slice and returns its entries present in the file (optional ones if there)."""
    rng = self.resolve(layers)
    present = []
    for e in names.entries(self.cfg, rng, optional=True):
      if not e.required and e.name not in self.tensors:
        continue
      self.check(e)
      present.append(e)
    for il in rng.layers():
      for group in names.same_type_groups(il):
        ts = [self.tensors[n] for n in group]
        if len({t.tensor_type for t in ts}) > 1:
          got = ", ".join(f"{t.name}={t.tensor_type.name}" for t in ts)
          raise TensorTypeError(f"{self.path}: tensors must share one type: {got}")
    return present

  def resolve(self, layers: LayerRange | str) -> LayerRange:
    if isinstance(layers, LayerRange):
      return layers.resolve(self.cfg.n_layers)
    return LayerRange.parse(layers, self.cfg.n_layers)

  def release(self, name: str) -> None:
    """Drops a tensor's pages from this process's map (they stay in the page cache), so the
    bytes of a loaded slice do not linger in RSS next to their dequantised copies."""
    mm = getattr(self.reader.data, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
      return
    t = self.tensor(name)
    start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(int(t.data_offset) + int(t.n_bytes), len(mm))
    if end > start:
      mm.madvise(mmap.MADV_DONTNEED, start, end - start)

  def nbytes(self, name: str) -> int:
    return int(self.tensor(name).n_bytes)

  def layer_bytes(self, *, resident_only: bool = False) -> tuple[int, list[int], int]:
    """(embedding bytes, bytes per layer, head bytes) of the tensors this file holds;
    `resident_only`: without the routed experts (what stays resident under --ssd_streaming)."""
    embed, head, per_layer = 0, 0, [0] * self.cfg.n_layers
    for name, t in self.tensors.items():
      try:
        spec, il = names.lookup(name)
      except names.UnknownTensorError:
        continue
      if resident_only and spec.is_expert:
        continue
      if spec.scope == names.EMBED:
        embed += int(t.n_bytes)
      elif spec.scope == names.HEAD:
        head += int(t.n_bytes)
      elif 0 <= il < self.cfg.n_layers:
        per_layer[il] += int(t.n_bytes)
    return embed, per_layer, head

  def fingerprint(self) -> str:
    """The model's fingerprint; split files carry the full model's under `ds4jax.fingerprint`."""
    stored = self.metadata(FINGERPRINT_KEY)
    if stored:
      return stored
    h = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True).encode())
    for name in sorted(self.tensors):
      t = self.tensors[name]
      h.update(f"\n{name} {t.tensor_type.name} {[int(d) for d in t.shape]}".encode())
    return h.hexdigest()


# Parsing a real header takes seconds (gguf-py builds one numpy view per vocab string), and
# config, fingerprint and loader all open the same file: keep the last few open.
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def open_gguf(path: str | os.PathLike, *, cache: bool = True) -> DS4File:
  """Opens and validates a ds4 GGUF header (see module docstring).

  With `cache`, a file already open (same path, inode, size and mtime) is reused.
  """
  path = os.fspath(path)
  if not cache:
    return DS4File(path)
  try:
    st = os.stat(path)
  except OSError as e:
    raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from None
  key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
  with _CACHE_LOCK:
    f = _CACHE.get(key)
    if f is not None:
      _CACHE.move_to_end(key)
      return f
  f = DS4File(path)
  with _CACHE_LOCK:
    _CACHE[key] = f
    while len(_CACHE) > _CACHE_SIZE:
      _CACHE.popitem(last=False)
  return f


def fingerprint(path: str | os.PathLike | DS4File) -> str:
  """Hex sha256 of the canonical config JSON plus the sorted tensor table (design.md §3)."""
  f = path if isinstance(path, DS4File) else open_gguf(path)
  return f.fingerprint()
