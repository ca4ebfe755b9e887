"""Seeded fuzzing of a worker's inbound side (issue 6, item 4).

Workers only dial out, so a fake coordinator accepts each dial and answers with fuzzed
ACCEPTs, well-framed WORK with fuzzed fields and payloads (the worker must answer with a
ProtocolError or PrefixMismatch and stay up: anything else means a field reached code
unvalidated), link-killing garbage (the worker must hang up with a logged reason and dial
again), and silence (its liveness deadline). The worker runs in this process, so its RSS is
this process's RSS. Afterwards it serves a legitimate WORK exactly. Run with `-s` for the
numbers.
"""

import random
import socket
import time

import numpy as np

from ds4jax.wire import protocol, tensors
from ds4jax.wire.protocol import MsgType
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.fake_stage import FakeRunner
from ds4jax.testing.fuzzing import JUNK, Mutator, RssMonitor, frame, greedy_next, wait_for

from fuzz_setup import (CFG, CTX, HANG_S, LOCAL, REMOTE, RSS_BOUND,
                        fake_bridge)  # noqa: F401 - fake_bridge is a fixture

SEED = 20261127
N_WORKER = 2000
ALLOWED_ETYPES = {"ProtocolError", "PrefixMismatch"}
ACCEPT = {"worker_id": 1, "heartbeat_s": 0.2, "ctx": CTX}


def legit_work(rng: random.Random, tokens=None, x=None):
  """A valid WORK for the worker's range: (header, payload)."""
  tokens = tokens or [rng.randrange(CFG.vocab_size) for _ in range(rng.randint(1, 4))]
  n = len(tokens)
  if x is None:
    x = np.asarray([[[rng.uniform(-1, 1) for _ in range(CFG.d_model)]
                     for _ in range(CFG.n_hc)] for _ in range(n)], np.float32)
  desc, xb = tensors.encode(x, "f32")
  h = {"req": rng.randrange(1, 10**6), "sid": f"s{rng.randrange(10**6)}", "p": 0, "n": n,
       "w": "out", "L": str(REMOTE), "x": desc["dtype"],
       "hb": protocol.hash_hex(protocol.FNV_INIT),
       "ha": protocol.hash_hex(protocol.fnv1a64(tokens)),
       "s": SamplingParams().to_dict(), "st": 0, "k": 0, "od": "f32"}
  return h, protocol.tokens_to_bytes(tokens) + xb


class FakeCoordinator:
  def __init__(self):
    self.lsock = socket.create_server(("127.0.0.1", 0))
    self.addr = self.lsock.getsockname()[:2]
    self.dials = 0

  def accept(self) -> socket.socket:
    self.lsock.settimeout(HANG_S)
    s, _ = self.lsock.accept()  # a timeout here means the worker stopped dialling
    self.dials += 1
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = protocol.recv_frame(s, idle_timeout=HANG_S, frame_timeout=HANG_S)
    assert f.type == MsgType.HELLO and f.header["start"] == REMOTE.start, f
    return s

  def close(self):
    self.lsock.close()


def react(sock, deadline, until):
  """The worker's reaction: ('alive', frames) once a frame satisfies `until`, or ('closed',
  frames) when it hangs up. Fails on a hang."""
  frames = []
  while True:
    left = deadline - time.monotonic()
    assert left > 0, f"worker neither answered nor hung up in time (saw {frames})"
    try:
      f = protocol.recv_frame(sock, idle_timeout=left, frame_timeout=2.0)
    except (EOFError, ConnectionResetError):
      return "closed", frames
    except protocol.IdleTimeout:
      continue
    frames.append(f)
    if until(f):
      return "alive", frames


def is_ready(f):
  return f.type == MsgType.READY


def is_reply(f):
  return f.type in (MsgType.ERROR, MsgType.RESULT)


def is_pong(t):
  return lambda f: f.type == MsgType.PONG and f.header.get("t") == t


