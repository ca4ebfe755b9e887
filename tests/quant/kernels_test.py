"""quant.kernels: jnp dequant per GGML block type == gguf.quants.dequantize, bit for bit.

Fixtures are random bytes (seeded) with the scale fields overwritten per mode: sane f16 scales,
zero scales (+0 and -0), extreme f16 patterns (+-65504, +-2**-24, the largest subnormal, -0,
+-inf, NaNs), or left fully random. Values are compared as uint32 views; NaN positions must
match (NaN payloads are not compared).
"""

import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from ds4jax.quant import kernels

TYPES = (Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.IQ2_XXS, Q.MXFP4)
MODES = ("sane", "zero", "extreme", "random")
F16_SCALE_OFFSETS = {Q.Q8_0: (0,), Q.Q2_K: (80, 82), Q.Q4_K: (0, 2), Q.IQ2_XXS: (0,)}
EXTREME_F16 = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x0400, 0x8000, 0x7C00, 0xFC00,
                        0x7E00, 0x7C01, 0xFFFF], dtype=np.uint16)
MXFP4_E = {"sane": np.arange(110, 141), "zero": np.array([2, 3]),
           "extreme": np.array([2, 3, 126, 127, 128, 253, 254, 255])}
LEAD = (3, 5)
SEED = {m: i for i, m in enumerate(MODES)}

_jit_dequant = jax.jit(kernels.dequant_rows, static_argnums=(1, 2))


def _n(q: Q) -> int:
  """Elements per test row: 4 blocks."""
  return 4 * gguf.GGML_QUANT_SIZES[q][0]


def _rows(q: Q, mode: str, lead=LEAD) -> np.ndarray:
  """uint8 [*lead, row_bytes]: random blocks with the scale fields set per `mode`."""
  rng = np.random.default_rng([int(q), SEED[mode]])
  block, type_size = gguf.GGML_QUANT_SIZES[q]
  nb = _n(q) // block
  blocks = rng.integers(0, 256, (*lead, nb, type_size), dtype=np.uint8)
  if mode != "random":
    if q == Q.MXFP4:
      blocks[..., 0] = rng.choice(MXFP4_E[mode], blocks.shape[:-1])
    for off in F16_SCALE_OFFSETS.get(q, ()):
      shape = blocks.shape[:-1]
      if mode == "sane":
        bits = (rng.standard_normal(shape) * 0.05).astype(np.float16).view(np.uint16)
      elif mode == "zero":
        bits = rng.choice(np.array([0x0000, 0x8000], np.uint16), shape)
      else:  # every extreme pattern occurs, in random places
        bits = rng.permutation(np.resize(EXTREME_F16, int(np.prod(shape)))).reshape(shape)
      blocks[..., off:off + 2] = bits.astype("<u2")[..., None].view(np.uint8)
  return blocks.reshape(*lead, nb * type_size)


@functools.cache
def _flushes_f32_subnormals() -> bool:
  """Whether the default backend flushes f32 subnormal operands/results to zero."""
  f = jax.jit(lambda x, y: x * y)
  return float(f(np.float32(2.0**-127), np.float32(12.0))) == 0.0


def _reference(rows: np.ndarray, q: Q) -> np.ndarray:
  """gguf-py's dequant, with the stated MXFP4 e < 2 exception applied on flushing backends."""
  with np.errstate(all="ignore"):
    ref = gguf.quants.dequantize(rows, q)
  if q == Q.MXFP4 and _flushes_f32_subnormals():
    e = rows.reshape(*rows.shape[:-1], -1, 17)[..., 0]
    sub = np.repeat(e < 2, 32, axis=-1)
    ref = np.where(sub, (ref.view(np.uint32) & np.uint32(0x80000000)).view(np.float32), ref)
  return ref


