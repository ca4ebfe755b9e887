"""Small numeric helpers shared by the model modules.

Every projection goes through `einsum`, which pins f32 matmuls to full precision (HF parity
needs it) and accumulates bf16 matmuls in f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

HIGHEST = jax.lax.Precision.HIGHEST


def einsum(spec: str, x, w):
  """`jnp.einsum(spec, x, w)` with x cast to w's dtype, full precision, f32 result."""
  x = x.astype(w.dtype)
  prec = HIGHEST if w.dtype == jnp.float32 else None
  return jnp.einsum(spec, x, w, precision=prec, preferred_element_type=jnp.float32)


def rms(x, eps: float):
  """Unweighted RMS normalisation over the last axis, in f32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def param(rngs: nnx.Rngs, shape, dtype, *, std: float = 0.02):
  """A normal(0, std) parameter; loaders overwrite it, so this only matters for smoke tests."""
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def const_param(shape, dtype, value: float):
  return nnx.Param(jnp.full(shape, value, dtype))
