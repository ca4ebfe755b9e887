"""The bridge between the asyncio HTTP server and the blocking model: threads, route, sessions.

Nothing that can block runs on the event loop. Route queries go through a one-thread executor
and are awaited with a short deadline (a stuck backend yields the last known state, marked
stale), so `/health` answers within ~50 ms whatever the model is doing. Each request's
generation runs in its own thread and hands events to the loop through an `asyncio.Queue`;
when the client goes away the async side sets a cancel flag, the thread stops after its
current token and closes its session.

    engine = Engine(backend, route_timeout=60)
    await engine.wait_route()                    # raises RouteNotReady after the timeout
    async for event in engine.run(work):         # work(cancel, emit) runs in a thread
      ...
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import re
import threading
import time
from typing import Any, AsyncIterator, Callable, Optional

from ds4jax.serving.metrics import Metrics

# How long a route query may take before /health answers from the cached state instead.
ROUTE_QUERY_DEADLINE_S = 0.05
# How often a waiting request re-checks the route (LocalAI polls every 100 ms).
ROUTE_POLL_S = 0.05

_MISSING_RE = re.compile(r"missing layers? (\d+)(?:\s*(?:-|:|\.\.)\s*(\d+))?")


class Busy(RuntimeError):
  """Too many generations at once: the request waited `waited_s` for a generation slot and
  was turned away (HTTP 429 with Retry-After; LocalAI: RESOURCE_EXHAUSTED)."""

  def __init__(self, message: str, retry_after_s: float, waited_s: float):
    super().__init__(message)
    self.retry_after_s = float(retry_after_s)
    self.waited_s = float(waited_s)


class RouteNotReady(Exception):
  """The route stayed incomplete for the whole route timeout."""

  def __init__(self, reason: str, missing_layers: list[int], waited_s: float):
    super().__init__(f"distributed route incomplete after {waited_s:.1f} s: {reason}")
    self.reason = reason
    self.missing_layers = missing_layers
    self.waited_s = waited_s


def missing_layers(reason: str, info: dict, uncovered: Optional[list[int]] = None) -> list[int]:
  """The uncovered layer indices: computed from the worker ranges when the backend allows,
  else `route_info()['missing_layers']`, else parsed from the reason ('missing layer 17')."""
  if uncovered is not None:
    return uncovered
  got = info.get("missing_layers") if isinstance(info, dict) else None
  if got:
    return sorted(int(i) for i in got)
  out: list[int] = []
  for m in _MISSING_RE.finditer(reason or ""):
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) else a
    out.extend(range(a, b + 1))
  return sorted(set(out))


@dataclasses.dataclass
class RouteState:
  complete: bool
  reason: str
  info: dict
  checked_at: float
  stale: bool = False
  missing: list[int] = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict[str, Any]:
    info = self.info
    return {"complete": self.complete,
            "reason": "complete" if self.complete else self.reason,
            "missing_layers": [] if self.complete else self.missing,
            "workers": info.get("workers", []),
            "route": info.get("route", info.get("stages", [])),
            "stale": self.stale, "age_s": round(time.monotonic() - self.checked_at, 3),
            "backend": {k: v for k, v in info.items() if k not in ("workers", "route", "stages")}}


_RANGE_RE = re.compile(r"(\d+):(\d+)(\+output)?")


class SessionTracker:
  """Wraps a Backend to count open sessions (for /health, /metrics and tests).

  It forwards every call, so it is a Backend itself. `serialize_steps` puts one lock around
  `step` for backends that are not thread-safe; sessions still interleave token by token.
  """

  route_is_cached = False  # route_ready/route_info ask the backend (ModelProcess: a snapshot)

  def __init__(self, backend, serialize_steps: bool = False):
    self.backend = backend
    self._lock = threading.Lock()
    self._step_lock = threading.Lock() if serialize_steps else None
    self.open: set[str] = set()
    self.opened = 0
    self.closed = 0

  def new_session(self) -> str:
    sid = self.backend.new_session()
    with self._lock:
      self.open.add(sid)
      self.opened += 1
    return sid

  def close_session(self, sid: str) -> None:
    try:
      self.backend.close_session(sid)
    finally:
      with self._lock:
        if sid in self.open:
          self.open.discard(sid)
          self.closed += 1

  def step(self, *args, **kw):
    if self._step_lock is None:
      return self.backend.step(*args, **kw)
    with self._step_lock:
      return self.backend.step(*args, **kw)

  def route_info(self) -> dict:
    return self.backend.route_info()

  def uncovered_layers(self, info: dict) -> Optional[list[int]]:
    """The layers no ready stage serves, as the backend's route_info reports them."""
    got = info.get("missing_layers") if isinstance(info, dict) else None
    return sorted(int(i) for i in got) if isinstance(got, list) else None

  def route_ready(self) -> tuple[bool, str]:
    ok, reason = self.backend.route_ready()
    return bool(ok), str(reason) or "complete"

  def __getattr__(self, name):
    return getattr(self.backend, name)