def worker_killing_case(m: Mutator, phase: str):
  """(kind, bytes, hold) for a case that should (or may) make the worker hang up."""
  if phase == "pre":
    mtype, valid = MsgType.ACCEPT, frame(MsgType.ACCEPT, ACCEPT)
  else:
    mtype = MsgType.WORK
    valid = frame(MsgType.WORK, *legit_work(m.rng))
  kind = m.rng.choice(["garbage", "truncated", "bitflip", "absurd", "badjson", "wrongtype",
                       "badfields" if phase == "pre" else "bitflip"])
  hold = False
  if kind == "garbage":
    data = m.garbage()
  elif kind == "truncated":
    data, hold = m.truncated(valid), True
  elif kind == "bitflip":
    data = m.bitflip(valid)
  elif kind == "absurd":
    data, hold = m.absurd(mtype), True
  elif kind == "badjson":
    data = m.bad_json(mtype)
  elif kind == "badfields":
    data = frame(MsgType.ACCEPT, m.bad_fields(ACCEPT))
  else:
    bad = [t for t in MsgType if t not in (MsgType.REFUSE, MsgType.ACCEPT, MsgType.PING,
                                           MsgType.WORK, MsgType.DROP)]
    data = frame(m.rng.choice(bad), {"req": 1})
  if data[:4] == protocol.MAGIC and len(data) > 5 and data[5] == MsgType.REFUSE:
    data = data[:5] + bytes([MsgType.ACCEPT]) + data[6:]  # REFUSE stops a worker by design
  return kind, data, hold


def worker_work_case(m: Mutator) -> bytes:
  """A well-framed WORK with fuzzed fields or payload: the worker must answer, not die."""
  h, payload = legit_work(m.rng)
  r = m.rng.random()
  if r < 0.5:
    h = m.bad_fields(h)
  elif r < 0.65:
    h["x"] = m.rng.choice(JUNK + ["bf16", "int8", "f16", "F32"])  # WORK's x: the dtype only
  elif r < 0.75:
    h["s"] = m.bad_fields(h["s"])
  elif r < 0.85:
    payload = m.truncated(payload) if m.rng.random() < 0.5 else payload + m.rng.randbytes(9)
  else:
    payload = m.bitflip(payload)
  return frame(MsgType.WORK, h, payload)


