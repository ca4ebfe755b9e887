"""Serving one coordinator connection: a few serving threads that trade roles.

At any time one thread reads frames (it answers PING at once, so a busy worker still looks
alive); each session's frames form a *lane*, run in arrival order by one thread at a time
(the coordinator pipelines several prefill chunks of a session), and lanes of different
sessions run on different threads at once, each blocking in `batcher.run`, which is how their
rows meet in one batch. A frame whose lane is idle runs on the thread that read it; another
takes over reading. The first thread loads and compiles the stage (`Worker._prepare`) while
the reader answers heartbeats.

    Connection(worker, channel, dead_after=30.0, poll=1.0, max_owners=9).serve()
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback

from ds4jax.wire import protocol, transport
from ds4jax.wire.errors import LinkLost, PrefixMismatch, ProtocolError
from ds4jax.wire.protocol import MsgType
from ds4jax.bridge.worker.work import pong_stats

log = logging.getLogger("ds4jax.bridge.worker")
# Frames that run in arrival order per session (its lane) on the serving threads.
_QUEUED = (MsgType.WORK, MsgType.DROP, MsgType.SNAPSHOT_SAVE, MsgType.SNAPSHOT_LOAD)
# An idle serving thread checks this often whether the reader role is free. With a single
# resident session a decode token does not wake it (a wake-up on the hot path costs more
# than the token's bookkeeping, and no other session's frame can be waiting), so a long
# compute is covered within this time (far below the 1 s minimum liveness deadline).
_TAKEOVER_S = 0.1
_JOIN_S = 30.0  # how long a closing connection waits for its serving threads


class _Lane:
  """One session's queued frames, in arrival order; at most one thread runs them."""

  __slots__ = ("queue", "owned", "listed", "computing")

  def __init__(self):
    self.queue: collections.deque = collections.deque()  # (frame, t_recv)
    self.owned = False  # a thread runs this lane
    self.listed = False  # waiting in Connection.ready for a thread
    self.computing = False  # a frame was taken and its reply is not yet built


