"""QAT rounding (ds4-architecture.md §2.7) against the hand-written numpy reference, and its
use on the cached KV rows of a model."""

import jax.numpy as jnp
import numpy as np
import pytest

from ds4jax.config import LayerRange
from ds4jax.gguf.load import load_tensors
from ds4jax.model import qat
from ds4jax.runtime.load import stage_from_tensors
from ds4jax.runtime.runner import StageRunner


def _blocks(rng, n_blocks, block, scales):
  """Random rows whose blocks span many magnitudes, plus exact ties and zero blocks."""
  x = rng.standard_normal((n_blocks, block)) * rng.choice(scales, (n_blocks, 1))
  x[0] = 0.0
  x[1, :] = 1e-9
  return x.astype(np.float32)


def test_e4m3_reference_grid():
  # Normals (1 + m/8) 2^e, subnormals m 2^-9, max 448; ties go to the even mantissa.
  got = qat.round_e4m3_ref(np.array([1.0625, 1.1875, 448.0, 3 * 2.0 ** -10, 2.0 ** -10, 0.0]))
  np.testing.assert_array_equal(got, [1.0, 1.25, 448.0, 2 * 2.0 ** -9, 0.0, 0.0])


def test_e2m1_reference_grid():
  got = qat.round_e2m1_ref(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, -2.6, 6.0]))
  np.testing.assert_array_equal(got, [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -3.0, 6.0])


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_kv_roundtrip_matches_reference(seed):
  rng = np.random.default_rng(seed)
  rope = 64
  x = _blocks(rng, 96, 128 + rope, [1e-3, 0.1, 1.0, 30.0, 1e4]).reshape(-1, 2 * 64 + rope)
  # Exact midpoints between E4M3 neighbours once the block scale is 1 (amax pinned at 448).
  x[2, :64] = np.linspace(1.0, 2.0, 64, dtype=np.float32) + 0.0625
  x[2, 0] = 448.0
  got = np.asarray(qat.fp8_kv_roundtrip(jnp.asarray(x), rope))
  want = qat.fp8_kv_roundtrip_ref(x, rope)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[:, -rope:], x[:, -rope:])  # rope dims untouched
  assert np.abs(got - x).max() > 0  # it does round


@pytest.mark.parametrize("seed", [0, 1])
def test_fp4_indexer_roundtrip_matches_reference(seed):
  rng = np.random.default_rng(seed)
  x = _blocks(rng, 64, 128, [1e-3, 0.1, 1.0, 50.0])
  got = np.asarray(qat.fp4_indexer_roundtrip(jnp.asarray(x)))
  want = qat.fp4_indexer_roundtrip_ref(x)
  np.testing.assert_allclose(got, want, rtol=0, atol=0)
  # The Hadamard alone is orthonormal: rotating back recovers x up to FP4 error.
  back = got @ qat.hadamard(128)
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
    np.testing.assert_array_equal(qat.fp8_kv_roundtrip_ref(rows, cfg.rope_dim), rows)
    plain = np.asarray(states[False].layers[il].kv[w:w + len(ids)])
    assert not np.array_equal(qat.fp8_kv_roundtrip_ref(plain, cfg.rope_dim), plain)
  # Indexer keys are stored rotated and FP4-rounded: at most 8 magnitudes per block of 32.
  for qat_on in (True, False):
    keys = np.asarray(states[qat_on].layers[2].idx_keys[:len(ids) // 4]).reshape(-1, 32)
    n_mag = max(len(np.unique(np.abs(b))) for b in keys)
    assert (n_mag <= 8) if qat_on else (n_mag > 8)
