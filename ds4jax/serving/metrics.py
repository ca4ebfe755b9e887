"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

The set is small and fixed, so a 150-line module beats a dependency: counters and histograms
keyed by label tuples, guarded by one lock because generation threads and the event loop both
record. `render()` is cheap (no model or route calls) so `/metrics` never blocks.

    m = Metrics()
    m.observe_step(result.telemetry, wall_s)
    text = m.render(route_complete=True)
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from typing import Iterable, Optional

# Seconds. Spans an in-process tiny model (~100 us) to a slow WAN hop (~10 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
# The tokens/s gauge averages over this trailing window.
RATE_WINDOW_S = 10.0


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
  if not names:
    return ""
  esc = [str(v).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") for v in values]
  return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


class _Histogram:

  def __init__(self, buckets: tuple[float, ...]):
    self.buckets = buckets
    self.counts = [0] * (len(buckets) + 1)
    self.total = 0.0
    self.n = 0

  def observe(self, v: float) -> None:
    self.counts[bisect.bisect_left(self.buckets, v)] += 1
    self.total += v
    self.n += 1

  def lines(self, name: str, names: tuple[str, ...], values: tuple[str, ...]) -> list[str]:
    out, cum = [], 0
    for le, c in zip(list(self.buckets) + [float("inf")], self.counts):
      cum += c
      le_s = "+Inf" if le == float("inf") else repr(le)
      out.append(f"{name}_bucket{_labels(names + ('le',), values + (le_s,))} {cum}")
    out.append(f"{name}_sum{_labels(names, values)} {self.total!r}")
    out.append(f"{name}_count{_labels(names, values)} {self.n}")
    return out


class Metrics:
  """Thread-safe counters, gauges and histograms for one server."""

  def __init__(self, clock=time.monotonic):
    self._lock = threading.Lock()
    self._clock = clock
    self.requests = collections.Counter()  # (endpoint, status code) -> n
    self.errors = collections.Counter()  # (kind,) -> n
    self.prompt_tokens = 0
    self.generated_tokens = 0
    self.queue_depth = 0  # requests waiting for the route or a generation slot
    self.active = 0  # requests generating now
    self._hops: dict[tuple[str, str], _Histogram] = {}
    self._steps = _Histogram(LATENCY_BUCKETS)
    self._durations: dict[tuple[str], _Histogram] = {}
    self._recent = collections.deque()  # (time, n_tokens) within RATE_WINDOW_S
    self._loop_lag = _Histogram(LATENCY_BUCKETS)
    self.loop_lag_max = 0.0

  # ---- recording ----------------------------------------------------------------------------

  def count_request(self, endpoint: str, status: int) -> None:
    with self._lock:
      self.requests[(endpoint, str(status))] += 1

  def count_error(self, kind: str) -> None:
    with self._lock:
      self.errors[(kind,)] += 1

  def add_queue(self, delta: int) -> None:
    with self._lock:
      self.queue_depth += delta

  def add_active(self, delta: int) -> None:
    with self._lock:
      self.active += delta

  def observe_prompt(self, n_tokens: int) -> None:
    with self._lock:
      self.prompt_tokens += n_tokens

  def observe_step(self, telemetry: Iterable, wall_s: float) -> None:
    """Records one generated token: its step wall time and each hop's latency."""
    now = self._clock()
    with self._lock:
      self.generated_tokens += 1
      self._recent.append((now, 1))
      self._steps.observe(wall_s)
      for hop in telemetry or ():
        # HopTelemetry in process, its dict from the model process.
        hop = hop if isinstance(hop, dict) else hop.to_dict()
        key = (str(hop["stage"]), str(hop["host"]))
        h = self._hops.get(key)
        if h is None:
          h = self._hops[key] = _Histogram(LATENCY_BUCKETS)
        h.observe(float(hop.get("compute_s", 0.0)) + float(hop.get("queue_s", 0.0)))

  def observe_loop_lag(self, seconds: float) -> None:
    with self._lock:
      self._loop_lag.observe(seconds)
      self.loop_lag_max = max(self.loop_lag_max, seconds)

  def observe_duration(self, endpoint: str, seconds: float) -> None:
    with self._lock:
      h = self._durations.setdefault((endpoint,), _Histogram(LATENCY_BUCKETS))
      h.observe(seconds)

  def tokens_per_second(self) -> float:
    """Generated tokens per second over the trailing RATE_WINDOW_S, all requests together."""
    now = self._clock()
    with self._lock:
      while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
        self._recent.popleft()
      if not self._recent:
        return 0.0
      n = sum(k for _, k in self._recent)
      span = max(now - self._recent[0][0], 1.0)
      return n / min(span, RATE_WINDOW_S)

  # ---- exposition ---------------------------------------------------------------------------

  def render(self, route_complete: Optional[bool] = None, n_workers: int = 0,
             n_sessions: int = 0) -> str:
    tps = self.tokens_per_second()
    out: list[str] = []

    def head(name, kind, help_):
      out.append(f"# HELP {name} {help_}")
      out.append(f"# TYPE {name} {kind}")

    with self._lock:
      head("ds4jax_requests_total", "counter", "HTTP requests by endpoint and status code.")
      for (ep, st), n in sorted(self.requests.items()):
        out.append(f"ds4jax_requests_total{_labels(('endpoint', 'status'), (ep, st))} {n}")
      head("ds4jax_errors_total", "counter", "Failed requests by kind.")
      for (kind,), n in sorted(self.errors.items()):
        out.append(f"ds4jax_errors_total{_labels(('kind',), (kind,))} {n}")
      head("ds4jax_prompt_tokens_total", "counter", "Prompt tokens received.")
      out.append(f"ds4jax_prompt_tokens_total {self.prompt_tokens}")
      head("ds4jax_generated_tokens_total", "counter", "Tokens generated.")
      out.append(f"ds4jax_generated_tokens_total {self.generated_tokens}")
      head("ds4jax_tokens_per_second", "gauge",
           f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.")
      out.append(f"ds4jax_tokens_per_second {tps!r}")
      head("ds4jax_queue_depth", "gauge", "Requests waiting for the route or a generation slot.")
      out.append(f"ds4jax_queue_depth {self.queue_depth}")
      head("ds4jax_active_requests", "gauge", "Requests generating now.")
      out.append(f"ds4jax_active_requests {self.active}")
      head("ds4jax_step_latency_seconds", "histogram", "Wall time of one generated token.")
      out.extend(self._steps.lines("ds4jax_step_latency_seconds", (), ()))
      head("ds4jax_hop_latency_seconds", "histogram",
           "Per-hop latency (queue + compute) of one step, by stage and host.")
      for key, h in sorted(self._hops.items()):
        out.extend(h.lines("ds4jax_hop_latency_seconds", ("stage", "host"), key))
      head("ds4jax_event_loop_lag_seconds", "histogram",
           "How late the HTTP event loop wakes up (what every request waits first).")
      out.extend(self._loop_lag.lines("ds4jax_event_loop_lag_seconds", (), ()))
      head("ds4jax_event_loop_lag_max_seconds", "gauge", "The largest event loop lag seen.")
      out.append(f"ds4jax_event_loop_lag_max_seconds {self.loop_lag_max!r}")
      head("ds4jax_request_duration_seconds", "histogram", "Request wall time by endpoint.")
      for key, h in sorted(self._durations.items()):
        out.extend(h.lines("ds4jax_request_duration_seconds", ("endpoint",), key))
    if route_complete is not None:
      head("ds4jax_route_complete", "gauge", "1 when workers cover every layer.")
      out.append(f"ds4jax_route_complete {int(route_complete)}")
      head("ds4jax_workers", "gauge", "Workers in the route.")
      out.append(f"ds4jax_workers {n_workers}")
    head("ds4jax_open_sessions", "gauge", "Backend sessions open now.")
    out.append(f"ds4jax_open_sessions {n_sessions}")
    return "\n".join(out) + "\n"