class Connection:
  """One connection to the coordinator, served for `worker` (its stop flag, sessions,
  batcher and frame handlers). The serving threads' shared state is guarded by `cv`."""

  def __init__(self, worker, ch: transport.Channel, dead_after: float, poll: float,
               max_owners: int):
    self.worker = worker
    self.ch = ch
    self.dead_after = dead_after
    self.poll = poll
    self.cv = threading.Condition()
    self.lanes: dict[str, _Lane] = {}
    self.ready: collections.deque[str] = collections.deque()  # lanes waiting for a thread
    self.owners = 0  # threads running a lane
    self.max_owners = max_owners
    self.idle = 0  # threads waiting for a role
    self.threads: list[threading.Thread] = []
    self.serving = False  # the stage is loaded and compiled (READY sent)
    self.reader_free = True
    self.done = False
    self.error: BaseException | None = None

  def end(self, err: BaseException | None) -> None:
    with self.cv:
      if not self.done:
        self.done, self.error = True, err
      self.cv.notify_all()
    if err is not None:
      self.ch.close()  # wakes a thread blocked reading

  def serve(self) -> None:
    """Serves until the connection ends (module docstring); raises what ended it, if not a
    clean close.

    Exactly one thread reads frames at a time. A frame whose session has nothing queued runs
    on the thread that read it, with no hand-off (the decode hot path), and another thread
    takes over reading: woken at once when other sessions may send meanwhile (or for a
    prefill chunk), else by itself within _TAKEOVER_S. Frames of a session that is
    computing queue in its lane. Threads are started as lanes need them, up to max_owners.
    """
    self._spawn(self._helper)
    try:
      self._roles()
    finally:
      self.end(None)
      self.ch.close()
      deadline = time.monotonic() + _JOIN_S
      with self.cv:
        threads = list(self.threads)
      for t in threads:
        t.join(timeout=max(deadline - time.monotonic(), 0.0))
    if self.error is not None:
      raise self.error

  def _spawn(self, target) -> None:
    t = threading.Thread(target=target, daemon=True, name="ds4jax-worker-serve")
    with self.cv:
      self.threads.append(t)
    t.start()

  def _helper(self) -> None:
    """Loads and compiles (the reader answers heartbeats meanwhile), then trades roles."""
    w = self.worker
    try:
      w._prepare(self.ch)
    except LinkLost:
      self.end(None)
      return
    except Exception as e:  # a slice that cannot load: say why, drop the link, stop
      log.error("cannot serve layers %s: %s: %s", w.layers.describe(), type(e).__name__, e)
      w._fatal = e
      w._stop.set()
      self.end(None)
      self.ch.close()
      return
    with self.cv:
      self.serving = True
      self.cv.notify_all()
    self._thread()

  def _thread(self) -> None:
    try:
      self._roles()
    except BaseException as e:  # never leave the connection without a thread
      self.end(e)

  def _roles(self) -> None:
    """One thread's life on a connection: run a waiting lane, else read, else wait."""
    sid = None
    while True:
      if sid is not None and not self._run_lane(sid):
        self.end(None)
        return
      sid = None
      with self.cv:
        while True:
          if self.done:
            return
          if self.serving and self.ready and self.owners < self.max_owners:
            sid = self.ready.popleft()
            lane = self.lanes[sid]
            lane.listed, lane.owned = False, True
            self.owners += 1
            break
          if self.reader_free:
            self.reader_free = False
            break
          self.idle += 1
          self.cv.wait(_TAKEOVER_S)
          self.idle -= 1
      if sid is None:
        sid = self._read()  # returns with a lane to run and the reader role handed over
        if sid is None:
          return

  def _run_lane(self, sid: str) -> bool:
    """Runs sid's queued frames in order until none is left; False once the link is lost."""
    while True:
      with self.cv:
        lane = self.lanes[sid]
        if self.done or not lane.queue:
          lane.owned = False
          self.owners -= 1
          if not lane.queue:
            del self.lanes[sid]
          if self.ready:
            self.cv.notify()  # a lane waited for a thread
          return True
        f, t_recv = lane.queue.popleft()
        lane.computing = True
      if not self._process(lane, f, t_recv):
        return False

  def _read(self) -> str | None:
    """Reads frames until one must run on this thread: returns its session id with this
    thread owning its lane and the reader role released (None: the connection ended)."""
    ch, w = self.ch, self.worker
    try:
      while not w._stop.is_set() and not self.done:
        try:
          f = ch.recv(idle_timeout=self.poll)
        except protocol.IdleTimeout:
          if ch.silent_for(time.monotonic()) > self.dead_after:
            raise LinkLost(f"no frame from the coordinator for {self.dead_after:.1f}s") from None
          continue
        if f.type == MsgType.PING:
          ch.send(MsgType.PONG, {"t": f.header.get("t", 0), "b": pong_stats(w.batcher)})
        elif f.type in _QUEUED:
          sid = f.header.get("sid")
          sid = sid if isinstance(sid, str) else ""  # _process refuses it in its lane
          spawn = False
          with self.cv:
            lane = self.lanes.get(sid)
            if f.type == MsgType.DROP and (lane is None or not (lane.queue or lane.computing)):
              lane = None  # nothing of sid runs or waits: drop it here, now
            else:
              if lane is None:
                lane = self.lanes[sid] = _Lane()
              lane.queue.append((f, time.monotonic()))
              if lane.owned or lane.listed:
                continue  # its owner (or the next free thread) runs it in order
              if not self.serving or self.owners >= self.max_owners:
                lane.listed = True
                self.ready.append(sid)
                continue
              lane.owned, self.reader_free = True, True
              self.owners += 1
              # Wake a reader unless this is a lone session's decode token (nobody else can
              # be waiting to send; an idle thread takes over by itself if it runs long).
              if (f.type != MsgType.WORK or f.header.get("n") != 1
                  or len(w.sessions) > 1 or self.owners > 1):
                if self.idle:
                  self.cv.notify()
                else:
                  spawn = len(self.threads) < self.max_owners  # + this thread
          if lane is None:
            w.sessions.drop(sid)
            continue
          if spawn:
            self._spawn(self._thread)
          return sid
        else:
          raise ProtocolError(f"unexpected {f.type.name} frame from the coordinator")
    except BaseException as e:
      self.end(e)
      return None
    self.end(None)
    return None

  def _process(self, lane: _Lane, f: protocol.Frame, t_recv: float) -> bool:
    """Runs one frame of a lane and sends its reply; False once the link is lost."""
    ch, w = self.ch, self.worker

    def computed():  # the session's state is settled: a DROP may now run on the reader
      with self.cv:
        lane.computing = False

    if f.type == MsgType.DROP:
      w.sessions.drop(str(f.header.get("sid", "")))
      computed()
      return True
    req = f.header.get("req", -1)
    try:
      try:
        if f.type in (MsgType.SNAPSHOT_SAVE, MsgType.SNAPSHOT_LOAD):
          header, payload = w._snapshot(f)
        else:
          header, payload = w._work(f, t_recv)
      finally:
        computed()
      ch.send(MsgType.RESULT, header, payload)
    except LinkLost:
      return False
    except Exception as e:
      tb = "" if isinstance(e, (PrefixMismatch, ProtocolError)) else traceback.format_exc()
      if not isinstance(e, PrefixMismatch):
        log.warning("work %s failed: %s: %s", req, type(e).__name__, e)
      try:
        ch.send(MsgType.ERROR, {"req": req, "etype": type(e).__name__,
                                "message": str(e), "traceback": tb})
      except LinkLost:
        return False
    return True
