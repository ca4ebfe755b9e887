"""`LocalBackend`: the single-process executor of the `Backend` protocol (design.md §5).

It drives one `StageRunner` for the whole model, or a chain of in-process runners for
contiguous layer ranges (an in-process split, handy in notebooks: same numbers as the wire
split minus the wire). Each session holds a slot in every stage's pool of states
(`generate.batching.StageBatcher`) and the token ids that state holds, so a `step` with a
longer transcript computes only the new suffix, and a transcript that diverges rewinds to the
common prefix instead of starting again from 0.

Steps of different sessions run concurrently (one thread per session: the server's request
threads, `step_many`): their decode tokens run as one batched call at every stage, and an
in-process split pipelines (one session on stage 2 while another is on stage 1).

    backend = ds4jax.build.local_backend("tiny.gguf", ctx_size=512)   # the one builder
    sid = backend.new_session()
    res = backend.step(sid, [0, 17, 42], SamplingParams(), step=0)
    res.token, res.n_computed     # sampled id, 3 tokens computed
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Sequence

import numpy as np

from ds4jax.config import LayerRange
from ds4jax.runtime import batching, sampling as sampling_lib
from ds4jax.runtime.types import HopTelemetry, StepResult

log = logging.getLogger("ds4jax.generate")


class SessionError(KeyError):
  """An unknown or closed session id."""

  def __str__(self):
    return str(self.args[0]) if self.args else "unknown session"


@dataclasses.dataclass
class _Session:
  # One pool slot per stage, or None while evicted (rebuilt from 0 on the next step).
  slots: list[int] | None
  # The token ids the slots hold, in order; len == every slot's position.
  tokens: list[int]
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
  last_used: float = 0.0


@dataclasses.dataclass(frozen=True)
class StepRequest:
  """One session's `step`, for `step_many`."""

  sid: str
  transcript: Sequence[int]
  sampling: Any
  step: int
  top_logprobs: int = 0
  return_logits: bool = False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  """Length of the longest common prefix of two id sequences."""
  n = min(len(a), len(b))
  if n == 0:
    return 0
  a_N = np.asarray(a[:n], np.int64)
  b_N = np.asarray(b[:n], np.int64)
  diff = np.nonzero(a_N != b_N)[0]
  return int(diff[0]) if diff.size else n


