"""Writes ds4-layout GGUF files with `gguf.GGUFWriter` and the exact metadata types of ds4.

Used by the tiny models (`ds4jax.gguf.tiny`) and by the HF -> GGUF converter.
Tensors are given in the numpy orientation (`names.TensorSpec.numpy_shape`), either as float
arrays, which are quantised here by the type policy, or as `RawTensor`s that already hold
quantised blocks (gguf-py cannot quantise Q2_K / Q4_K / IQ2_XXS).

`write_gguf_streamed` writes files too large to hold in memory (Flash dims): the header and
tensor table first, then each tensor's data chunk by chunk, so memory stays at one chunk.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as VT

from ds4jax.config import METADATA_KEYS, LayerRange, ModelConfig
from ds4jax.gguf import names
from ds4jax.gguf.errors import GGUFError

ARCH = "deepseek4"
# Float types gguf-py can quantise; everything else must come as a RawTensor.
QUANTISABLE = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.MXFP4})


@dataclasses.dataclass(frozen=True)
class RawTensor:
  """Already-quantised data: uint8 blocks shaped like `quant_shape_to_byte_shape`."""

  data: np.ndarray
  qtype: Q


def policy_type(spec: names.TensorSpec, policy: str) -> Q:
  """The GGML type a float tensor is stored as under `policy` ('ds4' or 'f32').

  'ds4' keeps ds4's types, except that float routed experts become Q8_0: gguf-py cannot
  quantise IQ2_XXS / Q2_K, and Q8_0 is an accepted expert type.
  """
  if spec.ds4_type == Q.I32:
    return Q.I32
  if policy == "f32":
    return Q.F32
  if policy != "ds4":
    raise GGUFError(f"unknown type policy {policy!r}: expected 'ds4' or 'f32'")
  if spec.ds4_type not in QUANTISABLE:
    return Q.Q8_0
  return spec.ds4_type


def _encode(arr: np.ndarray, qtype: Q) -> np.ndarray:
  """Float array -> what GGUFWriter.add_tensor stores for `qtype`."""
  if qtype == Q.I32:
    return np.ascontiguousarray(arr, dtype=np.int32)
  arr = np.ascontiguousarray(arr, dtype=np.float32)
  if qtype == Q.F32:
    return arr
  if qtype == Q.F16:
    return arr.astype(np.float16)
  return gguf.quants.quantize(arr, qtype)


def _config_metadata(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
  values = cfg.to_dict()
  for key, (field, kind, _required) in METADATA_KEYS.items():
    v = values[field]
    if kind == "u32":
      w.add_uint32(key, int(v))
    elif kind == "u64":
      w.add_uint64(key, int(v))
    elif kind == "f32":
      w.add_float32(key, float(v))
    elif kind == "bool":
      w.add_bool(key, bool(v))
    elif kind == "u32[]":
      w.add_key_value(key, [int(x) for x in v[: cfg.n_layers]], VT.ARRAY, sub_type=VT.UINT32)
    elif kind == "f32[]":
      w.add_key_value(key, [float(x) for x in v[: cfg.n_layers]], VT.ARRAY, sub_type=VT.FLOAT32)
    else:
      raise AssertionError(f"unknown metadata kind {kind!r} for {key}")


def _tokenizer_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, tokenizer) -> None:
  if tokenizer is None:
    from ds4jax.tokenizer.tiny_vocab import build_vocab  # deferred: only files without one
    tokenizer = build_vocab(cfg.vocab_size)
  if not isinstance(tokenizer, Mapping):
    tokenizer = {
        "tokenizer.ggml.model": tokenizer.model,
        "tokenizer.ggml.pre": tokenizer.pre,
        "tokenizer.ggml.tokens": list(tokenizer.tokens),
        "tokenizer.ggml.merges": list(tokenizer.merges),
        "tokenizer.ggml.token_type": (list(tokenizer.token_type), VT.INT32),
        "tokenizer.ggml.bos_token_id": tokenizer.bos_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
    }
  tokens = tokenizer.get("tokenizer.ggml.tokens")
  if tokens is not None and len(tokens) != cfg.vocab_size:
    raise GGUFError(f"tokenizer has {len(tokens)} tokens, config vocab_size is {cfg.vocab_size}")
  add_metadata(w, tokenizer)


def add_metadata(w: gguf.GGUFWriter, meta: Mapping[str, Any]) -> None:
  """Adds `{key: value}` or `{key: (value, GGUFValueType)}` with explicit or inferred types.

  Inferred: bool -> BOOL, int -> UINT32 (UINT64 if larger), float -> FLOAT32, str -> STRING,
  list -> ARRAY of the first item's type (ints: INT32).
  """
  for key, v in meta.items():
    vtype = None
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], VT):
      v, vtype = v
    if isinstance(v, (list, tuple, np.ndarray)):
      v = list(v.tolist() if isinstance(v, np.ndarray) else v)
      sub = vtype
      if sub is None:
        x = v[0]
        sub = (VT.STRING if isinstance(x, str) else VT.BOOL if isinstance(x, bool)
               else VT.INT32 if isinstance(x, int) else VT.FLOAT32)
      w.add_key_value(key, v, VT.ARRAY, sub_type=sub)
    elif vtype is not None:
      w.add_key_value(key, v, vtype)
    elif isinstance(v, bool):
      w.add_bool(key, v)
    elif isinstance(v, (int, np.integer)):
      (w.add_uint32 if 0 <= int(v) < 2**32 else w.add_uint64)(key, int(v))
    elif isinstance(v, (float, np.floating)):
      w.add_float32(key, float(v))
    elif isinstance(v, str):
      w.add_key_value(key, v, VT.STRING)
    else:
      raise GGUFError(f"cannot write metadata {key!r} of type {type(v).__name__}")


def check_tensor(cfg: ModelConfig, name: str, value) -> tuple[names.TensorSpec, int]:
  """Checks a tensor's name and numpy shape against the name table."""
  spec, il = _check_name(cfg, name)
  want = spec.numpy_shape(cfg, il)
  if isinstance(value, RawTensor):
    if value.qtype not in spec.types:
      raise GGUFError(f"tensor {name!r}: type {value.qtype.name} is not allowed")
    want_bytes = gguf.quants.quant_shape_to_byte_shape(want, value.qtype)
    if tuple(value.data.shape) != tuple(want_bytes) or value.data.dtype != np.uint8:
      raise GGUFError(f"tensor {name!r}: raw {value.qtype.name} data has shape "
                      f"{tuple(value.data.shape)} {value.data.dtype}, "
                      f"expected {tuple(want_bytes)} uint8")
  elif tuple(np.shape(value)) != want:
    raise GGUFError(f"tensor {name!r} has shape {tuple(np.shape(value))}, expected {want}")
  return spec, il


