"""GGML block types -> float32 in jax.numpy, the bit-for-bit twins of `gguf.quants.dequantize`.

`dequant_rows(rows_u8, qtype, n)` takes rows of packed GGUF bytes (any leading axes) and
dispatches on the static `qtype` to one function per block type in `DEQUANT_BLOCKS`. Each
follows gguf-py's `dequantize_blocks` (gguf/quants.py): the same element order, the same f32
operations in the same order, so outputs are bit-identical (compare uint32 views), NaN
positions included. Every product is exact in f32 (only the K-quants' final `- m` rounds, once,
as in gguf-py), so XLA's FMA contraction or fusion cannot change a result. Pure jnp / lax:
works under jit on CPU, GPU and TPU.

Port rules (docs/design.md §8; packed-quant research notes §1, §7): blocks are only
2-byte aligned inside a row, so u16/u32 fields are read from bytes with explicit shifts; f16
scales are `bitcast_convert_type(u16 -> float16)` then f32 (exact, subnormals too); signed
bytes are `bitcast_convert_type(u8 -> int8)`, never `astype`.

One exception to bit-exactness, MXFP4 with scale byte e in {0, 1}: its scale `d` is an f32
subnormal (2**-128 or 2**-127). Backends that flush f32 subnormals to zero (XLA:CPU, observed
with jax 0.10.2, eager and jit; likely TPUs) read `d` as 0, so the whole block comes back as
zeros carrying gguf-py's sign bit (-0.0 where kv < 0), even where gguf-py's product is a
normal number (12 * 2**-127 ~ 3.5e-38). Every e >= 2 is exact. Real MXFP4 scales sit far
above that range; tests/quant/kernels_test.py pins the CPU behaviour.

Shape alphabet (names carry their shape as a suffix; the leading `...` axes are implicit):

  B blocks per row   S bytes per block (type_size)   K elements per block
  G scale groups     L elements per group            Q packed quant bytes per block
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q
from jax import lax

_F32 = jnp.float32


# --- byte fields ------------------------------------------------------------------------------

def _u16(b_2):
  """uint8 [..., 2] (little-endian) -> uint16 [...]."""
  return b_2[..., 0].astype(jnp.uint16) | (b_2[..., 1].astype(jnp.uint16) << 8)


def _u32(b_4):
  """uint8 [..., 4] (little-endian) -> uint32 [...]."""
  u = [b_4[..., i].astype(jnp.uint32) for i in range(4)]
  return u[0] | (u[1] << 8) | (u[2] << 16) | (u[3] << 24)


def _f16(b_2):
  """uint8 [..., 2] holding an IEEE half -> float32 [...] (exact, subnormals/inf/NaN too)."""
  return lax.bitcast_convert_type(_u16(b_2), jnp.float16).astype(_F32)


def _i8(b):
  """uint8 [...] -> int8 [...] by reinterpreting the bits (not a value conversion)."""
  return lax.bitcast_convert_type(b, jnp.int8)


# --- tables (numpy, built once, jnp constants inside the functions) ---------------------------

@functools.cache
def _iq2_xxs_grid() -> np.ndarray:
  """float32 [256, 8]: `iq2xxs_grid` as gguf-py decodes it (`IQ2_XXS.init_grid`), 8/25/43."""
  gguf.quants.IQ2_XXS.init_grid()
  grid = np.array(gguf.quants.IQ2_XXS.grid, dtype=np.float32).reshape(256, 8)
  assert set(np.unique(grid).tolist()) <= {8.0, 25.0, 43.0}, "unexpected IQ2_XXS grid"
  grid.flags.writeable = False
  return grid


# Doubled e2m1 values, indexed by a 4-bit code (int8 in gguf-py, exactly representable in f32).
_MXFP4_KV = np.array(gguf.quants.MXFP4.kvalues, dtype=np.int8).astype(np.float32)

_Q2_K_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
_NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8).reshape(2, 1)
_IQ2_SIGN_SHIFTS = np.array([0, 7, 14, 21], dtype=np.uint32)
_BIT_SHIFTS = np.arange(8, dtype=np.uint32)


# --- one function per block type: blocks uint8 [..., B, S] -> float32 [..., B, K] -------------

def dequant_q8_0(blocks_BS):
  """Q8_0 (34 B / 32): `d:f16 @0`, `qs:int8[32] @2`; `y = qs * d`."""
  d_B1 = _f16(blocks_BS[..., 0:2])[..., None]
  x_BK = _i8(blocks_BS[..., 2:34]).astype(_F32)
  return x_BK * d_B1


def dequant_q2_k(blocks_BS):
  """Q2_K (84 B / 256): `scales:u8[16] @0`, `qs:u8[64] @16`, `d:f16 @80`, `dmin:f16 @82`.

  16 groups of 16: `y = (d * (sc & 15)) * q - dmin * (sc >> 4)`, q the 2-bit fields in
  gguf-py's order (`qs.reshape(2, 1, 32) >> [0, 2, 4, 6]`, then 16 x 16).
  """
  lead = blocks_BS.shape[:-1]
  sc_BG = blocks_BS[..., 0:16]
  qs_BQ = blocks_BS[..., 16:80]
  d_B1 = _f16(blocks_BS[..., 80:82])[..., None]
  dmin_B1 = _f16(blocks_BS[..., 82:84])[..., None]
  dl_BG1 = (d_B1 * (sc_BG & 0xF).astype(_F32))[..., None]
  ml_BG1 = (dmin_B1 * (sc_BG >> 4).astype(_F32))[..., None]
  q_B2432 = (qs_BQ.reshape(*lead, 2, 1, 32) >> _Q2_K_SHIFTS) & 3
  q_BGL = q_B2432.reshape(*lead, 16, 16).astype(_F32)
  return (dl_BG1 * q_BGL - ml_BG1).reshape(*lead, 256)


def dequant_q4_k(blocks_BS):
  """Q4_K (144 B / 256): `d:f16 @0`, `dmin:f16 @2`, `scales:u8[12] @4`, `qs:u8[128] @16`.

  8 groups of 32 with 6-bit scales/mins (gguf-py `Q4_K.get_scale_min`):
  `y = (d * sc) * q - dmin * m`; each 64-element chunk is 32 low nibbles, then 32 high.
  """
  lead = blocks_BS.shape[:-1]
  d_B1 = _f16(blocks_BS[..., 0:2])[..., None]
  dmin_B1 = _f16(blocks_BS[..., 2:4])[..., None]
  s_B34 = blocks_BS[..., 4:16].reshape(*lead, 3, 4)
  sd_B4, sm_B4, smd_B4 = s_B34[..., 0, :], s_B34[..., 1, :], s_B34[..., 2, :]
  sc_BG = jnp.concatenate([sd_B4 & 0x3F, (smd_B4 & 0x0F) | ((sd_B4 >> 2) & 0x30)], axis=-1)
  mn_BG = jnp.concatenate([sm_B4 & 0x3F, (smd_B4 >> 4) | ((sm_B4 >> 2) & 0x30)], axis=-1)
  dl_BG1 = (d_B1 * sc_BG.astype(_F32))[..., None]
  ml_BG1 = (dmin_B1 * mn_BG.astype(_F32))[..., None]
  q_B4232 = (blocks_BS[..., 16:144].reshape(*lead, 4, 1, 32) >> _NIBBLE_SHIFTS) & 0x0F
  q_BGL = q_B4232.reshape(*lead, 8, 32).astype(_F32)
  return (dl_BG1 * q_BGL - ml_BG1).reshape(*lead, 256)


def dequant_iq2_xxs(blocks_BS):
  """IQ2_XXS (66 B / 256): `d:f16 @0`, then 8 x (u32 `aux0`, u32 `aux1`) @2.

  Group g of 32 = 4 x 8: `aux0` bytes are 4 grid indices; `aux1` holds four 7-bit sign fields
  (bits 0/7/14/21; the 8th sign is their parity) and a 4-bit scale `s = aux1 >> 28`.
  `y = (d * (0.5 + s) * 0.25) * grid[idx] * sign`.
  """
  lead = blocks_BS.shape[:-1]
  d_B1 = _f16(blocks_BS[..., 0:2])[..., None]
  qs_BG24 = blocks_BS[..., 2:66].reshape(*lead, 8, 2, 4)
  idx_BG4 = qs_BG24[..., 0, :]  # aux0, little-endian: byte i is grid index i
  aux1_BG = _u32(qs_BG24[..., 1, :])
  db_BG = d_B1 * (np.float32(0.5) + (aux1_BG >> 28).astype(_F32)) * np.float32(0.25)
  s7_BG4 = (aux1_BG[..., None] >> _IQ2_SIGN_SHIFTS) & 0x7F
  s8_BG4 = s7_BG4 | ((lax.population_count(s7_BG4) & 1) << 7)  # == ksigns_iq2xs[s7]
  bit_BG48 = (s8_BG4[..., None] >> _BIT_SHIFTS) & 1
  sign_BG48 = jnp.where(bit_BG48 == 0, np.float32(1), np.float32(-1))
  grid_BG48 = jnp.asarray(_iq2_xxs_grid())[idx_BG4]
  y_BG48 = db_BG[..., None, None] * grid_BG48 * sign_BG48
  return y_BG48.reshape(*lead, 256)


def dequant_mxfp4(blocks_BS):
  """MXFP4 (17 B / 32): `e:u8 (E8M0) @0`, `qs:u8[16] @1`; `y[j] = kv[qs[j] & 15] * d`,
  `y[16 + j] = kv[qs[j] >> 4] * d`, with `d` the half of 2**(e - 127) (gguf-py
  `e8m0_to_fp32_half`). e in {0, 1} makes `d` an f32 subnormal: see the module docstring.
  """
  lead = blocks_BS.shape[:-1]
  e_B = blocks_BS[..., 0].astype(jnp.uint32)
  bits_B = jnp.where(e_B < 2, jnp.uint32(0x00200000) << e_B, (e_B - 1) << 23)
  d_B1 = lax.bitcast_convert_type(bits_B, _F32)[..., None]
  code_B216 = (blocks_BS[..., 1:17].reshape(*lead, 1, 16) >> _NIBBLE_SHIFTS) & 0x0F
  kv_BK = jnp.asarray(_MXFP4_KV)[code_B216].reshape(*lead, 32)
  return d_B1 * kv_BK


DEQUANT_BLOCKS: dict[Q, Callable] = {
    Q.Q8_0: dequant_q8_0,
    Q.Q2_K: dequant_q2_k,
    Q.Q4_K: dequant_q4_k,
    Q.IQ2_XXS: dequant_iq2_xxs,
    Q.MXFP4: dequant_mxfp4,
}
BLOCK_TYPES = frozenset(DEQUANT_BLOCKS)


def _block_type(qtype) -> Q:
  """A supported block type from a `GGMLQuantizationType` or its int id, else ValueError."""
  try:
    q = Q(int(qtype))
  except (TypeError, ValueError):
    raise ValueError(f"unknown GGML type {qtype!r}") from None
  if q not in BLOCK_TYPES:
    names = ", ".join(sorted(t.name for t in BLOCK_TYPES))
    raise ValueError(f"GGML type {q.name} ({int(q)}) has no jnp dequant kernel "
                     f"(block types: {names})")
  return q


def row_bytes(qtype, n: int) -> int:
  """Bytes of one packed row of `n` elements: `n // block * type_size` (ValueError unless `n`
  is a positive multiple of the block size)."""
  q = _block_type(qtype)
  block, type_size = gguf.GGML_QUANT_SIZES[q]
  n = int(n)
  if n <= 0 or n % block:
    raise ValueError(f"{q.name} rows hold a positive multiple of {block} elements, got n={n}")
  return n // block * type_size


def dequant_rows(rows_u8, qtype, n: int):
  """Packed GGUF rows -> float32 [..., n], bit-identical to `gguf.quants.dequantize`.

  `rows_u8`: uint8 [..., row_bytes(qtype, n)], any leading axes (experts, rows); `qtype` and
  `n` are static (a `GGMLQuantizationType` or int id in `BLOCK_TYPES`). ValueError for an
  unsupported type, a bad `n`, a non-uint8 array or a trailing axis of the wrong length.
  """
  q = _block_type(qtype)
  nbytes = row_bytes(q, n)
  rows_u8 = jnp.asarray(rows_u8)
  if rows_u8.dtype != jnp.uint8:
    raise ValueError(f"{q.name} rows must be uint8 bytes, got {rows_u8.dtype}")
  if rows_u8.ndim < 1 or rows_u8.shape[-1] != nbytes:
    raise ValueError(f"{q.name} rows of n={n} elements hold {nbytes} bytes, got an array of "
                     f"shape {tuple(rows_u8.shape)}")
  block, type_size = gguf.GGML_QUANT_SIZES[q]
  lead = rows_u8.shape[:-1]
  blocks_BS = rows_u8.reshape(*lead, int(n) // block, type_size)
  # The kernels broadcast shift vectors numpy-style, whatever the caller's rank-promotion mode.
  with jax.numpy_rank_promotion("allow"):
    return DEQUANT_BLOCKS[q](blocks_BS).reshape(*lead, int(n))
