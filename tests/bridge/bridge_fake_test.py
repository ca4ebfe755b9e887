"""The bridge end to end in one process (threads, real loopback sockets) over a fake numpy
stage whose outputs depend on every earlier token. Fast; the same behaviour with the real
model and real processes is in e2e_test.py."""

import contextlib
import threading
import time

import numpy as np
import pytest

from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
from ds4jax.wire.errors import HandshakeRefused, RouteUnavailable
from ds4jax.bridge.worker.worker import Worker, WorkerOptions
from ds4jax.config import LayerRange
from ds4jax.local_cluster import free_port
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner, full_logits

CFG = FakeConfig()
GREEDY = SamplingParams()


@contextlib.contextmanager
def workers(addr, specs, cfg=CFG, delay_s=0.0, runner=FakeRunner, **kw):
  """Worker threads for the given ranges; yields (workers, errors list)."""
  ws, threads, errors = [], [], []
  for spec in specs:
    rng = spec if isinstance(spec, LayerRange) else LayerRange.parse(spec, cfg.n_layers)
    opt = WorkerOptions(**{"ctx": 64, "backoff_min": 0.05, "backoff_max": 0.2, **kw})
    w = Worker(tuple(addr), fingerprint=cfg.fingerprint(), n_layers=cfg.n_layers,
               vocab_size=cfg.vocab_size, layers=rng, options=opt,
               load=lambda rng=rng: runner(cfg, rng, opt.ctx, delay_s))

    def run(w=w):
      try:
        w.run()
      except Exception as e:
        errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ws.append(w)
    threads.append(t)
  try:
    yield ws, errors
  finally:
    for w in ws:
      w.abort()
    for t in threads:
      t.join(timeout=5)


def wait_for(cond, what: str, timeout: float = 30.0) -> None:
  """Polls cond() under a hang guard."""
  deadline = time.monotonic() + timeout
  while not cond():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


def coordinator(local="0:0", ctx=64, delay_s=0.0, runner=FakeRunner, **kw):
  opt = dict(port=0, route_timeout=5, prefill_chunk=3, heartbeat_s=0.2, request_timeout=5)
  opt.update(kw)
  return Coordinator(runner(CFG, LayerRange.parse(local, CFG.n_layers), ctx, delay_s),
                     CoordinatorOptions(**opt))


def generate(coord, prompt, n, sid=None, check=True, dtype=None):
  """Greedy generation; checks every logits row against one process when check."""
  sid = sid or coord.new_session(dtype)
  toks, rows = list(prompt), []
  for step in range(n):
    r = coord.step(sid, toks, GREEDY, step, return_logits=True)
    if check:
      np.testing.assert_array_equal(r.logits_V, full_logits(CFG, toks)[-1])
    rows.append(r.logits_V)
    toks.append(r.token)
  return toks[len(prompt):], rows


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]


@pytest.mark.parametrize("local,specs", [
    ("0:output", []),
    ("0:0", ["1:output"]),
    ("0:1", ["2:output"]),
    ("0:0", ["1:2", "3:output"]),
    ("0:0", ["1:1", "2:2", "3:output"]),
])
def test_exact_split(local, specs):
  with coordinator(local) as coord, workers(coord.address, specs):
    if specs:
      assert coord.wait_route(5)
    out, _ = generate(coord, PROMPT, 8)
    assert len(out) == 8