class Engine:
  """Runs requests against one backend without ever blocking the event loop."""

  def __init__(self, backend: SessionTracker, *, route_timeout: float = 60.0,
               max_concurrency: int = 16, metrics: Optional[Metrics] = None,
               queue_timeout: float = 30.0):
    self.backend = backend
    self.route_timeout = float(route_timeout)
    self.max_concurrency = int(max_concurrency)
    # A request waits this long for one of the max_concurrency generation slots, then gets
    # Busy (HTTP 429 with Retry-After).
    self.queue_timeout = float(queue_timeout)
    self.metrics = metrics or Metrics()
    self._route_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="route")
    self._route_future: Optional[concurrent.futures.Future] = None
    self._route = RouteState(False, "route not checked yet", {}, time.monotonic(), stale=True)
    self._slots: Optional[asyncio.Semaphore] = None

  def close(self) -> None:
    self._route_pool.shutdown(wait=False, cancel_futures=True)

  # ---- route --------------------------------------------------------------------------------

  def _query_route(self) -> RouteState:
    ok, reason = self.backend.route_ready()
    try:
      info = dict(self.backend.route_info())
    except Exception as e:  # route_info is diagnostics; never fail health on it
      info = {"route_info_error": f"{type(e).__name__}: {e}"}
    missing = missing_layers(reason, info, self.backend.uncovered_layers(info))
    return RouteState(ok, reason, info, time.monotonic(), missing=missing)

  async def route_state(self, deadline_s: float = ROUTE_QUERY_DEADLINE_S) -> RouteState:
    """The route now, or the last known state (stale=True) if the backend is slow to say."""
    if self.backend.route_is_cached:
      # A snapshot read (the model process pushes it): no thread hop needed.
      self._route = self._query_route()
      return self._route
    fut = self._route_future
    if fut is None or fut.done():
      fut = self._route_future = self._route_pool.submit(self._query_route)
    try:
      self._route = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), deadline_s)
    except asyncio.TimeoutError:
      return dataclasses.replace(self._route, stale=True)
    except Exception as e:
      self._route = RouteState(False, f"route query failed: {type(e).__name__}: {e}", {},
                               time.monotonic())
    return self._route

  async def wait_route(self, timeout: Optional[float] = None, gone=None) -> Optional[RouteState]:
    """Polls the route until it is complete; RouteNotReady once `timeout` seconds pass.

    `gone` is an async predicate (the client disconnected): then it returns None at once.
    """
    timeout = self.route_timeout if timeout is None else timeout
    t0 = time.monotonic()
    while True:
      if gone is not None and await gone():
        return None
      # Requests may wait longer on a slow route query than /health does.
      state = await self.route_state(deadline_s=1.0)
      if state.complete and not state.stale:
        return state
      waited = time.monotonic() - t0
      if waited >= timeout:
        raise RouteNotReady(state.reason, state.missing, waited)
      await asyncio.sleep(min(ROUTE_POLL_S, max(timeout - waited, 0.001)))

  # ---- generation ---------------------------------------------------------------------------

  @contextlib.asynccontextmanager
  async def slot(self) -> AsyncIterator[None]:
    """Waits up to `queue_timeout` for a generation slot (counted as queued meanwhile), then
    raises `Busy`. The generations holding slots run concurrently: the backend
    batches their steps (docs/design.md §11)."""
    if self._slots is None:  # created lazily so it binds to the server's loop
      self._slots = asyncio.Semaphore(self.max_concurrency)
    self.metrics.add_queue(1)
    t0 = time.monotonic()
    try:
      await asyncio.wait_for(self._slots.acquire(), self.queue_timeout)
    except asyncio.TimeoutError:
      waited = time.monotonic() - t0
      retry = max(1.0, min(self.queue_timeout, 30.0))
      raise Busy(
          f"busy: {self.max_concurrency} generations are running and none finished within "
          f"{waited:.1f} s (--max_concurrency, --queue_timeout); retry after {retry:.0f} s",
          retry, waited) from None
    finally:
      self.metrics.add_queue(-1)
    self.metrics.add_active(1)
    try:
      yield
    finally:
      self.metrics.add_active(-1)
      self._slots.release()

  async def run(self, work: Callable[[threading.Event, Callable[[Any], None]], None]
                ) -> AsyncIterator[Any]:
    """Runs `work(cancel, emit)` in a thread and yields what it emits, in order.

    An exception in `work` is re-raised here. Leaving the iteration early (client gone,
    task cancelled) sets `cancel`; `work` must then return promptly and free its session.
    A `work` with `start(emit, fail, done)` and `cancel()` runs without a thread: it calls
    back from its own thread (the model process's reader).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    done = object()

    def put(item):
      try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
      except RuntimeError:  # the loop closed (server shutdown): nobody is listening
        cancel.set()

    def target():
      try:
        work(cancel, put)
      except BaseException as e:  # re-raised on the loop side
        put(_Failure(e))
      finally:
        put(done)

    start = getattr(work, "start", None)
    if start is not None:
      # Event-driven work (the model process): its reader thread calls back, no thread here.
      start(put, lambda e: put(_Failure(e)), lambda: put(done))
    else:
      threading.Thread(target=target, name="generate", daemon=True).start()
    try:
      while True:
        item = await queue.get()
        if item is done:
          return
        if isinstance(item, _Failure):
          raise item.error
        yield item
    finally:
      cancel.set()
      if start is not None:
        work.cancel()


@dataclasses.dataclass
class _Failure:
  error: BaseException
