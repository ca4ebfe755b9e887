"""Per-request timing of the coordinator's worker links, for the benchmark only.

The bridge's own telemetry gives each hop's compute and queue time (measured by the worker)
and the bytes each way. What it cannot see from one side is the round trip: the probe wraps
`WorkerLink.request` in this (coordinator) process and stamps the moment a WORK frame starts
to be sent, the moment `send` returns, and the moment the reply's callback runs (after the
reader thread parsed the frame). It also times the coordinator's activation encoding. It is
installed only by the benchmark's child process; nothing else ever imports it.

Run as a module it is the bridge's own micro-benchmark: a zero-compute stage
(`bench.echo.EchoRunner`, bench-preset activation rows) split over worker processes
on loopback, so every microsecond of a decode step is the bridge's (one JSON line out):

    python -m ds4jax.bench.probe --workers=1 --steps=400 [--gap_ms=5]

    probe = HopProbe().install()
    with probe.recording():
      backend.step(...)
    probe.records, probe.encode_s  # one dict per WORK request; coordinator encode times
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any


class HopProbe:
  """Records one dict per WORK request while `recording()` is active."""

  def __init__(self):
    self.records: list[dict[str, Any]] = []
    self.encode_s: list[float] = []
    self._on = False
    self._lock = threading.Lock()
    self._installed = False

  def install(self) -> "HopProbe":
    from ds4jax.bridge.coordinator import links
    from ds4jax.wire import tensors
    if self._installed:
      return self
    self._installed = True
    probe = self
    orig_request, orig_encode = links.WorkerLink.request, tensors.encode

    def request(link, header, payload, callback, **kw):
      rec: dict[str, Any] = {"layers": str(link.layers), "n": int(header.get("n", 0)),
                             "want": header.get("w"), "t_start": time.perf_counter()}

      def on_reply(f, err):
        rec["t_reply"] = time.perf_counter()
        if f is not None:
          rec["bytes_out"] = int(f.nbytes)
          tel = f.header.get("t")  # [compute_us, queue_us] (protocol v2)
          if isinstance(tel, list) and len(tel) == 2:
            rec["compute_s"], rec["queue_s"] = tel[0] * 1e-6, tel[1] * 1e-6
        callback(f, err)

      n = orig_request(link, header, payload, on_reply, **kw)
      rec["t_sent"] = time.perf_counter()
      rec["bytes_in"] = int(n)
      probe._add(rec)
      return n

    def encode(x, dtype="f32"):
      t0 = time.perf_counter()
      out = orig_encode(x, dtype)
      probe._add_encode(time.perf_counter() - t0)
      return out

    links.WorkerLink.request = request
    tensors.encode = encode
    return self

  def _add(self, rec: dict[str, Any]) -> None:
    with self._lock:
      if self._on:
        self.records.append(rec)

  def _add_encode(self, dt: float) -> None:
    with self._lock:
      if self._on:
        self.encode_s.append(dt)

  @contextlib.contextmanager
  def recording(self):
    """Starts fresh `records`/`encode_s` lists that fill while the block runs."""
    with self._lock:
      self.records, self.encode_s, self._on = [], [], True
    try:
      yield self
    finally:
      with self._lock:
        self._on = False


# ------------------------------------------------------------------------ micro-benchmark
def _echo_cfg():
  from ds4jax.bench.echo import EchoConfig
  return EchoConfig(n_layers=4, d_model=512, n_hc=4, vocab_size=4096)  # bench preset rows


def _serve(port: int, layers: str) -> None:
  """A worker process serving `layers` of the echo model (stops when the parent dies)."""
  import os
  from ds4jax.bridge.worker.worker import Worker, WorkerOptions
  from ds4jax.config import LayerRange
  from ds4jax.bench.echo import EchoRunner
  cfg = _echo_cfg()
  rng = LayerRange.parse(layers, cfg.n_layers)
  opt = WorkerOptions(ctx=4096, backoff_min=0.05, backoff_max=0.2)
  w = Worker(("127.0.0.1", port), fingerprint=cfg.fingerprint(), n_layers=cfg.n_layers,
             vocab_size=cfg.vocab_size, layers=rng, options=opt,
             load=lambda: EchoRunner(cfg, rng, opt.ctx))
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)

  threading.Thread(target=watch, daemon=True).start()
  w.run()


def hop_bench(n_workers: int, steps: int, gap_s: float = 0.0, prompt: int = 16,
              floor: bool = True, **coord_options) -> dict[str, Any]:
  """Decode steps through `n_workers` echo workers; medians of step time and hop RTT."""
  import numpy as np
  from ds4jax.bench.tcp_floor import measure_floor
  from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
  from ds4jax.config import LayerRange
  from ds4jax.local_cluster import spawn
  from ds4jax.runtime.sampling import SamplingParams
  from ds4jax.bench.echo import EchoRunner
  cfg = _echo_cfg()
  ranges = {1: ["1:output"], 2: ["1:2", "3:output"], 3: ["1:1", "2:2", "3:output"]}[n_workers]
  probe = HopProbe().install()
  coord = Coordinator(EchoRunner(cfg, LayerRange.parse("0:0", cfg.n_layers)),
                      CoordinatorOptions(port=0, route_timeout=60, **coord_options))
  procs = [spawn(["-m", "ds4jax.bench.probe", f"--serve={r}", f"--port={coord.address[1]}"],
                 None) for r in ranges]
  try:
    coord.wait_route(60)
    greedy = SamplingParams()
    sid = coord.new_session()
    toks = [1 + i % 7 for i in range(prompt)]
    times = []
    for i in range(steps + 20):
      if i == 20:
        probe.records = []
        probe._on = True
      if gap_s:
        time.sleep(gap_s)
      t0 = time.perf_counter()
      r = coord.step(sid, toks, greedy, i)
      times.append(time.perf_counter() - t0)
      if r.token != EchoRunner.greedy_next(cfg, len(toks)):
        raise AssertionError(f"step {i}: token {r.token}")
      toks.append(r.token)
    probe._on = False
    times = times[20:]
    recs = [r for r in probe.records if "t_reply" in r]
    rtt = [r["t_reply"] - r["t_start"] for r in recs]
    out: dict[str, Any] = {
        "workers": n_workers, "steps": steps, "gap_ms": gap_s * 1e3,
        "step_us": 1e6 * float(np.median(times)),
        "hop_rtt_us": 1e6 * float(np.median(rtt)),
        "hop_compute_us": 1e6 * float(np.median([r.get("compute_s", 0) for r in recs])),
        "hop_queue_us": 1e6 * float(np.median([r.get("queue_s", 0) for r in recs])),
        "bytes_in": int(np.median([r["bytes_in"] for r in recs])),
        "bytes_out": int(np.median([r.get("bytes_out", 0) for r in recs])),
    }
    if floor:
      fl = measure_floor([(out["bytes_in"], out["bytes_out"])], rounds=300,
                         gaps_s=[max(gap_s, 1e-3)])[0]
      out["tcp_rtt_us"] = 1e6 * fl["rtt_s_median"]
      out["tcp_rtt_after_gap_us"] = 1e6 * fl["rtt_s_median_after_gap"]
    return out
  finally:
    coord.close()
    for p in procs:
      p.kill()
      p.wait()


def main(argv=None) -> None:
  import argparse
  import json
  import os
  ap = argparse.ArgumentParser(description="zero-compute bridge hop micro-benchmark")
  ap.add_argument("--workers", type=int, default=1, choices=(1, 2, 3))
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--gap_ms", type=float, default=0.0, help="idle time before each step")
  ap.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding")
  ap.add_argument("--no_floor", action="store_true", help="skip the raw TCP floor")
  ap.add_argument("--serve", help=argparse.SUPPRESS)
  ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  import logging
  logging.getLogger("ds4jax").setLevel(logging.ERROR)  # teardown drops links on purpose
  if a.serve:
    _serve(a.port, a.serve)
    return
  res = hop_bench(a.workers, a.steps, a.gap_ms / 1e3, prompt=a.prompt, floor=not a.no_floor)
  res["loadavg"] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
  main()
