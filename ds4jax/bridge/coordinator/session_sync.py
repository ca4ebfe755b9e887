"""One split `step`: sync a session's KV on every stage with the transcript, then sample.

For a session the coordinator tracks: the token timeline its own stage holds (`tokens`,
with the rolling hash at every position), and for each worker the length of that timeline
the worker is known to hold (`held`). A step:

  1. p = the longest common prefix of `tokens` and the transcript (at most len - 1, so the
     last token is always computed and its logits exist);
  2. a hop that holds less than p (a replacement, or a worker that lost the session) is
     rebuilt by replaying its cached *inputs* through that stage only; where the cache does
     not reach, p is lowered until it does (a rewind is cheap everywhere: truncate);
  3. the transcript suffix from p runs through local + hops in pipelined chunks; the final
     hop samples the last position and returns the token.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

from ds4jax.bridge.wire import protocol, tensors
from ds4jax.bridge.wire.errors import LinkLost, ProtocolError
from ds4jax.bridge.coordinator.pipeline import Chunk, Pass, chunks_of
from ds4jax.runtime import sampling as sampling_mod
from ds4jax.runtime.types import HopTelemetry, StepResult


@dataclasses.dataclass
class _Entry:
  pos0: int
  n: int
  desc: dict[str, Any]
  data: bytes


class CoordSession:
  """The coordinator's record of one session (guarded by `lock` during a step).

  Its local state is a slot of the coordinator's StageBatcher pool (`local_slot`, None
  until the first local compute or after a reset); `free_slot` returns it to the pool."""

  def __init__(self, sid: str, dtype: str, cache_cap: int,
               free_slot: Callable[[int], None] | None = None):
    self.sid = sid
    self.dtype = dtype
    self.lock = threading.Lock()
    self.tokens: list[int] = []
    self.hashes: list[int] = [protocol.FNV_INIT]
    self.local_slot: int | None = None
    self._free_slot = free_slot
    self.closed = False  # close_session ran (a step still running frees the slot at its end)
    self.held: dict[int, int] = {}  # worker id -> positions of `tokens` it holds
    self.cache: dict[int, list[_Entry]] = {}  # layer start -> its inputs from position 0
    self.cache_bytes = 0
    self.cache_cap = cache_cap
    self.last_used = 0.0
    self._cache_lock = threading.Lock()

  # ------------------------------------------------------------------------------ timeline
  def append(self, toks, hashes: list[int] | None = None) -> None:
    """Extends the timeline; `hashes` = protocol.fnv1a64_steps(toks, self.hashes[-1]) when
    the caller has them already."""
    self.hashes.extend(protocol.fnv1a64_steps(toks, self.hashes[-1]) if hashes is None
                       else hashes)
    self.tokens.extend(int(t) for t in toks)

  def reset(self) -> None:
    """Forgets every position (and frees the local slot): the next step starts at 0."""
    slot, self.local_slot = self.local_slot, None
    if slot is not None and self._free_slot is not None:
      self._free_slot(slot)
    self.tokens, self.hashes, self.held = [], [protocol.FNV_INIT], {}
    with self._cache_lock:
      self.cache, self.cache_bytes = {}, 0

  # --------------------------------------------------------------------------------- cache
  def cache_len(self, start: int) -> int:
    with self._cache_lock:
      lst = self.cache.get(start, [])
      return lst[-1].pos0 + lst[-1].n if lst else 0

  def cache_add(self, start: int, pos0: int, desc: dict[str, Any], data: bytes) -> None:
    with self._cache_lock:
      lst = self.cache.setdefault(start, [])
      end = lst[-1].pos0 + lst[-1].n if lst else 0
      if pos0 != end:
        return  # not contiguous from 0 (after an overflow): stays unused until a rewind to 0
      if self.cache_bytes + len(data) > self.cache_cap:
        self.cache, self.cache_bytes = {}, 0  # over the cap: rebuilds fall back to recompute
        return
      lst.append(_Entry(pos0, desc["shape"][0], desc, bytes(data)))
      self.cache_bytes += len(data)

  def cache_trim(self, p: int) -> None:
    with self._cache_lock:
      for start, lst in self.cache.items():
        keep = []
        for e in lst:
          if e.pos0 + e.n <= p:
            keep.append(e)
          elif e.pos0 < p:
            desc, data = tensors.slice_tokens(e.desc, e.data, 0, p - e.pos0)
            keep.append(_Entry(e.pos0, p - e.pos0, desc, data))
          else:
            continue
        self.cache[start] = keep
      self.cache_bytes = sum(len(e.data) for lst in self.cache.values() for e in lst)

  def cache_span(self, start: int, lo: int, hi: int) -> list[tuple[int, dict, bytes]]:
    with self._cache_lock:
      out = []
      for e in self.cache.get(start, []):
        a, b = max(lo, e.pos0), min(hi, e.pos0 + e.n)
        if a < b:
          desc, data = tensors.slice_tokens(e.desc, e.data, a - e.pos0, b - e.pos0)
          out.append((a, desc, data))
      return out


class Stepper:
  """Runs steps of one session on a coordinator (see the module docstring)."""

  def __init__(self, coord, sess: CoordSession):
    self.coord = coord
    self.sess = sess

  def run(self, hops, transcript: list[int], sampling, step: int, top_logprobs: int,
          return_logits: bool) -> StepResult:
    sess, coord = self.sess, self.coord
    dtype = sess.dtype if all(sess.dtype in h.dtypes for h in hops) else "f32"
    p = _common_prefix(sess.tokens, transcript)
    p = min(p, len(transcript) - 1)
    # Lower p until every lagging hop can be caught up from cached inputs.
    changed = True
    while changed:
      changed = False
      for hop in hops:
        h = min(sess.held.get(hop.wid, 0), p)
        if h < p:
          c = sess.cache_len(hop.layers.start)
          if c < p and max(h, c) < p:
            p, changed = max(h, c), True
    self._rewind(p)
    for hop in hops:
      h = min(sess.held.get(hop.wid, 0), p)
      if h < p:
        self._rebuild(hop, h, p, dtype)

    new = transcript[p:]
    chunks = chunks_of(new, p, sess.hashes[p], coord.opt.prefill_chunk, "out")
    local_s = 0.0
    if not hops:  # the coordinator owns the head: one process
      for c in chunks:
        out, dt = self._local(c)
        local_s += dt
      logits_V = out[-1]
      res = {"token": sampling_mod.sample_token(logits_V, sampling, step)}
      if top_logprobs:
        res["logprobs"] = sampling_mod.top_logprobs(logits_V, top_logprobs)
      tel = [HopTelemetry(str(coord.local), "local", local_s, 0.0, 0, 0, len(new))]
      return StepResult(res["token"], res.get("logprobs", []),
                        logits_V if return_logits else None, tel, len(new))

    extra = _sampling_fields(sampling, step, top_logprobs, return_logits)
    ps = Pass(sess.sid, hops, window=coord.window(len(hops)), extra=extra, out_dtype=dtype,
              on_done=lambda i, c, f: self._hop_done(hops, i, c, f), direct=len(chunks) == 1)
    for c in chunks:
      if not ps.acquire():
        break
      try:
        out, dt = self._local(c)
      except BaseException as e:
        ps._settle(e)
        break
      local_s += dt
      desc, x = tensors.encode(out, dtype)
      sess.cache_add(hops[0].layers.start, c.pos0, desc, x)
      ps.submit(c, desc, x)
    ps.wait()
    f = chunks[-1].result
    try:
      token, logprobs, logits_V = _final_reply(f, coord.vocab_size, return_logits)
    except ProtocolError as e:  # a peer that breaks the protocol is dropped; recover
      err = LinkLost(f"{hops[-1]}: {e}")
      hops[-1].fail(err)
      raise err from None
    tel = [HopTelemetry(str(coord.local), "local", local_s, 0.0, 0, 0, len(new))]
    tel += [HopTelemetry(str(hop.layers), hop.peer, st.compute_s, st.queue_s, st.bytes_in,
                         st.bytes_out, st.n_tokens) for hop, st in zip(hops, ps.stats)]
    return StepResult(token, logprobs, logits_V, tel, len(new))

  # ------------------------------------------------------------------------------ helpers
  def _local(self, c: Chunk):
    """Runs a chunk through the local stage (batched with other sessions' steps there):
    -> (out [T, C, D] or logits [T, V], seconds)."""
    sess = self.sess
    try:
      out, dt = self.coord.local_forward(sess, c.tokens, c.pos0)
    except BaseException:
      sess.reset()  # the local state may have been donated half-way: start over cleanly
      raise
    sess.append(c.tokens, c.hashes)
    return out, dt

  def _rewind(self, p: int) -> None:
    sess = self.sess
    if p >= len(sess.tokens):
      return
    self.coord.local_truncate(sess, p)
    del sess.tokens[p:]
    del sess.hashes[p + 1:]
    sess.held = {w: min(k, p) for w, k in sess.held.items()}
    sess.cache_trim(p)

  def _hop_done(self, hops, i: int, c: Chunk, f: protocol.Frame) -> None:
    self.sess.held[hops[i].wid] = c.pos0 + len(c.tokens)
    if i + 1 < len(hops) and f.header.get("kind") == "hidden":
      self.sess.cache_add(hops[i + 1].layers.start, c.pos0, f.header["x"], f.payload)

  def _rebuild(self, hop, lo: int, hi: int, dtype: str) -> None:
    """Replays positions [lo, hi) of the session through `hop` only, from cached inputs."""
    sess, coord = self.sess, self.coord
    ps = Pass(sess.sid, [hop], window=coord.window(1), extra={}, out_dtype=dtype,
              on_done=lambda i, c, f: self._hop_done([hop], i, c, f))
    for pos0, desc, data in sess.cache_span(hop.layers.start, lo, hi):
      n = desc["shape"][0]
      c = Chunk(pos0, sess.tokens[pos0:pos0 + n], sess.hashes[pos0], sess.hashes[pos0 + n], "ack")
      if not ps.acquire():
        break
      ps.submit(c, desc, data)
    ps.wait()
    coord._event(f"session {sess.sid}: rebuilt the KV of {hop!r} by replaying positions "
                 f"{lo}..{hi} through that stage only")


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = len(a)
  if len(b) >= n and b[:n] == a:  # a decode step: all of a (one C-level comparison)
    return n
  p = 0
  for x, y in zip(a, b):
    if x != y:
      break
    p += 1
  return p


def _sampling_fields(sampling, step: int, top_logprobs: int, return_logits: bool,
                     ) -> dict[str, Any]:
  """The final hop's sampling fields, each omitted when equal to its default (the worker
  fills defaults back): greedy decoding adds no bytes to a decode token's WORK."""
  out: dict[str, Any] = {}
  s = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling)
       if getattr(sampling, f.name) != f.default}
  if s:
    out["s"] = s
  if step:
    out["st"] = int(step)
  if top_logprobs:
    out["k"] = int(top_logprobs)
  if return_logits:
    out["rl"] = True
  return out


def _final_reply(f, vocab_size: int, return_logits: bool):
  """(token, logprobs, logits_V | None) of the final hop's reply, every field checked."""
  h = f.header
  if h.get("kind", "token") != "token":  # absent: a token (protocol v2 default)
    raise ProtocolError(f"the final hop returned {h.get('kind')!r}, not a token")
  token = protocol.field(h, "token", int, lo=0, hi=vocab_size - 1)
  raw = protocol.field(h, "logprobs", list, default=[])
  if not all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int  # noqa: E721
             and 0 <= p[0] < vocab_size and isinstance(p[1], (int, float))
             and not isinstance(p[1], bool) for p in raw):
    raise ProtocolError("the final hop returned malformed logprobs")
  logits_V = tensors.decode(h.get("logits"), f.payload) if return_logits else None
  return token, [(p[0], float(p[1])) for p in raw], logits_V
