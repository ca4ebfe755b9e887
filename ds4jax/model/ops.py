"""Small numeric helpers shared by the model modules.

Every projection goes through `einsum`, which pins f32 matmuls to full precision (HF parity
needs it) and accumulates bf16 matmuls in f32. Weights may be dense arrays or `Packed`
GGUF blocks (docs/design.md §8): `einsum` multiplies them through the kernel interface
(`quant.matmul`, §8.1), `dense` and `rows` dequantise inside the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ds4jax.quant import matmul as quant_matmul
from ds4jax.quant.packed import Packed

HIGHEST = jax.lax.Precision.HIGHEST
# A packed 2-D weight whose f32 form is larger than this is dequantised in row tiles (prefill).
TILE_BYTES = quant_matmul.TILE_BYTES


def _dot(spec: str, x, w):
  return quant_matmul.dot(spec, x, w)


def einsum(spec: str, x, w):
  """`jnp.einsum(spec, x, w)` with x cast to w's dtype, full precision, f32 result.

  `w` may be a `Packed` weight, multiplied through the kernel interface (`quant.matmul`,
  docs/design.md §8.1) with its own activation mode `w.act`:
  - a linear layer, `"...K,NK->...N"`: `quant.matmul` on the rows of x (a decode step's few
    rows: the backend's packed kernel; a prefill chunk: dequantise, then a matmul, in row
    tiles of at most `TILE_BYTES` as f32, bit-identical to the dequantised path);
  - a grouped layer, `"...GK,GNK->...GN"` (the grouped output LoRA): `quant.expert_matmul`
    with row (i, g) on group g, when a kernel serves w (`quant.matmul.uses_kernel`) and x
    has at most `quant.matmul.KERNEL_ROWS` rows per group;
  - anything else: dequantised, then `jnp.einsum` (x rounded first in q8 mode).
  """
  if not isinstance(w, Packed):
    return _dot(spec, x, w)
  ins, out = spec.split("->")
  x_axes, w_axes = ins.split(",")
  k = x.shape[-1]
  if len(w_axes) == 2 and x_axes.endswith(w_axes[1]) and out == x_axes[:-1] + w_axes[0]:
    y_MN = quant_matmul.matmul(x.reshape(-1, k), w, act=w.act, tile_bytes=TILE_BYTES)
    return y_MN.reshape(x.shape[:-1] + (w.shape[0],))
  grouped = (len(w_axes) == 3 and x_axes[-2:] == w_axes[0] + w_axes[2]
             and out == x_axes[:-1] + w_axes[1])
  rows = int(np.prod(x.shape[:-2])) if grouped else 0
  if grouped and rows <= quant_matmul.KERNEL_ROWS and quant_matmul.uses_kernel(w):
    g = w.shape[0]
    e_P = jnp.tile(jnp.arange(g, dtype=jnp.int32), rows)
    y_PN = quant_matmul.expert_matmul(x.reshape(-1, k), w, e_P, act=w.act)
    return y_PN.reshape(x.shape[:-1] + (w.shape[1],))
  return _dot(spec, quant_matmul.activations(x, w), quant_matmul.after(x, w).dense())


def _tile_count(w: Packed) -> int:
  """Row tiles of a packed weight's dequantise-then-dot path under `TILE_BYTES`."""
  return quant_matmul.tile_count(w, TILE_BYTES)


def scores(q, k):
  """`einsum("...XH,...SH->...XS")` at full precision: the dot of every query row with every
  key row over H, with the keys as the dot's left operand. XLA:CPU copies a right operand
  that contracts its last axis transposed first, every call, and the keys (a window of a
  session's cache) are the large operand, the queries a few rows.

  Args:
    q: [*B, *X, H] queries (X: any query axes, e.g. [T, N]); k: [*B, S, H] keys, with the
      same leading batch axes B (none: k is [S, H]).

  Returns:
    [*B, *X, S] f32.
  """
  nb = k.ndim - 2
  lead, x, (s, h) = k.shape[:nb], q.shape[nb:-1], k.shape[nb:]
  q_BYH = q.reshape(lead + (int(np.prod(x)), h))
  batch = tuple(range(nb))
  s_BSY = jax.lax.dot_general(k, q_BYH, (((nb + 1,), (nb + 1,)), (batch, batch)),
                              precision=HIGHEST, preferred_element_type=jnp.float32)
  return jnp.swapaxes(s_BSY, -1, -2).reshape(lead + x + (s,))


def groups(w, g: int):
  """A `[G * R, K]` weight as `[G, R, K]` (dense: a reshape; Packed: still packed)."""
  if isinstance(w, Packed):
    return w.reshape_lead((g, w.shape[0] // g))
  return w.reshape(g, -1, w.shape[-1])


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
