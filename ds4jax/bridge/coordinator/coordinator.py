"""The coordinator: listens, admits workers, plans the route, and runs the Backend API.

It owns layers 0:K (a `StageRunner`) and is a `runtime.backend.RouteBackend` whose route is
its local hop followed by the worker links (`remote.RemoteHops`): the step is
`runtime.step.run_step`, the one algorithm `LocalBackend` runs too.

    coord = Coordinator(runner, CoordinatorOptions(port=0))
    sid = coord.new_session()
    res = coord.step(sid, transcript, SamplingParams(), step=0)   # -> StepResult

Threads: one accepts (`listener.Listener`: each HELLO is checked on its own short-lived
thread, so a slow or hostile peer cannot block admission), one reader per worker link, one
monitor (heartbeats, deadlines). `step` runs on the caller's thread; different sessions step concurrently, one
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

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, Sequence

from ds4jax.bridge.coordinator import residency, route as route_mod, snapshots
from ds4jax.bridge.coordinator.links import WorkerLink
from ds4jax.bridge.coordinator.listener import Listener, check_hello
from ds4jax.bridge.coordinator.remote import RemoteHops
from ds4jax.wire import tensors, transport
from ds4jax.wire.errors import LinkLost, RemoteError, RouteUnavailable
from ds4jax.wire.protocol import MsgType
from ds4jax.config import LayerRange
from ds4jax.runtime.backend import RouteBackend
from ds4jax.runtime.session import RouteSession

log = logging.getLogger("ds4jax.bridge.coordinator")


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


class Coordinator(RouteBackend):
  """Listening side of the bridge and the split `Backend`."""

  def __init__(self, runner, options: CoordinatorOptions | None = None):
    self.opt = opt = options or CoordinatorOptions()
    if opt.activation_dtype not in tensors.WIRE_DTYPES:
      raise ValueError(f"activation_dtype must be one of {tensors.WIRE_DTYPES}")
    if opt.prefill_chunk < 1:
      raise ValueError("prefill_chunk must be >= 1")
    if runner.layers.start != 0:
      raise ValueError(f"the coordinator's range must start at layer 0, got {runner.layers}")
    super().__init__([runner], prefill_chunk=opt.prefill_chunk, max_sessions=opt.max_sessions,
                     slot_wait_s=opt.route_timeout)
    self.runner = runner
    self.local: LayerRange = runner.layers
    self.n_layers = runner.cfg.n_layers
    self.vocab_size = runner.cfg.vocab_size
    self.ctx = runner.ctx_size
    self.dead_after = opt.dead_after or max(3 * opt.heartbeat_s, 1.0)
    from ds4jax.wire import auth  # stdlib only
    self.bind_warning = auth.warn_if_exposed(opt.host, opt.key)
    lsock = transport.listen(opt.host, opt.port)
    self.address = lsock.getsockname()[:2]
    self._links: dict[int, WorkerLink] = {}
    self._wids = itertools.count(1)
    self._cv = threading.Condition()
    self.generation = 0
    self._warm = threading.Event()
    if not opt.warmup:
      self._warm.set()
    self._stop = threading.Event()
    self.last_step: dict[str, Any] = {}
    self.events: list[str] = []  # warnings a user should see (recoveries, refusals)
    self._refusals: dict[int, str] = {}  # layer -> why the last worker offering it was refused
    self._listener = Listener(lsock, opt, check=self.check_hello, on_admit=self._admitted,
                              event=self._event)
    self._threads = [threading.Thread(target=self._monitor_loop, daemon=True,
                                      name="ds4jax-monitor")]
    if opt.warmup:
      self._threads.append(threading.Thread(target=self._warmup, daemon=True,
                                            name="ds4jax-warmup"))
    self._listener.start()
    for t in self._threads:
      t.start()
    log.info("coordinator for layers %s listening on %s:%d", self.local.describe(),
             *self.address)

  @property
  def batcher(self):
    """The local stage's StageBatcher."""
    return self.batchers[0]

  # ------------------------------------------------------------------------------ lifecycle
  def close(self) -> None:
    self._stop.set()
    self._listener.close()
    with self._cv:
      links = list(self._links.values())
    for link in links:
      link.fail(LinkLost("coordinator closing"), quiet=True)
    for t in self._threads:
      t.join(timeout=5)
    super().close()

  def _event(self, msg: str) -> None:
    log.warning("%s", msg)
    self.events.append(msg)

  # ------------------------------------------------------------------------------ admission
  def check_hello(self, f) -> tuple[str, LayerRange | None]:
    """('', range) to accept, or (reason, None): the exact text both sides show. A refusal
    is remembered for the layers the worker offered, so a route that stays incomplete says
    why their last worker was turned away."""
    reason, layers = check_hello(f, fingerprint=self.fingerprint, n_layers=self.n_layers,
                                 local=self.local, ctx=self.ctx)
    start, end = f.header.get("start"), f.header.get("end")
    if reason and type(start) is int and type(end) is int:  # noqa: E721 - not bools
      with self._cv:
        for il in range(max(start, 0), min(end, self.n_layers - 1) + 1):
          self._refusals[il] = reason
    return reason, layers

  def _unavailable(self, reason: str, timeout: float) -> RouteUnavailable:
    """The error of a route that stayed incomplete (call with self._cv held)."""
    missing = route_mod.missing_layers(
        self.n_layers, self.local, [l.layers for l in self._links.values() if l.ready])
    why = next((f"; the last worker offering layer {il} was refused: {self._refusals[il]}"
                for il in missing if il in self._refusals), "")
    return RouteUnavailable(f"route unavailable: {reason}{why} (waited {timeout:.1f}s for "
                            "workers)")

  def _admitted(self, ch, hello: dict, layers: LayerRange, peer: str) -> None:
    wid = next(self._wids)
    link = WorkerLink(wid, ch, hello, layers, heartbeat_s=self.opt.heartbeat_s,
                      dead_after=self.dead_after, request_timeout=self.opt.request_timeout,
                      on_change=self._on_link_change)
    link.residency.grace_s = self.opt.lease_grace_s
    with self._cv:
      if self._stop.is_set():
        ch.close()
        link.close_wakeup()
        return
      self._links[wid] = link
      for il in range(layers.start, layers.end + 1):
        self._refusals.pop(il, None)
    ch.send(MsgType.ACCEPT, {"worker_id": wid, "heartbeat_s": self.opt.heartbeat_s,
                             "ctx": self.ctx, "prefill_chunk": self.opt.prefill_chunk})
    log.info("accepted %r", link)
    link.reader.start()

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
    """(route, '') or (None, why): the reason names accepted workers still loading."""
    hops = [route_mod.HopInfo(l.wid, l.layers, l.peer) for l in self._links.values()
            if l.ready and l.alive]
    plan, reason = route_mod.plan_route(self.n_layers, self.local, hops, self.opt.pin)
    loading = [l for l in self._links.values() if l.alive and not l.ready]
    if plan is None and loading:
      reason += "; " + ", ".join(f"worker#{l.wid} loading {l.layers.describe()}"
                                 for l in loading)
    return plan, reason

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
          raise self._unavailable(reason, timeout)
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
      missing = route_mod.missing_layers(
          self.n_layers, self.local, [l.layers for l in self._links.values() if l.ready])
    stages = ([{"layers": str(self.local), "host": "local"}] +
              [{"layers": str(l.layers), "host": l.peer} for l in hops])
    return {
        "ready": plan is not None, "reason": reason, "generation": self.generation,
        "n_layers": self.n_layers, "ctx_size": self.ctx_size, "missing_layers": missing,
        "listen": f"{self.address[0]}:{self.address[1]}", "route": stages, "stages": stages,
        "workers": workers, "sessions": len(self._sessions),
        "activation_dtype": self.opt.activation_dtype, "last_step": self.last_step,
        "batch": dataclasses.asdict(self.batcher.stats),
    }

  def window(self, n_hops: int) -> int:
    return self.opt.window or min(max(n_hops + 2, 2), 8)

  # ----------------------------------------------------------------- the RouteBackend hooks
  def new_session(self, activation_dtype: str | None = None) -> str:
    dtype = activation_dtype or self.opt.activation_dtype
    if dtype not in tensors.WIRE_DTYPES:
      raise ValueError(f"activation_dtype must be one of {tensors.WIRE_DTYPES}")
    return super().new_session(dtype)

  def _cache_cap(self) -> int:
    return int(self.opt.replay_cache_mb * 2**20)

  def close_session(self, sid: str) -> None:
    """Forgets a session: its local slot is freed (after a step it is running, if any) and
    every worker gets DROP."""
    with self._lock:
      known = sid in self._sessions
    super().close_session(sid)
    if not known:
      return
    for link in self._ready_links():
      link.send(MsgType.DROP, {"sid": sid})
      link.residency.forget(sid)

  def _closed_during_step(self, sess: RouteSession) -> None:
    for link in self._ready_links():  # its leases were still held when it was closed
      link.residency.forget(sess.sid)

  def _ready_links(self) -> list[WorkerLink]:
    with self._cv:
      return [l for l in self._links.values() if l.ready]

  def _downstream(self, sess: RouteSession) -> RemoteHops | None:
    if not self._warm.is_set():  # the first step waits for the warm-up, not compiles twice
      self._warm.wait(self.opt.route_timeout)
    hops = self.wait_route()
    if not hops:  # the coordinator owns the head: one process
      return None
    return RemoteHops(hops, vocab_size=self.vocab_size, window=self.window(len(hops)),
                      event=self._event)

  def _leases(self, sess: RouteSession, down: RemoteHops | None):
    """Leases sess's session slot on every hop for one step (see residency.py): the worker
    never evicts a session mid-step, and steps beyond a worker's capacity queue."""
    hops = [] if down is None else down.hops
    return residency.leases(sess, hops, time.monotonic() + self.opt.route_timeout,
                            self._sessions)

  def _recoverable(self, sess: RouteSession, e: BaseException, tries: collections.Counter,
                   step: int) -> bool:
    sid = sess.sid
    if isinstance(e, LinkLost):
      tries["link"] += 1
      if tries["link"] > self.opt.max_recoveries:
        return False
      self._event(f"session {sid} step {step}: {e}; waiting up to "
                  f"{self.opt.route_timeout:.0f}s for a worker to take over")
      return True
    if isinstance(e, RemoteError):
      # A worker that lost the session (evicted it itself, e.g. after a snapshot restore
      # filled its slots) is rebuilt. Leases make this rare, so a bound that legitimate
      # churn does not reach still stops a peer that keeps answering PrefixMismatch.
      tries["mismatch"] += 1
      if e.etype != "PrefixMismatch" or tries["mismatch"] > self.opt.max_mismatches:
        return False
      sess.held.pop(getattr(e, "wid", -1), None)
      sess.hop_edits.pop(getattr(e, "wid", -1), None)  # it may have lost them too
      self._event(f"session {sid} step {step}: {e.remote_message}; rebuilding that hop")
      return True
    if super()._recoverable(sess, e, tries, step):
      self._event(f"session {sid} step {step}: {e}; recomputing from position 0")
      return True
    return False

  def _no_slot(self, message: str) -> BaseException:
    return RouteUnavailable(f"{message}; waited {self.opt.route_timeout:.0f}s")

  def step(self, sid: str, transcript: Sequence[int], sampling, step: int, *,
           top_logprobs: int = 0, return_logits: bool = False, capture=None, edits=None):
    res = super().step(sid, transcript, sampling, step, top_logprobs=top_logprobs,
                       return_logits=return_logits, capture=capture, edits=edits)
    wire = sum(t.bytes_in + t.bytes_out for t in res.telemetry)
    self.last_step = {"sid": sid, "n_computed": res.n_computed, "wire_bytes": wire,
                      "wire_bytes_per_token": wire / max(res.n_computed, 1)}
    return res

  def _export_remote(self, sess: RouteSession, n: int) -> dict:
    hops = self.wait_route()
    with self._leases(sess, RemoteHops(hops, vocab_size=0, window=1, event=self._event)):
      return snapshots.pull_route(hops, self.cfg, sess, n)

  def _import_remote(self, sess: RouteSession, tokens: list[int], read) -> None:
    hops = self.wait_route()
    with self._leases(sess, RemoteHops(hops, vocab_size=0, window=1, event=self._event)):
      snapshots.push_route(hops, sess.sid, tokens, read)
    sess.held = {hop.wid: len(tokens) for hop in hops}

  def _warmup(self) -> None:
    try:
      chunks = sorted({1, min(self.opt.prefill_chunk, self.ctx)})
      self.warmup(tuple(self.opt.warm_batches) or (1,), chunks)
    except Exception as e:  # the first step compiles instead
      log.warning("local warm-up failed: %s: %s", type(e).__name__, e)
    finally:
      self._warm.set()
