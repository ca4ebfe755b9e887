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

from gguf import GGMLQuantizationType as Q

from ds4jax.quant.packed import Packed

HIGHEST = jax.lax.Precision.HIGHEST
# A packed 2-D weight whose f32 form is larger than this is dequantised in row tiles.
TILE_BYTES = 256 << 20
# Rows of x up to which a packed linear layer runs as a fused dequantise-and-reduce.
MATVEC_ROWS = 8


def _dot(spec: str, x, w):
  x = x.astype(w.dtype)
  prec = HIGHEST if w.dtype == jnp.float32 else None
  return jnp.einsum(spec, x, w, precision=prec, preferred_element_type=jnp.float32)


def einsum(spec: str, x, w):
  """`jnp.einsum(spec, x, w)` with x cast to w's dtype, full precision, f32 result.

  `w` may be a `Packed` weight: it is dequantised inside the step. For a 2-D packed weight used
  as a linear layer, `"...K,NK->...N"`:
  - up to `MATVEC_ROWS` rows of x (decode): one fused dequantise-multiply-reduce over the
    weight's blocks, which reads the packed planes once and never writes the f32 weight;
  - more rows (prefill): dequantise, then a matmul (bit-identical to the dequantised path);
    a weight whose f32 form exceeds `TILE_BYTES` goes in row tiles under `lax.map`, so it
    never exists whole in f32 (the Flash head: 2.1 GB in f32, 212 MB a tile).
  """
  if not isinstance(w, Packed):
    return _dot(spec, x, w)
  ins, out = spec.split("->")
  x_axes, w_axes = ins.split(",")
  linear = (len(w_axes) == 2 and x_axes.endswith(w_axes[1])
            and out == x_axes[:-1] + w_axes[0])
  if not linear:
    return _dot(spec, x, w.dense())
  if int(np.prod(x.shape[:-1])) <= MATVEC_ROWS and _fuses(w):
    return matvec(x, w)
  n_tiles = _tile_count(w)
  if n_tiles == 1:
    return _dot(spec, x, w.dense())
  # Row tiles of w: each gives a slice of the last output axis.
  tiles = w.tiles(n_tiles)
  y_n = jax.lax.map(lambda planes: _dot(spec, x, Packed(tuple(planes), w.qtype, tiles.shape[1:],
                                                        w.dtype).dense()), tiles.planes)
  y_n = jnp.moveaxis(y_n, 0, -2)  # [..., n, rows/n]
  return y_n.reshape(y_n.shape[:-2] + (w.shape[0],))


def _fuses(w: Packed) -> bool:
  """Whether a fused dequantise-and-reduce beats dequantise-then-dot for a few rows of x,
  measured on XLA:CPU (T = 1, ms; scripts/bench_model.py has the end-to-end effect):
  Q8_0 256x512 0.10 vs 0.15, 4096x4096 16 vs 327; F16 256x512 0.08 vs 0.04 but far less
  memory traffic at scale; IQ2_XXS 2048x4096 29 vs 126, yet 256x512 0.72 vs 0.44;
  Q2_K 512x256 0.74 vs 0.21, 4096x2048 42 vs 34."""
  q = int(w.qtype)
  if q in (int(Q.Q8_0), int(Q.F16), int(Q.BF16)):
    return True
  return q == int(Q.IQ2_XXS) and int(np.prod(w.shape)) >= (1 << 20)


def matvec(x_MK, w: Packed):
  """x [..., K] times a packed [N, K] weight -> f32 [..., N], as one fused reduction over the
  weight's blocks (`Packed.blocks`): x is reshaped to the block layout instead of the weight
  to rows, so XLA emits a single loop that reads the packed planes. Products are the exact
  f32 products of the (dtype-rounded) operands; only the summation order differs from a dot."""
  lead, k = x_MK.shape[:-1], x_MK.shape[-1]
  blocks_N_ = w.blocks()  # f32 [N, B, *block] (or [N, K] for F16 / BF16)
  x = x_MK.reshape(-1, k)
  if w.dtype != jnp.float32:  # bf16 compute: bf16 operands, f32 products and sums
    blocks_N_ = blocks_N_.astype(w.dtype).astype(jnp.float32)
    x = x.astype(w.dtype)
  x_M1_ = x.astype(jnp.float32).reshape((x.shape[0], 1) + blocks_N_.shape[1:])
  y_MN = jnp.sum(blocks_N_[None] * x_M1_, axis=tuple(range(2, x_M1_.ndim)))
  return y_MN.reshape(lead + (w.shape[0],))


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
