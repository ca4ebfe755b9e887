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
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q
from jax import lax

_F32 = jnp.float32


# --- planes: the block fields of a row, de-interleaved into typed arrays ---------------------
#
# A packed tensor lives on the device as the planes of its blocks: the same bytes as the GGUF
# rows, each field of every block gathered into one typed array (`[..., B]` scales,
# `[..., B, Q]` quants). XLA then reads contiguous int8 / f16 / u32 arrays and fuses a
# dequantise-and-reduce into one loop; interleaved 34- or 66-byte blocks do not vectorise
# (Q8_0 2048 x 4096 matvec on this CPU: 1.2 ms from planes, 4-17 ms from blocks).

# Per type: (field name, byte offset, byte length, numpy dtype, trailing shape of the field).
PLANES: dict[Q, tuple[tuple[str, int, int, Any, tuple[int, ...]], ...]] = {
    Q.Q8_0: (("d", 0, 2, np.float16, ()), ("qs", 2, 32, np.int8, (32,))),
    Q.Q2_K: (("scales", 0, 16, np.uint8, (16,)), ("qs", 16, 64, np.uint8, (64,)),
             ("d", 80, 2, np.float16, ()), ("dmin", 82, 2, np.float16, ())),
    Q.Q4_K: (("d", 0, 2, np.float16, ()), ("dmin", 2, 2, np.float16, ()),
             ("scales", 4, 12, np.uint8, (12,)), ("qs", 16, 128, np.uint8, (128,))),
    # 8 groups of (aux0 = 4 grid-index bytes, aux1 = u32 signs and scale) after d.
    Q.IQ2_XXS: (("d", 0, 2, np.float16, ()), ("idx", 2, 64, np.uint8, (8, 4)),
                ("aux", 2, 64, np.uint32, (8,))),
    Q.MXFP4: (("e", 0, 1, np.uint8, ()), ("qs", 1, 16, np.uint8, (16,))),
}


