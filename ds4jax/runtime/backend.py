"""`RouteBackend`: sessions over a route, the one implementation of `Backend`'s step loop.

Both executors are route backends (design.md §0): `LocalBackend` (runtime/local.py) has local
hops only, the `Coordinator` (bridge/coordinator/) has its local hop and a `Downstream` of
worker links. This class owns what they share: the session table, the sessions' slots in
every local hop's `StageBatcher` pool (least recently used idle sessions give theirs up),
the checks on a transcript, the retry loop around `step.run_step`, `step_many`, session
export/import for snapshots, and ds4's disk KV cache around a step (`kv_disk`). A subclass
provides the downstream and its recovery rules through the `_downstream`, `_leases` and
`_recoverable` hooks; the algorithm never calls back into it.

Steps of different sessions run concurrently (one caller thread each): their decode tokens
run as one batched call at every local stage. One session's steps are serialized.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import secrets
import threading
import time
from typing import Any, Callable, Sequence

from ds4jax.runtime import batching
from ds4jax.runtime.capture import CaptureSpec, StepCapture
from ds4jax.runtime.edits import Interventions
from ds4jax.runtime.session import RouteSession, SessionError
from ds4jax.runtime.step import StepRequest, common_prefix, run_step
from ds4jax.runtime.types import StepResult

log = logging.getLogger("ds4jax.backend")


class RouteBackend:
  """Sessions over `runners` (this process's stages, contiguous from layer 0) + a downstream.

  Args:
    runners: the local stages, in layer order.
    prefill_chunk: most tokens per chunk of a step.
    max_sessions: sessions whose state the local pools keep (slots per stage).
    max_batch: most decode rows per batched call (default: the runner's).
    slot_wait_s: how long a step waits for a local slot while every slot is held by a
      running step (0: fail at once with `BatcherFull`).
    progress_every_s: period of the "prefill i/n tokens" log line on long prompts.
  """

  # The Generator adds no prefill heartbeat of its own: `run_step` logs chunk progress.
  reports_prefill_progress = True
  # ds4's disk KV cache (a `checkpoints.kv_disk.KVDiskCache`, set by the builder; None: off):
  # a step loads the longest cached prefix its session lacks, and a prefill stores the state
  # at its last chunk boundary.
  kv_disk = None

  def __init__(self, runners: Sequence[Any], *, prefill_chunk: int = 256, max_sessions: int = 8,
               max_batch: int | None = None, slot_wait_s: float = 0.0,
               progress_every_s: float = 2.0):
    if not runners:
      raise ValueError("a backend needs at least one StageRunner")
    if prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if max_sessions < 1:
      raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
    self.runners = list(runners)
    self.cfg = self.runners[0].cfg
    self.ctx_size = min(r.ctx_size for r in self.runners)
    self.prefill_chunk = int(prefill_chunk)
    self.max_sessions = int(max_sessions)
    self.slot_wait_s = float(slot_wait_s)
    self.progress_every_s = float(progress_every_s)
    self.batchers = [batching.StageBatcher(r, n_slots=self.max_sessions, max_batch=max_batch)
                     for r in self.runners]
    self._sessions: collections.OrderedDict[str, RouteSession] = collections.OrderedDict()
    self._lock = threading.RLock()  # the session table (never held while computing)
    self._slot_cv = threading.Condition()  # notified when a step ends (a slot may be free)
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  @property
  def fingerprint(self) -> str | None:
    fps = {r.fingerprint for r in self.runners} - {None}
    return fps.pop() if len(fps) == 1 else None

  def close(self) -> None:
    """Stops the stage batchers' threads (the backend is unusable afterwards)."""
    for b in self.batchers:
      b.close()
    if self._pool is not None:
      self._pool.shutdown(wait=False)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def warmup(self, batch_sizes=(1,), chunk_sizes=(1,)) -> None:
    """Compiles the batched step of every local stage for these sizes (bucketed)."""
    for r in self.runners:
      r.compile_batch(batch_sizes, chunk_sizes, n_slots=self.max_sessions)

  # ------------------------------------------------------------------------------ hooks
  def _downstream(self, sess: RouteSession):
    """The route's remote hops for this step (None: the local hops own the head). May wait
    for a route and raise `RouteUnavailable`."""
    return None

  def _leases(self, sess: RouteSession, downstream) -> contextlib.AbstractContextManager:
    """Held around one attempt of a step (a subclass leases the workers' session slots)."""
    return contextlib.nullcontext()

  def _recoverable(self, sess: RouteSession, e: BaseException, tries: collections.Counter,
                   step: int) -> bool:
    """Whether to run the step again after `e` (tries counts earlier retries per kind)."""
    if isinstance(e, batching.StateLost):  # a local pool was rebuilt after a failed call
      tries["lost"] += 1
      if tries["lost"] <= 1:
        log.warning("session %s step %d: %s; recomputing from position 0", sess.sid, step, e)
        return True
    return False

  def _no_slot(self, message: str) -> BaseException:
    return batching.BatcherFull(message)

  # --------------------------------------------------------------------------- sessions
  def new_session(self, activation_dtype: str | None = None) -> str:
    sid = secrets.token_hex(8)
    sess = RouteSession(sid, dtype=activation_dtype or "f32", free_slots=self._free_slots,
                        cache_cap=self._cache_cap())
    with self._lock:
      self._sessions[sid] = sess
    return sid

  def _cache_cap(self) -> int:
    return 0

  def close_session(self, sid: str) -> None:
    """Forgets a session; its slots are freed now, or by the step it is running."""
    with self._lock:
      sess = self._sessions.pop(sid, None)
    if sess is not None:
      sess.closed = True
      self._free_if_idle(sess)

  def session_tokens(self, sid: str) -> list[int]:
    """The ids whose state the session currently holds."""
    return list(self._get(sid).tokens)

  def _get(self, sid: str) -> RouteSession:
    with self._lock:
      sess = self._sessions.get(sid)
    if sess is None:
      raise SessionError(f"unknown session {sid!r}")
    return sess

  def _free_slots(self, slots: list[int]) -> None:
    for b, s in zip(self.batchers, slots):
      b.free(s)
    with self._slot_cv:
      self._slot_cv.notify_all()

  def _free_if_idle(self, sess: RouteSession) -> None:
    """Resets a session unless a step of it runs (whichever of close and the step's end
    comes last sees both the flag and a free lock)."""
    if sess.lock.acquire(blocking=False):
      try:
        sess.reset()
      finally:
        sess.lock.release()

  def _activate(self, sess: RouteSession) -> None:
    """Marks sess most recently used and gives it a slot in every local pool (call with
    sess.lock held), evicting the least recently used idle session when every slot is taken
    and waiting up to slot_wait_s while all are held by running steps."""
    with self._lock:
      self._sessions.move_to_end(sess.sid)
      sess.last_used = time.monotonic()
    if sess.slots is not None:
      return
    deadline = time.monotonic() + self.slot_wait_s
    while self.batchers[0].n_free == 0:
      if not self._evict_one(keep=sess):
        left = deadline - time.monotonic()
        if left <= 0:
          raise self._no_slot(
              f"all {self.max_sessions} session slots are computing (max_sessions="
              f"{self.max_sessions}); admit fewer generations at once")
        with self._slot_cv:
          self._slot_cv.wait(min(left, 0.05))
    sess.slots = [b.alloc() for b in self.batchers]
    sess.tokens, sess.hashes = [], sess.hashes[:1]

  def _evict_one(self, keep: RouteSession) -> bool:
    """Resets the least recently used idle session that holds slots; False if none is."""
    with self._lock:
      live = [s for s in self._sessions.values() if s is not keep and s.slots is not None]
    for victim in sorted(live, key=lambda s: s.last_used):
      if victim.lock.acquire(blocking=False):  # a session mid-step is not idle
        try:
          if victim.slots is None:
            continue
          victim.reset()
          log.info("evicted the state of idle session %s (max_sessions=%d)", victim.sid,
                   self.max_sessions)
          return True
        finally:
          victim.lock.release()
    return False

  # ------------------------------------------------------------------------------- step
  def _checked(self, transcript: Sequence[int], held: list[int]) -> list[int]:
    """The transcript as checked ints. A decode step's transcript is the session's timeline
    plus a token: only the new tokens are converted and checked."""
    n = len(held)
    if n and type(transcript) is list and len(transcript) > n and transcript[:n] == held:  # noqa: E721
      new = [int(t) for t in transcript[n:]]
      tokens = held + new
    else:
      tokens = new = [int(t) for t in transcript]
    if not tokens:
      raise ValueError("the transcript is empty: at least one token (BOS) is needed")
    bad = [t for t in new if not 0 <= t < self.cfg.vocab_size]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocab [0, {self.cfg.vocab_size})")
    if len(tokens) > self.ctx_size:
      raise ValueError(
          f"transcript of {len(tokens)} tokens exceeds the context size {self.ctx_size}")
    return tokens

  def step(self, sid: str, transcript: Sequence[int], sampling, step: int, *,
           top_logprobs: int = 0, return_logits: bool = False,
           capture: CaptureSpec | None = None, edits: Interventions | None = None
           ) -> StepResult:
    """Brings the session's state to `transcript` and samples the token that follows it.
    Thread-safe: concurrent steps of different sessions batch at every stage. `capture`
    keeps named points of the positions the step computes (`StepResult.captured`,
    runtime/capture.py); `edits` applies interventions in the step (runtime/edits.py: a
    session whose state was computed under other edits recomputes it). A request this
    model cannot serve is a one-line CaptureError or EditError before any compute."""
    params = sampling.to_params() if hasattr(sampling, "to_params") else sampling
    cap = None if capture is None else StepCapture(capture, self.cfg)
    if edits is not None:
      edits.resolve(self.cfg)
    sess = self._get(sid)
    try:
      with sess.lock:
        tokens = self._checked(transcript, sess.tokens)
        if self.kv_disk is not None and cap is None and not sess.closed:
          self._disk_load(sess, tokens, edits)  # a capture computes what it keeps
        tries: collections.Counter = collections.Counter()
        while True:
          if sess.closed:
            raise SessionError(f"session {sid!r} was closed")
          # Local slots first, then the route and its leases: the one global order in
          # which a step takes its resources, so waits cannot form a cycle.
          self._activate(sess)
          down = self._downstream(sess)
          try:
            with self._leases(sess, down):
              res = run_step(sess, self.batchers, tokens, params, step,
                             prefill_chunk=self.prefill_chunk, top_logprobs=top_logprobs,
                             return_logits=return_logits, downstream=down,
                             progress_every_s=self.progress_every_s, capture=cap,
                             edits=edits)
            break
          except BaseException as e:
            if not self._recoverable(sess, e, tries, step):
              raise
        if self.kv_disk is not None and res.n_computed > 1:  # a prefill, not a decode token
          self._disk_store(sess, tokens, res.n_computed, edits)
        return res
    finally:
      with self._slot_cv:
        self._slot_cv.notify_all()  # a step waiting for a local slot may find one now
      if sess.closed:  # closed while this step ran
        self._free_if_idle(sess)
        self._closed_during_step(sess)

  def _closed_during_step(self, sess: RouteSession) -> None:
    """A subclass's cleanup for a session closed while its step ran."""

  def step_many(self, requests: Sequence[StepRequest]) -> list[StepResult | BaseException]:
    """Several sessions' steps at once (distinct sessions): their tokens share the batched
    calls of every stage. Returns one StepResult, or the exception that request raised, per
    request, in order: one request's failure does not fail the others."""
    if len({r.sid for r in requests}) != len(requests):
      raise ValueError("step_many takes at most one request per session")
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_sessions, thread_name_prefix="ds4jax-step")
    futs = [self._pool.submit(self.step, r.sid, r.transcript, r.sampling, r.step,
                              top_logprobs=r.top_logprobs, return_logits=r.return_logits,
                              capture=r.capture, edits=r.edits)
            for r in requests]
    out: list[StepResult | BaseException] = []
    for f in futs:
      try:
        out.append(f.result())
      except Exception as e:  # noqa: BLE001 - returned per request
        out.append(e)
    return out

  # -------------------------------------------------------------------------- snapshots
  def export_session(self, sid: str):
    """(tokens, {layer: LayerBlob}) of every layer of the session's state, for snapshots."""
    sess = self._get(sid)
    with sess.lock:
      return self._export(sess)

  def _export(self, sess: RouteSession, n: int | None = None):
    """(tokens[:n], blobs) of the first n positions of sess (default all; sess.lock held)."""
    from ds4jax.checkpoints import stage_state
    from ds4jax.checkpoints.snapshots import SnapshotError
    if sess.slots is None:
      raise SnapshotError(f"session {sess.sid} holds no state (never stepped, or evicted)")
    n = len(sess.tokens) if n is None else n
    blobs = {}
    for b, slot in zip(self.batchers, sess.slots):
      held, part = stage_state.export_stage(b.runner, b.get(slot), n)
      if held != len(sess.tokens):
        raise SnapshotError(f"stage {b.runner.layers} holds {held} positions, the session "
                            f"{len(sess.tokens)}")
      blobs.update(part)
    blobs.update(self._export_remote(sess, n))
    return list(sess.tokens[:n]), blobs

  def import_session(self, sid: str, tokens: Sequence[int],
                     read: Callable[[Sequence[int]], dict]) -> None:
    """Installs the state of `tokens` into session sid; read(layers) -> {layer: LayerBlob}."""
    sess = self._get(sid)
    with sess.lock:
      self._import(sess, [int(t) for t in tokens], read)

  def _import(self, sess: RouteSession, tokens: list[int], read) -> None:
    from ds4jax.checkpoints import stage_state
    states = [stage_state.import_stage(r, len(tokens), read(r.layers.layers()),
                                       where=f"stage {r.layers}") for r in self.runners]
    sess.reset()  # a failed remote import below leaves a clean session
    self._import_remote(sess, tokens, read)
    self._activate(sess)
    for b, slot, st in zip(self.batchers, sess.slots, states):
      b.put(slot, st)
    sess.append(tokens)

  def _export_remote(self, sess: RouteSession, n: int) -> dict:
    return {}

  def _import_remote(self, sess: RouteSession, tokens: list[int], read) -> None:
    pass

  # ---------------------------------------------------------------------- disk KV cache
  def _disk_load(self, sess: RouteSession, tokens: list[int], edits) -> None:
    """Installs the longest prefix of `tokens` the disk cache holds beyond what sess holds
    (sess.lock held). Nothing here fails the step: a bad entry is skipped (the cache warns),
    a failed install is recomputed."""
    from ds4jax.checkpoints.stage_state import StateError
    key = None if edits is None else edits.key
    held = common_prefix(sess.tokens, tokens) if sess.edits_key == key else 0
    hit = self.kv_disk.find(tokens, held, key or "")
    if hit is None:
      return
    n, blobs = hit
    try:
      self._import(sess, tokens[:n], lambda layers: {il: blobs[il] for il in layers})
    except StateError as e:  # checked bytes that do not fit these stages
      self.kv_disk.reject(self.kv_disk.path(tokens[:n], key or ""), e)
      return
    except Exception as e:  # noqa: BLE001 - e.g. the route went away: compute instead
      log.warning("kv disk cache: could not restore %d tokens of session %s (%s: %s); "
                  "computing them", n, sess.sid, type(e).__name__, e)
      return
    sess.edits = edits  # the state was computed under these edits

  def _disk_store(self, sess: RouteSession, tokens: list[int], n_computed: int, edits) -> None:
    """After a prefill: stores the state at its last chunk boundary before the transcript's
    last token (so the same prompt again finds it), unless that state was there before this
    step (then it is stored already) or is on disk (sess.lock held)."""
    tag = "" if edits is None else edits.key
    n = (len(tokens) - 1) // self.kv_disk.every * self.kv_disk.every
    if n <= len(tokens) - n_computed:
      return
    if self.kv_disk.has(tokens[:n], tag):
      self.kv_disk.touch(self.kv_disk.path(tokens[:n], tag))
      return
    try:
      _, blobs = self._export(sess, n)
    except Exception as e:  # noqa: BLE001 - never fails the step that computed it
      log.warning("kv disk cache: could not save %d tokens of session %s (%s: %s)", n,
                  sess.sid, type(e).__name__, e)
      return
    self.kv_disk.store(tokens[:n], blobs, tag)

  # ---------------------------------------------------------------------------- route
  def route_ready(self) -> tuple[bool, str]:
    return True, ""

  def wait_route(self, timeout: float | None = None):
    """Waits for a complete route (a local route always is); RouteUnavailable otherwise."""
    return []

  def route_info(self) -> dict:
    stages = [{"layers": str(r.layers), "host": "local"} for r in self.runners]
    return {"mode": "local", "ready": True, "reason": "", "n_layers": self.cfg.n_layers,
            "ctx_size": self.ctx_size, "route": stages, "stages": stages, "missing_layers": []}


__all__ = ["RouteBackend"]
