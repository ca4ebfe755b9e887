"""Continuous batching in one process (issue 13): concurrent sessions through LocalBackend on
the real tiny model batch their decode tokens and each gets its tokens from alone (greedy and
seeded sampling); a session that disconnects in the middle of a batch frees its slot and
disturbs nobody; the stage batcher's refusals."""

import threading

import numpy as np
import pytest

from ds4jax import build
from ds4jax.config import LayerRange
from ds4jax.runtime import batching
from ds4jax.runtime.local import LocalBackend, StepRequest
from ds4jax.runtime.sampling import SamplingParams

from generate_fakes import PrefixRunner, reference_logits

N_TOKENS = 24


@pytest.fixture(scope="module")
def backend(tiny_gguf):
  be = build.local_backend(tiny_gguf, ranges=("0:1", "2:output"), ctx_size=128,
                           max_sessions=4)
  yield be
  be.close()


def _prompts(vocab, n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, size=int(rng.integers(5, 9))).tolist() for _ in range(n)]


def _generate(be, prompt, sampling, n, stop_after=None, log=None):
  sid = be.new_session()
  ids, out = list(prompt), []
  try:
    for i in range(n):
      if stop_after is not None and i == stop_after:
        return out  # the client went away: the finally frees the slots at once
      tok = be.step(sid, ids, sampling, i).token
      out.append(tok)
      ids.append(tok)
      if log is not None:
        log.append(i)
  finally:
    be.close_session(sid)
  return out


def _concurrently(fns):
  res = [None] * len(fns)
  errs = []

  def run(i):
    try:
      res[i] = fns[i]()
    except BaseException as e:  # noqa: BLE001 - reported below
      errs.append(e)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=300)
  assert not errs, errs
  return res


@pytest.mark.parametrize("sampling", [SamplingParams(),
                                      SamplingParams(temperature=0.9, top_k=20, seed=7)],
                         ids=["greedy", "seeded"])
def test_concurrent_sessions_batch_and_equal_alone(backend, sampling):
  prompts = _prompts(backend.cfg.vocab_size, 4)
  params = [sampling if sampling.temperature == 0 else
            SamplingParams(temperature=0.9, top_k=20, seed=7 + i) for i in range(4)]
  alone = [_generate(backend, p, s, N_TOKENS) for p, s in zip(prompts, params)]
  st = [b.stats for b in backend.batchers]
  before = [(s.decode_calls, s.decode_rows) for s in st]
  together = _concurrently([lambda p=p, s=s: _generate(backend, p, s, N_TOKENS)
                            for p, s in zip(prompts, params)])
  assert together == alone
  for s, (calls0, rows0) in zip(st, before):
    calls, rows = s.decode_calls - calls0, s.decode_rows - rows0
    assert rows == 4 * (N_TOKENS - 1) and calls < rows, (calls, rows)  # shared calls
  # The in-process split pipelines too: both stages saw batches of several sessions.
  assert all(s.max_batch_seen >= 2 for s in st)


def test_disconnect_in_the_middle_of_a_batch(backend):
  prompts = _prompts(backend.cfg.vocab_size, 4, seed=1)
  alone = [_generate(backend, p, SamplingParams(), N_TOKENS) for p in prompts]
  free0 = backend.batchers[0].n_free
  got = _concurrently([lambda i=i, p=p: _generate(backend, p, SamplingParams(), N_TOKENS,
                                                  stop_after=6 if i == 1 else None)
                       for i, p in enumerate(prompts)])
  assert got[1] == alone[1][:6]
  assert [got[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
  assert backend.batchers[0].n_free == free0 == 4  # every slot came back


def test_step_many_returns_per_request_results_and_errors():
  be = LocalBackend(PrefixRunner(LayerRange.parse("all", 4)), max_sessions=4)
  try:
    sids = [be.new_session() for _ in range(3)]
    reqs = [StepRequest(sids[0], [0, 5, 6], SamplingParams(), 0),
            StepRequest(sids[1], [0, 7], SamplingParams(), 0),
            StepRequest(sids[2], [0, 10**6], SamplingParams(), 0)]  # a bad id
    res = be.step_many(reqs)
    assert res[0].token == int(np.argmax(reference_logits([0, 5, 6])))
    assert res[1].token == int(np.argmax(reference_logits([0, 7])))
    assert isinstance(res[2], ValueError) and "outside the vocab" in str(res[2])
    with pytest.raises(ValueError, match="one request per session"):
      be.step_many([reqs[0], reqs[0]])
  finally:
    be.close()


def test_batcher_refusals_and_lost_state():
  runner = PrefixRunner(LayerRange.parse("all", 4))
  b = batching.StageBatcher(runner, n_slots=2)
  try:
    s0, s1 = b.alloc(), b.alloc()
    with pytest.raises(batching.BatcherFull, match="all 2 session slots"):
      b.alloc()
    b.run(s0, [0, 1, 2], None, 0)
    assert b.pos(s0) == 3
    with pytest.raises(batching.StateLost, match="holds 3 tokens"):
      b.run(s0, [3], None, 5)
    with pytest.raises(ValueError, match="1..256 tokens"):
      b.run(s1, [], None, 0)
    b.truncate(s0, 1)
    np.testing.assert_array_equal(b.run(s0, [9], None, 1)[-1], reference_logits([0, 9]))
    b.free(s1)
    assert b.alloc() == s1 and b.pos(s1) == 0
  finally:
    b.close()
  with pytest.raises(RuntimeError, match="closed"):
    b.run(s0, [1], None, 2)
