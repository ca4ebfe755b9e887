"""Seeded fuzzing of a listening coordinator (issue 6, item 4); the worker's side is in
fuzz_worker_test.py.

The coordinator runs in this process, so its RSS is this process's RSS (the fuzz client
builds a few KiB per case). Every case is a fresh TCP connection carrying garbage, a
truncated or bit-flipped HELLO, absurd lengths, a valid header with bad JSON, a HELLO with
fuzzed fields, a wrong first frame, or nothing at all (slowloris); a keyed coordinator also
gets hostile auth handshakes. Meanwhile a legitimate worker stays connected and a background
thread keeps generating through it. Each case must end within a bound (the coordinator hangs
up), every rejection is logged with the peer's address, RSS growth stays bounded, the
generated tokens equal the one-process reference, and a legitimate worker joins afterwards.
Run with `-s` for the numbers (cases, max RSS growth, time).
"""

import concurrent.futures as cf
import socket
import threading
import time

from ds4jax.wire import auth, protocol
from ds4jax.wire.protocol import MsgType
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.fuzzing import (Mutator, RssMonitor, drain_until_eof, frame, greedy_next,
                                    wait_for)

from fuzz_setup import (CFG, CTX, HANG_S, REMOTE, RSS_BOUND, assert_continues_exactly,
                        fake_bridge)  # noqa: F401 - fake_bridge is a fixture

SEED = 20261126
N_COORD = 2000
N_AUTH = 600


def hello() -> dict:
  return {"protocol": 1, "fingerprint": CFG.fingerprint(), "n_layers": CFG.n_layers,
          "start": REMOTE.start, "end": REMOTE.end, "has_output": True, "ctx": CTX,
          "dtypes": ["f32"], "caps": [], "host": "fuzz"}


def coord_cases(n, seed):
  m = Mutator(seed)
  valid = frame(MsgType.HELLO, hello())
  kinds = ["garbage", "truncated", "bitflip", "absurd", "badjson", "badfields", "wrongtype",
           "slowloris"]
  weights = [20, 15, 20, 10, 10, 15, 6, 4]
  for i in range(n):
    kind = m.rng.choices(kinds, weights)[0]
    if kind == "garbage":
      data, hold = m.garbage(), False
    elif kind == "truncated":
      data, hold = m.truncated(valid), m.rng.random() < 0.1
    elif kind == "bitflip":
      data, hold = m.bitflip(valid), False
    elif kind == "absurd":
      data, hold = m.absurd(MsgType.HELLO), m.rng.random() < 0.1
    elif kind == "badjson":
      data, hold = m.bad_json(MsgType.HELLO), False
    elif kind == "badfields":
      data, hold = frame(MsgType.HELLO, m.bad_fields(hello())), False
    elif kind == "wrongtype":
      t = m.rng.choice([t for t in MsgType if t != MsgType.HELLO])
      data, hold = frame(t, {"req": 1}), False
    else:
      data, hold = m.rng.choice([b"", protocol.MAGIC, valid[:20]]), True
    yield i, kind, data, hold


def run_case(addr, send, hold: bool, bound_s: float):
  """One hostile connection: `send` (bytes, or a function of the socket), then half-close
  unless `hold`. The coordinator must hang up (within `bound_s`, a hang guard); returns (local
  port, seconds until it did)."""
  t0 = time.monotonic()
  s = socket.create_connection(addr, timeout=2)
  try:
    port = s.getsockname()[1]
    try:
      s.sendall(send) if isinstance(send, bytes) else send(s)
      if not hold:
        s.shutdown(socket.SHUT_WR)
    except OSError:
      pass  # it may already have hung up on us (an AuthError mid-handshake is one)
    what = repr(send[:40]) if isinstance(send, bytes) else send.__name__
    assert drain_until_eof(s, t0 + bound_s), f"a bad peer was never cut off ({what})"
    return port, time.monotonic() - t0
  finally:
    s.close()


def logged_ports(messages) -> set[int]:
  """Client ports named ("127.0.0.1:PORT") in log messages."""
  ports = set()
  for msg in messages:
    for tok in msg.replace("(", " ").replace(")", " ").replace(",", " ").split():
      if tok.startswith("127.0.0.1:"):
        p = tok.rstrip(":").rsplit(":", 1)[1]
        if p.isdigit():
          ports.add(int(p))
  return ports


