"""LocalBackend over the real tiny model: prefix reuse, rewind and chunking give the logits of
a fresh one-shot run (the compressor/indexer state must survive `truncate`), and an
in-process split equals the whole model."""

import numpy as np
import pytest

from ds4jax.config import LayerRange
from ds4jax.runtime.local import LocalBackend
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.runtime.load import load_stage
from ds4jax.runtime.runner import StageRunner

GREEDY = SamplingParams()
CTX = 64
# Chunked and one-shot prefill run different matmul shapes; allow for XLA's reassociation.
ATOL = 1e-4


@pytest.fixture(scope="module")
def runners(tiny_gguf):
  whole = StageRunner(load_stage(tiny_gguf, LayerRange.parse("all", 4)), ctx_size=CTX)
  first = StageRunner(load_stage(tiny_gguf, LayerRange.parse("0:1", 4)), ctx_size=CTX)
  last = StageRunner(load_stage(tiny_gguf, LayerRange.parse("2:output", 4)), ctx_size=CTX)
  return whole, first, last


def _ids(n, seed):
  return [0] + list(np.random.default_rng(seed).integers(8, 512, n - 1))


def test_reuse_rewind_chunking_and_split_match_fresh_runs(runners):
  whole, first, last = runners
  a = _ids(16, 1)
  ext = a + _ids(9, 2)[1:]  # 24 tokens
  b = a[:10] + _ids(15, 3)[1:]  # diverges after 10 tokens, 24 tokens

  def fresh(ids):
    be = LocalBackend(whole, prefill_chunk=8)
    return be.step(be.new_session(), ids, GREEDY, 0, return_logits=True).logits_V

  be = LocalBackend(whole)
  sid = be.new_session()
  assert be.step(sid, a, GREEDY, 0).n_computed == 16
  res = be.step(sid, ext, GREEDY, 1, return_logits=True)
  assert res.n_computed == 8
  np.testing.assert_allclose(res.logits_V, fresh(ext), atol=ATOL, rtol=0)
  # Rewind into the middle of a compressed window (ratios 4 and 16, window 8).
  res = be.step(sid, b, GREEDY, 2, return_logits=True)
  assert res.n_computed == 14
  ref_b = fresh(b)
  np.testing.assert_allclose(res.logits_V, ref_b, atol=ATOL, rtol=0)
  assert res.token == int(np.argmax(ref_b))

  split = LocalBackend([first, last], prefill_chunk=8)
  res = split.step(split.new_session(), b, GREEDY, 0, return_logits=True)
  np.testing.assert_allclose(res.logits_V, ref_b, atol=ATOL, rtol=0)
  assert [h.stage for h in res.telemetry] == ["0:1", "2:output"]
