"""More sessions than a worker's KV slots: leases (bridge/residency.py) evict idle sessions
with DROP, queue steps beyond the capacity, and every session's output stays exact. In one
process over loopback with the fake stage, so it is fast."""

import contextlib
import threading
import time

import numpy as np
import pytest

from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
from ds4jax.wire.errors import RouteUnavailable
from ds4jax.bridge.coordinator.residency import Residency
from ds4jax.bridge.worker.worker import Worker, WorkerOptions
from ds4jax.config import LayerRange
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner, full_logits

CFG = FakeConfig()
GREEDY = SamplingParams()


@contextlib.contextmanager
def split(specs, max_sessions, delay_s=0.0):
  """A coordinator for 0:0 and worker threads for specs, each with max_sessions slots."""
  coord = Coordinator(FakeRunner(CFG, LayerRange(0, 0), 64, delay_s),
                      CoordinatorOptions(port=0, route_timeout=20, prefill_chunk=3,
                                         heartbeat_s=0.2, request_timeout=20))
  ws, threads = [], []
  for spec in specs:
    rng = LayerRange.parse(spec, CFG.n_layers)
    opt = WorkerOptions(ctx=64, max_sessions=max_sessions, backoff_min=0.05, backoff_max=0.2)
    w = Worker(coord.address, fingerprint=CFG.fingerprint(), n_layers=CFG.n_layers,
               vocab_size=CFG.vocab_size, layers=rng, options=opt,
               load=lambda rng=rng: FakeRunner(CFG, rng, 64, delay_s))
    ws.append(w)
    threads.append(threading.Thread(target=w.run, daemon=True))
    threads[-1].start()
  try:
    coord.wait_route(10)
    yield coord, ws
  finally:
    for w in ws:
      w.abort()
    coord.close()
    for t in threads:
      t.join(timeout=5)


def reference(prompt, n):
  """Greedy tokens and logits rows of one process, sequentially."""
  toks, rows = list(prompt), []
  for _ in range(n):
    row = full_logits(CFG, toks)[-1]
    rows.append(row)
    toks.append(int(np.argmax(row)))
  return toks[len(prompt):], rows


def test_twelve_concurrent_sessions_on_four_slots_all_exact():
  n_sessions, n_tokens = 12, 5
  prompts = [[(7 * i + k) % CFG.vocab_size for k in range(4 + i % 5)] for i in range(n_sessions)]
  refs = [reference(p, n_tokens) for p in prompts]
  with split(["1:2", "3:output"], max_sessions=4, delay_s=0.001) as (coord, ws):
    peak = [0]
    results, errors = {}, []
    barrier = threading.Barrier(n_sessions)

    def run(i):
      try:
        sid = coord.new_session()
        toks, rows = list(prompts[i]), []
        barrier.wait()
        for step in range(n_tokens):
          r = coord.step(sid, toks, GREEDY, step, return_logits=True)
          rows.append(r.logits_V)
          toks.append(r.token)
          peak[0] = max([peak[0]] + [len(w.sessions) for w in ws])
          time.sleep(0.005 * (i % 3))  # a slow reader: idle between steps, so it is evicted
        results[i] = (toks[len(prompts[i]):], rows)
      except Exception as e:  # surfaced below with its session
        errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_sessions)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert not errors, errors
    for i, (toks, rows) in results.items():
      assert toks == refs[i][0], f"session {i}"
      np.testing.assert_array_equal(np.stack(rows), np.stack(refs[i][1]))
    assert len(results) == n_sessions
    links = [coord._links[w["id"]] for w in coord.route_info()["workers"]]
    assert [l.residency.capacity for l in links] == [4, 4]
    # The coordinator evicted (DROP) and queued; the workers never had to evict on their own.
    assert all(l.residency.evictions > 0 for l in links)
    assert sum(l.residency.waits for l in links) > 0
    assert [w.sessions.evicted for w in ws] == [0, 0]
    assert peak[0] <= 4
    rebuilds = sum("rebuilt the KV" in e for e in coord.events)
    assert rebuilds > 0  # evicted mid-generation, then rebuilt from cached inputs
    print(f"evictions {[l.residency.evictions for l in links]}, "
          f"waits {[l.residency.waits for l in links]}, rebuilds {rebuilds}")


def test_one_slot_three_threads_make_progress():
  prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
  with split(["1:output"], max_sessions=1) as (coord, ws):
    out, errors = {}, []

    def run(i):
      try:
        sid, toks = coord.new_session(), list(prompts[i])
        for step in range(4):
          toks.append(coord.step(sid, toks, GREEDY, step).token)
        out[i] = toks[len(prompts[i]):]
      except Exception as e:
        errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    [t.start() for t in ts]
    [t.join(timeout=60) for t in ts]
    assert not errors, errors
    assert out == {i: reference(p, 4)[0] for i, p in enumerate(prompts)}
    assert ws[0].sessions.evicted == 0


def test_a_worker_that_lost_the_session_is_rebuilt_without_counting_as_a_failure():
  with split(["1:2", "3:output"], max_sessions=4) as (coord, ws):
    coord.opt.max_recoveries = 0  # a lost KV is not a lost link
    sid, toks = coord.new_session(), [5, 6, 7, 8]
    want, _ = reference(toks, 6)
    for step in range(6):
      if step in (2, 4):
        ws[step // 2 - 1].sessions.clear()  # the worker forgot behind the coordinator's back
      toks.append(coord.step(sid, toks, GREEDY, step).token)
    assert toks[4:] == want
    assert sum("unknown here" in e for e in coord.events) == 2


def test_residency_lease_evicts_idle_lru_and_waits_for_active():
  r = Residency(2)
  assert r.lease("a", 1e18) == (True, [])
  assert r.lease("b", 1e18) == (True, [])
  r.release("a")
  assert r.lease("c", 1e18) == (True, ["a"])  # a is idle: evicted
  with pytest.raises(RouteUnavailable, match="all 2 of its session slots"):
    r.lease("d", time.monotonic() + 0.1)  # b and c are active: wait, then give up
  assert r.waits == 1
  t = threading.Timer(0.1, r.release, ("b",))
  t.start()
  assert r.lease("d", time.monotonic() + 5) == (True, ["b"])
  assert r.lease("c", 1e18) == (False, [])  # resident: a second lease of the same session
  assert "a" not in r and len(r) == 2


def test_residency_grace_spares_a_session_between_steps_but_not_forever():
  r = Residency(1, grace_s=0.3)
  r.lease("a", 1e18)
  r.release("a")  # a is between two steps of its generation
  t0 = time.monotonic()
  assert r.lease("b", time.monotonic() + 5) == (True, ["a"])  # evicted only after the grace
  assert time.monotonic() - t0 >= 0.25 and r.waits == 1
  r.release("b")
  time.sleep(0.35)  # b stays idle for longer than the grace ...
  assert r.lease("c", time.monotonic() + 5) == (True, ["b"])
  assert r.waits == 1  # ... so it is evicted without a wait
