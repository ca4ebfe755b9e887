"""ds4jax vs HF DeepseekV4ForCausalLM (f32, eager) on the same re-randomised tiny weights.

The weights go HF -> ds4-layout GGUF (f32) -> ds4jax loader, so the converter, the name
table and the loader are covered too. 64 tokens = 8x the window, 16 CSA entries against an
indexer top-k of 3, 8 HCA entries.
"""

import numpy as np
import pytest

import ds4jax
from hf_reference import hf_logits
from ds4jax.runtime.load import stage_from_tensors
from ds4jax.runtime.runner import StageRunner
from ds4jax.gguf.load import load_tensors

TOL = 1e-4
N_TOK = 64
CHUNKS = (7, 5, 1, 7, 5, 39)  # buckets 8 and 1 only: few compilations
N_PREFILL = 7


@pytest.fixture(scope="module")
def ids():
  return np.random.default_rng(1).integers(0, 320, N_TOK).astype(np.int32)


@pytest.fixture(scope="module")
def model(hf_tiny):
  return ds4jax.load_model(hf_tiny[1], ctx_size=128, max_chunk=64)


@pytest.fixture(scope="module")
def hf_oneshot(hf_tiny, ids):
  return hf_logits(hf_tiny[0], ids)


def _assert_close(got, want):
  assert got.shape == want.shape
  err = np.abs(got - want).max()
  assert err <= TOL, f"max |dlogit| = {err:.3g}"
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_oneshot_prefill_matches_hf(model, ids, hf_oneshot):
  _assert_close(model.logits(ids), hf_oneshot)


def test_chunked_prefill_matches_hf(model, hf_tiny, ids, hf_oneshot):
  s = model.session()
  got = np.concatenate([s.prefill(ids[a:a + n]) for a, n in zip(np.cumsum((0,) + CHUNKS), CHUNKS)])
  _assert_close(got, hf_logits(hf_tiny[0], ids, chunks=CHUNKS))
  _assert_close(got, hf_oneshot)


def test_decode_matches_hf(model, hf_tiny, ids):
  s = model.session()
  got = [s.prefill(ids[:N_PREFILL])]
  got += [s.decode(int(t))[None] for t in ids[N_PREFILL:]]
  want = hf_logits(hf_tiny[0], ids, chunks=(N_PREFILL,) + (1,) * (N_TOK - N_PREFILL))
  _assert_close(np.concatenate(got), want)


def test_parity_is_sensitive_to_indexer_selection(hf_tiny, ids, hf_oneshot):
  """With a top-k that keeps every entry the logits move far beyond TOL: the indexer prunes,
  and the comparison above can see a wrong selection."""
  cfg, tensors = load_tensors(hf_tiny[1], "all")
  stage = stage_from_tensors(cfg.replace(index_topk=1024), "all", tensors)
  runner = StageRunner(stage, ctx_size=128, max_chunk=64)
  got, _ = runner.forward(runner.init_state(), ids, None, 0)
  err_pos = np.abs(got - hf_oneshot).max(-1)
  assert err_pos[:15].max() <= TOL  # fewer than 4 visible entries: nothing is pruned yet
  assert err_pos.max() > 100 * TOL


def test_quantised_fixture_matches_hf(tiny_gguf):
  """The ds4-mix tiny fixture (Q8_0/IQ2_XXS/Q2_K, D=256, HCA 16), dequantised into HF via
  `gguf.hf.hf_model_from_gguf`, against ds4jax loading the same file."""
  import torch
  from ds4jax.gguf.hf import hf_model_from_gguf
  ids = np.random.default_rng(2).integers(0, 512, 40)
  with torch.no_grad():
    want = hf_model_from_gguf(tiny_gguf)(torch.as_tensor(ids[None])).logits[0].numpy()
  _assert_close(ds4jax.load_model(tiny_gguf, ctx_size=64, max_chunk=64).logits(ids), want)


def test_long_input_is_split_and_context_fills_exactly(hf_tiny, ids, hf_oneshot):
  """ctx_size = 64 = the number of tokens, max_chunk 16: the runner splits a 61-token prefill
  into 16-row pieces, and the last 3 tokens run in a padded bucket of 4 that reaches past the
  context end (buffer slack keeps the writes from clamping)."""
  small = ds4jax.load_model(hf_tiny[1], ctx_size=N_TOK, max_chunk=16)
  s = small.session()
  got = np.concatenate([s.prefill(ids[:61]), s.prefill(ids[61:])])
  _assert_close(got, hf_oneshot)
  with pytest.raises(ValueError, match="exceeds ctx_size"):
    s.decode(1)
