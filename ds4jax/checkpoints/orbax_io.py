"""A stage's parameters as an orbax checkpoint (fast restore), and `OrbaxSource`, the
checkpoint as a `quant.source.TensorSource` (docs/design.md §7, §8).

Layout of a checkpoint directory:

    DIR/ds4jax_checkpoint.json   manifest: format, version, weights ('packed' | 'dequantized'),
                                 config, model fingerprint, layer range, dtype, and
                                 {param path: shape, dtype, sha256, qtype, element_shape}
    DIR/params/                  the orbax PyTree checkpoint (OCDBT)
    DIR/tokenizer.json           tokens/merges/types of the source GGUF (so a coordinator
                                 can run from the directory alone)

A packed checkpoint (the default) stores what a packed stage holds: each quantised or 16-bit
tensor as its GGUF bytes (uint8 blocks `[*lead, row_bytes]`, or the float16/bfloat16 array),
with its GGML `qtype` and `element_shape` in the manifest, and the rest (norms, F32 and I32
tensors) as float32 / int32 arrays. Orbax restores plain arrays; the `Packed` wrapper comes
from the manifest. Its bytes on disk are about the GGUF bytes of the slice, and any compute
dtype can be restored from it. A dequantised checkpoint (`weights="dequantized"`, version 1
and later) stores every parameter dequantised to its `dtype`, and restores only that dtype.

Parameters are stored under **absolute** layer indices (`blocks/<il>/...`), so one checkpoint
of a range serves any sub-range: a restore asks orbax for exactly the arrays of the slice
(`partial_restore`), so layers outside it are never read nor allocated. Every restored array
is checked against its manifest sha256, so a corrupt checkpoint is refused rather than
computed with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Iterator

import jax
import numpy as np

from ds4jax.checkpoints import manifest
from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf import names
from ds4jax.quant.source import Path, Stored

MANIFEST = "ds4jax_checkpoint.json"
FORMAT = "ds4jax-orbax-stage"
VERSION = 2        # written; 2 adds "weights" and the packed entries
READS = (1, 2)     # read: version 1 checkpoints are dequantised
WEIGHTS = ("packed", "dequantized")


class CheckpointError(ValueError):
  """A checkpoint that is missing, corrupt, or does not match what the caller asked for."""


def is_checkpoint(path) -> bool:
  """True if `path` is a directory holding a ds4jax checkpoint manifest."""
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


# ----------------------------------------------------------------------------------- paths
def _abs_key(path: tuple, start: int) -> tuple[str, ...]:
  """Local nnx path -> absolute string key path (blocks index += start)."""
  if path and path[0] == "blocks":
    return ("blocks", str(int(path[1]) + start)) + tuple(str(p) for p in path[2:])
  return tuple(str(p) for p in path)


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for key, v in flat.items():
    d = out
    for k in key[:-1]:
      d = d.setdefault(k, {})
    d[key[-1]] = v
  return out


def _pop(tree: dict, key: tuple[str, ...]):
  """Removes and returns the leaf at `key` (so a restored tree does not keep it alive)."""
  for k in key[:-1]:
    tree = tree[k]
  return tree.pop(key[-1])


def _sha256(arr: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


@contextlib.contextmanager
def _quiet_orbax():
  """Mutes orbax's per-file INFO lines (absl logging) for the duration of a save/restore."""
  from absl import logging as absl_logging
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(min(level, absl_logging.WARNING))  # higher = more verbose
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


def _config_from_dict(d: dict) -> ModelConfig:
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  return ModelConfig(**kw)


# ------------------------------------------------------------------------------------ save
def check_target(out_dir, *, overwrite: bool = False):
  """The path a checkpoint may be written to (CheckpointError otherwise); cheap, so a bad
  path fails before a long load."""
  return manifest.check_target(out_dir, name=MANIFEST, what="ds4jax checkpoint",
                               error=CheckpointError, overwrite=overwrite,
                               how="pass overwrite=True / --overwrite")


def leaf_entry(path: tuple, val, start: int) -> tuple[tuple[str, ...], np.ndarray, dict]:
  """(absolute key, host array, manifest entry) of one stage parameter: `path` its local nnx
  path, `val` an array or a `quant.packed.Packed` (stored as its GGUF bytes)."""
  from ds4jax.quant.packed import Packed
  key = _abs_key(path, start)
  # A Packed's `data`: its GGUF bytes (`quant.packed.storage`), whatever its device layout.
  arr = np.asarray(jax.device_get(val.data if isinstance(val, Packed) else val))
  entry = {"shape": list(arr.shape), "dtype": str(arr.dtype), "sha256": _sha256(arr),
           "qtype": None}
  if isinstance(val, Packed):
    entry.update(qtype=int(val.qtype), element_shape=list(val.shape))
  return key, arr, entry


