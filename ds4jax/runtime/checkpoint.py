"""Orbax stage checkpoints of a loaded stage: what `scripts/convert_to_orbax.py` writes and
restores (design.md §7). The directory format is `checkpoints.orbax_io`; this module is the
stage side of it (it loads the stage to store, and builds the stage a restore gives).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from ds4jax.checkpoints import orbax_io
from ds4jax.checkpoints.orbax_io import CheckpointError, OrbaxSource
from ds4jax.config import LayerRange
from ds4jax.runtime.load import load_stage, parse_dtype, parse_weights


def save_stage_checkpoint(gguf, layers: LayerRange | str, out_dir, *, weights: str = "packed",
                          dtype: str | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Writes `layers` of a GGUF as a checkpoint; returns the manifest.

  Args:
    gguf: the GGUF path (or a `gguf.source.GGUFSource`).
    layers: the slice to store ("all", "A:B", "A:output", a LayerRange).
    out_dir: the checkpoint directory to write.
    weights: 'packed' (the GGUF blocks; dtype must be None or float32: the compute dtype is
      chosen at restore) or 'dequantized' (every parameter dequantised to `dtype`).
    dtype: the stored dtype of a dequantised checkpoint (None: float32).
    overwrite: replace an existing checkpoint at `out_dir`.

  The arrays are exactly what `load_stage(gguf, layers, dtype=dtype, weights=weights)` holds,
  so a restore gives bit-identical logits.
  """
  from ds4jax.gguf.source import GGUFSource

  if parse_weights(weights) == "packed" and dtype is not None and (
      str(parse_dtype(dtype)) != "float32"):
    raise CheckpointError(f"a packed checkpoint keeps the GGUF's own precision, not {dtype} "
                          "(choose the compute dtype when loading, or store "
                          "weights='dequantized' / --weights=dequantized)")
  dt = str(parse_dtype(dtype or "float32"))
  orbax_io.check_target(out_dir, overwrite=overwrite)  # a bad path fails before the load
  src = gguf if isinstance(gguf, GGUFSource) else GGUFSource(gguf)
  rng = src.resolve(layers)
  stage = load_stage(src, rng, dtype=dt, weights=weights)
  flat, params = {}, {}
  for p, v in nnx.to_flat_state(nnx.state(stage)):
    key, arr, entry = orbax_io.leaf_entry(p, v.get_value(), rng.start)
    flat[key], params["/".join(key)] = arr, entry
  del stage
  return orbax_io.write_checkpoint(out_dir, src=src, rng=rng, weights=weights, dtype=dt,
                                   flat=flat, params=params, overwrite=overwrite)


def load_stage_checkpoint(path, layers: LayerRange | str | None = None, *, dtype=None,
                          weights: str = "packed", fingerprint: str | None = None,
                          verify: bool = True):
  """Restores a Stage from a checkpoint directory (`runtime.load.load_stage` of its source).

  Args:
    path: the checkpoint directory.
    layers: the slice to build ("all", "A:B", a LayerRange); None = the stored range.
      Any sub-range of the stored one is allowed.
    dtype: the compute dtype. None = the stored dtype; a dequantised checkpoint refuses any
      other (no silent casts), a packed one serves any.
    weights: 'packed' (what the checkpoint holds packed stays packed) or 'dequantized'.
    fingerprint: if given, the model the caller expects.
    verify: check every restored array against its manifest sha256.
  """
  src = OrbaxSource(path, verify=verify)
  if fingerprint is not None and fingerprint != src.fingerprint:
    raise CheckpointError(f"checkpoint {path} is of another model (fingerprint "
                          f"{src.fingerprint[:16]}, expected {fingerprint[:16]})")
  return load_stage(src, layers, dtype=dtype, weights=weights)


__all__ = ["load_stage_checkpoint", "save_stage_checkpoint"]
