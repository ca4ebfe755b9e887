"""Seeded fuzzing of the bridge's inbound surfaces (issue 6, item 4).

Two targets, both in this process so that their RSS is this process's RSS (the fuzz client
only builds a few KiB per case):

* a listening `Coordinator`: every case is a fresh TCP connection carrying garbage, a
  truncated or bit-flipped HELLO, absurd lengths, a valid header with bad JSON, a HELLO with
  fuzzed fields, a wrong first frame, or nothing at all (slowloris). A legitimate worker
  stays connected and a background thread keeps generating through it the whole time.
* a `Worker`'s inbound side: workers only dial out, so a fake coordinator accepts each dial
  and answers with fuzzed ACCEPTs, fuzzed WORK (the worker must answer with an error and
  stay up), and link-killing garbage (the worker must hang up and dial again).

Each case must end within a bounded time (the target answers or disconnects), every
rejection must be logged with the peer, RSS growth stays bounded, the other link keeps
producing the reference tokens, and a legitimate worker joins afterwards. Run with `-s` to
see the numbers (cases, max RSS growth, time).
"""

import concurrent.futures as cf
import json
import logging
import random
import socket
import threading
import time

import numpy as np
import psutil
import pytest

from ds4jax.bridge import protocol, tensors
from ds4jax.bridge.coordinator import Coordinator, CoordinatorOptions
from ds4jax.bridge.protocol import MsgType
from ds4jax.bridge.worker import Worker, WorkerOptions
from ds4jax.config import LayerRange
from ds4jax.generate.sampling import SamplingParams
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner, full_logits

SEED = 20261126
CFG = FakeConfig()
CTX = 64
LOCAL = LayerRange(0, 1, False)
REMOTE = LayerRange(2, 3, True)
N_COORD = 2000
N_WORKER = 2000
RSS_BOUND = 96 * 2**20
JUNK = [None, True, False, -1, 0, 1, 7, 2**31, 2**64, -2**63, 1.5, -0.0, 1e308, "", "x",
        "0" * 16, "z" * 300, [], [1, 2], {}, {"a": 1}, "\u00fc\u0000", [[[[]]]]]
BAD_JSON = [b"[" * 60000, b"{" * 1000, b'{"a": NaN}', b'{"a": Infinity}', b"\xff\xfe\xfd",
            b"[]", b'"a string"', b"123", b"null", b'{"a": 1', b'{"a": 1}}', b"{'a': 1}",
            b'{"a": "\\ud800"}', b'{"' + b"k" * 5000 + b'": ' + b"9" * 5000 + b"}", b""]


def frame(mtype, header, payload=b"", version=protocol.PROTOCOL_VERSION, flags=0) -> bytes:
  hj = json.dumps(header, separators=(",", ":")).encode()
  return protocol.HEADER.pack(protocol.MAGIC, version, int(mtype), flags, len(hj),
                              len(payload)) + hj + bytes(payload)


def hello() -> dict:
  return {"protocol": 1, "fingerprint": CFG.fingerprint(), "n_layers": CFG.n_layers,
          "start": REMOTE.start, "end": REMOTE.end, "has_output": True, "ctx": CTX,
          "dtypes": ["f32"], "caps": [], "host": "fuzz"}