def test_fuzz_coordinator(logs, fake_bridge):
  # heartbeat_s 1: the legitimate link is declared dead after 3 s without a frame (a loaded
  # 2-core box can stall a thread for a second); the fuzz links never get past the handshake.
  coord = fake_bridge.coordinator(handshake_timeout=0.5, frame_timeout=0.5, heartbeat_s=1.0,
                                  route_timeout=10, request_timeout=10, prefill_chunk=8)
  legit, legit_t = fake_bridge.worker(coord.address)
  coord.wait_route(HANG_S)
  legit_wid = coord.wait_route(1)[0].wid

  # The legitimate link generates (greedy, checked against the one-process reference)
  # for as long as the fuzz runs.
  stop, steps, errors = threading.Event(), [0], []

  def generate():
    while not stop.is_set():
      sid = coord.new_session()
      toks = [1, 2, 3]
      try:
        for k in range(20):
          if stop.is_set():
            break
          res = coord.step(sid, toks, SamplingParams(), k)
          assert res.token == greedy_next(CFG, toks), "legit link produced a wrong token"
          toks.append(res.token)
          steps[0] += 1
      except Exception as e:  # noqa: BLE001 - reported by the main thread
        errors.append(e)
        return
      finally:
        coord.close_session(sid)

  gen = threading.Thread(target=generate, daemon=True)
  gen.start()
  rss = RssMonitor()
  t0 = time.monotonic()
  ports, max_case_s, kinds, done = {}, {}, {}, 0
  with cf.ThreadPoolExecutor(8) as quick, cf.ThreadPoolExecutor(16) as slow:
    futs = {}
    for i, kind, data, hold in coord_cases(N_COORD, SEED):
      pool = slow if hold else quick
      futs[pool.submit(run_case, coord.address, data, hold, HANG_S)] = (i, kind)
      kinds[kind] = kinds.get(kind, 0) + 1
    for fut in cf.as_completed(futs):
      i, kind = futs[fut]
      port, dt = fut.result()
      ports[port] = (i, kind)  # ephemeral ports get reused: `done` counts the cases
      done += 1
      max_case_s[kind] = max(max_case_s.get(kind, 0.0), dt)
  fuzz_s = time.monotonic() - t0
  stop.set()
  gen.join(30)
  growth = rss.stop()
  assert not errors, errors
  assert steps[0] >= 5, f"legit link made only {steps[0]} steps during the fuzz"

  # Every fuzz connection was disconnected with a reason that names it.
  logged = logged_ports(logs.messages)
  missing = [ports[p] for p in ports if p not in logged]
  assert not missing, f"{len(missing)} disconnects without a logged reason, e.g. {missing[:5]}"

  # The legitimate worker is untouched, no fuzz link lingers, memory stayed bounded.
  info = coord.route_info()
  assert info["ready"] and [w["id"] for w in info["workers"]] == [legit_wid], info
  assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"

  # A legitimate worker joins afterwards and carries generation alone.
  fake_bridge.worker(coord.address)
  wait_for(lambda: sum(w["ready"] for w in coord.route_info()["workers"]) == 2, HANG_S,
           "the new worker to join")
  legit.stop()
  legit_t.join(10)
  wait_for(lambda: len(coord.route_info()["workers"]) == 1, HANG_S, "the old worker to leave")
  assert_continues_exactly(coord, coord.new_session(), [5, 6])
  print(f"\ncoordinator fuzz: {done} cases {kinds}, {fuzz_s:.1f}s, max RSS growth "
        f"{growth / 2**20:.1f} MiB (peak {rss.peak / 2**20:.0f} MiB), max seconds per case by kind "
        f"{ {k: round(v, 2) for k, v in max_case_s.items()} }, legit steps meanwhile "
        f"{steps[0]}")
  assert done == N_COORD


# ------------------------------------------------------------------------------------------
# A keyed coordinator: hostile pre-shared-key handshakes.

KEY = b"fuzzing-key-fuzzing-key"


def auth_msg(mtype, body=b"", reason=0) -> bytes:
  return auth._PREFIX.pack(auth.MAGIC, auth.VERSION, mtype, reason) + body