class LocalBackend:
  """Runs the whole model in this process over one or more contiguous `StageRunner`s.

  Args:
    runners: one runner for `all`, or runners for contiguous ranges, the first embedding and
      the last owning the head.
    prefill_chunk: most tokens per forward call while prefilling.
    max_sessions: sessions whose KV state stays allocated; the least recently used one beyond
      that drops its state (and re-prefills if used again).
    progress_every_s: period of the "prefill i/n tokens" log line on long prompts.
  """

  # The Generator adds no prefill heartbeat of its own: `_prefill` logs chunk progress.
  reports_prefill_progress = True

  def __init__(self, runners, *, prefill_chunk: int = 256, max_sessions: int = 8,
               progress_every_s: float = 2.0, max_batch: int | None = None):
    if not isinstance(runners, (list, tuple)):
      runners = [runners]
    if not runners:
      raise ValueError("LocalBackend needs at least one StageRunner")
    _check_chain([r.layers for r in runners], runners[0].cfg.n_layers)
    if prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if max_sessions < 1:
      raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
    self.runners = list(runners)
    self.cfg = runners[0].cfg
    self.ctx_size = min(r.ctx_size for r in runners)
    self.prefill_chunk = int(min(prefill_chunk, *(r.max_chunk for r in runners)))
    self.max_sessions = int(max_sessions)
    self.progress_every_s = float(progress_every_s)
    self.batchers = [batching.StageBatcher(r, n_slots=self.max_sessions, max_batch=max_batch)
                     for r in self.runners]
    self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
    self._ids = itertools.count()
    self._lock = threading.RLock()  # the session table (never held while computing)
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  def close(self) -> None:
    """Stops the stage batchers' threads (the backend is unusable afterwards)."""
    for b in self.batchers:
      b.close()
    if self._pool is not None:
      self._pool.shutdown(wait=False)

  # ---------------------------------------------------------------------------- sessions
  def new_session(self) -> str:
    with self._lock:
      sid = f"local-{next(self._ids)}"
      self._sessions[sid] = _Session(slots=None, tokens=[])
      return sid

  def close_session(self, sid: str) -> None:
    """Forgets a session and frees its slots at once."""
    with self._lock:
      sess = self._sessions.pop(sid, None)
    if sess is not None:
      with sess.lock:
        self._release(sess)

  def session_tokens(self, sid: str) -> list[int]:
    """The ids whose KV the session currently holds (for tests and chat statistics)."""
    return list(self._get(sid).tokens)

  def _get(self, sid: str) -> _Session:
    with self._lock:
      if sid not in self._sessions:
        raise SessionError(f"unknown session {sid!r}")
      return self._sessions[sid]

  def _release(self, sess: _Session) -> None:
    if sess.slots is not None:
      for b, slot in zip(self.batchers, sess.slots):
        b.free(slot)
    sess.slots, sess.tokens = None, []

  def _activate(self, sid: str) -> _Session:
    """Marks `sid` most recently used and gives it slots (call with sess.lock held), evicting
    the least recently used idle session when every slot is taken."""
    with self._lock:
      sess = self._get(sid)
      self._sessions.move_to_end(sid)
      sess.last_used = time.monotonic()
      if sess.slots is not None:
        return sess
      while self.batchers[0].n_free == 0:
        victims = [s for s in self._sessions.values()
                   if s is not sess and s.slots is not None and not s.lock.locked()]
        victim = min(victims, key=lambda s: s.last_used, default=None)
        if victim is None or not victim.lock.acquire(blocking=False):
          raise batching.BatcherFull(
              f"all {self.max_sessions} session slots are computing (max_sessions="
              f"{self.max_sessions}); admit fewer generations at once")
        try:
          self._release(victim)
        finally:
          victim.lock.release()
      sess.slots = [b.alloc() for b in self.batchers]
      sess.tokens = []
      return sess

  def export_states(self, sid: str):
    """(tokens, [StageState per stage]) of a session, for snapshots."""
    sess = self._get(sid)
    with sess.lock:
      if sess.slots is None:
        return list(sess.tokens), None
      return list(sess.tokens), [b.get(s) for b, s in zip(self.batchers, sess.slots)]

  def import_states(self, sid: str, tokens: Sequence[int], states) -> None:
    """Installs per-stage StageStates holding `tokens` into a session (snapshot restore)."""
    sess = self._get(sid)
    with sess.lock:
      self._activate(sid)
      for b, slot, st in zip(self.batchers, sess.slots, states):
        b.put(slot, st)
      sess.tokens = [int(t) for t in tokens]

  # -------------------------------------------------------------------------------- step
  def step(self, sid: str, transcript: Sequence[int], sampling: sampling_lib.SamplingParams,
           step: int, *, top_logprobs: int = 0, return_logits: bool = False) -> StepResult:
    """Brings the session's KV to `transcript` and samples the token that follows it.
    Thread-safe: concurrent steps of different sessions batch at every stage."""
    transcript = [int(t) for t in transcript]
    if not transcript:
      raise ValueError("the transcript is empty: at least one token (BOS) is needed")
    bad = [t for t in transcript if not 0 <= t < self.cfg.vocab_size]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocab [0, {self.cfg.vocab_size})")
    if len(transcript) > self.ctx_size:
      raise ValueError(
          f"transcript of {len(transcript)} tokens exceeds the context size {self.ctx_size}")
    params = sampling.to_params() if hasattr(sampling, "to_params") else sampling
    sess = self._get(sid)
    with sess.lock:
      self._activate(sid)
      for _ in range(2):
        try:
          logits_V, hops, n_computed = self._advance(sess, transcript)
          break
        except batching.StateLost as e:
          # A stage rebuilt its pool after a failed call: start this session over once.
          log.warning("session %s: %s; recomputing from position 0", sid, e)
          self._release(sess)
          self._activate(sid)
        except BaseException:
          # Interrupted or failed mid-chunk (Ctrl-C in a chat, a bad shape): the stages may
          # disagree about their position. Start over next time.
          self._release(sess)
          raise
      else:
        raise batching.StateLost(f"session {sid}: state lost twice in one step")
    token = sampling_lib.sample_token(logits_V, params, step)
    lps = sampling_lib.top_logprobs(logits_V, top_logprobs) if top_logprobs > 0 else []
    return StepResult(token=token, logprobs=lps, logits_V=logits_V if return_logits else None,
                      telemetry=hops, n_computed=n_computed)

  def step_many(self, requests: Sequence[StepRequest]) -> list[StepResult | BaseException]:
    """Several sessions' steps at once (distinct sessions): their tokens share the batched
    calls of every stage. Returns one StepResult, or the exception that request raised, per
    request, in order: one request's failure does not fail the others."""
    if len({r.sid for r in requests}) != len(requests):
      raise ValueError("step_many takes at most one request per session")
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(self.max_sessions, 1), thread_name_prefix="ds4jax-step")
    futs = [self._pool.submit(self.step, r.sid, r.transcript, r.sampling, r.step,
                              top_logprobs=r.top_logprobs, return_logits=r.return_logits)
            for r in requests]
    out: list[StepResult | BaseException] = []
    for f in futs:
      try:
        out.append(f.result())
      except Exception as e:  # noqa: BLE001 - returned per request
        out.append(e)
    return out

  def _advance(self, sess: _Session, transcript: list[int]):
    """Rewinds to the common prefix and runs the rest; -> (logits [V], hops, n computed)."""
    keep = common_prefix(sess.tokens, transcript)
    # The logits of the last transcript token are needed, so it is always (re)computed.
    keep = min(keep, len(transcript) - 1)
    held = min(b.pos(s) for b, s in zip(self.batchers, sess.slots))
    if held < len(sess.tokens):
      raise batching.StateLost(f"a stage holds {held} of the session's {len(sess.tokens)} tokens")
    if keep < len(sess.tokens):
      for b, slot in zip(self.batchers, sess.slots):
        b.truncate(slot, keep)
      sess.tokens = sess.tokens[:keep]
    suffix = transcript[keep:]
    logits_V, hops = self._prefill(sess, suffix)
    return logits_V, hops, len(suffix)

  def _prefill(self, sess: _Session, suffix: list[int]) -> tuple[np.ndarray, list[HopTelemetry]]:
    """Runs `suffix` through every stage in chunks; returns the last logits row [V]."""
    compute_s = [0.0] * len(self.runners)
    n = len(suffix)
    t_start = t_log = time.perf_counter()
    logits_TV = None
    for c0 in range(0, n, self.prefill_chunk):
      chunk = suffix[c0:c0 + self.prefill_chunk]
      tokens_T = np.asarray(chunk, np.int32)
      pos0 = len(sess.tokens)
      out = None
      for k, (b, slot) in enumerate(zip(self.batchers, sess.slots)):
        t0 = time.perf_counter()
        out = b.run(slot, tokens_T, out, pos0)
        compute_s[k] += time.perf_counter() - t0
      sess.tokens.extend(chunk)
      logits_TV = out
      now = time.perf_counter()
      if n > self.prefill_chunk and (now - t_log >= self.progress_every_s or c0 + len(chunk) == n):
        done = c0 + len(chunk)
        log.info("prefill %d/%d tokens (%.0f tok/s)", done, n, done / max(now - t_start, 1e-9))
        t_log = now
    logits_V = np.asarray(logits_TV[-1], np.float32)
    hops = [HopTelemetry(stage=str(r.layers), host="local", compute_s=compute_s[k], n_tokens=n)
            for k, r in enumerate(self.runners)]
    return logits_V, hops

  # --------------------------------------------------------------------------- routing
  def route_info(self) -> dict:
    """Same keys as the coordinator's: ready, reason, route (one entry per stage, in order)."""
    stages = [{"layers": str(r.layers), "host": "local"} for r in self.runners]
    return {
        "mode": "local",
        "ready": True,
        "reason": "",
        "n_layers": self.cfg.n_layers,
        "ctx_size": self.ctx_size,
        "route": stages,
        "stages": stages,
    }

  def route_ready(self) -> tuple[bool, str]:
    return True, ""


def _check_chain(ranges: Sequence[LayerRange], n_layers: int) -> None:
  """Refuses runners that do not cover [0, n_layers) contiguously, embed first, head last."""
  expect = 0
  for k, r in enumerate(ranges):
    if r.start != expect:
      raise ValueError(f"stage {k} starts at layer {r.start}, expected {expect}")
    if r.has_output != (k == len(ranges) - 1):
      raise ValueError(f"only the last stage may own the output head (stage {k}: {r})")
    expect = r.end + 1
  if expect != n_layers:
    raise ValueError(f"the stages end at layer {expect - 1}, the model has {n_layers} layers")


__all__ = ["LocalBackend", "SessionError", "StepRequest", "common_prefix"]
