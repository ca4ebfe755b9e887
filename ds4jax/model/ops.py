"""Small numeric helpers shared by the model modules.

Every projection goes through `einsum`, which pins f32 matmuls to full precision (HF parity
needs it) and accumulates bf16 matmuls in f32. Weights may be dense arrays or `Packed`
GGUF blocks (docs/design.md §8): `einsum`, `dense` and `rows` dequantise inside the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ds4jax.quant.packed import Packed

HIGHEST = jax.lax.Precision.HIGHEST
# A packed 2-D weight whose f32 form is larger than this is dequantised in row tiles.
TILE_BYTES = 256 << 20


def _dot(spec: str, x, w):
  x = x.astype(w.dtype)
  prec = HIGHEST if w.dtype == jnp.float32 else None
  return jnp.einsum(spec, x, w, precision=prec, preferred_element_type=jnp.float32)


def einsum(spec: str, x, w):
  """`jnp.einsum(spec, x, w)` with x cast to w's dtype, full precision, f32 result.

  `w` may be a `Packed` weight: it is dequantised inside the step. A 2-D packed weight whose
  first (output) axis appears in the result, `"...K,NK->...N"`, and whose f32 form exceeds
  `TILE_BYTES`, is dequantised and contracted in row tiles under `lax.map`, so it never
  exists whole in f32 (the Flash head: 2.1 GB in f32, 64 MB a tile).
  """
  if not isinstance(w, Packed):
    return _dot(spec, x, w)
  n_tiles = _tile_count(w)
  ins, out = spec.split("->")
  _, w_axes = ins.split(",")
  if n_tiles == 1 or len(w_axes) != 2 or not out.endswith(w_axes[0]):
    return _dot(spec, x, w.dense())
  # Row tiles of w: each gives a slice of the last output axis.
  tiles = w.tiles(n_tiles)
  y_n = jax.lax.map(lambda data: _dot(spec, x, Packed(data, w.qtype, tiles.shape[1:],
                                                      w.dtype).dense()), tiles.data)
  y_n = jnp.moveaxis(y_n, 0, -2)  # [..., n, rows/n]
  return y_n.reshape(y_n.shape[:-2] + (w.shape[0],))


def _tile_count(w: Packed) -> int:
  """Smallest divisor n of w's rows with rows/n * cols * 4 <= TILE_BYTES (1 if small)."""
  rows, per_row = w.shape[0], 4 * int(np.prod(w.shape[1:]))
  if rows * per_row <= TILE_BYTES or w.ndim != 2:
    return 1
  for n in range(2, rows + 1):
    if rows % n == 0 and (rows // n) * per_row <= TILE_BYTES:
      return n
  return rows


def dense(w):
  """A weight as a dense array (a Packed one dequantised to its compute dtype)."""
  return w.dense() if isinstance(w, Packed) else w


def rows(w, idx_T):
  """Rows `idx_T` of a `[N, D]` weight as f32 `[T, D]`; a Packed weight dequantises only
  those rows (an embedding lookup never materialises the table)."""
  if isinstance(w, Packed):
    return w.take(idx_T).dense().astype(jnp.float32)
  return w[idx_T].astype(jnp.float32)


def rms(x, eps: float):
  """Unweighted RMS normalisation over the last axis, in f32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def param(rngs: nnx.Rngs, shape, dtype, *, std: float = 0.02):
  """A normal(0, std) parameter; loaders overwrite it, so this only matters for smoke tests."""
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def const_param(shape, dtype, value: float):
  return nnx.Param(jnp.full(shape, value, dtype))
