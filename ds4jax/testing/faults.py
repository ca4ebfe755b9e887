"""Deterministic fault injection for bridge links (tests only).

`FaultInjector(faults, seed)` is a transport `wrap` hook: every socket it wraps becomes a
`FaultySocket` that applies the `Fault`s to the bytes it sends and/or receives. Faults fire at
byte offsets of each direction's stream, either absolute (`after_bytes`) or relative to a frame
(`after_frames` + `offset`, frames found by parsing the bridge protocol's fixed header), so a
run with a given seed injects the same faults at the same bytes however the kernel splits
reads. Kinds:

  drop      bytes in [at, at+length) vanish (length None: a black hole, like a pulled cable)
  corrupt   bytes in [at, at+length) are XORed with seeded non-zero masks
  delay     delivery stalls for `delay_s` before the byte at `at`
  truncate  the stream ends cleanly (FIN) at `at`, e.g. inside a frame
  close     the connection is reset (RST) at `at`; the local side gets ECONNRESET

With `p < 1` a frame fault is decided per frame from `after_frames` on, by a per-connection,
per-direction `random.Random` seeded from (seed, connection index, direction). Wrap below TLS
is impossible (ssl needs a real socket), so fault tests run without TLS.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import random
import socket
import struct
import threading
import time
from typing import Callable, Iterable

log = logging.getLogger("ds4jax.testing.faults")

KINDS = ("drop", "corrupt", "delay", "truncate", "close")
_RANGED = ("drop", "corrupt")


@dataclasses.dataclass(frozen=True)
class Fault:
  """One fault on one direction of a link (see the module docstring for the kinds)."""
  kind: str
  direction: str = "send"  # of the wrapped socket: "send" or "recv"
  after_bytes: int | None = None  # fire at this byte offset of the stream ...
  after_frames: int | None = None  # ... or at frame number N (0-based) + offset
  offset: int = 0
  length: int | None = 1  # drop/corrupt span; None = to the end of the stream
  delay_s: float = 0.0
  p: float = 1.0  # per-frame probability (after_frames) or of firing at all (after_bytes)
  count: int | None = 1  # how many times it may fire; None = unlimited
  # Count only frames of this protocol MsgType (after_frames = the Nth such frame). Reliable
  # on the send side, where a frame's header reaches sendall in one piece.
  frame_type: int | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {KINDS}")
    if self.direction not in ("send", "recv"):
      raise ValueError(f"fault direction must be 'send' or 'recv', not {self.direction!r}")
    if (self.after_bytes is None) == (self.after_frames is None):
      raise ValueError("a fault needs exactly one of after_bytes / after_frames")
    if not 0.0 <= self.p <= 1.0:
      raise ValueError(f"fault probability {self.p} is outside [0, 1]")


def bridge_frame_size(head: bytes) -> int:
  """Total bytes of a bridge protocol frame, from its fixed header."""
  from ds4jax.wire import protocol
  magic, _, _, _, hlen, plen = protocol.HEADER.unpack(head)
  if magic != protocol.MAGIC:
    raise ValueError("not a frame")
  return protocol.HEADER.size + hlen + plen


def _bridge_head_size() -> int:
  from ds4jax.wire import protocol
  return protocol.HEADER.size


class _Stream:
  """Byte offsets, frame boundaries and fault activations of one direction of one link."""

  def __init__(self, faults: list[Fault], rng: random.Random, frame_size, head_size: int):
    self.faults = faults
    self.rng = rng
    self.frame_size = frame_size
    self.head_size = head_size
    self.pos = 0
    self.frame_idx = -1
    self.frame_end = 0  # where the next frame starts; None while its header is incomplete
    self.head = bytearray()
    self.fired = [0] * len(faults)
    self.typed = [0] * len(faults)  # frames of each fault's frame_type seen so far
    self.acts: list[tuple[int, float, Fault]] = []  # (start, end, fault)
    for i, f in enumerate(faults):
      if f.after_bytes is not None and self._roll(i):
        self._activate(i, f.after_bytes)

  def _roll(self, i: int) -> bool:
    f = self.faults[i]
    if f.count is not None and self.fired[i] >= f.count:
      return False
    return f.p >= 1.0 or self.rng.random() < f.p

  def _activate(self, i: int, at: int):
    f = self.faults[i]
    self.fired[i] += 1
    end = at + (math.inf if f.length is None else f.length) if f.kind in _RANGED else at
    self.acts.append((at, end, f))

  def _frame_start(self, peek: bytes):
    self.frame_idx += 1
    self.frame_end = None
    self.head.clear()
    mtype = peek[5] if len(peek) > 5 else None  # the type byte of the fixed header
    for i, f in enumerate(self.faults):
      if f.after_frames is None:
        continue
      if f.frame_type is None:
        index = self.frame_idx
      elif mtype == f.frame_type:
        index = self.typed[i]
        self.typed[i] += 1
      else:
        continue
      if index >= f.after_frames and self._roll(i):
        self._activate(i, self.pos + f.offset)

  def plan(self, data) -> list[tuple[int, int, str | None, Fault | None]]:
    """Splits ``data`` (the next bytes of the stream) into (lo, hi, kind, fault) segments."""
    out = []
    lo, n = 0, len(data)
    while lo < n:
      if self.frame_end is not None and self.pos == self.frame_end:
        self._frame_start(bytes(data[lo:lo + self.head_size]))
      bounds = [n - lo]
      if self.frame_end is None:
        bounds.append(self.head_size - len(self.head))
      elif self.frame_end > self.pos:
        bounds.append(self.frame_end - self.pos)
      for start, end, _ in self.acts:
        for b in (start, end):
          if b > self.pos and b != math.inf:
            bounds.append(int(b) - self.pos)
      k = min(bounds)
      kind, fault = None, None
      for start, end, f in self.acts:
        if f.kind not in _RANGED and start == self.pos:
          out.append((lo, lo, f.kind, f))  # a point event before these bytes
        elif f.kind in _RANGED and start <= self.pos < end and fault is None:
          kind, fault = f.kind, f  # the first ranged fault covering these bytes applies
      out.append((lo, lo + k, kind, fault))
      self._track(data[lo:lo + k])
      old, self.pos, lo = self.pos, self.pos + k, lo + k
      # Keep ranged faults that reach past the new position and point events still ahead.
      self.acts = [a for a in self.acts
                   if (a[2].kind in _RANGED and a[1] > self.pos)
                   or (a[2].kind not in _RANGED and a[0] > old)]
    return out

  def _track(self, chunk):
    if self.frame_end is None:
      self.head += chunk
      if len(self.head) == self.head_size:
        try:
          self.frame_end = self.pos + len(chunk) - self.head_size + self.frame_size(bytes(self.head))
        except (ValueError, struct.error):
          self.frame_end = math.inf  # not frames: stop counting

  def corrupt(self, chunk) -> bytes:
    return bytes(b ^ self.rng.randrange(1, 256) for b in chunk)


class FaultySocket:
  """A socket proxy that injects faults; everything else is forwarded to the real socket."""

  def __init__(self, sock, faults: Iterable[Fault], *, seed: int = 0, index: int = 0,
               frame_size: Callable[[bytes], int] = bridge_frame_size,
               head_size: int | None = None):
    self._sock = sock
    faults = list(faults)
    hs = _bridge_head_size() if head_size is None else head_size
    self._streams = {
        d: _Stream([f for f in faults if f.direction == d],
                   random.Random(f"{seed}:{index}:{d}"), frame_size, hs)
        for d in ("send", "recv")}
    self.index = index
    self.events: list[tuple[str, str, int]] = []  # (direction, kind, stream offset)
    self._dead: str | None = None  # "truncate" or "close" once the link has been cut
    self._lock = threading.Lock()
    self._released = threading.Event()  # ends every delay, now and later

  def release(self) -> None:
    """Ends any delay in progress and skips later ones (a test done with a stall)."""
    self._released.set()

  def __getattr__(self, name):
    return getattr(self._sock, name)

  def _note(self, direction: str, kind: str, at: int):
    self.events.append((direction, kind, at))
    log.info("fault injected on link %d: %s %s at byte %d", self.index, direction, kind, at)

  def _cut(self, kind: str):
    with self._lock:
      if self._dead:
        return
      self._dead = kind
      try:
        if kind == "close":
          # Abortive close (the peer gets an RST). The local fd stays valid for select(),
          # as after a real reset: it is swapped for a socketpair end that reads EOF.
          real = self._sock
          self._sock, other = socket.socketpair()
          other.close()
          real.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
          real.close()
        else:
          self._sock.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass

  def _raise_if_closed(self):
    if self._dead == "close":
      raise ConnectionResetError(errno.ECONNRESET, "fault injection: connection reset")

  # ------------------------------------------------------------------------------ sending
  def sendall(self, data) -> None:
    self._raise_if_closed()
    if self._dead:
      raise BrokenPipeError(errno.EPIPE, "fault injection: stream truncated")
    data = bytes(data)
    st = self._streams["send"]
    for lo, hi, kind, fault in st.plan(data):
      at = st.pos - len(data) + lo
      if kind in ("truncate", "close"):
        self._note("send", kind, at)
        self._cut(kind)
        if kind == "close":
          self._raise_if_closed()
        return  # the sender believes it sent everything; the peer sees a cut stream
      if kind == "delay":
        self._note("send", kind, at)
        self._released.wait(fault.delay_s)
        continue
      if hi == lo:
        continue
      chunk = data[lo:hi]
      if kind == "drop":
        self._note("send", kind, at)
        continue
      if kind == "corrupt":
        self._note("send", kind, at)
        chunk = st.corrupt(chunk)
      self._sock.sendall(chunk)

  def send(self, data, flags: int = 0) -> int:
    self.sendall(data)
    return len(data)

  # ---------------------------------------------------------------------------- receiving
  def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
    view = memoryview(buffer).cast("B")
    want = nbytes or len(view)
    st = self._streams["recv"]
    timeout = self._sock.gettimeout()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
      self._raise_if_closed()
      if self._dead:
        return 0
      if deadline is not None:
        # Dropped bytes never arrived: keep the caller's timeout for the whole call.
        left = deadline - time.monotonic()
        if left <= 0:
          raise socket.timeout("timed out")
        self._sock.settimeout(left)
      try:
        data = self._sock.recv(want)
      finally:
        if deadline is not None:
          self._sock.settimeout(timeout)
      if not data:
        return 0
      got = 0
      for lo, hi, kind, fault in st.plan(data):
        at = st.pos - len(data) + lo
        if kind in ("truncate", "close"):
          self._note("recv", kind, at)
          self._cut(kind)
          if got:
            return got
          self._raise_if_closed()
          return 0
        if kind == "delay":
          self._note("recv", kind, at)
          self._released.wait(fault.delay_s)
          continue
        if hi == lo or kind == "drop":
          if hi > lo:
            self._note("recv", kind, at)
          continue
        chunk = data[lo:hi]
        if kind == "corrupt":
          self._note("recv", kind, at)
          chunk = st.corrupt(chunk)
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
      if got:
        return got

  def recv(self, bufsize: int, flags: int = 0) -> bytes:
    buf = bytearray(bufsize)
    n = self.recv_into(buf, bufsize)
    return bytes(buf[:n])

  def close(self) -> None:
    self._sock.close()

  def fileno(self) -> int:
    return self._sock.fileno()


class FaultInjector:
  """A transport ``wrap`` hook: wraps every socket it is given (or only the ``only`` indices,
  counted in wrap order) in a `FaultySocket`. ``links`` keeps them for inspection."""

  def __init__(self, faults: Iterable[Fault], *, seed: int = 0, only: Iterable[int] | None = None,
               **kwargs):
    self.faults = list(faults)
    self.seed = seed
    self.only = None if only is None else set(only)
    self.kwargs = kwargs
    self.links: list[FaultySocket] = []
    self._n = 0
    self._lock = threading.Lock()

  def __call__(self, sock):
    with self._lock:
      i = self._n
      self._n += 1
    if self.only is not None and i not in self.only:
      return sock
    fs = FaultySocket(sock, self.faults, seed=self.seed, index=i, **self.kwargs)
    with self._lock:
      self.links.append(fs)
    return fs

  @property
  def events(self) -> list[tuple[int, str, str, int]]:
    return [(fs.index, *e) for fs in self.links for e in fs.events]
