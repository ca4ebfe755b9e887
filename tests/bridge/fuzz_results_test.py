"""Seeded fuzzing of what an admitted worker sends back (issue 6, item 4).

The coordinator's other inbound surface: a worker that got in (right fingerprint, right
key) and then answers WORK with fuzzed RESULT/ERROR frames, garbage, duplicates, replies to
unknown requests, or silence. Every `step` must return the reference token or raise a
`BridgeError` with a reason (never a TypeError/KeyError from an unvalidated field) within a
bound, no thread may die with an uncaught exception, and after each case the same session
must keep generating correctly (the liar redials and answers honestly).
"""

import socket
import threading
import time

import pytest

from ds4jax.wire import protocol
from ds4jax.wire.errors import BridgeError
from ds4jax.wire.protocol import MsgType
from ds4jax.bridge.worker.worker import Worker, WorkerOptions
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.fake_stage import FakeRunner
from ds4jax.testing.fuzzing import Mutator, frame, greedy_next

from fuzz_setup import (CFG, CTX, HANG_S, REMOTE, assert_continues_exactly,
                        fake_bridge)  # noqa: F401 - fake_bridge is a fixture

SEED = 20261128
N_CASES = 400


class Liar:
  """A fake worker that computes honest replies (with the real worker's code) and lets the
  test replace the next one with a mutation."""

  def __init__(self, addr):
    self.addr = addr
    self.w = Worker(addr, fingerprint=CFG.fingerprint(), n_layers=CFG.n_layers,
                    vocab_size=CFG.vocab_size, layers=REMOTE, load=lambda: None,
                    options=WorkerOptions(ctx=CTX))
    self.w.use_runner(FakeRunner(CFG, REMOTE, ctx_size=CTX))
    self.mutation = None  # (reply index within the case, fn(mtype, header, payload) -> bytes)
    self.replies = 0
    self.lock = threading.Lock()
    self.stop = threading.Event()
    self.dials = 0
    self.t = threading.Thread(target=self._run, daemon=True, name="fuzz-liar")
    self.t.start()

  def arm(self, index, fn):
    with self.lock:
      self.mutation, self.replies = (index, fn), 0

  def disarm(self):
    with self.lock:
      self.mutation = None

  def _take(self):
    with self.lock:
      m, i = self.mutation, self.replies
      self.replies += 1
      if m is not None and m[0] == i:
        self.mutation = None
        return m[1]
      return None

  def _run(self):
    while not self.stop.is_set():
      try:
        s = socket.create_connection(self.addr, timeout=2)
      except OSError:
        time.sleep(0.01)
        continue
      self.dials += 1
      try:
        self._serve(s)
      except (OSError, EOFError, BridgeError):
        pass
      finally:
        s.close()
        self.w.sessions.clear()

  def _serve(self, s):
    protocol.send_frame(s, MsgType.HELLO, self.w.hello())
    f = protocol.recv_frame(s, idle_timeout=2, frame_timeout=2)
    if f.type != MsgType.ACCEPT:
      return
    protocol.send_frame(s, MsgType.READY, {})
    while not self.stop.is_set():
      try:
        f = protocol.recv_frame(s, idle_timeout=0.1, frame_timeout=2)
      except protocol.IdleTimeout:
        continue
      if f.type == MsgType.PING:
        protocol.send_frame(s, MsgType.PONG, {"t": f.header.get("t", 0)})
        continue
      if f.type == MsgType.DROP:
        self.w.sessions.drop(str(f.header.get("sid", "")))
        continue
      try:
        mtype, (h, p) = MsgType.RESULT, self.w._work(f, time.monotonic())
      except Exception as e:  # noqa: BLE001 - an honest worker reports it as an ERROR
        mtype, h, p = MsgType.ERROR, {"req": f.header.get("req"), "etype": type(e).__name__,
                                      "message": str(e), "traceback": ""}, b""
      fn = self._take()
      s.sendall(frame(mtype, h, p) if fn is None else fn(mtype, h, p))


