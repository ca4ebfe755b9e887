"""Optional QAT-faithful rounding (ds4-architecture.md §2.7), used when `cfg.qat` is set.

- FP8-E4M3 round trip of cached KV rows: the first H-R (nope) channels, blocks of 64, a
  power-of-two scale `2^ceil(log2(max(amax, 1e-4)/448))`.
- Indexer: Walsh-Hadamard rotation (Sylvester order, /sqrt(n)) then an FP4-E2M1 round trip in
  blocks of 32, scale `2^ceil(log2(max(amax, 6*2^-126)/6))`.

The JAX versions use XLA's float8/float4 casts (round to nearest, ties to even); the numpy
`*_ref` functions spell the rounding out by hand and serve as the test oracle.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

FP8_MAX = 448.0
FP4_MAX = 6.0


def _ceil_log2_pow2(y, xp):
  """2^ceil(log2(y)) exactly, for y > 0 (frexp avoids log2 rounding)."""
  m, e = xp.frexp(y)
  e = e - (m == 0.5).astype(e.dtype)
  return xp.ldexp(xp.ones_like(y), e)


def _blocked(x, block: int):
  return x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))


def fp8_kv_roundtrip(x_TH, rope_dim: int, block: int = 64):
  """FP8-E4M3 round trip of the nope channels of KV rows x: [..., H]."""
  x = x_TH.astype(jnp.float32)
  n = x.shape[-1] - rope_dim
  blk = _blocked(x[..., :n], block)
  amax = jnp.maximum(jnp.max(jnp.abs(blk), axis=-1, keepdims=True), 1e-4)
  scale = _ceil_log2_pow2(amax / FP8_MAX, jnp)
  q = jnp.clip(blk / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)
  return jnp.concatenate([(q * scale).reshape(x[..., :n].shape), x[..., n:]], axis=-1)


@functools.lru_cache(maxsize=8)
def hadamard(n: int) -> np.ndarray:
  """Sylvester-ordered Walsh-Hadamard matrix divided by sqrt(n), float32 [n, n]."""
  if n & (n - 1):
    raise ValueError(f"Hadamard size must be a power of two, got {n}")
  h = np.ones((1, 1), np.float64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / np.sqrt(n)).astype(np.float32)


def wht(x, xp=jnp):
  """Sylvester-ordered Walsh-Hadamard transform over the last axis, divided by sqrt(n).

  Butterflies (log2 n stages of a+b, a-b) in f32, so a constant row maps exactly to one
  non-zero, as in ds4; a matmul would leave rounding noise that FP4 then amplifies.
  """
  n = x.shape[-1]
  if n & (n - 1):
    raise ValueError(f"Hadamard size must be a power of two, got {n}")
  lead = x.shape[:-1]
  h = 1
  while h < n:
    y = x.reshape(lead + (n // (2 * h), 2, h))
    a, b = y[..., 0, :], y[..., 1, :]
    x = xp.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
    h *= 2
  return x * xp.float32(1.0 / np.sqrt(n))


def fp4_indexer_roundtrip(x_TH, block: int = 32):
  """Hadamard rotation then FP4-E2M1 round trip of indexer vectors x: [..., dI]."""
  x = wht(x_TH.astype(jnp.float32))
  blk = _blocked(x, block)
  amax = jnp.maximum(jnp.max(jnp.abs(blk), axis=-1, keepdims=True), FP4_MAX * 2.0 ** -126)
  scale = _ceil_log2_pow2(amax / FP4_MAX, jnp)
  q = jnp.clip(blk / scale, -FP4_MAX, FP4_MAX).astype(jnp.float4_e2m1fn).astype(jnp.float32)
  return (q * scale).reshape(x.shape)


# --------------------------------------------------------------------- numpy references
def round_e4m3_ref(v: np.ndarray) -> np.ndarray:
  """Nearest E4M3FN value (ties to even mantissa) of v, |v| <= 448, float64."""
  v = np.asarray(v, np.float64)
  a = np.abs(v)
  e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
  e = np.maximum(e, -6.0)  # below 2^-6 the grid is the subnormal spacing 2^-9
  step = 2.0 ** (e - 3)
  q = np.round(a / step) * step  # np.round is half-to-even; mantissa parity = grid parity
  return np.sign(v) * np.minimum(q, FP8_MAX)


def round_e2m1_ref(v: np.ndarray) -> np.ndarray:
  """Nearest E2M1 value of v (grid 0,.5,1,1.5,2,3,4,6; ties to the even grid index)."""
  v = np.asarray(v, np.float64)
  a = np.abs(v)
  q = np.where(a < 2, np.round(a * 2) / 2, np.where(a < 4, np.round(a), np.where(a <= 5, 4.0, 6.0)))
  return np.sign(v) * q


def fp8_kv_roundtrip_ref(x: np.ndarray, rope_dim: int, block: int = 64) -> np.ndarray:
  x = np.asarray(x, np.float32).astype(np.float64)
  n = x.shape[-1] - rope_dim
  blk = _blocked(x[..., :n], block)
  amax = np.maximum(np.abs(blk).max(-1, keepdims=True), 1e-4)
  scale = _ceil_log2_pow2(np.float32(amax / FP8_MAX).astype(np.float64), np)
  q = round_e4m3_ref(np.clip(blk / scale, -FP8_MAX, FP8_MAX)) * scale
  return np.concatenate([q.reshape(x[..., :n].shape), x[..., n:]], -1).astype(np.float32)


def fp4_indexer_roundtrip_ref(x: np.ndarray, block: int = 32) -> np.ndarray:
  x = wht(np.asarray(x, np.float32), np).astype(np.float64)
  blk = _blocked(x, block)
  amax = np.maximum(np.abs(blk).max(-1, keepdims=True), FP4_MAX * 2.0 ** -126)
  scale = _ceil_log2_pow2(np.float32(amax / FP4_MAX).astype(np.float64), np)
  q = round_e2m1_ref(np.clip(blk / scale, -FP4_MAX, FP4_MAX)) * scale
  return q.reshape(x.shape).astype(np.float32)