def _assert_bits_equal(got, ref: np.ndarray) -> None:
  got = np.asarray(got)
  assert got.dtype == np.float32 and got.shape == ref.shape, (got.dtype, got.shape, ref.shape)
  nan = np.isnan(ref)
  np.testing.assert_array_equal(np.isnan(got), nan, err_msg="NaN positions differ")
  g, r = got[~nan], ref[~nan]
  bad = np.flatnonzero(g.view(np.uint32) != r.view(np.uint32))
  assert bad.size == 0, (f"{bad.size} of {g.size} values differ, first at {bad[0]}: "
                         f"got {g[bad[0]]!r}, want {r[bad[0]]!r}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("q", TYPES, ids=lambda q: q.name)
def test_matches_gguf_py(q, mode):
  rows = _rows(q, mode)
  ref = _reference(rows, q)
  _assert_bits_equal(_jit_dequant(rows, q, _n(q)), ref)
  finite = np.isfinite(ref)
  if mode == "sane":  # not vacuous: mostly nonzero finite values
    assert finite.all() and (ref != 0).mean() > 0.3
  if mode == "zero":
    assert (ref == 0).all() if q != Q.MXFP4 else finite.all()
  if mode == "extreme" and q != Q.MXFP4:  # inf/NaN scales reach the output
    assert np.isnan(ref).any() and np.isinf(ref).any() and (np.abs(ref[finite]) > 1e5).any()


@pytest.mark.parametrize("q", [Q.Q2_K, Q.MXFP4], ids=lambda q: q.name)
def test_eager_matches_gguf_py(q):
  """Op by op (no fusion) on fully random bytes. Eager mode compiles every op for every new
  shape, so only two types (a K-quant with its final `- m`, and MXFP4) run it."""
  rows = _rows(q, "random")
  _assert_bits_equal(kernels.dequant_rows(rows, q, _n(q)), _reference(rows, q))


@pytest.mark.parametrize("q", TYPES, ids=lambda q: q.name)
def test_leading_axes_and_slices(q):
  n = _n(q)
  rows = _rows(q, "sane", lead=(2, 3, 2))
  out = np.asarray(_jit_dequant(rows, q, n))
  assert out.shape == (2, 3, 2, n)
  _assert_bits_equal(out, _reference(rows, q))
  _assert_bits_equal(_jit_dequant(jnp.asarray(rows[1, 2, 0]), q, n), out[1, 2, 0])  # no lead
  # One long row of several blocks == its pieces side by side (blocks never straddle rows).
  _assert_bits_equal(_jit_dequant(rows.reshape(2, 3, -1), q, 2 * n), out.reshape(2, 3, -1))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mxfp4_subnormal_scales_are_the_stated_exception(jit):
  """e in {0, 1}: gguf-py gives tiny nonzero values; XLA:CPU flushes the subnormal scale."""
  blocks = _rows(Q.MXFP4, "random").reshape(*LEAD, -1, 17)
  blocks[..., 0] = np.array([0, 1, 2, 3])  # the scale bytes of the 4 blocks of every row
  rows = blocks.reshape(*LEAD, -1)
  with np.errstate(all="ignore"):
    exact = gguf.quants.dequantize(rows, Q.MXFP4).reshape(*LEAD, -1, 32)
  f = _jit_dequant if jit else kernels.dequant_rows
  got = np.asarray(f(rows, Q.MXFP4, _n(Q.MXFP4))).reshape(*LEAD, -1, 32)
  assert (np.abs(exact[..., 0:2, :]) > 2.0**-126).any()  # some exact values are even normal
  _assert_bits_equal(got[..., 2:, :], exact[..., 2:, :])  # e >= 2 exact (e = 2: d = 2**-126)
  if jax.default_backend() == "cpu":
    assert _flushes_f32_subnormals()
  if _flushes_f32_subnormals():  # zeros with gguf-py's sign bit (-0.0 where kv < 0)
    sign = (exact[..., 0:2, :].view(np.uint32) & np.uint32(0x80000000)).view(np.float32)
    _assert_bits_equal(got[..., 0:2, :], sign)
    assert (got[..., 0:2, :] == 0).all() and np.signbit(got).any()
  else:
    _assert_bits_equal(got, exact)


def test_iq2_xxs_parity_signs_equal_ksigns():
  s7 = jnp.arange(128, dtype=jnp.uint32)
  s8 = s7 | ((jax.lax.population_count(s7) & 1) << 7)
  np.testing.assert_array_equal(np.asarray(s8),
                                np.frombuffer(gguf.quants.IQ2_XXS.ksigns, dtype=np.uint8))


def test_comparison_can_fail():
  rows = _rows(Q.Q4_K, "sane")
  ref = _reference(rows, Q.Q4_K)
  off = ref.copy()
  off.view(np.uint32)[0, 0, 7] ^= 1  # one ulp
  with pytest.raises(AssertionError, match="values differ"):
    _assert_bits_equal(kernels.dequant_rows(rows, Q.Q4_K, _n(Q.Q4_K)), off)
  off = ref.copy()
  off[1, 1, 3] = np.nan
  with pytest.raises(AssertionError, match="NaN positions"):
    _assert_bits_equal(kernels.dequant_rows(rows, Q.Q4_K, _n(Q.Q4_K)), off)
  with pytest.raises(AssertionError, match="values differ"):  # the sign of zero counts
    _assert_bits_equal(np.float32([0.0, 1.0]), np.float32([-0.0, 1.0]))


def test_row_bytes_and_types():
  assert kernels.BLOCK_TYPES == frozenset(TYPES)
  assert kernels.row_bytes(Q.IQ2_XXS, 4096) == 1056
  assert kernels.row_bytes(Q.Q2_K, 2048) == 672
  assert kernels.row_bytes(int(Q.Q8_0), 4096) == 4352
  assert kernels.row_bytes(Q.Q4_K, 256) == 144
  assert kernels.row_bytes(Q.MXFP4, 64) == 34
  for q in TYPES:
    n = _n(q)
    assert kernels.row_bytes(q, n) == gguf.quants.quant_shape_to_byte_shape((n,), q)[0]


@pytest.mark.parametrize("qtype, match", [
    (Q.Q4_0, "Q4_0 .* has no jnp dequant kernel"),
    (Q.F16, "F16 .* has no jnp dequant kernel"),
    (int(Q.BF16), "BF16 .* has no jnp dequant kernel"),
    (12345, "unknown GGML type 12345"),
    ("Q8_0", "unknown GGML type 'Q8_0'"),
])
def test_bad_qtype(qtype, match):
  rows = np.zeros((2, 34), np.uint8)
  with pytest.raises(ValueError, match=match):
    kernels.dequant_rows(rows, qtype, 32)
  with pytest.raises(ValueError, match=match):
    kernels.row_bytes(qtype, 32)


@pytest.mark.parametrize("q", TYPES, ids=lambda q: q.name)
def test_bad_rows(q):
  n, nbytes = _n(q), kernels.row_bytes(q, _n(q))
  for width in (nbytes - 1, nbytes + 1, nbytes // 2):
    with pytest.raises(ValueError, match=rf"{q.name} rows of n={n} elements hold {nbytes} bytes"):
      kernels.dequant_rows(np.zeros((3, width), np.uint8), q, n)
  with pytest.raises(ValueError, match="hold .* bytes, got an array of shape \\(\\)"):
    kernels.dequant_rows(np.zeros((), np.uint8), q, n)
  for bad_n in (n + 1, 0, -n):
    with pytest.raises(ValueError, match="positive multiple"):
      kernels.dequant_rows(np.zeros((3, nbytes), np.uint8), q, bad_n)
  with pytest.raises(ValueError, match="must be uint8"):
    kernels.dequant_rows(np.zeros((3, nbytes), np.int8), q, n)
  with pytest.raises(ValueError, match="hold .* bytes"):  # under jit too (shapes are static)
    _jit_dequant(np.zeros((3, nbytes + 2), np.uint8), q, n)