def mutations(m: Mutator):
  """Named functions (mtype, header, payload) -> the bytes to send instead of the reply."""
  def fields(mt, h, p):
    return frame(mt, m.bad_fields(h), p)

  def payload(mt, h, p):
    return frame(mt, h, m.truncated(p) if p and m.rng.random() < 0.5 else p + m.rng.randbytes(7))

  def token(mt, h, p):
    return frame(mt, dict(h, token=m.rng.choice([-1, CFG.vocab_size, 2**40, "7", 7.5, None])), p)

  def telemetry(mt, h, p):
    return frame(mt, dict(h, t=m.rng.choice([7, "x", [7], [{"compute_s": "x"}], {}, [1, -1], [1.5, 2]])), p)

  def logprobs(mt, h, p):
    return frame(mt, dict(h, logprobs=m.rng.choice([7, [[1]], [["a", "b"]], [None], "x"])), p)

  def error(mt, h, p):
    return frame(MsgType.ERROR, m.bad_fields({"req": h.get("req"), "etype": "Boom",
                                              "message": "m", "traceback": "t"}))

  def wrongreq(mt, h, p):
    return frame(mt, dict(h, req=int(h.get("req", 0)) + 10**6), p)

  def duplicate(mt, h, p):
    return frame(mt, h, p) * 2

  def garbage(mt, h, p):
    return m.garbage()

  def bitflip(mt, h, p):
    return m.bitflip(frame(mt, h, p))

  def wrongtype(mt, h, p):
    return frame(m.rng.choice([MsgType.HELLO, MsgType.READY, MsgType.ACCEPT, MsgType.WORK]), h)

  def silence(mt, h, p):
    return b""

  return [fields, payload, token, telemetry, logprobs, error, wrongreq, duplicate, garbage,
          bitflip, wrongtype, silence]


@pytest.fixture
def thread_crashes(monkeypatch):
  crashes = []
  monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(
      (args.thread.name if args.thread else "?", repr(args.exc_value))))
  return crashes


def test_fuzz_replies_from_an_admitted_worker(logs, thread_crashes, fake_bridge):
  coord = fake_bridge.coordinator(heartbeat_s=0.2, request_timeout=0.6, route_timeout=2.0,
                                  prefill_chunk=2, handshake_timeout=1.0, frame_timeout=0.5)
  liar = Liar(coord.address)
  m = Mutator(SEED)
  muts = mutations(m)
  outcomes, unclear, t0, slowest = {}, [], time.monotonic(), 0.0
  try:
    coord.wait_route(5)
    sid, toks = coord.new_session(), [1, 2, 3]
    for i in range(N_CASES):
      # Silence costs a request deadline: every 40th case only.
      fn = muts[-1] if i % 40 == 20 else m.rng.choice(muts[:-1])
      liar.arm(m.rng.choice([0, 1]), fn)
      if len(toks) > CTX - 4:
        coord.close_session(sid)
        sid, toks = coord.new_session(), [1, 2, 3]
      tc = time.monotonic()
      try:
        res = coord.step(sid, toks, SamplingParams(), len(toks))
        outcome = "token"
        if fn.__name__ not in ("token", "fields", "bitflip"):  # those may lie about the token
          assert res.token == greedy_next(CFG, toks), f"{fn.__name__}: wrong token accepted"
        assert 0 <= res.token < CFG.vocab_size, f"{fn.__name__}: token {res.token} accepted"
        toks.append(greedy_next(CFG, toks))
      except BridgeError as e:
        outcome = type(e).__name__
      except Exception as e:  # noqa: BLE001 - an unvalidated field reached code
        outcome = "unclear"
        unclear.append((fn.__name__, repr(e)))
      dt = time.monotonic() - tc
      slowest = max(slowest, dt)
      assert dt < HANG_S, f"{fn.__name__}: step took {dt:.1f}s"  # a hang guard; printed below
      key = (fn.__name__, outcome)
      outcomes[key] = outcomes.get(key, 0) + 1
    elapsed = time.monotonic() - t0
    assert not unclear, f"{len(unclear)} unclear failures, e.g. {unclear[:5]}"
    assert not thread_crashes, thread_crashes[:5]
    # The session still generates exactly with an honest worker. The last case may have armed a
    # mutation for a reply its step never asked for (a one-reply step, index 1): disarm it.
    liar.disarm()
    assert_continues_exactly(coord, sid, toks)
    print(f"\nreply fuzz: {N_CASES} cases, {elapsed:.1f}s, slowest step {slowest:.2f}s, "
          f"{liar.dials} dials, outcomes {sorted(outcomes.items())}")
  finally:
    liar.stop.set()
    liar.t.join(5)
