"""The coordinator's side of one worker connection: requests with deadlines, replies by id.

Whoever reads a RESULT/ERROR frame turns it into a callback on the pending request it
answers. Normally that is the link's reader thread. A stepping thread that waits for one
decode token instead *claims* the links of its route (`read_direct`) and reads them itself:
the reply is parsed, relayed to the next hop and handed to the step on the thread that
waits for it, with no thread hand-off. While claims are held, and for `_LINGER_S` after
(between two decode steps) while no request is pending, the reader thread stays parked, so
it is not woken on every token either. The coordinator's monitor thread calls `check()` to
send heartbeats and to declare the link dead when the worker has been silent longer than
`dead_after` or a request outlived its deadline; `fail()` then completes every pending
request with the error.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import select
import socket
import threading
import time
from typing import Any, Callable

from ds4jax.wire import protocol, transport
from ds4jax.wire.errors import (BridgeError, DeadlineExceeded, LinkLost, ProtocolError,
                                  RemoteError)
from ds4jax.wire.protocol import MsgType
from ds4jax.bridge.coordinator.residency import Residency
from ds4jax.config import LayerRange

log = logging.getLogger("ds4jax.bridge.coordinator")
# callback(frame or None, error or None); runs on the link's reader (or monitor) thread.
Callback = Callable[[protocol.Frame | None, BaseException | None], None]
_req_ids = itertools.count(1)
# After a direct read, the reader thread stays parked this long unless a request is pending
# (the next decode step claims the link again, usually well within it).
_LINGER_S = 0.05


@dataclasses.dataclass
class _Pending:
  deadline: float
  callback: Callback


# The batching counters a worker's PONG carries ("b"), in order (bridge.worker.work.pong_stats).
_BATCH_KEYS = ("calls", "decode_calls", "decode_rows", "max_batch_seen")


class WorkerLink:
  """One accepted, handshaken worker."""

  def __init__(self, wid: int, ch: transport.Channel, hello: dict[str, Any], layers: LayerRange,
               *, heartbeat_s: float, dead_after: float, request_timeout: float,
               on_change: Callable[["WorkerLink", BaseException | None], None]):
    self.wid = wid
    self.ch = ch
    self.hello = hello
    self.layers = layers
    self.peer = ch.peer
    self.ctx = int(hello["ctx"])
    self.dtypes = tuple(hello.get("dtypes", ("f32",)))
    # The worker's session slots (HELLO max_sessions; 0 = not announced, the worker evicts).
    self.residency = Residency(int(hello.get("max_sessions", 0)))
    # The worker's batching counters, from its last PONG (route_info; informational).
    self.batch_stats: dict[str, int] = {}
    self.heartbeat_s = heartbeat_s
    self.dead_after = dead_after
    self.request_timeout = request_timeout
    self._on_change = on_change
    self._pending: dict[int, _Pending] = {}
    self._lock = threading.Lock()
    self._last_ping = time.monotonic()
    self.ready = False
    self.alive = True
    # Reading: `_rlock` is held by whoever reads frames (the reader thread for one frame,
    # or a claiming stepper for its whole wait); `_rd` guards the claim bookkeeping.
    self._rlock = threading.Lock()
    self._rd = threading.Condition()
    self._claims = 0
    self._stepper_reads = False
    self._linger_until = 0.0
    self._parked = False
    self._selecting = False
    self._wake_r, self._wake_w = socket.socketpair()
    self._wake_r.setblocking(False)
    self._wake_w.setblocking(False)
    self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                   name=f"ds4jax-link-{wid}")

  def __repr__(self) -> str:
    return f"worker#{self.wid}({self.peer} {self.layers.describe()})"

  # ------------------------------------------------------------------------------ requests
  def request(self, header: dict[str, Any], payload, callback: Callback, *,
              mtype: int = MsgType.WORK) -> int:
    """Sends WORK (or another request type); callback gets the RESULT frame, or an error.
    Returns the bytes sent; raises LinkLost when the send fails (unless the callback has
    already been given the error by a concurrent fail())."""
    req = next(_req_ids)
    header = dict(header, req=req)
    with self._lock:
      if not self.alive:
        raise LinkLost(f"{self} is gone")
      self._pending[req] = _Pending(time.monotonic() + self.request_timeout, callback)
    if not self._claims:  # nobody reads this link directly: the reader thread must
      with self._rd:
        if not self._claims:
          self._linger_until = 0.0
          if self._parked:
            self._rd.notify_all()
    try:
      return self.ch.send(mtype, header, payload)
    except LinkLost as e:
      with self._lock:
        mine = self._pending.pop(req, None) is not None
      self.fail(e)
      if not mine:  # a concurrent fail() already gave the callback its error: not twice
        return 0
      raise  # the caller handles this request's failure

  def send(self, mtype: int, header: dict[str, Any]) -> None:
    try:
      self.ch.send(mtype, header)
    except LinkLost as e:
      self.fail(e)

  # ------------------------------------------------------------------------------- reading
  def _read_loop(self) -> None:
    idle = max(self.heartbeat_s, 0.05)
    try:
      while self.alive:
        with self._rd:
          while self.alive and (self._claims or time.monotonic() < self._linger_until):
            self._parked = True
            self._rd.wait(max(0.0, self._linger_until - time.monotonic()) or idle)
          self._parked = False
          self._selecting = True
        try:
          readable = _wait_any([self.ch.sock, self._wake_r], idle)
        finally:
          with self._rd:
            self._selecting = False
        if self._wake_r in readable:
          _drain(self._wake_r)
        if self.ch.sock not in readable or self._claims:
          continue
        if not self._rlock.acquire(blocking=False):
          continue  # a stepper reads
        try:
          if self._claims or not self.alive:
            continue
          try:
            f = self.ch.recv(idle_timeout=0.0)
          except protocol.IdleTimeout:
            continue
          self._dispatch(f)
        finally:
          self._rlock.release()
    except EOFError:
      self.fail(LinkLost(f"{self} closed the connection"))
    except (OSError, ValueError, BridgeError) as e:
      self.fail(e if isinstance(e, LinkLost) else LinkLost(f"{self}: {e}"))
    finally:
      self.close_wakeup()

  def close_wakeup(self) -> None:
    """Closes the reader thread's wake-up pair (at its exit; or when it never started)."""
    for s in (self._wake_r, self._wake_w):
      try:
        s.close()
      except OSError:
        pass

  def _dispatch(self, f: protocol.Frame) -> None:
    if f.type in (MsgType.RESULT, MsgType.ERROR):
      self._complete(f)
    elif f.type == MsgType.READY:
      self.ready = True
      self._on_change(self, None)  # the route may now form
    elif f.type == MsgType.PONG:
      b = f.header.get("b")
      if (isinstance(b, list) and len(b) == len(_BATCH_KEYS)
          and all(type(v) is int and 0 <= v < 1 << 53 for v in b)):  # noqa: E721
        self.batch_stats = dict(zip(_BATCH_KEYS, b))  # malformed: informational, ignored
    else:
      raise ProtocolError(f"unexpected {f.type.name} frame from a worker")

  def try_claim(self) -> bool:
    """Takes over reading this link for the calling thread; False if another stepper reads
    it (or it is gone). Pair with `unclaim`."""
    with self._rd:
      if not self.alive or self._stepper_reads:
        return False  # another stepper reads it (for its whole step): do not wait for it
      self._claims += 1
      selecting = self._selecting
    if selecting:  # the reader thread sits in select on the socket: move it out of the way
      try:
        self._wake_w.send(b"\0")
      except OSError:
        pass
    # The reader thread (or a stepper that just claimed) holds it only briefly.
    if self._rlock.acquire(timeout=0.01):
      with self._rd:
        self._stepper_reads = True
      return True
    self._release_claim()
    return False

  def unclaim(self) -> None:
    with self._rd:
      self._stepper_reads = False
    self._rlock.release()
    self._release_claim()

  def _release_claim(self) -> None:
    with self._rd:
      self._claims -= 1
      if self._claims == 0:
        with self._lock:
          waiting = bool(self._pending)
        # Someone else waits for a reply: read now. Else park a little (next decode step).
        self._linger_until = 0.0 if waiting else time.monotonic() + _LINGER_S
        if waiting or not self.alive:
          self._rd.notify_all()

  def read_claimed(self) -> None:
    """Reads and dispatches one frame if one is waiting (the caller holds a claim)."""
    try:
      f = self.ch.recv(idle_timeout=0.0)
    except protocol.IdleTimeout:
      return
    except EOFError:
      self.fail(LinkLost(f"{self} closed the connection"))
      return
    except (OSError, ValueError, BridgeError) as e:
      self.fail(e if isinstance(e, LinkLost) else LinkLost(f"{self}: {e}"))
      return
    try:
      self._dispatch(f)
    except BridgeError as e:
      self.fail(e if isinstance(e, LinkLost) else LinkLost(f"{self}: {e}"))

  def _complete(self, f: protocol.Frame) -> None:
    req = f.header.get("req")
    with self._lock:
      p = self._pending.pop(req, None) if type(req) is int else None  # not True == 1
    if p is None:
      raise ProtocolError(f"reply to unknown request {req!r}")
    if f.type == MsgType.ERROR:
      err = RemoteError(str(f.header.get("etype", "Error")), str(f.header.get("message", "")),
                        str(f.header.get("traceback", "")), where=repr(self))
      err.wid = self.wid
      p.callback(None, err)
    else:
      p.callback(f, None)

  # ------------------------------------------------------------------------------ liveness
  def check(self, now: float) -> None:
    """Heartbeat and deadlines; called periodically by the coordinator's monitor."""
    if not self.alive:
      return
    silent = self.ch.silent_for(now)
    if silent > self.dead_after:
      self.fail(DeadlineExceeded(f"{self} sent nothing for {silent:.1f}s "
                                 f"(heartbeat deadline {self.dead_after:.1f}s)"))
      return
    with self._lock:
      late = [r for r, p in self._pending.items() if p.deadline < now]
    if late:
      self.fail(DeadlineExceeded(f"{self} did not answer request {late[0]} within "
                                 f"{self.request_timeout:.1f}s"))
      return
    if now - self._last_ping >= self.heartbeat_s:
      self._last_ping = now
      try:
        self.ch.try_send(MsgType.PING, {"t": round(now, 3)})
      except LinkLost as e:
        self.fail(e)

  def fail(self, err: BaseException, *, quiet: bool = False) -> None:
    """Marks the link dead (once), closes it and fails every pending request with err.
    `quiet`: an orderly close (the coordinator shutting down), logged at debug level."""
    with self._lock:
      if not self.alive:
        return
      self.alive = False
      pending, self._pending = self._pending, {}
    why = str(err)  # a link error often names the link already: say it once
    log.log(logging.DEBUG if quiet else logging.WARNING, "dropping %s",
            why if why.startswith(str(self)) else f"{self}: {why}")
    self.ch.close()
    with self._rd:
      self._rd.notify_all()  # a parked reader thread exits
    try:
      self._wake_w.send(b"\0")
    except OSError:
      pass
    self.residency.close(err)
    for p in pending.values():
      try:
        p.callback(None, err)
      except Exception:  # a callback must never kill the reader or monitor
        log.exception("request callback failed")
    self._on_change(self, err)


