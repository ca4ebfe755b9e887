"""QAT rounding (ds4-architecture.md §2.7) against a reference written here, independent of
ds4jax.model.qat: the E4M3FN and E2M1 grids are enumerated from their bit patterns, a value
rounds to the nearest grid point (ties to the even code), block scales are the smallest power
of two >= amax / max found by search, and the Hadamard matrix is built by Kronecker products.
Then its use on the cached KV rows of a model."""

import jax.numpy as jnp
import numpy as np
import pytest

from ds4jax.config import LayerRange
from ds4jax.gguf.load import load_tensors
from ds4jax.model import qat
from ds4jax.runtime.load import stage_from_tensors
from ds4jax.runtime.runner import StageRunner


def _grid(exp_bits, man_bits, bias, nan_codes=()):
  """(values, codes): every finite non-negative value of a sign/exponent/mantissa format,
  ascending, with its bit code (exponent << man_bits | mantissa)."""
  vals, codes = [], []
  for e in range(2 ** exp_bits):
    for m in range(2 ** man_bits):
      code = e << man_bits | m
      if code in nan_codes:
        continue
      frac = m / 2 ** man_bits
      vals.append(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
      codes.append(code)
  order = np.argsort(vals, kind="stable")
  return np.asarray(vals)[order], np.asarray(codes)[order]


E4M3FN = _grid(4, 3, 7, nan_codes=(0b1111111,))  # S.1111.111 is NaN: max 1.75 * 2^8 = 448
E2M1 = _grid(2, 1, 1)  # 0, 0.5, 1, 1.5, 2, 3, 4, 6


def _round(v, grid):
  """Nearest grid value of v (|v| <= the grid's max), ties to the even code."""
  vals, codes = grid
  a = np.abs(np.asarray(v, np.float64))
  hi = np.clip(np.searchsorted(vals, a), 1, len(vals) - 1)
  lo = hi - 1
  d_lo, d_hi = a - vals[lo], vals[hi] - a
  pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(codes[lo] % 2 == 0, lo,
                                                                        hi)))
  return np.sign(v) * vals[pick]


_POW2 = 2.0 ** np.arange(-160, 160)


def _pow2_at_least(y):
  """The smallest power of two >= y (y > 0), by search over the powers."""
  return _POW2[np.searchsorted(_POW2, np.asarray(y, np.float64), side="left")]


def _blockwise(x, block, fmt_max, floor, grid):
  """x [..., n] in blocks of `block`: scale = 2^ceil(log2(max(amax, floor) / fmt_max)) (float32
  arithmetic, as the model computes it), round x / scale on the grid, scale back."""
  blk = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block)).astype(np.float32)
  amax = np.maximum(np.abs(blk).max(-1, keepdims=True), np.float32(floor))
  scale = _pow2_at_least(amax / np.float32(fmt_max))
  q = _round(np.clip(blk / scale, -fmt_max, fmt_max), grid) * scale
  return q.reshape(x.shape).astype(np.float32)


def fp8_kv_ref(x, rope):
  x = np.asarray(x, np.float32)
  n = x.shape[-1] - rope
  return np.concatenate([_blockwise(x[..., :n], 64, 448.0, 1e-4, E4M3FN), x[..., n:]], -1)


def sylvester(n):
  """The +-1 Hadamard matrix of order n (Sylvester's construction, by Kronecker products)."""
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
  return h


def hadamard_ref(n):
  return sylvester(n) / np.sqrt(n)


def fp4_indexer_ref(x):
  """The +-1 rotation summed in float64, then divided by sqrt(n) in float32 (as the model does)."""
  n = x.shape[-1]
  sums = (np.asarray(x, np.float64) @ sylvester(n).T).astype(np.float32)
  rotated = sums * np.float32(1.0 / np.sqrt(n))
  return _blockwise(rotated, 32, 6.0, 6.0 * 2.0 ** -126, E2M1)


def _blocks(rng, n_blocks, block, scales):
  """Random rows whose blocks span many magnitudes, plus exact ties and zero blocks."""
  x = rng.standard_normal((n_blocks, block)) * rng.choice(scales, (n_blocks, 1))
  x[0] = 0.0
  x[1, :] = 1e-9
  return x.astype(np.float32)


