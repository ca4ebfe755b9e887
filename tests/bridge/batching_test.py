"""Continuous batching across the route (docs/design.md §11, issue 13 item 3), in one process
over loopback sockets with the fake stage (fast; the tiny model over real processes is in
e2e_test.py): concurrent sessions' decode rows run as one call at the coordinator's stage
and at every worker, every session gets exactly its own tokens, and one session's trouble
(closed mid-batch, state lost on a worker) leaves the others alone."""

import threading
import time

import numpy as np

from bridge_fake_test import CFG, GREEDY, coordinator, full_logits, workers

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9], [2, 7]]
DELAY_S = 0.004  # per forward_batch call on every stage: rows of one call share it


def run_threads(fns):
  """Runs fns on threads at once; -> their results (or the exception each raised)."""
  out = [None] * len(fns)

  def run(i):
    try:
      out[i] = fns[i]()
    except Exception as e:  # noqa: BLE001 - returned and checked by the test
      out[i] = e

  ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
  [t.start() for t in ts]
  [t.join(timeout=120) for t in ts]
  assert not any(t.is_alive() for t in ts), "a generation hung"
  return out


def greedy(coord, prompt, n, sid=None, on_step=None, barrier=None):
  """n greedy tokens, every logits row checked against one process; `barrier`: wait there
  after the prompt's step, so every session's first decode token starts at once."""
  sid = sid or coord.new_session()
  toks = list(prompt)
  for step in range(n):
    if on_step is not None:
      on_step(step, sid)
    if step == 1 and barrier is not None:
      barrier.wait(timeout=30)
    r = coord.step(sid, toks, GREEDY, step, return_logits=True)
    np.testing.assert_array_equal(r.logits_V, full_logits(CFG, toks)[-1])
    toks.append(r.token)
  return toks[len(prompt):]


def reference(prompt, n):
  toks = list(prompt)
  for _ in range(n):
    toks.append(int(np.argmax(full_logits(CFG, toks)[-1])))
  return toks[len(prompt):]


def wait_for(cond, timeout=5.0):
  deadline = time.monotonic() + timeout
  while not cond() and time.monotonic() < deadline:
    time.sleep(0.02)
  return cond()


def test_four_sessions_64_tokens_batch_at_every_stage():
  n = 64
  with coordinator(delay_s=DELAY_S, ctx=80) as coord, \
      workers(coord.address, ["1:output"], delay_s=DELAY_S, ctx=80) as (ws, errors):
    coord.wait_route(5)
    barrier = threading.Barrier(len(PROMPTS))
    t0 = time.monotonic()
    got = run_threads([lambda p=p: greedy(coord, p, n, barrier=barrier) for p in PROMPTS])
    took = time.monotonic() - t0
    assert got == [reference(p, n) for p in PROMPTS] and not errors
    stats = [coord.batcher.stats, ws[0].batcher.stats]
    for st in stats:  # decode rows of several sessions shared calls on both stages
      assert st.max_batch_seen > 1 and st.decode_rows > st.decode_calls, st
    # The worker reports the same counters in its PONGs (route_info, over the wire).
    assert wait_for(lambda: coord.route_info()["workers"][0]["batch"].get(
        "max_batch_seen", 0) > 1, 3.0)
    assert coord.route_info()["batch"]["max_batch_seen"] > 1
    print(f"\n4 sessions x {n} tokens in {took:.2f}s; mean rows per decode call: " +
          ", ".join(f"{st.decode_rows / st.decode_calls:.2f}" for st in stats))


def test_a_session_closed_mid_batch_does_not_disturb_the_others():
  n = 24
  with coordinator(delay_s=DELAY_S) as coord, \
      workers(coord.address, ["1:output"], delay_s=DELAY_S) as (ws, _):
    coord.wait_route(5)
    sids = [coord.new_session() for _ in PROMPTS]

    def close_mid_way(step, sid):
      if step == 8:  # from another thread while this session's step is in a batch
        threading.Thread(target=coord.close_session, args=(sid,)).start()

    fns = [lambda p=p, s=s: greedy(coord, p, n, sid=s) for p, s in zip(PROMPTS, sids)]
    fns[1] = lambda: greedy(coord, PROMPTS[1], n, sid=sids[1], on_step=close_mid_way)
    got = run_threads(fns)
    assert isinstance(got[1], KeyError), got[1]  # its client went away: its steps stop
    for i in (0, 2, 3):
      assert got[i] == reference(PROMPTS[i], n)
    # Its slots are free again on both stages; the others' are not disturbed.
    assert wait_for(lambda: sids[1] not in ws[0].sessions)
    assert coord.batcher.n_free == coord.opt.max_sessions - 3
    assert all(s not in ws[0].sessions or ws[0].sessions.get(s).slot is not None
               for s in sids)


def test_one_session_losing_its_worker_state_mid_batch_is_rebuilt_alone():
  n = 20
  with coordinator(delay_s=DELAY_S) as coord, \
      workers(coord.address, ["1:2", "3:output"], delay_s=DELAY_S) as (ws, _):
    coord.wait_route(5)
    sids = [coord.new_session() for _ in PROMPTS]

    def lose_state(step, sid):
      if step == 6:  # the worker forgets this one session (as if it had evicted it)
        ws[1].sessions.drop(sid)

    fns = [lambda p=p, s=s: greedy(coord, p, n, sid=s) for p, s in zip(PROMPTS, sids)]
    fns[2] = lambda: greedy(coord, PROMPTS[2], n, sid=sids[2], on_step=lose_state)
    got = run_threads(fns)
    assert got == [reference(p, n) for p in PROMPTS]
    rebuilt = [e for e in coord.events if "rebuilt the KV" in e]
    assert rebuilt and all(sids[2] in e for e in rebuilt), coord.events


def test_queued_chunks_of_one_session_run_in_order_beside_other_sessions():
  """A long prompt (its prefill chunks pipelined: several in flight on a worker at once)
  while three sessions decode: every session is exact, so the chunks ran in order."""
  long_prompt = [int(t) for t in np.random.default_rng(3).integers(0, CFG.vocab_size, 40)]
  with coordinator(delay_s=DELAY_S, prefill_chunk=4) as coord, \
      workers(coord.address, ["1:1", "2:2", "3:output"], delay_s=DELAY_S) as (ws, _):
    coord.wait_route(5)
    fns = [lambda p=p: greedy(coord, p, 16) for p in PROMPTS[:3]]
    fns.append(lambda: greedy(coord, long_prompt, 2))
    got = run_threads(fns)
    assert got == [reference(p, 16) for p in PROMPTS[:3]] + [reference(long_prompt, 2)]
    assert all(w.batcher.stats.chunk_calls >= 10 for w in ws)  # the 40-token prompt: 10 chunks
