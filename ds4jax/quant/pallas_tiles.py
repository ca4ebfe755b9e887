"""What the Pallas kernels of `quant.pallas_gpu` and `quant.pallas_tpu` share (design §8.1).

- `dequant_tile(qtype, get, lookup, dtype)`: the in-kernel dequantisation of one tile of a
  packed weight, f32 [tn, kc] in GGUF element order, from the plane chunks `get` returns
  (`get(i)`: plane i of `kernels.PLANES`, rows of the tile, `kb` blocks: [tn, kb, *trail];
  `get(i, lo, size)`: the same, sliced on its last axis). One function per block type, the
  same f32 operations in the same order as its `kernels.dequant_*` twin (bit-identical
  values, tests/quant/pallas_test.py), written for Pallas kernel bodies: no
  `optimization_barrier`, no captured array constants (shift vectors are iotas), integers
  widened to 32 bits before they are shifted, and the one table read (the IQ2_XXS grid)
  behind `lookup`, each backend's gather.
- `slots(e_P, n_experts, rows)`: the distinct experts of a call, so a kernel reads and
  unpacks each chosen expert's tile once, whatever the rows that chose it.
- `operands(x, w, e_P, rows)`: x as the kernel multiplies it (rounded through the compute
  dtype, rows padded) and the slot arrays.

Shape alphabet: P rows, E experts, N output rows, K contraction, U slots (distinct experts),
B blocks per row; a tile is tn rows by kc = kb * block elements.
"""

from __future__ import annotations

import functools

import gguf
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q
from jax import lax

from ds4jax.quant import kernels
from ds4jax.quant.packed import FLOAT16_TYPES

F32, I32, U32 = jnp.float32, jnp.int32, jnp.uint32
TYPES = frozenset(kernels.BLOCK_TYPES | set(FLOAT16_TYPES))


def block_size(qtype) -> int:
  """Elements per block; 1 for F16 / BF16 (a plane chunk of kb "blocks" is kb elements)."""
  q = Q(int(qtype))
  return 1 if q in FLOAT16_TYPES else gguf.GGML_QUANT_SIZES[q][0]


@functools.cache
def iq2_codes() -> np.ndarray:
  """int32 [256]: IQ2_XXS grid row i as 8 two-bit codes (element t at bits 2t), code c the
  value 8, 25, 43 for c = 0, 1, 2 (`kernels._iq2_xxs_grid`)."""
  grid = kernels._iq2_xxs_grid()
  c = np.select([grid == 8, grid == 25, grid == 43], [0, 1, 2], -1)
  assert (c >= 0).all(), "unexpected IQ2_XXS grid"
  return (c.astype(np.int64) << (2 * np.arange(8))).sum(-1).astype(np.int32)


def _iota(shape, dim):
  return lax.broadcasted_iota(I32, tuple(shape), dim)


def _f16(h):
  return kernels.f16_to_f32(h)


# --- one function per block type: plane chunks -> f32 [tn, kb, *kernels.BLOCK_SHAPE[q]] ---

def _q8_0(get, lookup):
  d_B = _f16(get(0))
  return get(1).astype(F32) * d_B[..., None]


def _q2_k(get, lookup):
  sc_BG, qs_BQ = get(0).astype(I32), get(1).astype(I32)
  d_B, dmin_B = _f16(get(2)), _f16(get(3))
  lead = qs_BQ.shape[:-1]
  sc_B242 = sc_BG.reshape(*lead, 2, 4, 2)
  dl_B242 = d_B[..., None, None, None] * (sc_B242 & 0xF).astype(F32)
  ml_B242 = dmin_B[..., None, None, None] * (sc_B242 >> 4).astype(F32)
  shift = 2 * _iota((1,) * len(lead) + (1, 4, 1, 1), len(lead) + 1)
  q_B24216 = ((qs_BQ.reshape(*lead, 2, 1, 2, 16) >> shift) & 3).astype(F32)
  return dl_B242[..., None] * q_B24216 - ml_B242[..., None]


def _q4_k(get, lookup):
  d_B, dmin_B, qs_BQ = _f16(get(0)), _f16(get(1)), get(3).astype(I32)
  # The 12 scale bytes as three 4-byte slices (a 12-wide load is no power of two).
  sd_B4, sm_B4, smd_B4 = (get(2, 4 * i, 4).astype(I32) for i in range(3))
  lead = qs_BQ.shape[:-1]
  hi_B24 = _iota((1,) * len(lead) + (2, 4), len(lead)) == 1

  def eight(lo_B4, hi_B4):  # concatenate([lo, hi], -1) without a concatenate
    return jnp.where(hi_B24, hi_B4[..., None, :], lo_B4[..., None, :]).reshape(*lead, 8)

  sc_BG = eight(sd_B4 & 0x3F, (smd_B4 & 0x0F) | ((sd_B4 >> 2) & 0x30))
  mn_BG = eight(sm_B4 & 0x3F, (smd_B4 >> 4) | ((sm_B4 >> 2) & 0x30))
  dl_B42 = (d_B[..., None] * sc_BG.astype(F32)).reshape(*lead, 4, 2)
  ml_B42 = (dmin_B[..., None] * mn_BG.astype(F32)).reshape(*lead, 4, 2)
  shift = 4 * _iota((1,) * len(lead) + (1, 2, 1), len(lead) + 1)
  q_B4232 = ((qs_BQ.reshape(*lead, 4, 1, 32) >> shift) & 0x0F).astype(F32)
  return dl_B42[..., None] * q_B4232 - ml_B42[..., None]


