"""A stage's dequantised parameters as an orbax checkpoint (fast restore, no dequantisation).

Layout of a checkpoint directory:

    DIR/ds4jax_checkpoint.json   manifest: format, config, model fingerprint, layer range,
                                 dtype, and {param path: shape, dtype, sha256}
    DIR/params/                  the orbax PyTree checkpoint (OCDBT)
    DIR/tokenizer.json           tokens/merges/types of the source GGUF (so a coordinator
                                 can run from the directory alone)

Parameters are stored under **absolute** layer indices (`blocks/<il>/...`), so one checkpoint
of a range serves any sub-range: a restore builds the stage abstractly (`nnx.eval_shape`),
maps its paths to absolute keys and asks orbax for exactly those arrays (`partial_restore`),
so layers outside the slice are never read nor allocated. Every restored array is checked
against its manifest sha256, so a corrupt checkpoint is refused rather than computed with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from ds4jax.checkpoints import manifest
from ds4jax.config import LayerRange, ModelConfig

MANIFEST = "ds4jax_checkpoint.json"
FORMAT = "ds4jax-orbax-stage"
VERSION = 1


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


def _get(tree: dict, key: tuple[str, ...]):
  for k in key:
    tree = tree[k]
  return tree


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
def save_stage_checkpoint(gguf_path, layers: LayerRange | str, out_dir, *,
                          dtype: str = "float32", overwrite: bool = False) -> dict[str, Any]:
  """Dequantises `layers` of a GGUF and writes them as a checkpoint; returns the manifest.

  The arrays are exactly what `model.load.load_stage(gguf_path, layers, dtype=dtype)` holds,
  so a restore gives bit-identical logits.
  """
  from ds4jax.gguf.load import load_tensors
  from ds4jax.gguf.reader import fingerprint, open_gguf
  from ds4jax.model.load import stage_from_tensors

  out = manifest.check_target(out_dir, name=MANIFEST, what="ds4jax checkpoint",
                              error=CheckpointError, overwrite=overwrite,
                              how="pass overwrite=True / --overwrite")
  if out.exists():
    shutil.rmtree(out)
  f = open_gguf(gguf_path)
  rng = f.resolve(layers)
  cfg, tensors = load_tensors(f, rng)
  stage = stage_from_tensors(cfg, rng, tensors, dtype=dtype)
  del tensors
  _, state = nnx.split(stage)
  flat = {_abs_key(p, rng.start): np.asarray(jax.device_get(v.get_value()))
          for p, v in nnx.to_flat_state(state)}
  params = {"/".join(k): {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha256(a)}
            for k, a in flat.items()}
  meta = {
      "format": FORMAT, "version": VERSION, "fingerprint": fingerprint(f),
      "layers": str(rng), "start": rng.start, "end": rng.end, "has_output": rng.has_output,
      "n_layers": cfg.n_layers, "dtype": _dtype_name(dtype), "config": cfg.to_dict(),
      "source": os.path.basename(f.path),
      "params": params, "tokenizer": None,
  }
  out.mkdir(parents=True)
  import orbax.checkpoint as ocp  # deferred: heavy, and only needed here
  with _quiet_orbax(), ocp.PyTreeCheckpointer() as ckpt:
    ckpt.save(out / "params", args=ocp.args.PyTreeSave(_nest(flat)))
  tok = _tokenizer_dict(f)
  if tok is not None:
    (out / "tokenizer.json").write_text(json.dumps(tok))
    meta["tokenizer"] = "tokenizer.json"
  # The manifest goes last: a directory without it is an unfinished conversion.
  (out / MANIFEST).write_text(json.dumps(meta, indent=1))
  return meta


def _dtype_name(dtype) -> str:
  from ds4jax.model.load import parse_dtype
  return str(parse_dtype(dtype))


def _tokenizer_dict(f) -> dict[str, Any] | None:
  """tokenizer.ggml.{tokens, merges, token_type} of the GGUF, or None if it has none."""
  reader = f.reader if hasattr(f, "reader") else None
  if reader is None:
    import gguf
    reader = gguf.GGUFReader(f.path, "r")
  out = {}
  for key, name in (("tokenizer.ggml.tokens", "tokens"), ("tokenizer.ggml.merges", "merges"),
                    ("tokenizer.ggml.token_type", "token_types")):
    field = reader.get_field(key)
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
  """The checked manifest of the checkpoint at `path`; CheckpointError otherwise."""
  where = f"checkpoint {path}"
  m = manifest.read_manifest(path, name=MANIFEST, fmt=FORMAT, version=VERSION,
                             what="ds4jax checkpoint", error=CheckpointError, where=where)
  for key in ("fingerprint", "start", "end", "has_output", "dtype", "config", "params"):
    if key not in m:
      raise CheckpointError(f"{where}: corrupt manifest (no {key!r})")
  try:
    m["cfg"] = _config_from_dict(m["config"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: corrupt manifest config ({e})") from None
  return m


def model_info(path) -> tuple[ModelConfig, str]:
  """(config, model fingerprint) of a GGUF file or a checkpoint directory."""
  if os.path.isdir(path):
    m = read_manifest(path)
    return m["cfg"], m["fingerprint"]
  from ds4jax.gguf.reader import fingerprint, open_gguf
  f = open_gguf(path)
  return f.cfg, fingerprint(f)


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


def load_stage_checkpoint(path, layers: LayerRange | str | None = None, *, dtype=None,
                          fingerprint: str | None = None, verify: bool = True):
  """Restores a Stage from a checkpoint directory.

  Args:
    path: the checkpoint directory.
    layers: the slice to build ("all", "A:B", a LayerRange); None = the stored range.
      Any sub-range of the stored one is allowed.
    dtype: None = the stored dtype; otherwise it must equal it (no silent casts).
    fingerprint: if given, the model the caller expects.
    verify: check every restored array against its manifest sha256.
  """
  from ds4jax.model.load import abstract_stage, parse_dtype

  m = read_manifest(path)
  where = f"checkpoint {path}"
  cfg = m["cfg"]
  if fingerprint is not None and fingerprint != m["fingerprint"]:
    raise CheckpointError(f"{where} is of another model (fingerprint {m['fingerprint'][:16]}, "
                          f"expected {fingerprint[:16]})")
  if layers is None:
    rng = stored_range(m)
  elif isinstance(layers, str):
    rng = LayerRange.parse(layers, cfg.n_layers)
  else:
    rng = layers.resolve(cfg.n_layers)
  check_range(m, rng, where)
  if dtype is not None and str(parse_dtype(dtype)) != m["dtype"]:
    raise CheckpointError(f"{where} holds {m['dtype']} parameters, asked for "
                          f"{parse_dtype(dtype)} (convert again with --dtype)")
  graphdef, flat = abstract_stage(cfg, rng, m["dtype"])
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {}
  for p, var in flat.items():
    key = _abs_key(p, rng.start)
    entry = m["params"].get("/".join(key))
    if entry is None:
      raise CheckpointError(f"{where} lacks parameter {'/'.join(key)}")
    if tuple(entry["shape"]) != tuple(var.shape) or entry["dtype"] != str(var.dtype):
      raise CheckpointError(
          f"{where}: parameter {'/'.join(key)} is {entry['dtype']}{entry['shape']}, the model "
          f"needs {var.dtype}{list(var.shape)}")
    target[key] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)
  tree = _nest(target)
  import orbax.checkpoint as ocp  # deferred: heavy
  try:
    with _quiet_orbax(), ocp.PyTreeCheckpointer() as ckpt:
      restored = ckpt.restore(
          pathlib.Path(path).absolute() / "params",
          args=ocp.args.PyTreeRestore(
              item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
              partial_restore=True))
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{where} is corrupt or unreadable: {msg}") from None
  filled = {}
  for p, var in flat.items():
    key = _abs_key(p, rng.start)
    arr = _get(restored, key)
    if verify and _sha256(np.asarray(jax.device_get(arr))) != m["params"]["/".join(key)]["sha256"]:
      raise CheckpointError(f"{where} is corrupt: parameter {'/'.join(key)} fails its sha256 check")
    filled[p] = var.replace(arr)
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


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


def timed_load(path, layers="all", **kw) -> tuple[Any, float]:
  """(stage, seconds) from a GGUF or a checkpoint, with every array ready (for benchmarks)."""
  from ds4jax.model.load import load_stage
  t0 = time.perf_counter()
  stage = (load_stage_checkpoint(path, layers, **kw) if os.path.isdir(path)
           else load_stage(path, layers, **kw))
  jax.block_until_ready(nnx.state(stage))
  return stage, time.perf_counter() - t0
