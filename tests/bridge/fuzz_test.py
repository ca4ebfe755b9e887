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