def test_prefix_reuse_rewind_and_two_threads():
  with coordinator() as coord, workers(coord.address, ["1:2", "3:output"]):
    sid = coord.new_session()
    r = coord.step(sid, PROMPT, GREEDY, 0)
    assert r.n_computed == len(PROMPT)
    r = coord.step(sid, PROMPT + [r.token, 7], GREEDY, 1, return_logits=True)
    assert r.n_computed == 2
    diverged = PROMPT[:4] + [11, 12]
    r = coord.step(sid, diverged, GREEDY, 2, return_logits=True)
    assert r.n_computed == 2  # rewound to the 4-token common prefix
    np.testing.assert_array_equal(r.logits_V, full_logits(CFG, diverged)[-1])
    results, errs = {}, []

    def run(name, prompt):
      try:
        results[name] = generate(coord, prompt, 6)[0]
      except Exception as e:  # surfaced below
        errs.append(e)

    ts = [threading.Thread(target=run, args=(i, PROMPT[i:] + [i])) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errs and len(results) == 2


def test_worker_eviction_is_rebuilt_from_cached_inputs():
  with coordinator() as coord, workers(coord.address, ["1:2", "3:output"], max_sessions=1):
    a, b = coord.new_session(), coord.new_session()
    ta, tb = list(PROMPT), PROMPT[::-1]
    for step in range(3):  # every step evicts the other session on both workers
      for sid, toks in ((a, ta), (b, tb)):
        r = coord.step(sid, toks, GREEDY, step, return_logits=True)
        np.testing.assert_array_equal(r.logits_V, full_logits(CFG, toks)[-1])
        toks.append(r.token)
    assert any("rebuilt the KV" in e for e in coord.events)


def test_spare_takes_over_without_changing_the_output():
  with coordinator("0:output") as one:
    ref, _ = generate(one, PROMPT, 10, check=False)
  with coordinator() as coord, workers(coord.address, ["1:2", "3:output"]) as (ws, _):
    sid = coord.new_session()
    first, _ = generate(coord, PROMPT, 4, sid=sid)
    with workers(coord.address, ["1:2"]):  # a spare joins, then the primary dies
      deadline = time.monotonic() + 5
      while len(coord.route_info()["workers"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
      ws[0].abort()
      toks = PROMPT + first
      for step in range(4, 10):
        r = coord.step(sid, toks, GREEDY, step, return_logits=True)
        np.testing.assert_array_equal(r.logits_V, full_logits(CFG, toks)[-1])
        toks.append(r.token)
    assert toks[len(PROMPT):] == ref
    assert any("rebuilt the KV" in e for e in coord.events)


def test_start_order_and_coordinator_restart(logs):
  port = free_port()
  with workers(("127.0.0.1", port), ["1:output"]) as (ws, _):
    deadline = time.monotonic() + 60  # a hang guard
    while not any("not reachable" in m for m in logs.messages):  # it dials before we listen
      assert time.monotonic() < deadline, "the worker never dialed"
      time.sleep(0.01)
    with coordinator(port=port) as coord:
      out1, _ = generate(coord, PROMPT, 3)
    with coordinator(port=port) as coord:  # a restart: the worker redials on its own
      out2, _ = generate(coord, PROMPT, 3)
    assert out1 == out2 and ws[0].connections == 2


@pytest.mark.parametrize("kind,expect", [
    ("version", "protocol version 99 is not supported"),
    ("model", "model mismatch"),
    ("range", "layer range 2:9 ends past the final model layer 3"),
    ("head", "owns the output head but not the last layer 3"),
    ("ctx", "worker context too small: worker=16 coordinator=64"),
])
def test_refusals_show_the_reason_on_both_sides(kind, expect):
  cfg, spec, kw = CFG, "1:output", {}
  if kind == "version":
    kw["protocol_version"] = 99
  elif kind == "model":
    cfg = FakeConfig(seed=1)
  elif kind == "range":
    spec = LayerRange(2, 9)
  elif kind == "head":
    spec = LayerRange(1, 2, True)
  else:
    kw["ctx"] = 16
  with coordinator() as coord, workers(coord.address, [spec], cfg=cfg, **kw) as (_, errors):
    deadline = time.monotonic() + 5
    while not errors and time.monotonic() < deadline:
      time.sleep(0.02)
    assert len(errors) == 1 and isinstance(errors[0], HandshakeRefused)
    assert expect in errors[0].reason
    assert any(expect in e for e in coord.events)
    assert not coord.route_ready()[0]


def test_route_unavailable_names_why_the_last_worker_was_refused():
  with coordinator(route_timeout=0.5) as coord, workers(coord.address, ["1:1"]), \
      workers(coord.address, ["2:output"], cfg=FakeConfig(seed=1)) as (_, errors):
    wait_for(lambda: errors, "the refused worker's error")
    sid = coord.new_session()
    with pytest.raises(RouteUnavailable) as e:
      coord.step(sid, PROMPT, GREEDY, 0)
    msg = str(e.value)
    assert "missing layer 2" in msg and "model mismatch" in msg
    assert "the last worker offering layer 2 was refused" in msg
    with workers(coord.address, ["2:output"]):  # an accepted worker clears the note
      generate(coord, PROMPT, 1, sid=sid)
      assert "refused" not in coord._unavailable("x", 0.0).args[0]


def test_route_reason_names_workers_still_loading():
  gate = threading.Event()
  with coordinator() as coord:
    rng = LayerRange.parse("1:output", CFG.n_layers)
    w = Worker(tuple(coord.address), fingerprint=CFG.fingerprint(), n_layers=CFG.n_layers,
               vocab_size=CFG.vocab_size, layers=rng, options=WorkerOptions(ctx=64),
               load=lambda: gate.wait(30) and FakeRunner(CFG, rng, 64))
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
      wait_for(lambda: "loading" in coord.route_ready()[1], "the loading worker in the reason")
      ok, reason = coord.route_ready()
      assert not ok and reason.startswith("missing layer 1")
      assert "worker#1 loading 1:3+output" in reason
      gate.set()
      wait_for(lambda: coord.route_ready()[0], "the route")
    finally:
      gate.set()
      w.abort()
      t.join(timeout=5)


def test_route_unavailable_while_status_answers():
  with coordinator(route_timeout=0.6) as coord, workers(coord.address, ["1:1"]):
    sid = coord.new_session()
    seen = []
    t = threading.Thread(target=lambda: seen.append(coord.route_info()))
    t0 = time.monotonic()
    t.start()
    with pytest.raises(RouteUnavailable, match="unavailable: missing layer 2"):
      coord.step(sid, PROMPT, GREEDY, 0)
    t.join()
    assert seen and seen[0]["ready"] is False and time.monotonic() - t0 >= 0.6
    with workers(coord.address, ["2:output"]):  # the route comes back: same session works
      generate(coord, PROMPT, 2, sid=sid)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_lossy_wire_dtypes_finish(dtype):
  with coordinator() as coord, workers(coord.address, ["1:2", "3:output"]):
    ref, _ = generate(coord, PROMPT, 6)
    out, _ = generate(coord, PROMPT, 6, check=False, dtype=dtype)
    assert len(out) == 6
    sid = coord.new_session(dtype)  # teacher-forced on the f32 transcript: comparable rows
    toks = PROMPT + ref
    r = coord.step(sid, toks, GREEDY, 0, return_logits=True)
    d = float(np.abs(r.logits_V - full_logits(CFG, toks)[-1]).max())
    assert 0 < d < 0.5


def test_head_samples_with_coordinator_params_and_returns_logprobs():
  from ds4jax.runtime import sampling
  params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=7)
  with coordinator() as coord, workers(coord.address, ["1:2", "3:output"]):
    sid, toks = coord.new_session(), list(PROMPT)
    for step in range(6):
      r = coord.step(sid, toks, params, step, top_logprobs=3)
      logits = full_logits(CFG, toks)[-1]
      assert r.token == sampling.sample_token(logits, params, step)
      assert r.logits_V is None
      assert [i for i, _ in r.logprobs] == [i for i, _ in sampling.top_logprobs(logits, 3)]
      np.testing.assert_allclose([lp for _, lp in r.logprobs],
                                 [lp for _, lp in sampling.top_logprobs(logits, 3)], rtol=1e-12)
      toks.append(r.token)
    info = coord.route_info()
    assert info["last_step"]["n_computed"] == 1 and info["last_step"]["wire_bytes"] > 0


def test_no_replacement_fails_clearly_then_the_session_recovers():
  with coordinator("0:output") as one:
    ref, _ = generate(one, PROMPT, 6, check=False)
  with coordinator(route_timeout=0.5) as coord, \
      workers(coord.address, ["1:2", "3:output"]) as (ws, _):
    sid = coord.new_session()
    first, _ = generate(coord, PROMPT, 3, sid=sid)
    ws[1].abort()
    with pytest.raises(RouteUnavailable, match="missing layer 3"):
      coord.step(sid, PROMPT + first, GREEDY, 3)
    with workers(coord.address, ["3:output"]):
      coord.opt.route_timeout = 5
      toks = PROMPT + first
      for step in range(3, 6):
        r = coord.step(sid, toks, GREEDY, step, return_logits=True)
        np.testing.assert_array_equal(r.logits_V, full_logits(CFG, toks)[-1])
        toks.append(r.token)
    assert toks[len(PROMPT):] == ref


def test_coordinator_session_limit_evicts_idle_local_state():
  with coordinator(max_sessions=1) as coord, workers(coord.address, ["1:output"]):
    a, b = coord.new_session(), coord.new_session()
    ta, tb = list(PROMPT), PROMPT[::-1]
    for step in range(3):
      for sid, toks in ((a, ta), (b, tb)):
        r = coord.step(sid, toks, GREEDY, step, return_logits=True)
        np.testing.assert_array_equal(r.logits_V, full_logits(CFG, toks)[-1])
        assert r.n_computed == len(toks)  # the other session evicted it: from 0 again
        toks.append(r.token)


def test_prefill_is_pipelined_across_stages():
  """The coordinator computes prefill chunk k+1 while the first worker computes chunk k: that
  worker's first chunk is held until the coordinator has started its second, which a serial
  prefill (waiting for each chunk's result) would never do."""
  second_chunk_started, held_out = threading.Event(), []

  class Local(FakeRunner):
    def _row(self, state, tokens_T, hc_TCD, pos0):
      if pos0 == 2:  # the coordinator's second 2-token chunk
        second_chunk_started.set()
      return super()._row(state, tokens_T, hc_TCD, pos0)

  class FirstWorker(FakeRunner):
    def _row(self, state, tokens_T, hc_TCD, pos0):
      if pos0 == 0 and self.layers.start == 1 and not second_chunk_started.wait(60):
        held_out.append(pos0)  # the coordinator never moved on: not pipelined
      return super()._row(state, tokens_T, hc_TCD, pos0)

  prompt = list(range(1, 13))
  with coordinator(runner=Local, prefill_chunk=2, route_timeout=60, request_timeout=120) as coord, \
      workers(coord.address, ["1:2", "3:output"], runner=FirstWorker):
    coord.wait_route(60)
    r = coord.step(coord.new_session(), prompt, GREEDY, 0, return_logits=True)
  assert not held_out, "the coordinator waited for the worker's first chunk before its second"
  np.testing.assert_array_equal(r.logits_V, full_logits(CFG, prompt)[-1])
  assert [t.n_tokens for t in r.telemetry] == [len(prompt)] * 3
