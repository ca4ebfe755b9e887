"""Which sessions a worker holds, as the coordinator sees it: the worker's KV slots, leased.

A worker keeps at most `max_sessions` sessions (it says how many in HELLO). Left alone it
would evict the least recently used one itself, and with more active sessions than slots two
sessions could evict each other forever (each rebuild evicts the other: livelock). So the
coordinator decides instead. Before a step sends work to a hop it *leases* the session's slot
on that hop:

  * the session is resident: the lease marks it active;
  * there is a free slot: the session takes it (it holds nothing there yet: `fresh`);
  * every slot is taken: the least recently used *idle* session is evicted here (the caller
    sends DROP for it first, on the same ordered link, so the worker never evicts on its own).
    A session idle for less than `grace_s` is probably between two steps of a generation, so
    it is evicted only once the new step has waited `grace_s` (fewer rebuilds, no starvation);
  * every slot is held by an active session: the step waits until one finishes.

The resident set is a superset of what the worker really holds (a session enters it before
its first WORK and leaves it only when DROP goes out), so the worker never has to evict, and
an active session is never evicted: every leased step runs to its end, so sessions beyond the
capacity queue and progress is guaranteed. Leases on several hops are taken in route order
(ascending layer start), the same total order for every session, so waits never form a cycle.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time

from ds4jax.wire.errors import LinkLost, RouteUnavailable
from ds4jax.wire.protocol import MsgType


class Residency:
  """The resident sessions of one worker link. capacity 0: unknown (the worker evicts)."""

  def __init__(self, capacity: int, grace_s: float = 0.0):
    self.capacity = int(capacity)
    # A session idle for less than grace_s is between two steps of a running generation;
    # evicting it would cost a rebuild on its very next step. A full worker evicts such a
    # session only once the waiting step has itself waited grace_s (so nobody starves).
    self.grace_s = float(grace_s)
    self._idle_since: dict[str, float] = {}
    self._active: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU first
    self._cv = threading.Condition()
    self._closed: BaseException | None = None
    self.evictions = 0  # sessions evicted here to make room (tests, logs)
    self.waits = 0  # leases that had to wait for an active session to finish

  def __len__(self) -> int:
    with self._cv:
      return len(self._active)

  def __contains__(self, sid: str) -> bool:
    with self._cv:
      return sid in self._active

  def lease(self, sid: str, deadline: float, what: str = "worker") -> tuple[bool, list[str]]:
    """Marks sid active here; returns (fresh, evicted ids). `fresh`: sid was not resident,
    so the worker holds none of its positions. The caller must DROP the evicted ids before
    sending sid's work. Raises LinkLost if the link dies while waiting, RouteUnavailable
    past the deadline."""
    with self._cv:
      t0 = time.monotonic()
      waited = False
      while True:
        if self._closed is not None:
          raise LinkLost(f"{what}: {self._closed}")
        if sid in self._active:
          self._active[sid] += 1
          self._active.move_to_end(sid)
          self._idle_since.pop(sid, None)
          return False, []
        now = time.monotonic()
        need = len(self._active) + 1 - self.capacity if self.capacity > 0 else 0
        idle = [s for s, n in self._active.items() if n == 0]  # LRU first
        wake = now + 0.5
        if now - t0 < self.grace_s:  # still patient: only sessions idle for grace_s
          ripe = [s for s in idle if now - self._idle_since.get(s, 0.0) >= self.grace_s]
          wake = min([wake, t0 + self.grace_s] +
                     [self._idle_since.get(s, 0.0) + self.grace_s for s in idle])
        else:
          ripe = idle
        if need <= len(ripe):
          evicted = ripe[:max(need, 0)]
          for victim in evicted:
            del self._active[victim]
            self._idle_since.pop(victim, None)
          self.evictions += len(evicted)
          self._active[sid] = 1
          return True, evicted
        if not waited:
          waited, self.waits = True, self.waits + 1
        left = deadline - now
        if left <= 0:
          raise RouteUnavailable(
              f"{what} is busy: all {self.capacity} of its session slots are in use by "
              "active steps")
        self._cv.wait(max(min(left, wake - now), 0.001))

  def release(self, sid: str) -> None:
    """Ends one lease of sid (it stays resident, now idle if no other lease holds it)."""
    with self._cv:
      n = self._active.get(sid)
      if n:
        self._active[sid] = n - 1
        if n == 1:
          self._idle_since[sid] = time.monotonic()
      self._cv.notify_all()

  def forget(self, sid: str) -> None:
    """sid was dropped on the worker (close_session)."""
    with self._cv:
      if self._active.get(sid, 0) == 0:
        self._active.pop(sid, None)
        self._idle_since.pop(sid, None)
      self._cv.notify_all()

  def close(self, err: BaseException) -> None:
    """The link is gone: every waiter raises."""
    with self._cv:
      self._closed = err
      self._cv.notify_all()


@contextlib.contextmanager
def leases(sess, hops, deadline: float, sessions: dict):
  """Holds sess's lease on every hop (WorkerLinks) for the duration of one step.

  Evicted sessions get DROP before our WORK (same ordered link) and, when they are idle, their
  record (`sessions[sid].held`) stops claiming positions there. A hop where sess is fresh
  holds none of its positions, whatever the record said."""
  held = []
  try:
    for hop in sorted(hops, key=lambda h: (h.layers.start, h.wid)):  # one global order
      fresh, evicted = hop.residency.lease(sess.sid, deadline, repr(hop))
      held.append(hop)
      for victim in evicted:
        hop.send(MsgType.DROP, {"sid": victim})
        _forget_held(sessions.get(victim), hop.wid)
      if fresh:
        sess.held.pop(hop.wid, None)
    yield
  finally:
    for hop in held:
      hop.residency.release(sess.sid)


def _forget_held(s, wid: int) -> None:
  """Best effort: if the evicted session is stepping elsewhere right now, its next lease on
  wid reports it fresh anyway."""
  if s is not None and s.lock.acquire(blocking=False):
    try:
      s.held.pop(wid, None)
    finally:
      s.lock.release()
