"""A worker's per-session KV store: a size limit, LRU eviction, and the prefix-hash check.

Each session holds a slot of the stage's `StageBatcher` pool (docs/design.md §11) plus the
token timeline and the rolling hash at every position, so a WORK frame that starts earlier
than the session's end can be honoured by a cheap rewind (`batcher.truncate`) once its
`hash_before` matches the stored prefix. Anything else is refused *before* computing: the
coordinator then replays the transcript.

Sessions compute concurrently (one lane each, batched by the batcher), so a session being
computed is `busy` and never evicted; only the lane that owns a session touches its
timeline, the store's lock guards the map.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

from ds4jax.wire import protocol
from ds4jax.wire.errors import PrefixMismatch


@dataclasses.dataclass
class Session:
  sid: str
  slot: int | None  # the batcher pool slot (None while it is being allocated)
  tokens: list[int] = dataclasses.field(default_factory=list)
  hashes: list[int] = dataclasses.field(default_factory=lambda: [protocol.FNV_INIT])
  busy: bool = False  # between prepare and commit/release: not evictable
  edits: Any = None  # the runtime.edits.Interventions its state is computed under
  edits_key: str | None = None  # the coordinator's key for them

  @property
  def n(self) -> int:
    return len(self.tokens)


class SessionStore:
  """LRU map sid -> Session, holding at most `limit` sessions, each a slot of `batcher`
  (a `runtime.batching.StageBatcher` with at least `limit` slots; `bind` sets it once the
  stage is loaded)."""

  def __init__(self, limit: int = 8, batcher=None):
    if limit < 1:
      raise ValueError(f"session limit must be >= 1, got {limit}")
    self.limit = limit
    self.batcher = batcher
    self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
    self._lock = threading.Lock()
    self.evicted = 0

  def bind(self, batcher) -> None:
    """Uses `batcher`'s pool from now on (every session is dropped)."""
    self.clear()
    self.batcher = batcher

  def __len__(self) -> int:
    return len(self._sessions)

  def __contains__(self, sid: str) -> bool:
    return sid in self._sessions

  def prepare(self, sid: str, pos0: int, hash_before: int) -> tuple[Session, list[str]]:
    """The session positioned at pos0 (rewound if needed) and marked busy; PrefixMismatch
    if it cannot be. Call `commit` or `release` after.

    Returns (session, ids of sessions evicted to make room).
    """
    evicted: list[str] = []
    with self._lock:
      s = self._sessions.get(sid)
      if s is not None and s.slot is not None and self.batcher.pos(s.slot) != s.n:
        # The pool was rebuilt after a failed batched call: the state is gone.
        self._pop(sid)
        s = None
      if s is None:
        if pos0 != 0 or hash_before != protocol.FNV_INIT:
          raise PrefixMismatch(
              f"session {sid} is unknown here (evicted, or this worker restarted) "
              f"but work starts at position {pos0}")
        evicted = self._make_room()
        s = Session(sid, None, busy=True)
        self._sessions[sid] = s
        fresh = True
      else:
        if s.busy:
          raise RuntimeError(f"session {sid} is already computing")  # lanes keep one each
        fresh = False
        s.busy = True
      self._sessions.move_to_end(sid)
    try:
      if fresh:  # outside the lock: alloc waits for the batcher's thread
        s.slot = self.batcher.alloc()
        return s, evicted
      if pos0 > s.n:
        raise PrefixMismatch(f"session {sid} holds {s.n} positions but work starts at {pos0}")
      if s.hashes[pos0] != hash_before:
        raise PrefixMismatch(
            f"session {sid} prefix hash at position {pos0} is {protocol.hash_hex(s.hashes[pos0])}"
            f", work expects {protocol.hash_hex(hash_before)}")
      if pos0 < s.n:
        self.batcher.truncate(s.slot, pos0)
        del s.tokens[pos0:]
        del s.hashes[pos0 + 1:]
      return s, evicted
    except BaseException:
      if fresh:
        self.drop(sid)
      else:
        self.release(s)
      raise

  def _make_room(self) -> list[str]:
    """Evicts least recently used idle sessions until one more fits (lock held)."""
    evicted = []
    while len(self._sessions) >= self.limit:
      old = next((k for k, v in self._sessions.items() if not v.busy), None)
      if old is None:
        raise RuntimeError(f"all {self.limit} session slots of this worker are computing")
      self._pop(old)
      evicted.append(old)
      self.evicted += 1
    return evicted

  def _pop(self, sid: str) -> Session | None:
    s = self._sessions.pop(sid, None)
    if s is not None and s.slot is not None:
      self.batcher.free(s.slot)
    return s

  @staticmethod
  def commit(s: Session, tokens, hashes: list[int] | None = None) -> None:
    """Appends tokens (ints) to s, whose slot now holds them, and releases it; `hashes` =
    protocol.fnv1a64_steps(tokens, s.hashes[-1]) when the caller has them already."""
    tokens = [int(t) for t in tokens]
    s.hashes.extend(protocol.fnv1a64_steps(tokens, s.hashes[-1]) if hashes is None else hashes)
    s.tokens.extend(tokens)
    s.busy = False

  @staticmethod
  def release(s: Session) -> None:
    s.busy = False

  def get(self, sid: str) -> Session | None:
    with self._lock:
      return self._sessions.get(sid)

  def acquire(self, sid: str) -> Session | None:
    """Session sid marked busy (not evictable) until `release`, or None if unknown."""
    with self._lock:
      s = self._sessions.get(sid)
      if s is None:
        return None
      if s.busy or s.slot is None:
        raise RuntimeError(f"session {sid} is already computing")
      s.busy = True
      return s

  def install(self, sid: str, state, tokens) -> list[str]:
    """Replaces (or adds) session sid with a restored StageState holding `tokens` (a session
    snapshot), written into a slot; returns the ids evicted to make room."""
    with self._lock:
      self._pop(sid)
      evicted = self._make_room()
      s = Session(sid, None, busy=True)
      self._sessions[sid] = s
    try:
      s.slot = self.batcher.alloc()
      self.batcher.put(s.slot, state)
    except BaseException:
      self.drop(sid)
      raise
    self.commit(s, tokens)
    return evicted

  def drop(self, sid: str) -> bool:
    with self._lock:
      return self._pop(sid) is not None

  def clear(self) -> int:
    with self._lock:
      n = len(self._sessions)
      for sid in list(self._sessions):
        self._pop(sid)
      return n
