"""Builds a Stage from GGUF tensors, abstract-first (style rule 9).

`nnx.eval_shape` gives the stage's parameter tree without allocating it; each tensor of the
slice is matched to its parameter path through `ds4jax.gguf.names`, checked, cast to the
compute dtype and placed; then `nnx.merge` builds the module. Layers outside the range never
exist, not even abstractly.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf import names
from ds4jax.model.stage import Stage

_DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16}


def parse_dtype(dtype) -> jnp.dtype:
  """'float32' | 'bfloat16' (or a jnp dtype) -> jnp dtype; ValueError otherwise."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unsupported dtype {dtype!r}: expected 'float32' or 'bfloat16'")
    return jnp.dtype(_DTYPES[dtype])
  dt = jnp.dtype(dtype)
  if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"unsupported dtype {dt}: expected float32 or bfloat16")
  return dt


def abstract_stage(cfg: ModelConfig, layers: LayerRange, dtype="float32"):
  """(graphdef, {local path: abstract Param}) of a stage, with nothing allocated."""
  dt = parse_dtype(dtype)
  abstract = nnx.eval_shape(lambda: Stage(cfg, layers, rngs=nnx.Rngs(0), dtype=dt))
  graphdef, state = nnx.split(abstract)
  return graphdef, dict(nnx.to_flat_state(state))


def stage_from_tensors(cfg: ModelConfig, layers: LayerRange | str,
                       tensors: Mapping[str, np.ndarray], *, dtype="float32") -> Stage:
  """Builds the stage of `layers` from `{gguf_name: array}` (numpy orientation).

  Tensors the slice does not own are ignored; a missing parameter is an error, except the
  optional router bias (zeros).
  """
  layers = (LayerRange.parse(layers, cfg.n_layers) if isinstance(layers, str)
            else layers.resolve(cfg.n_layers))
  graphdef, flat = abstract_stage(cfg, layers, dtype)
  filled = {}
  for name, arr in tensors.items():
    if not names.owner(name, layers):
      continue
    path = names.local_path(name, layers)
    var = flat.get(path)
    if var is None:
      raise ValueError(f"tensor {name!r} maps to {path}, which the stage does not have")
    arr = np.asarray(arr)
    if tuple(arr.shape) != tuple(var.shape):
      raise ValueError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(var.shape)}")
    filled[path] = var.replace(jnp.asarray(arr, dtype=var.dtype))
  for path, var in flat.items():
    if path in filled:
      continue
    if path[-1] == "bias" and path[-2] == "moe":
      filled[path] = var.replace(jnp.zeros(var.shape, var.dtype))
    else:
      raise ValueError(f"no tensor for parameter {'.'.join(map(str, path))}")
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def load_stage(path, layers: LayerRange | str = "all", *, dtype=None) -> Stage:
  """Loads the slice `layers` of a ds4 GGUF (only its tensors are read and dequantised), or
  restores it from an orbax checkpoint directory (scripts/convert_to_orbax.py).

  dtype: None means float32 for a GGUF and the stored dtype for a checkpoint.
  """
  if os.path.isdir(path):
    from ds4jax.checkpoints.orbax_io import load_stage_checkpoint  # deferred: imports orbax
    return load_stage_checkpoint(path, layers, dtype=dtype)
  from ds4jax.gguf.load import load_tensors  # deferred: the gguf package imports lazily
  cfg, tensors = load_tensors(path, layers)
  rng = (LayerRange.parse(layers, cfg.n_layers) if isinstance(layers, str)
         else layers.resolve(cfg.n_layers))
  return stage_from_tensors(cfg, rng, tensors, dtype=dtype or "float32")