def write_checkpoint(out_dir, *, src, rng: LayerRange, weights: str, dtype: str,
                     flat: dict[tuple[str, ...], np.ndarray], params: dict[str, dict],
                     overwrite: bool = False) -> dict[str, Any]:
  """Writes a checkpoint of `rng` of the GGUF source `src` (a `gguf.source.GGUFSource`):
  `flat` {absolute key: host array} and `params` {"/".join(key): entry}, both from
  `leaf_entry`. Returns the manifest (written last: a directory without it is an unfinished
  conversion). The stage side is `runtime.checkpoint.save_stage_checkpoint`."""
  out = check_target(out_dir, overwrite=overwrite)
  if out.exists():
    shutil.rmtree(out)
  cfg = src.cfg
  meta = {
      "format": FORMAT, "version": VERSION, "weights": weights, "fingerprint": src.fingerprint,
      "layers": str(rng), "start": rng.start, "end": rng.end, "has_output": rng.has_output,
      "n_layers": cfg.n_layers, "dtype": dtype, "config": cfg.to_dict(),
      "source": os.path.basename(src.path), "params": params, "tokenizer": None,
  }
  out.mkdir(parents=True)
  import orbax.checkpoint as ocp  # deferred: heavy, and only needed here
  with _quiet_orbax(), ocp.PyTreeCheckpointer() as ckpt:
    ckpt.save(out / "params", args=ocp.args.PyTreeSave(_nest(flat)))
  tok = _tokenizer_dict(src.file)
  if tok is not None:
    (out / "tokenizer.json").write_text(json.dumps(tok))
    meta["tokenizer"] = "tokenizer.json"
  (out / MANIFEST).write_text(json.dumps(meta, indent=1))
  return meta


def _tokenizer_dict(f) -> dict[str, Any] | None:
  """tokenizer.ggml.{tokens, merges, token_type} of the GGUF (a `DS4File`), or None if it
  has none."""
  out = {}
  for key, name in (("tokenizer.ggml.tokens", "tokens"), ("tokenizer.ggml.merges", "merges"),
                    ("tokenizer.ggml.token_type", "token_types")):
    field = f.reader.get_field(key)
    if field is None:
      if name == "token_types":
        out[name] = None
        continue
      return None
    vals = field.contents()
    out[name] = [int(v) for v in vals] if name == "token_types" else [str(v) for v in vals]
  return out


