"""A worker's per-session KV store: a size limit, LRU eviction, and the prefix-hash check.

Each session keeps its runner state plus the token timeline and the rolling hash at every
position, so a WORK frame that starts earlier than the session's end can be honoured by a
cheap rewind (`runner.truncate`) once its `hash_before` matches the stored prefix. Anything
else is refused *before* computing: the coordinator then replays the transcript.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

from ds4jax.bridge import protocol
from ds4jax.bridge.errors import PrefixMismatch


@dataclasses.dataclass
class Session:
  sid: str
  state: Any
  tokens: list[int] = dataclasses.field(default_factory=list)
  hashes: list[int] = dataclasses.field(default_factory=lambda: [protocol.FNV_INIT])

  @property
  def n(self) -> int:
    return len(self.tokens)


class SessionStore:
  """LRU map sid -> Session, holding at most `limit` sessions."""

  def __init__(self, limit: int = 8):
    if limit < 1:
      raise ValueError(f"session limit must be >= 1, got {limit}")
    self.limit = limit
    self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
    self._lock = threading.Lock()
    self.evicted = 0

  def __len__(self) -> int:
    return len(self._sessions)

  def __contains__(self, sid: str) -> bool:
    return sid in self._sessions

  def prepare(self, sid: str, pos0: int, hash_before: int, runner) -> tuple[Session, list[str]]:
    """The session positioned at pos0, rewound if needed; PrefixMismatch if it cannot be.

    Returns (session, ids of sessions evicted to make room).
    """
    with self._lock:
      evicted: list[str] = []
      s = self._sessions.get(sid)
      if s is None:
        if pos0 != 0 or hash_before != protocol.FNV_INIT:
          raise PrefixMismatch(
              f"session {sid} is unknown here (evicted, or this worker restarted) "
              f"but work starts at position {pos0}")
        while len(self._sessions) >= self.limit:
          old, _ = self._sessions.popitem(last=False)
          evicted.append(old)
          self.evicted += 1
        s = Session(sid, runner.init_state())
        self._sessions[sid] = s
      self._sessions.move_to_end(sid)
      if pos0 > s.n:
        raise PrefixMismatch(f"session {sid} holds {s.n} positions but work starts at {pos0}")
      if s.hashes[pos0] != hash_before:
        raise PrefixMismatch(
            f"session {sid} prefix hash at position {pos0} is {protocol.hash_hex(s.hashes[pos0])}"
            f", work expects {protocol.hash_hex(hash_before)}")
      if pos0 < s.n:
        s.state = runner.truncate(s.state, pos0)
        del s.tokens[pos0:]
        del s.hashes[pos0 + 1:]
      return s, evicted

  @staticmethod
  def commit(s: Session, tokens, state, hashes: list[int] | None = None) -> None:
    """Appends tokens (ints) to s; `hashes` = protocol.fnv1a64_steps(tokens, s.hashes[-1])
    when the caller has them already."""
    tokens = [int(t) for t in tokens]
    s.hashes.extend(protocol.fnv1a64_steps(tokens, s.hashes[-1]) if hashes is None else hashes)
    s.tokens.extend(tokens)
    s.state = state

  def get(self, sid: str) -> Session | None:
    with self._lock:
      return self._sessions.get(sid)

  def install(self, sid: str, state, tokens) -> list[str]:
    """Replaces (or adds) session sid with a restored state holding `tokens` (a session
    snapshot); returns the ids evicted to make room."""
    s = Session(sid, None)
    self.commit(s, tokens, state)
    with self._lock:
      evicted: list[str] = []
      self._sessions.pop(sid, None)
      while len(self._sessions) >= self.limit:
        old, _ = self._sessions.popitem(last=False)
        evicted.append(old)
        self.evicted += 1
      self._sessions[sid] = s
      return evicted

  def drop(self, sid: str) -> bool:
    with self._lock:
      return self._sessions.pop(sid, None) is not None

  def clear(self) -> int:
    with self._lock:
      n = len(self._sessions)
      self._sessions.clear()
      return n