def write_gguf(path: str | os.PathLike, cfg: ModelConfig, tensors: Mapping[str, Any], *,
               types: str = "ds4", tokenizer=None, extra_metadata: Mapping[str, Any] | None = None,
               name: str = "ds4jax", layers: LayerRange | None = None) -> str:
  """Writes a ds4-layout GGUF.

  Args:
    path: output file.
    cfg: the model config; its `deepseek4.*` keys are written with ds4's exact types.
    tensors: `{gguf_name: array}` in numpy orientation; float arrays are stored with the
      `types` policy ('ds4' mix or 'f32'); `RawTensor`s are written as given; tid2eid is I32.
    tokenizer: a `TinyVocab`, a `{tokenizer.ggml.*: value}` dict, or None for the tiny
      byte-level BPE vocab of `cfg.vocab_size` tokens.
    extra_metadata: more keys (see `add_metadata` for the types).
    layers: the slice the file must hold (default: the whole model); every required tensor of
      it must be given, and nothing outside it.
  Returns:
    The path written.
  """
  layers = (layers or LayerRange.parse("all")).resolve(cfg.n_layers)
  _check_complete(cfg, layers, tensors)
  w = _new_writer(path, cfg, tokenizer, extra_metadata, name)
  for tname in sorted(tensors, key=_order_key):
    value = tensors[tname]
    spec, _ = check_tensor(cfg, tname, value)
    if not names.owner(tname, layers):
      raise GGUFError(f"tensor {tname!r} is outside layer range {layers.describe()}")
    if isinstance(value, RawTensor):
      w.add_tensor(tname, value.data, raw_dtype=value.qtype)
    else:
      qtype = policy_type(spec, types)
      data = _encode(np.asarray(value), qtype)
      w.add_tensor(tname, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16, Q.I32) else None)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return os.fspath(path)


@dataclasses.dataclass(frozen=True)
class StreamedTensor:
  """A tensor written chunk by chunk: `chunks()` yields C-contiguous arrays whose bytes, in
  order, are the tensor's data (uint8 blocks for quantised types). `numpy_shape` is in
  elements, the reversed GGUF dims."""

  name: str
  qtype: Q
  numpy_shape: tuple[int, ...]
  chunks: Callable[[], Iterable[np.ndarray]]

  @property
  def nbytes(self) -> int:
    return math.prod(gguf.quants.quant_shape_to_byte_shape(self.numpy_shape, self.qtype))