# ---------------------------------------------------------------------------------- reading
def read_manifest(path) -> dict[str, Any]:
  """The checked manifest of the checkpoint at `path` (with `cfg`, and `weights` set for
  version 1 too); CheckpointError otherwise."""
  where = f"checkpoint {path}"
  m = manifest.read_manifest(path, name=MANIFEST, fmt=FORMAT, version=READS,
                             what="ds4jax checkpoint", error=CheckpointError, where=where)
  for key in ("fingerprint", "start", "end", "has_output", "dtype", "config", "params"):
    if key not in m:
      raise CheckpointError(f"{where}: corrupt manifest (no {key!r})")
  m.setdefault("weights", "dequantized")  # version 1 stored dequantised parameters only
  if m["weights"] not in WEIGHTS:
    raise CheckpointError(f"{where}: corrupt manifest (weights {m['weights']!r})")
  try:
    m["cfg"] = _config_from_dict(m["config"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: corrupt manifest config ({e})") from None
  return m


def stored_range(m: dict[str, Any]) -> LayerRange:
  return LayerRange(int(m["start"]), int(m["end"]), bool(m["has_output"]))


def check_range(m: dict[str, Any], want: LayerRange, where: str = "") -> None:
  """Refuses a slice the checkpoint cannot serve (layers or head missing; a checkpoint that
  starts at 0 holds the embedding)."""
  have = stored_range(m)
  where = where or "checkpoint"
  if want.start < have.start or want.end > have.end:
    raise CheckpointError(f"{where} holds layers {have}, cannot serve {want}")
  if want.has_output and not have.has_output:
    raise CheckpointError(f"{where} holds layers {have} without the output head, cannot serve "
                          f"{want}")


class OrbaxSource:
  """A checkpoint directory as a `quant.source.TensorSource`.

  Attributes: path, cfg, fingerprint, dtype (float32 for a packed checkpoint, the stored
  dtype for a dequantised one), weights ('packed' | 'dequantized'), manifest.
  """

  def __init__(self, path, *, verify: bool = True):
    """verify: check every restored array against its manifest sha256."""
    self.path = os.fspath(path)
    self.manifest = read_manifest(self.path)
    self.cfg: ModelConfig = self.manifest["cfg"]
    self.fingerprint: str = self.manifest["fingerprint"]
    self.weights: str = self.manifest["weights"]
    self.dtype: str = self.manifest["dtype"]
    self.verify = verify
    self._where = f"checkpoint {self.path}"

  def __repr__(self) -> str:
    return f"OrbaxSource({self.path!r})"

  def resolve(self, layers: LayerRange | str | None = None) -> LayerRange:
    """None: the stored range. Any sub-range of it is served."""
    if layers is None:
      rng = stored_range(self.manifest)
    elif isinstance(layers, str):
      rng = LayerRange.parse(layers, self.cfg.n_layers)
    else:
      rng = layers.resolve(self.cfg.n_layers)
    check_range(self.manifest, rng, self._where)
    return rng

  def _table(self, layers: LayerRange) -> dict[Path, tuple[tuple[str, ...], dict]]:
    """{local path: (absolute key, manifest entry)} of the slice, each entry checked against
    the ds4 name table."""
    from ds4jax.quant.packed import storage

    params = self.manifest["params"]
    out = {}
    for e in names.entries(self.cfg, layers, optional=True):
      path = names.local_path(e.name, layers)
      key = _abs_key(path, layers.start)
      entry = params.get("/".join(key))
      if entry is None:
        if e.required:
          raise CheckpointError(f"{self._where} lacks parameter {'/'.join(key)}")
        continue
      want = e.numpy_shape(self.cfg)
      try:
        shape, qtype = tuple(entry["shape"]), entry.get("qtype")
        if qtype is None:
          ok = shape == want
          what = f"{entry['dtype']}{list(shape)}"
        else:
          dshape, ddtype = storage(qtype, entry["element_shape"])
          ok = tuple(entry["element_shape"]) == want and (dshape, str(ddtype)) == (
              shape, entry["dtype"])
          what = f"{entry['dtype']}{list(shape)} (packed {list(entry['element_shape'])})"
      except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{self._where}: corrupt manifest entry {'/'.join(key)} "
                              f"({err})") from None
      if not ok:
        raise CheckpointError(f"{self._where}: parameter {'/'.join(key)} is {what}, the model "
                              f"needs {list(want)}")
      out[path] = (key, entry)
    return out

  def abstract(self, layers: LayerRange, *, packed: bool = True,
               dtype: str | None = None) -> dict[Path, Stored]:
    """A dequantised checkpoint serves its stored dtype only (no silent casts)."""
    if dtype is not None and self.weights == "dequantized" and str(dtype) != self.dtype:
      raise CheckpointError(f"{self._where} holds {self.dtype} parameters, asked for {dtype} "
                            "(convert again with --dtype)")
    out = {}
    for path, (_, entry) in self._table(layers).items():
      qtype = entry.get("qtype")
      if qtype is not None and packed:
        out[path] = Stored(int(qtype), tuple(entry["element_shape"]), np.dtype(entry["dtype"]))
      elif qtype is not None:  # dequantised on the host at load
        out[path] = Stored(None, tuple(entry["element_shape"]), np.dtype(np.float32))
      else:
        out[path] = Stored(None, tuple(entry["shape"]), _np_dtype(entry["dtype"]))
    return out

  def tensors(self, layers: LayerRange, *,
              packed: bool = True) -> Iterator[tuple[Path, Any, int | None]]:
    """Restores the slice's arrays to host memory in one orbax call, then yields them one
    at a time (each dropped from the restored tree first), each checked against its sha256
    and, for a packed entry asked for dequantised, dequantised on the host by gguf-py."""
    table = self._table(layers)
    tree = _nest({key: jax.ShapeDtypeStruct(tuple(e["shape"]), _np_dtype(e["dtype"]))
                  for key, e in table.values()})
    import orbax.checkpoint as ocp  # deferred: heavy
    args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), tree)
    try:
      with _quiet_orbax(), ocp.PyTreeCheckpointer() as ckpt:
        restored = ckpt.restore(
            pathlib.Path(self.path).absolute() / "params",
            args=ocp.args.PyTreeRestore(item=tree, restore_args=args, partial_restore=True))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(f"{self._where} is corrupt or unreadable: {msg}") from None
    del tree, args
    for path, (key, entry) in table.items():
      arr = _pop(restored, key)
      if self.verify and _sha256(arr) != entry["sha256"]:
        raise CheckpointError(f"{self._where} is corrupt: parameter {'/'.join(key)} fails its "
                              "sha256 check")
      qtype = entry.get("qtype")
      if qtype is not None and not packed:
        from ds4jax.gguf import dequant
        arr = dequant.dequantize(arr, qtype, list(reversed(entry["element_shape"])),
                                 "/".join(key))
        qtype = None
      yield path, arr, qtype
      del arr


def _np_dtype(name: str) -> np.dtype:
  """A manifest dtype name as numpy spells it (bfloat16 through ml_dtypes)."""
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def tokenizer_from_checkpoint(path):
  """The Tokenizer saved with the checkpoint (CheckpointError if the source had none)."""
  from ds4jax.tokenizer import Tokenizer
  m = read_manifest(path)
  if not m.get("tokenizer"):
    raise CheckpointError(f"checkpoint {path} has no tokenizer (its GGUF had none)")
  try:
    d = json.loads((pathlib.Path(path) / m["tokenizer"]).read_text())
    return Tokenizer.from_vocab(d["tokens"], d["merges"], d.get("token_types"))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint {path}: corrupt tokenizer.json ({e})") from None