def test_reference_grids():
  """The enumerated grids are the formats' (max 448 and 6, subnormals m 2^-9 and 0.5)."""
  assert E4M3FN[0].max() == 448.0 and len(E4M3FN[0]) == 127
  assert E4M3FN[0][1] == 2.0 ** -9 and E4M3FN[0][8] == 2.0 ** -6
  np.testing.assert_array_equal(E2M1[0], [0, 0.5, 1, 1.5, 2, 3, 4, 6])
  # Ties go to the even mantissa; subnormals round on their 2^-9 spacing.
  np.testing.assert_array_equal(
      _round(np.array([1.0625, 1.1875, 448.0, 3 * 2.0 ** -10, 2.0 ** -10, 0.0, -1.0625]),
             E4M3FN), [1.0, 1.25, 448.0, 2 * 2.0 ** -9, 0.0, 0.0, -1.0])
  np.testing.assert_array_equal(
      _round(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, -2.6, 6.0]), E2M1),
      [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -3.0, 6.0])
  np.testing.assert_array_equal(_pow2_at_least([1.0, 1.0000001, 0.3, 2.0 ** -130]),
                                [1.0, 2.0, 0.5, 2.0 ** -130])


def test_hadamard_matches_the_kronecker_reference():
  for n in (2, 32, 128):
    np.testing.assert_allclose(qat.hadamard(n), hadamard_ref(n), rtol=0, atol=1e-7)
  x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(qat.wht(jnp.asarray(x))), x @ hadamard_ref(128).T,
                             rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_kv_roundtrip_matches_reference(seed):
  rng = np.random.default_rng(seed)
  rope = 64
  x = _blocks(rng, 96, 128 + rope, [1e-3, 0.1, 1.0, 30.0, 1e4]).reshape(-1, 2 * 64 + rope)
  # Exact midpoints between E4M3 neighbours once the block scale is 1 (amax pinned at 448).
  x[2, :64] = np.linspace(1.0, 2.0, 64, dtype=np.float32) + 0.0625
  x[2, 0] = 448.0
  got = np.asarray(qat.fp8_kv_roundtrip(jnp.asarray(x), rope))
  want = fp8_kv_ref(x, rope)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[:, -rope:], x[:, -rope:])  # rope dims untouched
  assert np.abs(got - x).max() > 0  # it does round


@pytest.mark.parametrize("seed", [0, 1])
def test_fp4_indexer_roundtrip_matches_reference(seed):
  rng = np.random.default_rng(seed)
  x = _blocks(rng, 64, 128, [1e-3, 0.1, 1.0, 50.0])
  got = np.asarray(qat.fp4_indexer_roundtrip(jnp.asarray(x)))
  want = fp4_indexer_ref(x)
  np.testing.assert_array_equal(got, want)
  # The Hadamard alone is orthonormal: rotating back recovers x up to FP4 error.
  back = got @ hadamard_ref(128)
  assert np.abs(back - x).max() < 0.5 * np.abs(x).max()


def test_model_caches_fp8_rows_when_qat_is_on(tiny_gguf):
  cfg, tensors = load_tensors(tiny_gguf, "0:2")
  ids = np.arange(1, 13)
  outs, states = {}, {}
  for on in (False, True):
    c = cfg.replace(qat=on)
    runner = StageRunner(stage_from_tensors(c, LayerRange(0, 2), tensors), ctx_size=32,
                         max_chunk=16)
    outs[on], states[on] = runner.forward(runner.init_state(), ids, None, 0)
  assert np.isfinite(outs[True]).all()
  diff = np.abs(outs[True] - outs[False]).max()
  assert 0 < diff < 0.1 * np.abs(outs[False]).max()
  w = cfg.window
  for il in range(3):
    rows = np.asarray(states[True].layers[il].kv[w:w + len(ids)])
    np.testing.assert_array_equal(fp8_kv_ref(rows, cfg.rope_dim), rows)
    plain = np.asarray(states[False].layers[il].kv[w:w + len(ids)])
    assert not np.array_equal(fp8_kv_ref(plain, cfg.rope_dim), plain)
  # Indexer keys are stored rotated and FP4-rounded: at most 8 magnitudes per block of 32.
  for qat_on in (True, False):
    keys = np.asarray(states[qat_on].layers[2].idx_keys[:len(ids) // 4]).reshape(-1, 32)
    n_mag = max(len(np.unique(np.abs(b))) for b in keys)
    assert (n_mag <= 8) if qat_on else (n_mag > 8)
