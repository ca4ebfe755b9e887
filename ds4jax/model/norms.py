"""RMSNorm (ds4-architecture.md §2.0): `w * x / sqrt(mean(x^2) + eps)`, computed in f32."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ds4jax.config import ModelConfig
from ds4jax.model import ops


class RMSNorm(nnx.Module):
  """Weighted RMSNorm over the last axis; the weight `scale` is kept in f32 like ds4/HF."""

  def __init__(self, cfg: ModelConfig, *, dim: int, rngs: nnx.Rngs | None = None,
               layer_idx: int = -1, dtype=jnp.float32):
    del rngs, layer_idx, dtype  # norm weights are always f32
    self.eps = float(cfg.rms_eps)
    self.scale = ops.const_param((dim,), jnp.float32, 1.0)

  def __call__(self, x):
    """x: [..., dim] -> f32 [..., dim]."""
    scale = self.scale[...]
    return ops.rms(x, self.eps) * scale.reshape((1,) * (x.ndim - 1) + scale.shape)