def write_gguf_streamed(path: str | os.PathLike, cfg: ModelConfig,
                        tensors: Sequence[StreamedTensor], *, tokenizer=None,
                        extra_metadata: Mapping[str, Any] | None = None, name: str = "ds4jax",
                        on_tensor: Callable[[int, int, StreamedTensor, int, int], None] | None
                        = None) -> str:
  """Writes a whole-model ds4-layout GGUF without holding more than one chunk in memory.

  Args:
    path: output file; removed again if writing fails or is interrupted.
    cfg, tokenizer, extra_metadata, name: as for `write_gguf`.
    tensors: every tensor of the file (see `StreamedTensor`), checked against the name table
      (name, dims, accepted type) before anything is written; written in file order.
    on_tensor: called after each tensor as `on_tensor(i, n, tensor, bytes_done, bytes_total)`.
  Returns:
    The path written.
  """
  by_name: dict[str, StreamedTensor] = {}
  for t in tensors:
    if t.name in by_name:
      raise GGUFError(f"tensor {t.name!r} is given twice")
    by_name[t.name] = t
  layers = LayerRange.parse("all", cfg.n_layers)
  _check_complete(cfg, layers, by_name)
  ordered = [by_name[n] for n in sorted(by_name, key=_order_key)]
  for t in ordered:
    spec, il = _check_name(cfg, t.name)
    want = spec.numpy_shape(cfg, il)
    if tuple(t.numpy_shape) != want:
      raise GGUFError(f"tensor {t.name!r} has shape {tuple(t.numpy_shape)}, expected {want}")
    if t.qtype not in spec.types:
      raise GGUFError(f"tensor {t.name!r}: type {t.qtype.name} is not allowed")
  w = _new_writer(path, cfg, tokenizer, extra_metadata, name)
  for t in ordered:
    # Shapes in elements with an explicit type: the writer derives the GGUF dims from them.
    w.add_tensor_info(t.name, t.numpy_shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
  total, done = sum(t.nbytes for t in ordered), 0
  try:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    for i, t in enumerate(ordered):
      w.write_padding(fout, fout.tell())
      n = 0
      for chunk in t.chunks():
        chunk = np.ascontiguousarray(chunk)
        fout.write(memoryview(chunk).cast("B"))
        n += chunk.nbytes
      if n != t.nbytes:
        raise GGUFError(f"tensor {t.name!r}: its chunks hold {n} bytes, expected {t.nbytes}")
      w.write_padding(fout, n)
      done += n
      if on_tensor is not None:
        on_tensor(i, len(ordered), t, done, total)
    w.close()
  except BaseException:
    w.close()
    if os.path.exists(path):
      os.unlink(path)
    raise
  return os.fspath(path)


def _check_name(cfg: ModelConfig, tname: str) -> tuple[names.TensorSpec, int]:
  try:
    spec, il = names.lookup(tname)
  except names.UnknownTensorError as e:
    raise GGUFError(str(e)) from None
  if spec.scope == names.LAYER and not 0 <= il < cfg.n_layers:
    raise GGUFError(f"tensor {tname!r}: layer {il} is outside the model's {cfg.n_layers} layers")
  return spec, il


def _check_complete(cfg: ModelConfig, layers: LayerRange, tensors) -> None:
  """Every required tensor of `layers` is among `tensors` (names)."""
  required = set(names.tensor_names(cfg, layers))
  missing = sorted(required - set(tensors), key=_order_key)
  if missing:
    raise GGUFError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")


def _new_writer(path, cfg: ModelConfig, tokenizer, extra_metadata, name: str) -> gguf.GGUFWriter:
  """A GGUFWriter with the name, config, tokenizer and extra metadata added, in that order."""
  w = gguf.GGUFWriter(os.fspath(path), ARCH)
  w.add_name(name)
  _config_metadata(w, cfg)
  _tokenizer_metadata(w, cfg, tokenizer)
  if extra_metadata:
    add_metadata(w, extra_metadata)
  return w


def _order_key(tname: str) -> tuple:
  """Canonical file order: embedding, then layer by layer in table order, then the head, so a
  slice's bytes are contiguous in the file."""
  try:
    spec, il = names.lookup(tname)
  except names.UnknownTensorError:
    return (3, 0, 0, tname)
  rank = names.SPECS.index(spec)
  return ({names.EMBED: 0, names.LAYER: 1, names.HEAD: 2}[spec.scope], il, rank, tname)