def test_fuzz_worker(logs, fake_bridge):
  fc = FakeCoordinator()
  _, wt = fake_bridge.worker(fc.addr, frame_timeout=0.1, dead_after=1.0)
  m = Mutator(SEED)
  rss = RssMonitor()
  t0 = time.monotonic()
  sock, phase = fc.accept(), "pre"
  kinds, kills, bad_etypes, replies, max_case_s, time_by_kind = {}, 0, [], 0, 0.0, {}
  slow_due = False
  try:
    for i in range(N_WORKER):
      tc = time.monotonic()
      if sock is None:
        sock, phase = fc.accept(), "pre"
      if phase == "pre" and m.rng.random() < 0.75:
        protocol.send_frame(sock, MsgType.ACCEPT, ACCEPT)
        assert react(sock, time.monotonic() + HANG_S, is_ready)[0] == "alive"
        phase = "proper"
      r = m.rng.random()
      slow_due = slow_due or i % 700 == 350
      if phase == "pre":
        kind, data, hold = worker_killing_case(m, "pre")
      elif r < 0.75:
        kind, data, hold = "workfields", worker_work_case(m), False
      elif slow_due and phase == "proper":
        kind, data, hold = "slowloris", b"", True  # nothing at all: the 1 s liveness deadline
        slow_due = False
      else:
        kind, data, hold = worker_killing_case(m, "serve")
      kinds[kind] = kinds.get(kind, 0) + 1
      # Afterwards the worker must hang up, or show it is alive: READY after an ACCEPT, the
      # reply to a WORK, or (after garbage) the PONG to a PING sent behind it.
      until = is_ready if phase == "pre" else is_reply if kind == "workfields" else is_pong(i)
      # Cut inside the frame (else: stall past the deadline). Drawn before sending, so a
      # send that fails cannot shift the generator.
      cut = hold and kind != "slowloris" and m.rng.random() < 0.7
      try:
        sock.sendall(data)
        if cut:
          sock.shutdown(socket.SHUT_WR)
        if until not in (is_ready, is_reply) and not hold:
          sock.sendall(frame(MsgType.PING, {"t": i}))
      except OSError:
        pass
      state, frames = react(sock, time.monotonic() + HANG_S, until)
      for f in frames:
        if f.type == MsgType.ERROR:
          replies += 1
          if f.header.get("etype") not in ALLOWED_ETYPES:
            bad_etypes.append((f.header.get("etype"), f.header.get("message")))
        elif f.type == MsgType.RESULT:
          replies += 1
      if state == "closed":
        kills += 1
        sock.close()
        sock = None
      elif phase == "pre":
        phase = "fuzzed"  # accepted a fuzzed ACCEPT: keep serving on it
      max_case_s = max(max_case_s, time.monotonic() - tc)
      time_by_kind[kind] = time_by_kind.get(kind, 0.0) + time.monotonic() - tc
    fuzz_s = time.monotonic() - t0
    assert not bad_etypes, f"unvalidated fields reached code that raised: {bad_etypes[:5]}"
    assert wt.is_alive(), "the worker stopped"
    assert kinds["workfields"] > 1000 and replies >= kinds["workfields"]
    assert kills > 200 and fc.dials == kills + (sock is not None) and kinds["slowloris"] >= 2

    # Every hang-up was logged with its reason.
    def n_logged():
      return sum(msg.startswith(("link to coordinator lost", "connection to coordinator failed"))
                 for msg in logs.messages)
    wait_for(lambda: n_logged() >= kills, HANG_S, "a logged reason for every disconnect")

    # Afterwards the worker serves a legitimate request exactly.
    if sock is None:
      sock, phase = fc.accept(), "pre"
    if phase == "pre":
      protocol.send_frame(sock, MsgType.ACCEPT, ACCEPT)
      assert react(sock, time.monotonic() + HANG_S, is_ready)[0] == "alive"
    toks = [3, 1, 4, 1, 5]
    local = FakeRunner(CFG, LOCAL, ctx_size=CTX)
    x, _ = local.forward(local.init_state(), toks, None, 0)
    h, payload = legit_work(random.Random(0), toks, x)
    protocol.send_frame(sock, MsgType.WORK, h, payload)
    state, frames = react(sock, time.monotonic() + HANG_S, is_reply)
    f = frames[-1]
    assert state == "alive" and f.type == MsgType.RESULT and f.header["token"] == greedy_next(CFG, toks), f.header
    growth = rss.stop()
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"
    print(f"\nworker fuzz: {N_WORKER} cases {kinds}, {kills} hang-ups and redials, {replies} "
          f"error/result replies, {fuzz_s:.1f}s, max {max_case_s:.2f}s per case, max RSS "
          f"growth {growth / 2**20:.1f} MiB (peak {rss.peak / 2**20:.0f} MiB); seconds by kind "
          f"{ {k: round(v, 1) for k, v in time_by_kind.items()} }")
  finally:
    if sock is not None:
      sock.close()
    fc.close()


def test_accept_with_absurd_heartbeat_is_refused_by_the_worker(logs, fake_bridge):
  """A heartbeat of 1e308 s would switch off the worker's dead-coordinator check."""
  fc = FakeCoordinator()
  fake_bridge.worker(fc.addr)
  try:
    sock = fc.accept()
    protocol.send_frame(sock, MsgType.ACCEPT, dict(ACCEPT, heartbeat_s=1e308))
    assert react(sock, time.monotonic() + HANG_S, is_ready)[0] == "closed"
    sock.close()
    wait_for(lambda: any("heartbeat_s=1e+308 is outside" in msg for msg in logs.messages), 3,
             "the reason to be logged")
    fc.accept().close()  # and it dials again
  finally:
    fc.close()