class Mutator:
  """The seeded case generator shared by both targets."""

  def __init__(self, seed):
    self.rng = random.Random(seed)

  def garbage(self) -> bytes:
    data = self.rng.randbytes(self.rng.choice([1, 3, 15, 16, 17, 100, 1000, 5000]))
    return protocol.MAGIC + data if self.rng.random() < 0.5 else data

  def truncated(self, valid: bytes) -> bytes:
    return valid[:self.rng.randrange(1, len(valid))]

  def bitflip(self, valid: bytes) -> bytes:
    b = bytearray(valid)
    for _ in range(self.rng.randint(1, 8)):
      i = self.rng.randrange(len(b) * 8)
      b[i // 8] ^= 1 << (i % 8)
    return bytes(b)

  def absurd(self, mtype) -> bytes:
    big = [protocol.MAX_HEADER + 1, 2**31, 2**32 - 1]
    hlen, plen = self.rng.choice([(self.rng.choice(big), 0), (2, protocol.MAX_PAYLOAD + 1),
                                  (2, 2**32 - 1), (2, protocol.MAX_PAYLOAD),
                                  (2, self.rng.randrange(2**20, protocol.MAX_PAYLOAD))])
    tail = b"{}" + self.rng.randbytes(self.rng.randrange(0, 64))
    return protocol.HEADER.pack(protocol.MAGIC, 1, int(mtype), 0, hlen, plen) + tail

  def bad_json(self, mtype) -> bytes:
    body = self.rng.choice(BAD_JSON + [self.rng.randbytes(self.rng.randrange(1, 200))])
    return protocol.HEADER.pack(protocol.MAGIC, 1, int(mtype), 0, len(body), 0) + body

  def bad_fields(self, header: dict) -> dict:
    h = dict(header)
    for _ in range(self.rng.randint(1, 3)):
      op, key = self.rng.random(), self.rng.choice(sorted(h) or ["k"])
      if op < 0.25:
        h.pop(key, None)
      elif op < 0.9:
        h[key] = self.rng.choice(JUNK)
      else:
        h[self.rng.choice(["zz", "x" * 100, ""])] = self.rng.choice(JUNK)
    return h


class LogCapture(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture
def logs():
  cap = LogCapture()
  lg = logging.getLogger("ds4jax.bridge")
  old = lg.level
  lg.addHandler(cap)
  lg.setLevel(logging.INFO)
  yield cap
  lg.removeHandler(cap)
  lg.setLevel(old)


class RssMonitor:
  """Samples this process's RSS every few ms; `growth` is peak minus the starting RSS."""

  def __init__(self):
    # Code the targets load lazily on some frames (snapshot handling pulls in JAX, which a
    # real worker has loaded anyway) is loaded first: the bound is about what input costs.
    import ds4jax.checkpoints.snapshot_bridge  # noqa: F401
    import ds4jax.generate.sampling  # noqa: F401
    self.proc = psutil.Process()
    self.base = self.peak = self.proc.memory_info().rss
    self._stop = threading.Event()
    self._t = threading.Thread(target=self._run, daemon=True)
    self._t.start()

  def _run(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, self.proc.memory_info().rss)

  def stop(self) -> int:
    self._stop.set()
    self._t.join()
    return self.peak - self.base


def reference_next(tokens) -> int:
  return int(np.argmax(full_logits(CFG, tokens)[-1]))


def start_worker(addr, **opts) -> tuple[Worker, threading.Thread]:
  opts = dict(dict(ctx=CTX, frame_timeout=0.5, connect_timeout=2.0, backoff_min=0.002,
                   backoff_max=0.02), **opts)
  w = Worker(addr, fingerprint=CFG.fingerprint(), n_layers=CFG.n_layers,
             vocab_size=CFG.vocab_size, layers=REMOTE,
             load=lambda: FakeRunner(CFG, REMOTE, ctx_size=CTX), options=WorkerOptions(**opts))
  t = threading.Thread(target=w.run, daemon=True, name="fuzz-legit-worker")
  t.start()
  return w, t


def wait_for(pred, timeout, what):
  deadline = time.monotonic() + timeout
  while not pred():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


def drain_until_eof(sock, deadline) -> bool:
  """Reads (and discards) until the peer closes; False if the deadline passes first."""
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      return False
    sock.settimeout(left)
    try:
      if not sock.recv(65536):
        return True
    except (ConnectionResetError, BrokenPipeError):
      return True
    except (socket.timeout, TimeoutError):
      return False


# ------------------------------------------------------------------------------------------
# Target 1: a listening coordinator.


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


def run_coord_case(addr, data, hold, hold_s):
  """One connection; returns (local port, seconds until the coordinator hung up)."""
  t0 = time.monotonic()
  s = socket.create_connection(addr, timeout=2)
  try:
    port = s.getsockname()[1]
    try:
      s.sendall(data)
      if not hold:
        s.shutdown(socket.SHUT_WR)
    except OSError:
      pass  # it may already have hung up on us
    closed = drain_until_eof(s, t0 + (hold_s + 2.0 if hold else 3.0))
    assert closed, f"coordinator did not disconnect a bad peer within the bound ({data[:40]!r})"
    return port, time.monotonic() - t0
  finally:
    s.close()


def test_fuzz_coordinator(logs):
  opts = CoordinatorOptions(handshake_timeout=0.5, frame_timeout=0.5, heartbeat_s=0.2,
                            route_timeout=10, request_timeout=10, prefill_chunk=8)
  coord = Coordinator(FakeRunner(CFG, LOCAL, ctx_size=CTX), opts)
  legit, legit_t = start_worker(coord.address)
  newcomer = None
  try:
    coord.wait_route(10)
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
            assert res.token == reference_next(toks), "legit link produced a wrong token"
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
    hold_s = opts.handshake_timeout + opts.frame_timeout
    ports, max_case_s, kinds = {}, {}, {}
    with cf.ThreadPoolExecutor(8) as quick, cf.ThreadPoolExecutor(16) as slow:
      futs = {}
      for i, kind, data, hold in coord_cases(N_COORD, SEED):
        pool = slow if hold else quick
        futs[pool.submit(run_coord_case, coord.address, data, hold, hold_s)] = (i, kind)
        kinds[kind] = kinds.get(kind, 0) + 1
      for fut in cf.as_completed(futs):
        i, kind = futs[fut]
        port, dt = fut.result()
        ports[port] = (i, kind)
        max_case_s[kind] = max(max_case_s.get(kind, 0.0), dt)
    fuzz_s = time.monotonic() - t0
    stop.set()
    gen.join(30)
    growth = rss.stop()
    assert not errors, errors
    assert steps[0] >= 5, f"legit link made only {steps[0]} steps during the fuzz"

    # Every fuzz connection was disconnected with a reason that names it.
    logged = set()
    for msg in logs.messages:
      for tok in msg.replace("(", " ").replace(")", " ").replace(",", " ").split():
        if tok.startswith("127.0.0.1:"):
          p = tok.rstrip(":").rsplit(":", 1)[1]
          if p.isdigit():
            logged.add(int(p))
    missing = [ports[p] for p in ports if p not in logged]
    assert not missing, f"{len(missing)} disconnects without a logged reason, e.g. {missing[:5]}"

    # The legitimate worker is untouched, no fuzz link lingers, memory stayed bounded.
    info = coord.route_info()
    assert info["ready"] and [w["id"] for w in info["workers"]] == [legit_wid], info
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"

    # A legitimate worker joins afterwards and carries generation alone.
    newcomer, newcomer_t = start_worker(coord.address)
    wait_for(lambda: sum(w["ready"] for w in coord.route_info()["workers"]) == 2, 10,
             "the new worker to join")
    legit.stop()
    legit_t.join(10)
    wait_for(lambda: len(coord.route_info()["workers"]) == 1, 10, "the old worker to leave")
    sid, toks = coord.new_session(), [5, 6]
    for k in range(3):
      res = coord.step(sid, toks, SamplingParams(), k)
      assert res.token == reference_next(toks)
      toks.append(res.token)
    print(f"\ncoordinator fuzz: {len(ports)} cases {kinds}, {fuzz_s:.1f}s, max RSS growth "
          f"{growth / 2**20:.1f} MiB, max seconds per case by kind "
          f"{ {k: round(v, 2) for k, v in max_case_s.items()} }, legit steps meanwhile "
          f"{steps[0]}")
    assert len(ports) == N_COORD
  finally:
    legit.stop()
    if newcomer is not None:
      newcomer.stop()
    coord.close()


# ------------------------------------------------------------------------------------------
# Target 2: a worker's inbound side (a fake coordinator accepts its dials).

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
  h = {"req": rng.randrange(1, 10**6), "sid": f"s{rng.randrange(10**6)}", "pos0": 0, "n": n,
       "want": "out", "layers": str(REMOTE), "x": desc,
       "hash_before": protocol.hash_hex(protocol.FNV_INIT),
       "hash_after": protocol.hash_hex(protocol.fnv1a64(tokens)),
       "sampling": SamplingParams().to_dict(), "step": 0, "top_logprobs": 0,
       "out_dtype": "f32"}
  return h, protocol.tokens_to_bytes(tokens) + xb


class FakeCoordinator:
  def __init__(self):
    self.lsock = socket.create_server(("127.0.0.1", 0))
    self.addr = self.lsock.getsockname()[:2]
    self.dials = 0

  def accept(self) -> socket.socket:
    self.lsock.settimeout(5.0)
    s, _ = self.lsock.accept()  # a timeout here means the worker stopped dialling
    self.dials += 1
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = protocol.recv_frame(s, idle_timeout=3, frame_timeout=3)
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
    h["x"] = m.bad_fields(h["x"])
  elif r < 0.75:
    h["sampling"] = m.bad_fields(h["sampling"])
  elif r < 0.85:
    payload = m.truncated(payload) if m.rng.random() < 0.5 else payload + m.rng.randbytes(9)
  else:
    payload = m.bitflip(payload)
  return frame(MsgType.WORK, h, payload)


def test_fuzz_worker(logs):
  fc = FakeCoordinator()
  w, wt = start_worker(fc.addr, frame_timeout=0.1, dead_after=1.0)
  m = Mutator(SEED + 1)
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
        assert react(sock, time.monotonic() + 3, is_ready)[0] == "alive"
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
      try:
        sock.sendall(data)
        if hold and kind != "slowloris" and m.rng.random() < 0.7:
          sock.shutdown(socket.SHUT_WR)  # cut inside the frame (else: stall past the deadline)
        if until not in (is_ready, is_reply) and not hold:
          sock.sendall(frame(MsgType.PING, {"t": i}))
      except OSError:
        pass
      state, frames = react(sock, time.monotonic() + 3.0, until)
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
    wait_for(lambda: n_logged() >= kills, 5, "a logged reason for every disconnect")

    # Afterwards the worker serves a legitimate request exactly.
    if sock is None:
      sock, phase = fc.accept(), "pre"
    if phase == "pre":
      protocol.send_frame(sock, MsgType.ACCEPT, ACCEPT)
      assert react(sock, time.monotonic() + 3, is_ready)[0] == "alive"
    toks = [3, 1, 4, 1, 5]
    local = FakeRunner(CFG, LOCAL, ctx_size=CTX)
    x, _ = local.forward(local.init_state(), toks, None, 0)
    h, payload = legit_work(random.Random(0), toks, x)
    protocol.send_frame(sock, MsgType.WORK, h, payload)
    state, frames = react(sock, time.monotonic() + 5, is_reply)
    f = frames[-1]
    assert state == "alive" and f.type == MsgType.RESULT and f.header["token"] == reference_next(toks), f.header
    growth = rss.stop()
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"
    print(f"\nworker fuzz: {N_WORKER} cases {kinds}, {kills} hang-ups and redials, {replies} "
          f"error/result replies, {fuzz_s:.1f}s, max {max_case_s:.2f}s per case, max RSS "
          f"growth {growth / 2**20:.1f} MiB; seconds by kind "
          f"{ {k: round(v, 1) for k, v in time_by_kind.items()} }")
  finally:
    w.stop()
    if sock is not None:
      sock.close()
    fc.close()
    wt.join(10)
