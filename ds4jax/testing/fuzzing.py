"""Tools for fuzzing bridge endpoints in tests: a seeded case generator (`Mutator`), raw
frame building, a log capture, and an RSS monitor."""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time

import psutil

from ds4jax.wire import protocol

JUNK = [None, True, False, -1, 0, 1, 7, 2**31, 2**64, -2**63, 1.5, -0.0, 1e308, "", "x",
        "0" * 16, "z" * 300, [], [1, 2], {}, {"a": 1}, "\u00fc\u0000", [[[[]]]]]
BAD_JSON = [b"[" * 60000, b"{" * 1000, b'{"a": NaN}', b'{"a": Infinity}', b"\xff\xfe\xfd",
            b"[]", b'"a string"', b"123", b"null", b'{"a": 1', b'{"a": 1}}', b"{'a': 1}",
            b'{"a": "\\ud800"}', b'{"' + b"k" * 5000 + b'": ' + b"9" * 5000 + b"}", b""]


def frame(mtype, header, payload=b"", version=protocol.PROTOCOL_VERSION, flags=0) -> bytes:
  hj = json.dumps(header, separators=(",", ":")).encode()
  return protocol.HEADER.pack(protocol.MAGIC, version, int(mtype), flags, len(hj),
                              len(payload)) + hj + bytes(payload)


class Mutator:
  """A seeded generator of hostile inputs: garbage, truncations, bit flips, absurd lengths,
  bad JSON and fuzzed header fields."""

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
    return (protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, int(mtype), 0, hlen,
                                 plen) + tail)

  def bad_json(self, mtype) -> bytes:
    body = self.rng.choice(BAD_JSON + [self.rng.randbytes(self.rng.randrange(1, 200))])
    return (protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, int(mtype), 0,
                                 len(body), 0) + body)

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


class RssMonitor:
  """Samples this process's RSS every few ms; `growth` is peak minus the starting RSS."""

  def __init__(self):
    # Code the targets load lazily on some frames (snapshot handling pulls in JAX, which a
    # real worker has loaded anyway) is loaded first: the bound is about what input costs.
    import ds4jax.bridge.worker.snapshots  # noqa: F401
    import ds4jax.runtime.sampling  # noqa: F401
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


def start_fake_worker(addr, cfg, layers, ctx: int, **opts):
  """A `Worker` serving `FakeRunner(cfg, layers)` on a daemon thread; returns (worker, thread)."""
  import numpy as np  # noqa: F401 - keeps the import cost out of callers' RSS baselines
  from ds4jax.bridge.worker.worker import Worker, WorkerOptions
  from ds4jax.testing.fake_stage import FakeRunner

  opts = dict(dict(ctx=ctx, frame_timeout=0.5, connect_timeout=2.0, backoff_min=0.002,
                   backoff_max=0.02), **opts)
  w = Worker(addr, fingerprint=cfg.fingerprint(), n_layers=cfg.n_layers,
             vocab_size=cfg.vocab_size, layers=layers,
             load=lambda: FakeRunner(cfg, layers, ctx_size=ctx), options=WorkerOptions(**opts))
  t = threading.Thread(target=w.run, daemon=True, name="fuzz-legit-worker")
  t.start()
  return w, t


def greedy_next(cfg, tokens) -> int:
  """The one-process reference: the greedy next token after `tokens`."""
  import numpy as np
  from ds4jax.testing.fake_stage import full_logits
  return int(np.argmax(full_logits(cfg, tokens)[-1]))
