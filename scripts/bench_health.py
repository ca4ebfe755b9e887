"""How fast the OpenAI server's /health answers while the model works (goal: under 100 ms).

    python scripts/bench_health.py                # the tiny model, one worker
    python scripts/bench_health.py --gguf=bench --streams=8

Starts `scripts/serve.py` as the coordinator of a split (layers 0:1, listening on loopback),
probes /health every `--probe_ms` while
  1. the worker process starts, loads and compiles, and joins the route;
  2. `--streams` streaming completions run at once;
and prints the latency of every phase (p50, p90, p99, max) against the goal. The tests check
that health answers in those phases (tests/serving/serve_e2e_test.py, app_test.py); how fast
is this script's figure, since a shared machine's scheduling decides it.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds4jax import local_cluster  # noqa: E402

GOAL_MS = 100.0
_GGUF = flags.DEFINE_string("gguf", "tiny", "GGUF path, or 'tiny'/'bench' (test models).")
_CTX = flags.DEFINE_integer("ctx_size", 256, "KV capacity per session, tokens.")
_STREAMS = flags.DEFINE_integer("streams", 4, "Concurrent streaming completions.")
_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Tokens per completion.")
_PROBE_MS = flags.DEFINE_float("probe_ms", 50.0, "Interval between probes.")
_CACHE = flags.DEFINE_string("cache_dir", None, "ds4jax cache dir (test models, XLA cache).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Prober:
  """Probes /health from a thread; `take()` returns the latencies (ms) since the last take."""

  def __init__(self, url: str, every_s: float):
    import httpx
    self.client = httpx.Client(base_url=url, timeout=30)
    self.every_s, self.ms, self.last = every_s, [], {}
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._run, daemon=True)
    self.thread.start()

  def _run(self):
    while not self.stop.is_set():
      t0 = time.perf_counter()
      self.last = self.client.get("/health").json()
      self.ms.append(1e3 * (time.perf_counter() - t0))
      self.stop.wait(self.every_s)

  def take(self) -> list[float]:
    out, self.ms = self.ms, []
    return out

  def close(self):
    self.stop.set()
    self.thread.join(30)
    self.client.close()


def row(phase: str, ms: list[float]) -> str:
  if not ms:
    return f"| {phase} | 0 | - | - | - | - | - |"
  p50, p90, p99 = np.percentile(ms, [50, 90, 99])
  met = "yes" if max(ms) < GOAL_MS else "no"
  return (f"| {phase} | {len(ms)} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {max(ms):.1f} | "
          f"{met} |")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import openai

  from ds4jax import cli
  gguf = cli.resolve_gguf(_GGUF.value, _CACHE.value)
  port = local_cluster.free_port()
  cache = [f"--cache_dir={_CACHE.value}"] if _CACHE.value else []
  server = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "scripts", "serve.py"), f"--gguf={gguf}",
       "--layers=0:1", f"--listen=127.0.0.1:{port}", "--http=127.0.0.1:0",
       f"--ctx_size={_CTX.value}", f"--max_concurrency={_STREAMS.value}", "--route_timeout=600",
       *cache], cwd=REPO, stdout=subprocess.PIPE, text=True)
  workers = prober = None
  try:
    line = ""
    while not line.startswith("serving "):
      line = server.stdout.readline()
      if not line:
        raise RuntimeError("serve.py exited before serving")
    url = line.split()[1]
    prober = Prober(url, _PROBE_MS.value / 1e3)
    model = prober.client.get("/health").json()["model"]
    workers = local_cluster.LocalWorkers(
        gguf, ["2:output"], ("127.0.0.1", port), ctx_size=_CTX.value, cache_dir=_CACHE.value,
        extra_args=[f"--max_sessions={_STREAMS.value}"]).start()
    while not prober.last.get("route", {}).get("complete"):
      workers.check()
      time.sleep(0.1)
    rows = [row("worker loads, compiles, joins", prober.take())]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def run(i):
      s = client.completions.create(model=model, prompt=f"Request {i}:", stream=True,
                                    max_tokens=_TOKENS.value, temperature=0)
      return sum(1 for _ in s)

    with concurrent.futures.ThreadPoolExecutor(_STREAMS.value) as pool:
      list(pool.map(run, range(_STREAMS.value)))
    rows.append(row(f"{_STREAMS.value} concurrent streams", prober.take()))
    print(f"/health latency, ms (goal: every probe under {GOAL_MS:.0f} ms)\n")
    print("| phase | probes | p50 | p90 | p99 | max | goal met |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
  finally:
    if prober:
      prober.close()
    server.terminate()
    server.wait(30)
    if workers:
      workers.stop()


if __name__ == "__main__":
  app.run(main)