def _iq2_xxs(get, lookup):
  d_B, idx_BG4, aux_BG = _f16(get(0)), get(1).astype(I32), get(2)
  db_BG = d_B[..., None] * (np.float32(0.5) + (aux_BG >> 28).astype(F32)) * np.float32(0.25)
  lead = aux_BG.shape
  s7_BG4 = ((aux_BG[..., None] >> (7 * _iota(lead + (4,), len(lead))).astype(U32))
            & 0x7F).astype(I32)
  code_BG4 = lookup(idx_BG4)  # 8 two-bit codes per grid index
  t_BG48 = _iota(lead + (4, 8), len(lead) + 1)
  c_BG48 = (code_BG4[..., None] >> (2 * t_BG48)) & 3
  g_BG48 = 8 + 17 * (c_BG48 >= 1).astype(I32) + 18 * (c_BG48 >= 2).astype(I32)
  parity = s7_BG4 ^ (s7_BG4 >> 4)
  parity = parity ^ (parity >> 2)
  parity = (parity ^ (parity >> 1)) & 1  # the 8th sign: parity of the 7 stored ones
  neg_BG48 = jnp.where(t_BG48 == 7, parity[..., None], (s7_BG4[..., None] >> t_BG48) & 1)
  v_BG48 = jnp.where(neg_BG48 == 1, -g_BG48, g_BG48).astype(F32)
  return db_BG[..., None, None] * v_BG48


def _mxfp4(get, lookup):
  e_B, qs_BQ = get(0).astype(U32), get(1).astype(I32)
  bits_B = jnp.where(e_B < 2, jnp.uint32(0x00200000) << e_B, (e_B - 1) << 23)
  d_B11 = lax.bitcast_convert_type(bits_B, F32)[..., None, None]
  lead = qs_BQ.shape[:-1]
  code_B216 = (qs_BQ[..., None, :] >> (4 * _iota((1,) * len(lead) + (2, 1), len(lead)))) & 0xF
  m_B216 = code_B216 & 7
  mag_B216 = jnp.where(m_B216 < 2, m_B216,
                       (2 + (m_B216 & 1)) << jnp.maximum((m_B216 >> 1) - 1, 0))
  kv_B216 = jnp.where(code_B216 >= 8, -mag_B216, mag_B216).astype(F32)
  return d_B11 * kv_B216


_TILES = {Q.Q8_0: _q8_0, Q.Q2_K: _q2_k, Q.Q4_K: _q4_k, Q.IQ2_XXS: _iq2_xxs, Q.MXFP4: _mxfp4}


def dequant_tile(qtype, get, lookup, dtype=F32):
  """One tile of a packed weight -> f32 [tn, kc] (GGUF order), rounded through `dtype` (the
  weight's compute dtype) as `Packed.dense` / `matmul.matvec` round it. `lookup(idx)`: int32
  grid indices -> `iq2_codes()[idx]` (IQ2_XXS only)."""
  q = Q(int(qtype))
  if q == Q.F16:
    w_NK = _f16(get(0))
  elif q == Q.BF16:
    w_NK = kernels.bf16_to_f32(get(0))
  else:
    w_NK = _TILES[q](get, lookup)
    w_NK = w_NK.reshape(w_NK.shape[0], -1)
  if jnp.dtype(dtype) != F32:
    w_NK = w_NK.astype(dtype).astype(F32)
  return w_NK


def largest_divisor(n: int, at_most: int, *, pow2: bool = False) -> int:
  """The largest d <= at_most dividing n (a power of two if pow2)."""
  for d in range(min(n, at_most), 0, -1):
    if n % d == 0 and (not pow2 or d & (d - 1) == 0):
      return d
  return 1


# --- the slots of a call and the operands every kernel takes --------------------------------

def slots(e_P, n_experts: int, rows: int):
  """(n int32 [1], uid int32 [rows]): the n distinct valid experts of e_P ascending, then
  the last of them repeated (E - 1 if none), so a padding slot names a tile already read."""
  valid_P = (e_P >= 0) & (e_P < n_experts)
  uid = jnp.unique(jnp.where(valid_P, e_P, n_experts), size=rows, fill_value=n_experts)
  n = jnp.sum((uid < n_experts).astype(I32))
  last = jnp.minimum(uid[jnp.maximum(n - 1, 0)], n_experts - 1)
  uid = jnp.where(jnp.arange(rows) < n, uid, last).astype(I32)
  return n.reshape(1), uid


def prepare(x_PK, w, e_P, plan, backend: str):
  """(tiling, x, e, n, uid) of a kernel call: `plan(w, P)`'s tiling (a one-line ValueError
  naming `backend` where it has none) and `operands` padded to its rows."""
  p = x_PK.shape[0]
  tiling = plan(w, p)
  if tiling is None or w.ndim != 3:
    raise ValueError(f"no {backend} tiling for {w.shape} x {p} rows of qtype {w.qtype}")
  return (tiling,) + operands(x_PK, w, e_P, tiling.rows)


def operands(x_PK, w, e_P, rows: int):
  """(x f32 [rows, K], e int32 [rows], n int32 [1], uid int32 [rows]) for a kernel call:
  x (already q8-rounded by the caller in q8 mode) rounded through the compute dtype as the
  reference rounds it, padded with zero rows whose expert is -1 (they match no slot)."""
  p = x_PK.shape[0]
  x = x_PK.astype(F32)
  if jnp.dtype(w.dtype) != F32:
    x = x.astype(w.dtype).astype(F32)
  x = jnp.pad(x, ((0, rows - p), (0, 0)))
  e = jnp.pad(e_P.astype(I32), (0, rows - p), constant_values=-1)
  n, uid = slots(e[:p], w.shape[0], rows)
  return x, e, n, uid
