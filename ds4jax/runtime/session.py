"""What a backend knows of one session: the timeline its route holds, and where it is held.

A `RouteSession` is the one record of a session, whichever backend owns it (design.md §0):

- `tokens` / `hashes`: the token timeline the local hops hold, with the ds4 FNV-1a rolling
  hash at every position (`hashes[i]` is the hash of `tokens[:i]`), which remote hops check;
- `slots`: the session's slot in each local hop's `StageBatcher` pool (None until the first
  step, or after an eviction or a reset);
- `held`: for each remote hop (by worker id) how many positions of `tokens` it holds;
- an input cache per remote layer start: the activations that entered that hop, from
  position 0, so a replaced worker is rebuilt by replaying them through that stage only.

Only the step that holds `lock` touches a session, so its fields need no other guard; the
input cache has its own lock because replies land on link reader threads.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Sequence

from ds4jax.wire import protocol, tensors


@dataclasses.dataclass
class _Cached:
  pos0: int
  n: int
  desc: dict[str, Any]
  data: bytes


class SessionError(KeyError):
  """An unknown or closed session id."""

  def __str__(self):
    return str(self.args[0]) if self.args else "unknown session"


class RouteSession:
  """One session of a backend (see the module docstring).

  Args:
    sid: the session id.
    dtype: the activation dtype on the wire ("f32", "bf16", "int8").
    cache_cap: most bytes of cached hop inputs (0: no targeted rebuilds).
    free_slots: returns the session's local slots to their pools (called by `reset`).
  """

  def __init__(self, sid: str, *, dtype: str = "f32", cache_cap: int = 0,
               free_slots: Callable[[list[int]], None] | None = None):
    self.sid = sid
    self.dtype = dtype
    self.lock = threading.Lock()
    self.tokens: list[int] = []
    self.hashes: list[int] = [protocol.FNV_INIT]
    self.slots: list[int] | None = None
    self.held: dict[int, int] = {}
    self.closed = False  # close_session ran (a step still running frees the slots at its end)
    self.edits = None  # the runtime.edits.Interventions its state was computed under
    self.hop_edits: dict[int, str] = {}  # worker id -> the edits key it holds for this session
    self.last_used = 0.0
    self._free_slots = free_slots
    self._cache: dict[int, list[_Cached]] = {}
    self._cache_bytes = 0
    self._cache_cap = int(cache_cap)
    self._cache_lock = threading.Lock()

  @property
  def edits_key(self) -> str | None:
    """The key of the edits its state was computed under (None: no edits)."""
    return None if self.edits is None else self.edits.key

  def __repr__(self):
    return f"RouteSession({self.sid!r}, {len(self.tokens)} tokens)"

  # ------------------------------------------------------------------------------ timeline
  def append(self, toks: Sequence[int], hashes: list[int] | None = None) -> None:
    """Extends the timeline; `hashes` = protocol.fnv1a64_steps(toks, self.hashes[-1]) when
    the caller has them already."""
    self.hashes.extend(protocol.fnv1a64_steps(toks, self.hashes[-1]) if hashes is None
                       else hashes)
    self.tokens.extend(int(t) for t in toks)

  def rewind(self, p: int) -> None:
    """Forgets positions p.. of the timeline, of every remote hop and of the input cache (the
    caller truncates the local slots)."""
    del self.tokens[p:]
    del self.hashes[p + 1:]
    self.held = {w: min(k, p) for w, k in self.held.items()}
    self._cache_trim(p)

  def reset(self) -> None:
    """Forgets every position and frees the local slots: the next step starts at 0."""
    slots, self.slots = self.slots, None
    if slots is not None and self._free_slots is not None:
      self._free_slots(slots)
    self.tokens, self.hashes, self.held, self.hop_edits = [], [protocol.FNV_INIT], {}, {}
    with self._cache_lock:
      self._cache, self._cache_bytes = {}, 0

  # ------------------------------------------------------------------------ input cache
  def cache_len(self, start: int) -> int:
    """Positions of the inputs of the hop starting at layer `start` cached from 0."""
    with self._cache_lock:
      lst = self._cache.get(start, [])
      return lst[-1].pos0 + lst[-1].n if lst else 0

  def cache_add(self, start: int, pos0: int, desc: dict[str, Any], data: bytes) -> None:
    """Caches the encoded input [n, C, D] of the hop at layer `start` for positions pos0..;
    dropped unless contiguous from 0; over the cap the whole cache is dropped."""
    with self._cache_lock:
      lst = self._cache.setdefault(start, [])
      end = lst[-1].pos0 + lst[-1].n if lst else 0
      if pos0 != end:
        return  # not contiguous from 0 (after an overflow): unused until a rewind to 0
      if self._cache_bytes + len(data) > self._cache_cap:
        self._cache, self._cache_bytes = {}, 0  # over the cap: rebuilds fall back to recompute
        return
      lst.append(_Cached(pos0, desc["shape"][0], desc, bytes(data)))
      self._cache_bytes += len(data)

  def cache_span(self, start: int, lo: int, hi: int) -> list[tuple[int, dict, bytes]]:
    """The cached inputs of the hop at layer `start` for positions lo..hi-1, in pieces."""
    with self._cache_lock:
      out = []
      for e in self._cache.get(start, []):
        a, b = max(lo, e.pos0), min(hi, e.pos0 + e.n)
        if a < b:
          desc, data = tensors.slice_tokens(e.desc, e.data, a - e.pos0, b - e.pos0)
          out.append((a, desc, data))
      return out

  def _cache_trim(self, p: int) -> None:
    with self._cache_lock:
      for start, lst in self._cache.items():
        keep = []
        for e in lst:
          if e.pos0 + e.n <= p:
            keep.append(e)
          elif e.pos0 < p:
            desc, data = tensors.slice_tokens(e.desc, e.data, 0, p - e.pos0)
            keep.append(_Cached(e.pos0, p - e.pos0, desc, data))
        self._cache[start] = keep
      self._cache_bytes = sum(len(e.data) for lst in self._cache.values() for e in lst)


__all__ = ["RouteSession", "SessionError"]
