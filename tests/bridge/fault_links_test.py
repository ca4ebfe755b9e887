"""Faults injected into real coordinator <-> worker links (issue 6, item 6).

Each test breaks one link mid-generation with `faults.FaultInjector` as a transport `wrap`
hook (only the first connection is faulty; the worker's redial is clean). The break must be
detected with a logged reason, nothing may hang, and the greedy output must equal the
undisturbed one-process reference token for token.
"""

import logging
import threading
import time

import numpy as np
import pytest

from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
from ds4jax.testing.faults import Fault, FaultInjector
from ds4jax.wire.protocol import MsgType
from ds4jax.bridge.worker.worker import Worker, WorkerOptions
from ds4jax.config import LayerRange
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner, full_logits

CFG = FakeConfig()
CTX = 32
LOCAL = LayerRange(0, 1, False)
REMOTE = LayerRange(2, 3, True)
PROMPT = [4, 8, 15, 16]
N_NEW = 6
REQUEST_TIMEOUT = 1.0


def reference() -> list[int]:
  toks = list(PROMPT)
  for _ in range(N_NEW):
    toks.append(int(np.argmax(full_logits(CFG, toks)[-1])))
  return toks[len(PROMPT):]


def run(caplog, *, worker_wrap=None, coord_wrap=None):
  """Generates N_NEW tokens through a faulty link; returns (tokens, seconds, coordinator).
  The seconds are printed, not bounded (recovery takes about the detecting deadline)."""
  caplog.set_level(logging.INFO, logger="ds4jax.bridge")
  coord = Coordinator(
      FakeRunner(CFG, LOCAL, ctx_size=CTX),
      CoordinatorOptions(heartbeat_s=0.2, request_timeout=REQUEST_TIMEOUT, route_timeout=8,
                         frame_timeout=0.5, handshake_timeout=1.0, prefill_chunk=2,
                         wrap=coord_wrap))
  w = Worker(coord.address, fingerprint=CFG.fingerprint(), n_layers=CFG.n_layers,
             vocab_size=CFG.vocab_size, layers=REMOTE,
             load=lambda: FakeRunner(CFG, REMOTE, ctx_size=CTX),
             options=WorkerOptions(ctx=CTX, frame_timeout=0.5, backoff_min=0.05,
                                   backoff_max=0.2, wrap=worker_wrap))
  wt = threading.Thread(target=w.run, daemon=True)
  wt.start()
  out, t0 = [], time.monotonic()
  try:
    coord.wait_route(60)
    sid, toks = coord.new_session(), list(PROMPT)
    for k in range(N_NEW):
      res = coord.step(sid, toks, SamplingParams(), k)
      toks.append(res.token)
      out.append(res.token)
    elapsed = time.monotonic() - t0
  finally:
    w.stop()
    coord.close()
    wt.join(10)
  assert not wt.is_alive(), "worker did not stop"
  return out, elapsed, coord


def logged(caplog, logger, *texts) -> str:
  """The first record of `logger` containing every text (a tuple text: any of its items)."""
  def has(msg, t):
    return any(x in msg for x in t) if isinstance(t, tuple) else t in msg

  for r in caplog.records:
    if r.name == logger and all(has(r.getMessage(), t) for t in texts):
      return r.getMessage()
  raise AssertionError(f"{logger} logged nothing with {texts}: "
                       f"{[r.getMessage() for r in caplog.records if r.name == logger][-6:]}")


# Faults on what the worker sends: its third RESULT (mid-generation) is broken.
WORKER_SIDE = [
    ("corrupt", dict(offset=0, length=2), "bad magic"),
    ("truncate", dict(offset=20), "closed inside a frame"),
    ("close", dict(), "reset"),
    # A stalled send also holds back the PONGs: the request or the heartbeat deadline fires.
    ("delay", dict(delay_s=2.0), ("did not answer request", "sent nothing for")),
    ("drop", dict(length=None), ("did not answer request", "sent nothing for")),
]


@pytest.mark.parametrize("kind,kw,reason", WORKER_SIDE, ids=[k for k, _, _ in WORKER_SIDE])
def test_broken_worker_link_is_detected_and_recovered(caplog, kind, kw, reason):
  inj = FaultInjector([Fault(kind, after_frames=2, frame_type=MsgType.RESULT, **kw)], seed=3,
                      only=[0])
  out, elapsed, coord = run(caplog, worker_wrap=inj)
  assert out == reference()
  assert [e[2] for e in inj.events][:1] == [kind]  # the fault really fired, on link 0
  msg = logged(caplog, "ds4jax.bridge.coordinator", "dropping worker#1", reason)
  assert "127.0.0.1:" in msg
  assert any("worker lost" in e for e in coord.events)  # the user sees a warning
  print(f"\n{kind}: detected ({msg.split('dropping ', 1)[1][:70]}...) and recovered in "
        f"{elapsed:.2f}s")


def test_silent_worker_is_declared_dead_by_heartbeat(caplog):
  """Nothing at all (not even PONGs) after READY: the heartbeat deadline, not a request."""
  inj = FaultInjector([Fault("drop", after_frames=2, length=None)], only=[0])  # after READY
  out, _, _ = run(caplog, worker_wrap=inj)
  assert out == reference()
  logged(caplog, "ds4jax.bridge.coordinator", "dropping worker#1",
         ("sent nothing for", "did not answer request"))


def test_corrupted_work_is_detected_by_the_worker(caplog):
  """The coordinator's second WORK reaches the worker corrupted: the worker logs why it hung
  up and redials; the coordinator recovers the step."""
  inj = FaultInjector([Fault("corrupt", after_frames=1, frame_type=MsgType.WORK, length=1)],
                      seed=5, only=[0])
  out, _, coord = run(caplog, coord_wrap=inj)
  assert out == reference()
  assert inj.events and inj.events[0][1:3] == ("send", "corrupt")
  logged(caplog, "ds4jax.bridge.worker", "link to coordinator lost", "bad magic")
  logged(caplog, "ds4jax.bridge.coordinator", "dropping worker#1")


def test_probabilistic_corruption_is_deterministic_per_seed():
  """The same seed corrupts the same frames at the same bytes."""
  def events(seed):
    import socket
    from ds4jax.wire import protocol
    a, b = socket.socketpair()
    inj = FaultInjector([Fault("corrupt", after_frames=0, offset=30, p=0.25, count=None,
                               frame_type=MsgType.WORK)], seed=seed)
    fa = inj(a)
    for i in range(40):
      protocol.send_frame(fa, MsgType.PING if i % 3 else MsgType.WORK, {"i": i}, b"x" * 40)
    a.close()
    b.close()
    return inj.events

  assert events(1) == events(1) and events(1) != events(2) and events(1)
