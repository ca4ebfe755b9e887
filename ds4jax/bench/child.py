"""One benchmark configuration in a fresh process (so its peak RSS and compiles are its own).

    python -m ds4jax.bench.child SPEC.json OUT.json

SPEC keys: mode ('single' | 'split' | 'hf' | 'concurrency'), gguf, ranges (split: the
coordinator's range first, then one per worker), ctx, prompt_lens, decode_tokens, seed, chunk,
cache_dir, log_dir, floor_rounds. OUT gets the measurements; last-position logits go next to it
as .npy. 'concurrency' (ds4jax/bench/concurrency.py) also takes levels, prompt_len,
warm_tokens, and ranges (absent or ["all"]: one process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import sys
import time
from typing import Any

import numpy as np

from ds4jax.bench import measure

log = logging.getLogger("ds4jax.bench")


def run_single(spec: dict[str, Any], ids: list[int]) -> dict[str, Any]:
  from ds4jax import build
  t0 = time.perf_counter()
  # One stream: the builder compiles its decode step and the chunk buckets before the weights.
  backend = build.local_backend(spec["gguf"], ctx_size=spec["ctx"], prefill_chunk=spec["chunk"],
                                max_sessions=1)
  load_s = time.perf_counter() - t0
  res = measure.bench_backend(backend, ids, prompt_lens=spec["prompt_lens"],
                              decode_tokens=spec["decode_tokens"], warm_len=spec["chunk"],
                              keep_logits=True)
  res["load_s"] = load_s
  res["memory"] = {"process_peak_rss_mb": measure.peak_rss_mb()}
  res["stages"] = ["all"]
  return res


def run_split(spec: dict[str, Any], ids: list[int]) -> dict[str, Any]:
  from ds4jax.bench.probe import HopProbe
  from ds4jax.bench.tcp_floor import measure_floor

  probe = HopProbe().install()
  worker_ranges = spec["ranges"][1:]
  t0 = time.perf_counter()
  with split_cluster(spec) as (coord, workers):
    load_s = time.perf_counter() - t0
    route = coord.route_info()
    stage_order = [s["layers"] for s in route["route"]]
    tel: list[list[dict]] = []
    res = measure.bench_backend(
        coord, ids, prompt_lens=spec["prompt_lens"], decode_tokens=spec["decode_tokens"],
        warm_len=spec["chunk"], decode_context=probe.recording,
        on_decode_step=lambda i, r, dt: tel.append([h.to_dict() for h in r.telemetry]))
    step_s = res["decode"]["ms_per_token_median"] / 1e3  # a hop idles this long minus its RTT
    hops = measure.summarize_hops(probe.records, probe.encode_s,
                                  spec["decode_tokens"], stage_order[1:])
    floors = measure_floor([(h["bytes_in"], h["bytes_out"]) for h in hops],
                           rounds=spec.get("floor_rounds", 200),
                           gaps_s=[max(step_s - h["rtt_s"], 1e-3) for h in hops])
    for h, fl in zip(hops, floors):
      h["tcp_floor_rtt_s"] = fl["rtt_s_median"]
      h["tcp_floor_after_gap_s"] = fl["rtt_s_median_after_gap"]
    local = [t[0]["compute_s"] for t in tel]
    res.update(load_s=load_s, stages=stage_order, hops=hops,
               coordinator_compute_s=float(np.median(local)) if local else 0.0)
    workers.check()
    res["memory"] = {
        "coordinator_peak_rss_mb": measure.peak_rss_mb(),
        "workers": [{"layers": r, "pid": p.pid, "peak_rss_mb": measure.peak_rss_mb(p.pid)}
                    for r, p in zip(worker_ranges, workers.procs)],
    }
    if spec.get("paired_rounds", 0):
      # Memory is read above: the reference model below must not count in the coordinator.
      from ds4jax import build
      ref = build.local_backend(spec["gguf"], ctx_size=spec["ctx"], prefill_chunk=spec["chunk"],
                                max_sessions=1)
      res["paired"] = measure.paired_decode(
          coord, ref, ids, prompt_len=spec["prompt_lens"][0], rounds=spec["paired_rounds"],
          steps=max(1, spec["decode_tokens"] // spec["paired_rounds"]))
    return res


def run_concurrency(spec: dict[str, Any], ids: list[int]) -> dict[str, Any]:
  """The concurrency study on one process (LocalBackend) or a split (Coordinator)."""
  from ds4jax import build
  from ds4jax.bench import concurrency
  ranges = spec.get("ranges") or ["all"]
  n_max = max(spec["levels"])
  kw = dict(levels=spec["levels"], prompt_len=spec["prompt_len"],
            decode_tokens=spec["decode_tokens"], warm_tokens=spec.get("warm_tokens", 4),
            seed=spec.get("seed", 0))
  t0 = time.perf_counter()
  if ranges == ["all"]:
    # Every decode bucket up to n_max rows and the prefill chunks compile at load.
    backend = build.local_backend(spec["gguf"], ctx_size=spec["ctx"],
                                  prefill_chunk=spec["chunk"], max_sessions=n_max)
    try:
      load_s = time.perf_counter() - t0
      res = concurrency.bench_levels(backend, backend.cfg.vocab_size, **kw)
    finally:
      backend.close()
  else:
    with split_cluster(spec, max_sessions=n_max) as (coord, _):
      load_s = time.perf_counter() - t0
      res = concurrency.bench_levels(coord, coord.vocab_size, **kw)
  res.update(load_s=load_s, stages=ranges, memory={"process_peak_rss_mb": measure.peak_rss_mb()})
  return res


@contextlib.contextmanager
def split_cluster(spec: dict[str, Any], max_sessions: int = 8):
  """(Coordinator for spec["ranges"][0], LocalWorkers: one process per further range),
  yielded once the route is complete; `max_sessions` sessions stay resident everywhere."""
  from ds4jax import build
  from ds4jax.local_cluster import LocalWorkers
  if spec.get("log_dir"):
    pathlib.Path(spec["log_dir"]).mkdir(parents=True, exist_ok=True)
  coord_range, worker_ranges = spec["ranges"][0], spec["ranges"][1:]
  # Generous deadlines: a worker compiling on a loaded 2-core machine is slow, not dead.
  coord = build.coordinator(spec["gguf"], layers=coord_range, ctx_size=spec["ctx"],
                            prefill_chunk=spec["chunk"], max_sessions=max(64, max_sessions),
                            key=None, request_timeout=1800.0, route_timeout=900.0,
                            heartbeat_s=2.0)
  workers = LocalWorkers(spec["gguf"], worker_ranges, coordinator=coord.address,
                         ctx_size=spec["ctx"], cache_dir=spec.get("cache_dir"),
                         log_dir=spec.get("log_dir"),
                         extra_args=[f"--max_sessions={max(8, max_sessions)}"])
  try:
    workers.start()
    deadline = time.monotonic() + 900
    while not coord.route_ready()[0]:
      workers.check()
      if time.monotonic() > deadline:
        raise TimeoutError(f"route incomplete after 900 s: {coord.route_ready()[1]}")
      time.sleep(0.2)
    yield coord, workers
    workers.check()
  finally:
    workers.stop()
    coord.close()


def run_hf(spec: dict[str, Any], ids: list[int]) -> dict[str, Any]:
  from ds4jax.bench import hf
  from ds4jax.gguf.hf import hf_model_from_gguf
  t0 = time.perf_counter()
  model = hf_model_from_gguf(spec["gguf"])
  load_s = time.perf_counter() - t0
  res = hf.measure_hf(model, ids, prompt_lens=spec["prompt_lens"],
                      decode_tokens=spec["decode_tokens"])
  res["logits"] = res.pop("last_logits")
  res["load_s"] = load_s
  res["memory"] = {"process_peak_rss_mb": measure.peak_rss_mb()}
  return res


def main(argv: list[str]) -> None:
  spec_path, out_path = argv[1], pathlib.Path(argv[2])
  spec = json.loads(pathlib.Path(spec_path).read_text())
  logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
  for name in ("jax", "gguf", "absl"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from ds4jax.gguf.reader import read_config
  cfg = read_config(spec["gguf"])
  ids = measure.prompt_ids(cfg.vocab_size, max(spec.get("prompt_lens", [1])),
                          spec.get("seed", 0))
  if spec["mode"] != "hf":
    from ds4jax import cli
    from ds4jax.runtime.load import return_big_frees
    cli.enable_compilation_cache(spec.get("cache_dir"))
    return_big_frees()  # as scripts/worker.py does: the same allocator for every stage
  run = {"single": run_single, "split": run_split, "hf": run_hf,
         "concurrency": run_concurrency}[spec["mode"]]
  res = run(spec, ids)
  for n, row in res.pop("logits", {}).items():
    np.save(out_path.with_suffix(f".logits{n}.npy"), row)
  res["env_after"] = measure.env_info()
  out_path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
  main(sys.argv)
