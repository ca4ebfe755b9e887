"""The coordinator's side of one worker connection: requests with deadlines, replies by id.

One reader thread per link turns RESULT/ERROR frames into callbacks on the pending request
they answer. The coordinator's monitor thread calls `check()` to send heartbeats and to
declare the link dead when the worker has been silent longer than `dead_after` or a
request outlived its deadline; `fail()` then completes every pending request with the error.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable

from ds4jax.bridge import protocol, transport
from ds4jax.bridge.errors import (BridgeError, DeadlineExceeded, LinkLost, ProtocolError,
                                  RemoteError)
from ds4jax.bridge.protocol import MsgType
from ds4jax.bridge.residency import Residency
from ds4jax.config import LayerRange

log = logging.getLogger("ds4jax.bridge.coordinator")
# callback(frame or None, error or None); runs on the link's reader (or monitor) thread.
Callback = Callable[[protocol.Frame | None, BaseException | None], None]
_req_ids = itertools.count(1)


@dataclasses.dataclass
class _Pending:
  deadline: float
  callback: Callback


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
    self.heartbeat_s = heartbeat_s
    self.dead_after = dead_after
    self.request_timeout = request_timeout
    self._on_change = on_change
    self._pending: dict[int, _Pending] = {}
    self._lock = threading.Lock()
    self._last_ping = time.monotonic()
    self.ready = False
    self.alive = True
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
    try:
      while self.alive:
        try:
          f = self.ch.recv(idle_timeout=max(self.heartbeat_s, 0.05))
        except protocol.IdleTimeout:
          continue
        if f.type in (MsgType.RESULT, MsgType.ERROR):
          self._complete(f)
        elif f.type == MsgType.READY:
          self.ready = True
          self._on_change(self, None)  # the route may now form
        elif f.type != MsgType.PONG:
          raise ProtocolError(f"unexpected {f.type.name} frame from a worker")
    except EOFError:
      self.fail(LinkLost(f"{self} closed the connection"))
    except (OSError, BridgeError) as e:
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

  def fail(self, err: BaseException) -> None:
    """Marks the link dead (once), closes it and fails every pending request with err."""
    with self._lock:
      if not self.alive:
        return
      self.alive = False
      pending, self._pending = self._pending, {}
    log.warning("dropping %s: %s", self, err)
    self.ch.close()
    self.residency.close(err)
    for p in pending.values():
      try:
        p.callback(None, err)
      except Exception:  # a callback must never kill the reader or monitor
        log.exception("request callback failed")
    self._on_change(self, err)