def _wait_any(socks, timeout: float) -> list:
  """The subset of socks that can be read now or within timeout (TLS buffers included)."""
  ready = [s for s in socks if getattr(s, "pending", None) is not None and s.pending()]
  if ready:
    return ready
  r, _, _ = select.select(socks, [], [], timeout)
  return r


def _drain(sock) -> None:
  try:
    while sock.recv(4096):
      pass
  except OSError:
    pass


def claim_all(links) -> list[WorkerLink] | None:
  """Claims every link for direct reading by the calling thread (in worker-id order), or
  none of them (None: another stepper reads one; wait for the reader threads instead)."""
  claimed: list[WorkerLink] = []
  for link in sorted(set(links), key=lambda l: l.wid):
    if not link.try_claim():
      unclaim_all(claimed)
      return None
    claimed.append(link)
  return claimed


def unclaim_all(claimed) -> None:
  for link in claimed:
    link.unclaim()


def read_until(claimed, done: Callable[[], bool], poll_s: float = 0.25) -> None:
  """Reads the claimed links on this thread until done(); replies run their callbacks here.
  Returns early once every link is gone (fail() completed their requests with errors)."""
  while not done():
    live = [l for l in claimed if l.alive]
    if not live:
      return
    try:
      ready = _wait_any([l.ch.sock for l in live], poll_s)
    except (OSError, ValueError):  # a socket closed under us: fail() ran
      continue
    for l in live:
      if l.ch.sock in ready:
        l.read_claimed()