def auth_case(m: Mutator, i: int):
  """(kind, bytes or interact(sock), hold): a hostile client side of the key handshake. What runs
  on the pool threads draws from its own per-case generator, so cases stay reproducible."""
  m, pick = Mutator(f"{SEED}:auth:{i}"), m
  hello_msg = auth_msg(auth.HELLO, m.rng.randbytes(32))
  kind = pick.rng.choice(["garbage", "bitflip", "truncated", "keyless", "badproof",
                          "flipproof", "replyjunk", "authedgarbage", "slowloris"])

  def proof(flip: bool, junk: bool = False):
    def go(s):
      s.sendall(hello_msg)
      ch = s.recv(40)
      if junk:
        s.sendall(m_garbage)
        return
      nonce_s = ch[8:40]
      mac = auth._mac(KEY, b"client", hello_msg[8:40], nonce_s)
      msg = auth_msg(auth.PROOF, nonce_s + mac)
      s.sendall(m.bitflip(msg) if flip else msg[:8] + nonce_s + m.rng.randbytes(32))
    return go

  def authed_garbage(s):
    auth.client_handshake(s, KEY, timeout=2)  # a real key holder that then misbehaves
    s.sendall(m_garbage)

  m_garbage = m.garbage()
  if kind == "garbage":
    return kind, m_garbage, False
  if kind == "bitflip":
    return kind, m.bitflip(hello_msg), False
  if kind == "truncated":
    return kind, m.truncated(hello_msg), m.rng.random() < 0.2
  if kind == "keyless":
    return kind, frame(MsgType.HELLO, hello()), False
  if kind == "badproof":
    return kind, proof(False), False
  if kind == "flipproof":
    return kind, proof(True), False
  if kind == "replyjunk":
    return kind, proof(False, junk=True), False
  if kind == "authedgarbage":
    return kind, authed_garbage, False
  return kind, m.rng.choice([b"", auth.MAGIC, hello_msg[:20]]), True


def test_fuzz_keyed_coordinator_handshake(logs, fake_bridge):
  # heartbeat_s 1: the legitimate link is declared dead after 3 s without a frame (a loaded
  # 2-core box can stall a thread for a second); the fuzz links never get past the handshake.
  coord = fake_bridge.coordinator(handshake_timeout=0.5, frame_timeout=0.5, heartbeat_s=1.0,
                                  route_timeout=10, request_timeout=10, key=KEY)
  fake_bridge.worker(coord.address, key=KEY)
  legit_wid = coord.wait_route(HANG_S)[0].wid
  m = Mutator(SEED + 7)
  t0 = time.monotonic()
  rss = RssMonitor()
  ports, kinds, done = {}, {}, 0
  with cf.ThreadPoolExecutor(8) as pool:
    futs = {}
    for i in range(N_AUTH):
      kind, interact, hold = auth_case(m, i)
      kinds[kind] = kinds.get(kind, 0) + 1
      futs[pool.submit(run_case, coord.address, interact, hold, 3.0)] = (i, kind)
    for fut in cf.as_completed(futs):
      port, _ = fut.result()
      ports[port] = futs[fut]  # ephemeral ports get reused: `done` counts the cases
      done += 1
  growth = rss.stop()
  elapsed = time.monotonic() - t0
  missing = [ports[p] for p in ports if p not in logged_ports(logs.messages)]
  assert not missing, f"{len(missing)} rejections without a logged reason: {missing[:5]}"
  assert [w["id"] for w in coord.route_info()["workers"]] == [legit_wid]
  assert growth < RSS_BOUND
  assert_continues_exactly(coord, coord.new_session(), [9, 9, 2])
  assert done == N_AUTH
  print(f"\nkeyed coordinator handshake fuzz: {done} cases {kinds}, {elapsed:.1f}s, "
        f"max RSS growth {growth / 2**20:.1f} MiB")


def test_flood_of_silent_peers_is_bounded_and_recovers(logs, fake_bridge):
  """More silent connections than handshake slots: the surplus is refused at once (logged as
  such, not timed out), threads stay bounded, and a legitimate worker joins once the slots
  time out. (The 3 s handshake deadline only has to outlast opening 40 connections.)"""
  coord = fake_bridge.coordinator(handshake_timeout=3.0, heartbeat_s=0.2, max_handshakes=8)
  socks = []

  def refused():
    return sum("handshakes already in progress" in m for m in logs.messages)

  try:
    threads0 = threading.active_count()
    for _ in range(40):
      socks.append(socket.create_connection(coord.address, timeout=HANG_S))
    wait_for(lambda: refused() >= 30, HANG_S, "the surplus peers to be refused")
    assert threading.active_count() <= threads0 + 8 + 2
    assert all(drain_until_eof(s, time.monotonic() + HANG_S) for s in socks), \
        "a silent peer was never cut off"
    fake_bridge.worker(coord.address)
    coord.wait_route(HANG_S)
    assert_continues_exactly(coord, coord.new_session(), [1, 2], n=1)
  finally:
    for s in socks:
      s.close()
