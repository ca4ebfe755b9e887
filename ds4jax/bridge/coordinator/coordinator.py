"""The coordinator: listens, admits workers, plans the route, and runs the Backend API.

It owns layers 0:K (a `StageRunner`), and implements `generate.types.Backend`:

    coord = Coordinator(runner, CoordinatorOptions(port=0))
    sid = coord.new_session()
    res = coord.step(sid, transcript, SamplingParams(), step=0)   # -> StepResult

Threads: one accepts (each HELLO is checked on its own short-lived thread, so a slow or
hostile peer cannot block admission), one reader per worker link, one monitor (heartbeats,
deadlines). `step` runs on the caller's thread; different sessions step concurrently, one
session's steps are serialized. Nothing holds the registry lock while waiting for a route,
so `route_ready()`/`route_info()` stay answerable.

Recovery: a hop that drops mid-step is removed; the step waits up to `route_timeout` for a
worker covering its range (new or spare), rebuilds that hop's KV from the coordinator's
cached activations (its inputs at that layer, relayed earlier) so only that stage recomputes,
and continues. Without the cache (over its cap) the session rewinds far enough to recompute.

Worker KV slots: each step leases its session's slot on every hop (`residency.py`), evicting
idle sessions with DROP and queueing beyond a worker's `max_sessions`, so concurrent sessions
never evict each other mid-step.

Batching (docs/design.md §11): the local stage's session states are slots of one
`StageBatcher` pool, so concurrent steps of different sessions (one caller thread each) run
their local decode rows as one `forward_batch`, and each worker batches their WORK frames
the same way; several sessions are in flight on different hops at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from ds4jax.bridge.coordinator import admission, residency, route as route_mod
from ds4jax.bridge.wire import protocol, tensors, transport
from ds4jax.bridge.wire.errors import LinkLost, ProtocolError, RemoteError, RouteUnavailable
from ds4jax.bridge.coordinator.links import WorkerLink
from ds4jax.bridge.wire.protocol import MsgType
from ds4jax.bridge.coordinator.session_sync import CoordSession, Stepper
from ds4jax.config import LayerRange
from ds4jax.runtime.batching import BatcherFull, StageBatcher, StateLost

log = logging.getLogger("ds4jax.bridge.coordinator.coordinator")


@dataclasses.dataclass
class CoordinatorOptions:
  host: str = "127.0.0.1"
  port: int = 0
  route_timeout: float = 60.0
  request_timeout: float = 60.0  # per WORK request, compute included
  heartbeat_s: float = 1.0  # PING idle links this often
  dead_after: float = 0.0  # silence that kills a link; 0 -> max(3 heartbeats, 1 s)
  handshake_timeout: float = 10.0
  # Connections in TLS/auth/HELLO at once (one thread each); more are closed at once, so a
  # flood of silent peers cannot exhaust threads or memory.
  max_handshakes: int = 64
  frame_timeout: float = 30.0
  prefill_chunk: int = 256
  window: int = 0  # chunks in flight; 0 -> hops + 2, clamped to [2, 8]
  activation_dtype: str = "f32"
  key: bytes | None = None
  tls: Any = None
  wrap: Callable | None = None
  replay_cache_mb: float = 256.0  # per session; 0 disables targeted KV rebuilds
  pin: Sequence[str] = ()  # if set, only workers with these ranges ("1:2", "3:output")
  max_recoveries: int = 3  # lost links survived per step
  max_mismatches: int = 16  # PrefixMismatch rebuilds per step (a worker that lost the KV)
  # A full worker evicts a session idle this briefly (mid-generation) only after the waiting
  # step waited this long: residency.py.
  lease_grace_s: float = 0.1
  warmup: bool = False  # compile the local decode/chunk shapes in the background at start
  # Sessions whose local KV is kept (LRU beyond that): the slots of the local stage's pool,
  # allocated up front (max_sessions x one session's state of the local layers).
  max_sessions: int = 16
  warm_batches: tuple[int, ...] = (1,)  # decode batch sizes the warm-up compiles


class Coordinator:
  """Listening side of the bridge and the split `Backend`."""

  def __init__(self, runner, options: CoordinatorOptions | None = None):
    self.runner = runner
    self.opt = opt = options or CoordinatorOptions()
    if opt.activation_dtype not in tensors.WIRE_DTYPES:
      raise ValueError(f"activation_dtype must be one of {tensors.WIRE_DTYPES}")
    if opt.prefill_chunk < 1:
      raise ValueError("prefill_chunk must be >= 1")
    self.local: LayerRange = runner.layers
    self.n_layers = runner.cfg.n_layers
    self.vocab_size = runner.cfg.vocab_size
    self.fingerprint = runner.fingerprint
    self.ctx = runner.ctx_size
    if self.local.start != 0:
      raise ValueError(f"the coordinator's range must start at layer 0, got {self.local}")
    self.dead_after = opt.dead_after or max(3 * opt.heartbeat_s, 1.0)
    from ds4jax.bridge.wire import auth  # stdlib only
    self.bind_warning = auth.warn_if_exposed(opt.host, opt.key)
    self._lsock = transport.listen(opt.host, opt.port)
    self.address = self._lsock.getsockname()[:2]
    self._links: dict[int, WorkerLink] = {}
    self._wids = itertools.count(1)
    self._cv = threading.Condition()
    self.generation = 0
    self._sessions: dict[str, CoordSession] = {}
    self.batcher = StageBatcher(runner, n_slots=opt.max_sessions, name=f"coordinator {self.local}")
    self._slot_cv = threading.Condition()  # notified when a step ends (a slot may be free)
    self._warm = threading.Event()
    if not opt.warmup:
      self._warm.set()
    self._stop = threading.Event()
    self._admitting = threading.BoundedSemaphore(max(1, opt.max_handshakes))
    self.last_step: dict[str, Any] = {}
    self.events: list[str] = []  # warnings a user should see (recoveries, refusals)
    self._threads = [threading.Thread(target=self._accept_loop, daemon=True,
                                      name="ds4jax-accept"),
                     threading.Thread(target=self._monitor_loop, daemon=True,
                                      name="ds4jax-monitor")]
    if opt.warmup:
      self._threads.append(threading.Thread(target=self._warmup, daemon=True,
                                            name="ds4jax-warmup"))
    for t in self._threads:
      t.start()
    log.info("coordinator for layers %s listening on %s:%d", self.local.describe(),
             *self.address)

  # ------------------------------------------------------------------------------ lifecycle
  def close(self) -> None:
    self._stop.set()
    try:
      self._lsock.close()
    except OSError:
      pass
    with self._cv:
      links = list(self._links.values())
    for link in links:
      link.fail(LinkLost("coordinator closing"), quiet=True)
    for t in self._threads:
      t.join(timeout=5)
    self.batcher.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _event(self, msg: str) -> None:
    log.warning("%s", msg)
    self.events.append(msg)

  # ------------------------------------------------------------------------------ admission
  def _accept_loop(self) -> None:
    try:
      self._lsock.settimeout(0.5)
    except OSError:  # close() ran before this thread started
      return
    while not self._stop.is_set():
      try:
        sock, addr = transport.accept(self._lsock, self.opt.wrap)
      except (TimeoutError, OSError):
        continue
      if not self._admitting.acquire(blocking=False):
        log.warning("rejected connection from %s:%d: %d handshakes already in progress",
                    addr[0], addr[1], self.opt.max_handshakes)
        sock.close()
        continue
      try:
        threading.Thread(target=self._admit_slot, args=(sock, addr), daemon=True,
                         name="ds4jax-admit").start()
      except RuntimeError as e:  # cannot start a thread: refuse this peer, keep accepting
        self._admitting.release()
        log.warning("rejected connection from %s:%d: %s", addr[0], addr[1], e)
        sock.close()

  def _admit_slot(self, sock, addr) -> None:
    try:
      self._admit(sock, addr)
    finally:
      self._admitting.release()

  def _admit(self, sock, addr) -> None:
    peer = f"{addr[0]}:{addr[1]}"
    try:
      if self.opt.tls is not None and transport.is_plain_ds4jax(
          transport.peek(sock, 4, self.opt.handshake_timeout)):
        # Answer as a TLS server would, so the worker stops (final) instead of redialing.
        self._event(f"refused worker {peer}: it does not use TLS and this coordinator does")
        transport.refuse_and_close(sock, transport.TLS_ALERT)
        return
      sock = transport.secure_server(sock, key=self.opt.key, tls=self.opt.tls,
                                     timeout=self.opt.handshake_timeout)
      # HELLO carries no payload: until admission a peer cannot make us buffer any.
      ch = transport.Channel(sock, peer, frame_timeout=self.opt.frame_timeout, max_payload=0)
      f = ch.recv(idle_timeout=self.opt.handshake_timeout, any_version=True)
      if f.type != MsgType.HELLO:
        raise ProtocolError(f"expected HELLO, got {f.type.name}")
      reason, layers = self.check_hello(f)
      if reason:
        self._event(f"refused worker {peer}: {reason}")
        # In the peer's own frame version (REFUSE is the same JSON in every version), so a
        # worker of another protocol version can read why and stop instead of redialing.
        ch.send(MsgType.REFUSE, {"reason": reason}, version=f.version)
        ch.close()
        return
      wid = next(self._wids)
      ch.max_payload = protocol.MAX_PAYLOAD
      link = WorkerLink(wid, ch, f.header, layers, heartbeat_s=self.opt.heartbeat_s,
                        dead_after=self.dead_after, request_timeout=self.opt.request_timeout,
                        on_change=self._on_link_change)
      link.residency.grace_s = self.opt.lease_grace_s
      with self._cv:
        if self._stop.is_set():
          ch.close()
          link.close_wakeup()
          return
        self._links[wid] = link
      ch.send(MsgType.ACCEPT, {"worker_id": wid, "heartbeat_s": self.opt.heartbeat_s,
                               "ctx": self.ctx, "prefill_chunk": self.opt.prefill_chunk})
      log.info("accepted %r", link)
      link.reader.start()
    except Exception as e:  # anything a peer does before admission only costs its link
      if isinstance(e, ProtocolError) and str(e).startswith(protocol.TLS_PEER):
        # A TLS worker: any plain answer makes its TLS stack fail with "wrong version
        # number", which it treats as final (worker.final_reason).
        self._event(f"refused worker {peer}: it uses TLS and this coordinator does not")
        transport.refuse_and_close(sock, protocol.encode_header(
            MsgType.REFUSE, {"reason": "this coordinator does not use TLS"}, 0))
        return
      log.warning("rejected connection from %s: %s: %s", peer, type(e).__name__, e)
      try:
        sock.close()
      except OSError:
        pass

  def check_hello(self, f: protocol.Frame) -> tuple[str, LayerRange | None]:
    """('', range) to accept, or (reason, None): the exact text both sides show."""
    return admission.check_hello(f, fingerprint=self.fingerprint, n_layers=self.n_layers,
                                 local=self.local, ctx=self.ctx)

  def _on_link_change(self, link: WorkerLink, err: BaseException | None) -> None:
    with self._cv:
      if err is not None:
        if self._links.pop(link.wid, None) is None:
          return
        if self._stop.is_set():  # closing: every link goes, and that is no news
          self._cv.notify_all()
          return
        self._event(f"worker lost: {link!r}: {err}")
      self.generation += 1
      ok, reason = self._plan_locked()
      log.info("route generation %d: %s", self.generation,
               route_mod.describe(self.local, [self._links[h.wid] for h in ok])
               if ok is not None else f"incomplete ({reason})")
      self._cv.notify_all()

  def _monitor_loop(self) -> None:
    tick = max(min(self.opt.heartbeat_s, self.dead_after) / 4, 0.02)
    while not self._stop.wait(tick):
      with self._cv:
        links = list(self._links.values())
      now = time.monotonic()
      for link in links:
        link.check(now)

  # ---------------------------------------------------------------------------------- route
  def _plan_locked(self):
    hops = [route_mod.HopInfo(l.wid, l.layers, l.peer) for l in self._links.values()
            if l.ready and l.alive]
    return route_mod.plan_route(self.n_layers, self.local, hops, self.opt.pin)

  def pin(self, ranges: Sequence[str]) -> None:
    """Restricts routes to workers with these ranges (empty: any); takes effect at once."""
    with self._cv:
      self.opt.pin = tuple(ranges)
      self.generation += 1
      self._cv.notify_all()

  def route_ready(self) -> tuple[bool, str]:
    with self._cv:
      plan, reason = self._plan_locked()
    return plan is not None, reason

  def wait_route(self, timeout: float | None = None) -> list[WorkerLink]:
    """The current route's links; waits up to timeout (default route_timeout) for one."""
    timeout = self.opt.route_timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    with self._cv:
      while True:
        plan, reason = self._plan_locked()
        if plan is not None:
          return [self._links[h.wid] for h in plan]
        left = deadline - time.monotonic()
        if left <= 0 or self._stop.is_set():
          raise RouteUnavailable(
              f"route unavailable: {reason} (waited {timeout:.1f}s for workers)")
        self._cv.wait(min(left, 0.5))  # releases the lock: status stays answerable

  def route_info(self) -> dict:
    with self._cv:
      plan, reason = self._plan_locked()
      workers = [{"id": l.wid, "peer": l.peer, "layers": l.layers.describe(),
                  "ready": l.ready, "ctx": l.ctx, "host": l.hello.get("host", ""),
                  "sessions": len(l.residency), "max_sessions": l.residency.capacity,
                  "batch": dict(l.batch_stats)}
                 for l in self._links.values()]
      hops = [] if plan is None else [self._links[h.wid] for h in plan]
    stages = ([{"layers": str(self.local), "host": "local"}] +
              [{"layers": str(l.layers), "host": l.peer} for l in hops])
    return {
        "ready": plan is not None, "reason": reason, "generation": self.generation,
        "listen": f"{self.address[0]}:{self.address[1]}", "route": stages, "stages": stages,
        "workers": workers, "sessions": len(self._sessions),
        "activation_dtype": self.opt.activation_dtype, "last_step": self.last_step,
        "batch": dataclasses.asdict(self.batcher.stats),
    }

  # -------------------------------------------------------------------------------- backend
  def new_session(self, activation_dtype: str | None = None) -> str:
    dtype = activation_dtype or self.opt.activation_dtype
    if dtype not in tensors.WIRE_DTYPES:
      raise ValueError(f"activation_dtype must be one of {tensors.WIRE_DTYPES}")
    sid = secrets.token_hex(8)
    self._sessions[sid] = CoordSession(sid, dtype, int(self.opt.replay_cache_mb * 2**20),
                                       free_slot=self.batcher.free)
    return sid

  def _evict_idle(self, keep: str) -> None:
    """Keeps at most max_sessions sessions' local KV: the least recently used idle session
    forgets its state (its id stays valid; its next step recomputes from position 0)."""
    live = [s for s in list(self._sessions.values())
            if s.local_slot is not None and s.sid != keep]
    extra = len(live) + 1 - self.opt.max_sessions
    for s in sorted(live, key=lambda s: s.last_used)[:max(extra, 0)]:
      if s.lock.acquire(blocking=False):  # a session mid-step is not idle
        try:
          s.reset()
          log.info("evicted the local KV of idle session %s (max_sessions=%d)", s.sid,
                   self.opt.max_sessions)
        finally:
          s.lock.release()

  def close_session(self, sid: str) -> None:
    """Forgets a session: its local slot is freed (after a step it is running, if any) and
    every worker gets DROP."""
    sess = self._sessions.pop(sid, None)
    if sess is None:
      return
    sess.closed = True
    self._free_closed(sess)
    with self._cv:
      links = list(self._links.values())
    for link in links:
      if link.ready:
        link.send(MsgType.DROP, {"sid": sid})
        link.residency.forget(sid)

  def _free_closed(self, sess: CoordSession) -> None:
    """Frees a closed session's local slot, unless a step of it runs (that step's end
    does it: whichever of the two comes last sees both the flag and a free lock)."""
    if sess.lock.acquire(blocking=False):
      try:
        sess.reset()
      finally:
        sess.lock.release()

  def step(self, sid: str, transcript: Sequence[int], sampling, step: int, *,
           top_logprobs: int = 0, return_logits: bool = False):
    sess = self._sessions.get(sid)
    if sess is None:
      raise KeyError(f"unknown session {sid!r}")
    try:
      return self._step(sess, transcript, sampling, step, top_logprobs, return_logits)
    finally:
      if sess.closed:  # closed while this step ran: its leases were still held then
        self._free_closed(sess)
        with self._cv:
          links = list(self._links.values())
        for link in links:
          link.residency.forget(sid)

  def _step(self, sess: CoordSession, transcript: Sequence[int], sampling, step: int,
            top_logprobs: int, return_logits: bool):
    sid = sess.sid
    if not len(transcript):
      raise ValueError("transcript is empty")
    if len(transcript) > self.ctx:
      raise ValueError(f"transcript of {len(transcript)} tokens exceeds ctx {self.ctx}")
    stepper = Stepper(self, sess)
    with sess.lock:
      tokens = _checked(transcript, sess.tokens, self.vocab_size)
      sess.last_used = time.monotonic()
      self._evict_idle(keep=sid)
      recoveries = mismatches = lost = 0
      try:
        while True:
          if sess.closed:
            raise KeyError(f"session {sid!r} was closed")
          if sess.local_slot is None:
            # Before any worker lease (the local layers come first in the one global order
            # in which a step takes its resources), so waits for slots cannot form a cycle.
            sess.local_slot = self._local_slot(sess)
          hops = self.wait_route()
          try:
            with self._leases(sess, hops):
              res = stepper.run(hops, tokens, sampling, step, top_logprobs, return_logits)
            wire = sum(t.bytes_in + t.bytes_out for t in res.telemetry)
            self.last_step = {"sid": sid, "n_computed": res.n_computed, "wire_bytes": wire,
                              "wire_bytes_per_token": wire / max(res.n_computed, 1)}
            return res
          except StateLost as e:
            # The local pool was rebuilt after another session's batched call failed: this
            # session was reset by `_local` and recomputes from position 0, once.
            lost += 1
            if lost > 1:
              raise
            self._event(f"session {sid} step {step}: {e}; recomputing from position 0")
          except LinkLost as e:
            recoveries += 1
            if recoveries > self.opt.max_recoveries:
              raise
            self._event(f"session {sid} step {step}: {e}; waiting up to "
                        f"{self.opt.route_timeout:.0f}s for a worker to take over")
          except RemoteError as e:
            # A worker that lost the session (evicted it itself, e.g. after a snapshot
            # restore filled its slots) is rebuilt. Leases make this rare, so a bound that
            # legitimate churn does not reach still stops a peer that keeps answering
            # PrefixMismatch.
            mismatches += 1
            if e.etype != "PrefixMismatch" or mismatches > self.opt.max_mismatches:
              raise
            sess.held.pop(getattr(e, "wid", -1), None)
            self._event(f"session {sid} step {step}: {e.remote_message}; rebuilding that hop")
      finally:
        with self._slot_cv:
          self._slot_cv.notify_all()  # a step waiting for a local slot may find one now

  def _leases(self, sess: CoordSession, hops):
    """Leases sess's session slot on every hop for one step (see residency.py): the worker
    never evicts a session mid-step, and steps beyond a worker's capacity queue."""
    return residency.leases(sess, hops, time.monotonic() + self.opt.route_timeout,
                            self._sessions)

  # --------------------------------------------------------------------- local stage helpers
  def local_forward(self, sess: CoordSession, tokens: list[int], pos0: int):
    """Runs tokens at pos0.. of sess through the local stage (its batcher: concurrent
    sessions' decode rows run as one call); -> (float32 [T, C, D] or [T, V], seconds)."""
    if not self._warm.is_set():  # the first step waits for the warm-up, not compiles twice
      self._warm.wait(self.opt.route_timeout)
    t0 = time.monotonic()
    slot = sess.local_slot
    if slot is None:
      if pos0 != 0:
        raise StateLost(f"session {sess.sid} has no local state but the chunk starts at {pos0}")
      slot = sess.local_slot = self._local_slot(sess)
    tokens_T = np.asarray(tokens, np.int32)
    step = self.runner.max_chunk
    outs = [self.batcher.run(slot, tokens_T[a:a + step], None, pos0 + a)
            for a in range(0, tokens_T.shape[0], step)]
    out = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)
    return out, time.monotonic() - t0

  def local_truncate(self, sess: CoordSession, pos: int) -> None:
    """Rewinds sess's local state to pos tokens (nothing to do without one)."""
    if sess.local_slot is not None:
      self.batcher.truncate(sess.local_slot, pos)

  def local_put(self, sess: CoordSession, state) -> None:
    """Installs a StageState of the local layers (a snapshot) as sess's local state."""
    if sess.local_slot is None:
      sess.local_slot = self._local_slot(sess)
    self.batcher.put(sess.local_slot, state)

  def _local_slot(self, sess: CoordSession) -> int:
    """A free slot of the local pool, evicting an idle session's state if none is free and
    waiting (up to route_timeout) while every slot is held by a running step."""
    deadline = time.monotonic() + self.opt.route_timeout
    while True:
      try:
        return self.batcher.alloc()
      except BatcherFull:
        self._evict_idle(keep=sess.sid)
      try:
        return self.batcher.alloc()
      except BatcherFull:
        pass
      left = deadline - time.monotonic()
      if left <= 0:
        raise RouteUnavailable(
            f"all {self.opt.max_sessions} local session slots are held by running steps "
            f"(max_sessions={self.opt.max_sessions}); waited {self.opt.route_timeout:.0f}s")
      with self._slot_cv:
        self._slot_cv.wait(min(left, 0.05))

  def _warmup(self) -> None:
    from ds4jax.bridge.worker.worker import warmup_batched
    try:
      warmup_batched(self.runner, self.opt.warm_batches, (1, self.opt.prefill_chunk),
                     self.opt.max_sessions)
    except Exception as e:  # the first step compiles instead
      log.warning("local warm-up failed: %s: %s", type(e).__name__, e)
    finally:
      self._warm.set()

  def window(self, n_hops: int) -> int:
    return self.opt.window or min(max(n_hops + 2, 2), 8)


def _checked(transcript: Sequence[int], held: list[int], vocab_size: int) -> list[int]:
  """The transcript as a list of ints in [0, vocab_size). A decode step's transcript is the
  session's timeline plus one token: that prefix was checked before, so only the new tokens
  are converted and checked (the rest is one C-level list comparison)."""
  n = len(held)
  if n and type(transcript) is list and len(transcript) > n and transcript[:n] == held:  # noqa: E721
    new = [int(t) for t in transcript[n:]]
    tokens = held + new
  else:
    tokens = new = [int(t) for t in transcript]
  if min(new) < 0 or max(new) >= vocab_size:
    raise ValueError(f"token ids must be in [0, {vocab_size})")
  return tokens
