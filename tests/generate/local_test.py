"""LocalBackend: prefix reuse, rewind, chunked prefill, in-process split, sessions, refusals."""

import logging

import numpy as np
import pytest

from ds4jax.config import LayerRange
from ds4jax.runtime.local import LocalBackend, SessionError, common_prefix
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.runtime.types import Backend

from generate_fakes import PrefixRunner, reference_logits

GREEDY = SamplingParams()


def _backend(ranges=("all",), **kw):
  runners = [PrefixRunner(LayerRange.parse(r, 4)) for r in ranges]
  return LocalBackend(runners, **kw), runners


def test_is_a_backend():
  b, _ = _backend()
  assert isinstance(b, Backend)


def test_common_prefix():
  assert common_prefix([], [1]) == 0
  assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
  assert common_prefix([1, 2, 3], [1, 5, 3]) == 1
  assert common_prefix([1, 2], [1, 2, 3, 4]) == 2


def test_step_samples_from_the_right_logits():
  b, _ = _backend()
  sid = b.new_session()
  ids = [0, 5, 9, 11]
  res = b.step(sid, ids, GREEDY, 0, return_logits=True, top_logprobs=3)
  ref = reference_logits(ids)
  np.testing.assert_array_equal(res.logits_V, ref)
  assert res.token == int(np.argmax(ref))
  assert res.n_computed == 4
  assert [t for t, _ in res.logprobs] == list(np.argsort(-ref, kind="stable")[:3])
  assert res.telemetry[0].stage == "0:output" and res.telemetry[0].n_tokens == 4


def test_prefix_reuse_and_rewind():
  b, (r,) = _backend()
  sid = b.new_session()
  base = [0, 3, 4, 5, 6]
  b.step(sid, base, GREEDY, 0)
  # Extension: only the new tokens run.
  res = b.step(sid, base + [7, 8], GREEDY, 1, return_logits=True)
  assert res.n_computed == 2
  np.testing.assert_array_equal(res.logits_V, reference_logits(base + [7, 8]))
  # The same transcript again: the last token is recomputed for its logits.
  assert b.step(sid, base + [7, 8], GREEDY, 2).n_computed == 1
  # Divergence after 3 tokens: rewind, compute 3 new ones, same logits as a fresh run.
  res = b.step(sid, [0, 3, 4, 40, 41, 42], GREEDY, 3, return_logits=True)
  assert res.n_computed == 3
  np.testing.assert_array_equal(res.logits_V, reference_logits([0, 3, 4, 40, 41, 42]))
  assert b.session_tokens(sid) == [0, 3, 4, 40, 41, 42]


def test_chunked_prefill_logs_progress(caplog):
  b, (r,) = _backend(prefill_chunk=3, progress_every_s=0.0)
  sid = b.new_session()
  ids = list(range(10))
  with caplog.at_level(logging.INFO, logger="ds4jax"):
    res = b.step(sid, ids, GREEDY, 0, return_logits=True)
  assert r.calls == [3, 3, 3, 1]
  np.testing.assert_array_equal(res.logits_V, reference_logits(ids))
  assert "prefill 10/10 tokens" in caplog.text


def test_in_process_split_equals_single_stage():
  whole, _ = _backend()
  split, runners = _backend(("0:0", "1:2", "3:output"), prefill_chunk=4)
  ids = [0, 9, 8, 7, 6, 5, 4, 3, 2]
  s1, s2 = whole.new_session(), split.new_session()
  for k in range(4):
    a = whole.step(s1, ids, SamplingParams(temperature=0.8, seed=3), k, return_logits=True)
    c = split.step(s2, ids, SamplingParams(temperature=0.8, seed=3), k, return_logits=True)
    np.testing.assert_array_equal(a.logits_V, c.logits_V)
    assert a.token == c.token
    assert [h.stage for h in c.telemetry] == ["0:0", "1:2", "3:output"]
    ids = ids + [a.token]
  assert [r["layers"] for r in split.route_info()["route"]] == ["0:0", "1:2", "3:output"]


def test_sessions_are_independent_and_evicted_state_is_rebuilt():
  b, _ = _backend(max_sessions=1)
  s1, s2 = b.new_session(), b.new_session()
  b.step(s1, [0, 1, 2], GREEDY, 0)
  b.step(s2, [0, 7, 7, 7], GREEDY, 0)  # evicts s1's state
  res = b.step(s1, [0, 1, 2, 3], GREEDY, 1, return_logits=True)
  assert res.n_computed == 4
  np.testing.assert_array_equal(res.logits_V, reference_logits([0, 1, 2, 3]))
  b.close_session(s1)
  with pytest.raises(SessionError, match="unknown session"):
    b.step(s1, [0], GREEDY, 0)


def test_refusals():
  b, _ = _backend()
  sid = b.new_session()
  with pytest.raises(ValueError, match="empty"):
    b.step(sid, [], GREEDY, 0)
  with pytest.raises(ValueError, match="outside the vocab"):
    b.step(sid, [0, 512], GREEDY, 0)
  with pytest.raises(ValueError, match="context size"):
    b.step(sid, [1] * 65, GREEDY, 0)
  with pytest.raises(ValueError, match="starts at layer"):
    LocalBackend([PrefixRunner(LayerRange.parse("0:1", 4)), PrefixRunner(LayerRange.parse("3:output", 4))])
  with pytest.raises(ValueError, match="head"):
    LocalBackend([PrefixRunner(LayerRange.parse("0:3", 4))])


def test_heartbeat_logs_while_the_block_runs(caplog):
  import time
  from ds4jax.runtime.progress import heartbeat
  with caplog.at_level(logging.INFO, logger="ds4jax"):
    with heartbeat("loading things", every_s=0.05):
      deadline = time.monotonic() + 60  # a hang guard: two beats come after ~0.1 s
      while caplog.text.count("loading things:") < 2:
        assert time.monotonic() < deadline, "no heartbeat while the block ran"
        time.sleep(0.01)
    n = caplog.text.count("loading things:")
    time.sleep(0.15)  # three periods: a heartbeat still running would log again
  assert caplog.text.count("loading things:") == n  # stopped with the block


def test_interrupted_prefill_resets_the_session():
  b, (r0, r1) = _backend(("0:1", "2:output"))
  sid = b.new_session()
  b.step(sid, [0, 1, 2], GREEDY, 0)
  real = r1.forward

  def boom(*a):
    raise KeyboardInterrupt

  r1.forward = boom  # stage 0 advances, stage 1 never does
  with pytest.raises(KeyboardInterrupt):
    b.step(sid, [0, 1, 2, 3, 4], GREEDY, 1)
  r1.forward = real
  res = b.step(sid, [0, 1, 2, 3, 4], GREEDY, 1, return_logits=True)
  assert res.n_computed == 5  # rebuilt from 0, consistent again
  np.testing.assert_array_equal(res.logits_V, reference_logits([0, 1, 2, 3, 4]))
