"""The prefill window, observed from the stages themselves (fake stages that log when each
chunk starts and ends): never more than `window` chunks in flight, and the window is used.

Chunks settle in order (every hop is FIFO), so with a window of W the coordinator may start
chunk c+W only after chunk c has left the head stage: start_local[c+W] > end_head[c]. A
coordinator that ignored the window would start chunk c+W as soon as its own stage is free.
"""

import threading
import time

import numpy as np
import pytest

from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
from ds4jax.bridge.worker.worker import Worker, WorkerOptions
from ds4jax.config import LayerRange
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner, full_logits

CFG = FakeConfig()
DELAY = 0.03  # per chunk, every stage


class LoggingRunner(FakeRunner):
  """A FakeRunner that records (pos0, start, end) of every row of its (batched) calls."""

  def __init__(self, *a, **kw):
    super().__init__(*a, **kw)
    self.calls = []

  def forward_batch(self, pool, slots_B, tokens_BT, hc_BTCD, n_valid_B):
    pos = [pool[s].pos for s in slots_B]
    t0 = time.monotonic()
    out = super().forward_batch(pool, slots_B, tokens_BT, hc_BTCD, n_valid_B)
    self.calls += [(p, t0, time.monotonic()) for p in pos]
    return out


@pytest.mark.parametrize("window", [2, 3])
def test_in_flight_chunks_never_exceed_the_window(window):
  chunk, n_chunks = 2, 8
  prompt = [(5 * k + 1) % CFG.vocab_size for k in range(chunk * n_chunks)]
  local = LoggingRunner(CFG, LayerRange(0, 0), 64, DELAY)
  runners = {}
  with Coordinator(local, CoordinatorOptions(port=0, prefill_chunk=chunk, window=window,
                                             heartbeat_s=0.2, route_timeout=10)) as coord:
    ws, ts = [], []
    for spec in ("1:2", "3:output"):
      rng = LayerRange.parse(spec, CFG.n_layers)
      runners[spec] = LoggingRunner(CFG, rng, 64, DELAY)
      w = Worker(coord.address, fingerprint=CFG.fingerprint(), n_layers=CFG.n_layers,
                 vocab_size=CFG.vocab_size, layers=rng, load=lambda r=runners[spec]: r,
                 options=WorkerOptions(ctx=64, warmup=False))
      ws.append(w)
      ts.append(threading.Thread(target=w.run, daemon=True))
      ts[-1].start()
    try:
      coord.wait_route(10)
      r = coord.step(coord.new_session(), prompt, SamplingParams(), 0, return_logits=True)
    finally:
      for w in ws:
        w.abort()
      for t in ts:
        t.join(5)
  np.testing.assert_array_equal(r.logits_V, full_logits(CFG, prompt)[-1])
  start = {p: t0 for p, t0, _ in local.calls}
  end = {p: t1 for p, _, t1 in runners["3:output"].calls}
  pos = [c * chunk for c in range(n_chunks)]
  assert sorted(start) == pos and sorted(end) == pos
  # Never more than `window` in flight: chunk c+W starts after chunk c left the head.
  for c in range(n_chunks - window):
    assert start[pos[c + window]] > end[pos[c]], f"chunk {c + window} started too early"
  # ...and the window is used: some chunk c+W-1 starts while chunk c is still in the route.
  assert any(start[pos[c + window - 1]] < end[pos[c]] for c in range(n_chunks - window + 1))