def _field(blocks_BS, q: Q, off: int, size: int, dtype, trail: tuple[int, ...]):
  """One field of every block: uint8 blocks [..., B, S] -> dtype [..., B, *trail] (numpy or
  jnp input; a reinterpretation of the bytes, little-endian)."""
  lead = blocks_BS.shape[:-1]
  raw = blocks_BS[..., off:off + size]
  if q == Q.IQ2_XXS and size == 64:  # the interleaved (aux0, aux1) pairs
    raw = raw.reshape(*lead, 8, 2, 4)[..., 0 if dtype == np.uint8 else 1, :]
  item = np.dtype(dtype).itemsize
  if isinstance(blocks_BS, np.ndarray):
    out = np.ascontiguousarray(raw).view(dtype)
  elif item == 1:
    out = lax.bitcast_convert_type(raw, jnp.dtype(dtype))
  else:
    out = lax.bitcast_convert_type(raw.reshape(*raw.shape[:-1], raw.shape[-1] // item, item),
                                   jnp.dtype(dtype))
  return out.reshape(*lead, *trail)


def split_planes(rows_u8, qtype, n: int) -> tuple:
  """Packed GGUF rows (uint8 [..., row_bytes], numpy or jnp) -> the tuple of planes of
  `PLANES[qtype]`, each [..., B, *trail] (B = n / block). numpy in, numpy out: the loader
  splits on the host, once."""
  q = _block_type(qtype)
  block, type_size = gguf.GGML_QUANT_SIZES[q]
  lead = rows_u8.shape[:-1]
  blocks_BS = rows_u8.reshape(*lead, int(n) // block, type_size)
  return tuple(_field(blocks_BS, q, off, size, dt, trail)
               for _, off, size, dt, trail in PLANES[q])


def join_planes(planes, qtype) -> np.ndarray:
  """The inverse of `split_planes` on the host: numpy planes -> uint8 GGUF rows
  [..., row_bytes]."""
  q = _block_type(qtype)
  _, type_size = gguf.GGML_QUANT_SIZES[q]
  scale = next(i for i, f in enumerate(PLANES[q]) if f[4] == ())
  lead_b = planes[scale].shape  # [..., B]
  blocks = np.zeros(lead_b + (type_size,), np.uint8)
  for (name, off, size, _, _), p in zip(PLANES[q], planes):
    raw = np.ascontiguousarray(p).view(np.uint8).reshape(lead_b + (-1,))
    if q == Q.IQ2_XXS and size == 64:  # interleave (aux0, aux1) pairs
      pairs = blocks[..., off:off + size].reshape(lead_b + (8, 2, 4))
      pairs[..., 0 if name == "idx" else 1, :] = raw.reshape(lead_b + (8, 4))
      blocks[..., off:off + size] = pairs.reshape(lead_b + (64,))
    else:
      blocks[..., off:off + size] = raw
  return blocks.reshape(lead_b[:-1] + (-1,))


def plane_specs(qtype, shape) -> tuple[tuple[tuple[int, ...], np.dtype], ...]:
  """((shape, dtype), ...) of the planes of a tensor of numpy `shape` stored as `qtype`."""
  q = _block_type(qtype)
  block, _ = gguf.GGML_QUANT_SIZES[q]
  lead, nb = tuple(shape[:-1]), int(shape[-1]) // block
  return tuple((lead + (nb,) + trail, np.dtype(dt)) for _, _, _, dt, trail in PLANES[q])


def f16_to_f32(h):
  """float16 -> float32 by integer bit operations: exact (subnormals, inf, NaN payloads too)
  and vectorised; XLA:CPU's own f16 convert runs ~30x slower than a f32 read (a 256 x 512
  F16 matvec: 0.45 ms vs 0.02 ms from f32)."""
  em = lax.bitcast_convert_type(h, jnp.uint16).astype(jnp.uint32)
  sign = (em & 0x8000) << 16
  em = em & 0x7FFF
  normal = lax.bitcast_convert_type(sign | ((em << 13) + (112 << 23)), _F32)
  special = lax.bitcast_convert_type(sign | (em << 13) | 0x7F800000, _F32)
  # Subnormal halves (em < 0x400) are em * 2**-24: exact, and a normal f32 (no FTZ issue).
  tiny = em.astype(_F32) * np.float32(2.0 ** -24)
  tiny = jnp.where(sign != 0, -tiny, tiny)
  return jnp.where(em < 0x400, tiny, jnp.where(em >= 0x7C00, special, normal))


def bf16_to_f32(h):
  """bfloat16 -> float32: the 16 bits are the top of the f32 (exact)."""
  return lax.bitcast_convert_type(
      lax.bitcast_convert_type(h, jnp.uint16).astype(jnp.uint32) << 16, _F32)


def _f16(h):
  """float16 plane -> float32 (exact, subnormals/inf/NaN too)."""
  return f16_to_f32(h)


def _i8(b):
  """int8 plane -> float32 values."""
  return b.astype(_F32)


# --- tables (numpy, built once, jnp constants inside the functions) ---------------------------

@functools.cache
def _iq2_xxs_grid() -> np.ndarray:
  """float32 [256, 8]: `iq2xxs_grid` as gguf-py decodes it (`IQ2_XXS.init_grid`), 8/25/43."""
  gguf.quants.IQ2_XXS.init_grid()
  grid = np.array(gguf.quants.IQ2_XXS.grid, dtype=np.float32).reshape(256, 8)
  assert set(np.unique(grid).tolist()) <= {8.0, 25.0, 43.0}, "unexpected IQ2_XXS grid"
  grid.flags.writeable = False
  return grid


@functools.cache
def _iq2_xxs_signed_grid() -> np.ndarray:
  """int8 [256 * 128, 8]: row (i << 7) | s7 is grid row i with element j negated where bit j
  of `ksigns_iq2xs[s7] = s7 | parity(s7) << 7` is set (values +-8, +-25, +-43)."""
  s7 = np.arange(128)
  parity = np.unpackbits(s7.astype(np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int64) & 1
  s8 = s7 | (parity << 7)
  sign_S8 = np.where((s8[:, None] >> np.arange(8)) & 1, -1, 1)
  table = _iq2_xxs_grid()[:, None, :] * sign_S8[None, :, :]
  table = table.astype(np.int8).reshape(256 * 128, 8)
  table.flags.writeable = False
  return table


def _per_group(*xs):
  """Materialises per-block / per-group values before the per-element expansion: without the
  barrier XLA fuses them into the element loop and recomputes them for every element (Q2_K
  2048 x 4096 matvec: 16 ms fused vs a few ms with the scales computed once)."""
  return lax.optimization_barrier(xs)


_Q2_K_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1, 1)
_NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8).reshape(2, 1)
_IQ2_SIGN_SHIFTS = np.array([0, 7, 14, 21], dtype=np.uint32)


# --- one function per block type: planes -> float32 [..., B, *BLOCK_SHAPE[q]] ----------------
#
# Each returns a block in its natural shape, whose row-major order is the GGUF element order
# (no reshape of computed values: XLA:CPU then fuses a dequantise-and-reduce into one
# vectorised loop). `BLOCK_SHAPE` gives it; a caller reshapes x to match, or the result.

def dequant_q8_0(d_B, qs_BK):
  """Q8_0 (34 B / 32): `d:f16 @0`, `qs:int8[32] @2`; `y = qs * d`. -> [..., B, 32]"""
  (d_B,) = _per_group(_f16(d_B))
  return _i8(qs_BK) * d_B[..., None]


def dequant_q2_k(sc_BG, qs_BQ, d_B, dmin_B):
  """Q2_K (84 B / 256): `scales:u8[16] @0`, `qs:u8[64] @16`, `d:f16 @80`, `dmin:f16 @82`.

  16 groups of 16: `y = (d * (sc & 15)) * q - dmin * (sc >> 4)`. Element (h, s, j, i) =
  128h + 32s + 16j + i is bits 2s of byte 32h + 16j + i, in group 8h + 2s + j (gguf-py:
  `qs.reshape(2, 1, 32) >> [0, 2, 4, 6]`). -> [..., B, 2, 4, 2, 16]
  """
  lead = qs_BQ.shape[:-1]
  sc_B242 = sc_BG.reshape(*lead, 2, 4, 2)
  dl_B242, ml_B242 = _per_group(_f16(d_B)[..., None, None, None] * (sc_B242 & 0xF).astype(_F32),
                                _f16(dmin_B)[..., None, None, None] * (sc_B242 >> 4).astype(_F32))
  q_B24216 = ((qs_BQ.reshape(*lead, 2, 1, 2, 16) >> _Q2_K_SHIFTS) & 3).astype(_F32)
  return dl_B242[..., None] * q_B24216 - ml_B242[..., None]


def dequant_q4_k(d_B, dmin_B, s_B12, qs_BQ):
  """Q4_K (144 B / 256): `d:f16 @0`, `dmin:f16 @2`, `scales:u8[12] @4`, `qs:u8[128] @16`.

  8 groups of 32 with 6-bit scales/mins (gguf-py `Q4_K.get_scale_min`):
  `y = (d * sc) * q - dmin * m`. Element (c, h, l) = 64c + 32h + l is nibble h of byte
  32c + l, in group 2c + h. -> [..., B, 4, 2, 32]
  """
  lead = qs_BQ.shape[:-1]
  s_B34 = s_B12.reshape(*lead, 3, 4)
  sd_B4, sm_B4, smd_B4 = s_B34[..., 0, :], s_B34[..., 1, :], s_B34[..., 2, :]
  sc_BG = jnp.concatenate([sd_B4 & 0x3F, (smd_B4 & 0x0F) | ((sd_B4 >> 2) & 0x30)], axis=-1)
  mn_BG = jnp.concatenate([sm_B4 & 0x3F, (smd_B4 >> 4) | ((sm_B4 >> 2) & 0x30)], axis=-1)
  dl_B42, ml_B42 = _per_group((_f16(d_B)[..., None] * sc_BG.astype(_F32)).reshape(*lead, 4, 2),
                              (_f16(dmin_B)[..., None] * mn_BG.astype(_F32)).reshape(*lead, 4, 2))
  q_B4232 = ((qs_BQ.reshape(*lead, 4, 1, 32) >> _NIBBLE_SHIFTS) & 0x0F).astype(_F32)
  return dl_B42[..., None] * q_B4232 - ml_B42[..., None]


def dequant_iq2_xxs(d_B, idx_BG4, aux_BG):
  """IQ2_XXS (66 B / 256): `d:f16 @0`, then 8 x (u32 `aux0`, u32 `aux1`) @2.

  Group g of 32 = 4 x 8: `aux0` bytes are 4 grid indices; `aux1` holds four 7-bit sign fields
  (bits 0/7/14/21; the 8th sign is their parity) and a 4-bit scale `s = aux1 >> 28`.
  `y = (d * (0.5 + s) * 0.25) * grid[idx] * sign`. -> [..., B, 8, 4, 8]
  """
  db_BG = _f16(d_B)[..., None] * (np.float32(0.5) + (aux_BG >> 28).astype(_F32)) \
      * np.float32(0.25)
  s7_BG4 = (aux_BG[..., None] >> _IQ2_SIGN_SHIFTS) & 0x7F
  # One gather of 8 signed grid values (int8: +-8, +-25, +-43) per (grid index, 7 sign bits):
  # ds4's `iq2xxs_signed_grid`. grid * sign is exact, so db * (grid * sign) is gguf-py's
  # (db * grid) * sign bit for bit. 4x faster on XLA:CPU than expanding bits per element.
  key_BG4 = (idx_BG4.astype(jnp.int32) << 7) | s7_BG4.astype(jnp.int32)
  v_BG48 = jnp.take(jnp.asarray(_iq2_xxs_signed_grid()), key_BG4, axis=0)
  db_BG, v_BG48 = _per_group(db_BG, v_BG48)
  return db_BG[..., None, None] * v_BG48.astype(_F32)


def dequant_mxfp4(e_B, qs_BQ):
  """MXFP4 (17 B / 32): `e:u8 (E8M0) @0`, `qs:u8[16] @1`; `y[j] = kv[qs[j] & 15] * d`,
  `y[16 + j] = kv[qs[j] >> 4] * d`, with `d` the half of 2**(e - 127) (gguf-py
  `e8m0_to_fp32_half`). e in {0, 1} makes `d` an f32 subnormal: see the module docstring.
  -> [..., B, 2, 16]
  """
  lead = qs_BQ.shape[:-1]
  e_B = e_B.astype(jnp.uint32)
  bits_B = jnp.where(e_B < 2, jnp.uint32(0x00200000) << e_B, (e_B - 1) << 23)
  d_B11 = lax.bitcast_convert_type(bits_B, _F32)[..., None, None]
  (d_B11,) = _per_group(d_B11)
  code_B216 = ((qs_BQ.reshape(*lead, 1, 16) >> _NIBBLE_SHIFTS) & 0x0F).astype(jnp.int32)
  # kv[code] without a gather: |kv| = m for m < 2, else (2 + (m & 1)) << ((m >> 1) - 1).
  m_B216 = code_B216 & 7
  mag_B216 = jnp.where(m_B216 < 2, m_B216, (2 + (m_B216 & 1)) << jnp.maximum((m_B216 >> 1) - 1, 0))
  kv_B216 = jnp.where(code_B216 >= 8, -mag_B216, mag_B216).astype(_F32)  # int: -0 is +0
  return d_B11 * kv_B216


BLOCK_SHAPE: dict[Q, tuple[int, ...]] = {
    Q.Q8_0: (32,), Q.Q2_K: (2, 4, 2, 16), Q.Q4_K: (4, 2, 32), Q.IQ2_XXS: (8, 4, 8),
    Q.MXFP4: (2, 16),
}


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
  return dequant_planes(split_planes(rows_u8, q, n), q, n)


def dequant_planes(planes, qtype, n: int):
  """The planes of `split_planes` (jnp arrays, leading axes `...`) -> float32 [..., n]."""
  q = _block_type(qtype)
  scale = next(i for i, f in enumerate(PLANES[q]) if f[4] == ())  # a [..., B] plane
  lead = planes[scale].shape[:-1]
  # The kernels broadcast shift vectors numpy-style, whatever the caller's rank-promotion mode.
  return dequant_blocks(planes, q).reshape(*lead, int(n))


def dequant_blocks(planes, qtype):
  """The planes of `split_planes` -> float32 [..., B, *BLOCK_SHAPE[qtype]] (GGUF element order
  in row-major order of the block axes: reshaping to [..., B * block] gives the row)."""
  q = _block_type(qtype)
  # The kernels broadcast shift vectors numpy-style, whatever the caller's rank-promotion mode.
  with jax.numpy_rank_promotion("allow"):
    return DEQUANT_BLOCKS[q](*planes)
