"""The concurrency study (issue 13 item 5): aggregate decode tok/s and inter-token latency
of c concurrent streams, each a client thread with its own session and random prompt.

One round at concurrency c, on any `Backend` (only `new_session`, `step`, `close_session`):

  1. c threads start together; each prefills its own `prompt_len`-token prompt (step 0);
  2. a barrier: once every stream holds its first token, all are released at once (t_go),
     so the timed window is decode only (no prefill chunk between the decode batches);
  3. each stream decodes `decode_tokens` greedy tokens, one `step` per token with the whole
     transcript, and stamps the time each token comes back.

  aggregate tok/s = c * decode_tokens / (last token of any stream - t_go)
  ITL             = gaps between consecutive tokens of one stream (the first gap is t_go to
                    its first decode token); p50 / p99 over the gaps of all streams.

Stage batcher counters (`LocalBackend.batchers[k].stats`, and a coordinator's when it has
them) are read at t_go and at the end, so "mean rows" and "ms per call" are the decode
window's alone. Everything here but `run_round` is plain numbers (no JAX), for scripts/bench.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import numpy as np

from ds4jax.runtime.sampling import SamplingParams

GREEDY = SamplingParams()


def stream_prompts(vocab_size: int, n: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
  """n distinct random prompts; stream i's prompt is the same in every configuration."""
  return [np.random.default_rng([seed, i]).integers(2, vocab_size, prompt_len).tolist()
          for i in range(n)]


def stage_stats(backend) -> list[Any]:
  """The stats of a backend's local stage batchers (a RouteBackend: local or coordinator)."""
  return [b.stats for b in backend.batchers]


def _snap(stats) -> list[tuple[int, int, float, int]]:
  return [(s.decode_calls, s.decode_rows, s.compute_s, s.calls) for s in stats]


def run_round(backend, prompts: Sequence[Sequence[int]], decode_tokens: int) -> dict[str, Any]:
  """One round of len(prompts) concurrent streams on `backend` (see the module docstring)."""
  c = len(prompts)
  stats = stage_stats(backend)
  marks: dict[str, Any] = {}

  def release():  # runs once, in the last thread to arrive, before any is released
    marks["before"] = _snap(stats)
    marks["t_go"] = time.perf_counter()

  start = threading.Barrier(c)
  go = threading.Barrier(c, action=release)
  times: list[list[float]] = [[] for _ in range(c)]
  tokens: list[list[int]] = [[] for _ in range(c)]
  errors: list[BaseException] = []
  sids = [backend.new_session() for _ in range(c)]

  def stream(i: int) -> None:
    try:
      transcript = [int(t) for t in prompts[i]]
      start.wait()
      res = backend.step(sids[i], transcript, GREEDY, 0)
      transcript.append(res.token)
      go.wait()
      for k in range(decode_tokens):
        res = backend.step(sids[i], transcript, GREEDY, k + 1)
        times[i].append(time.perf_counter())
        transcript.append(res.token)
        tokens[i].append(int(res.token))
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
      errors.append(e)
      start.abort()
      go.abort()

  threads = [threading.Thread(target=stream, args=(i,), name=f"ds4jax-stream-{i}")
             for i in range(c)]
  try:
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    for sid in sids:
      backend.close_session(sid)
  real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
  if errors:
    raise (real or errors)[0]
  after = _snap(stats)
  t_go = marks["t_go"]
  gaps = np.concatenate([np.diff([t_go] + ts) for ts in times])
  wall = max(ts[-1] for ts in times) - t_go
  stages = []
  for (c0, r0, s0, n0), (c1, r1, s1, n1) in zip(marks["before"], after):
    calls = c1 - c0
    stages.append({"decode_calls": calls, "decode_rows": r1 - r0,
                   "mean_rows": (r1 - r0) / calls if calls else None,
                   # only decode calls run in the window (every prefill ended before t_go)
                   "ms_per_call": 1e3 * (s1 - s0) / (n1 - n0) if n1 > n0 else None})
  return {
      "concurrency": c, "decode_tokens": decode_tokens, "wall_s": wall,
      "tok_s": c * decode_tokens / wall,
      "itl_ms_p50": 1e3 * float(np.percentile(gaps, 50)),
      "itl_ms_p99": 1e3 * float(np.percentile(gaps, 99)),
      "itl_ms_mean": 1e3 * float(np.mean(gaps)),
      "stages": stages, "tokens_out": tokens,
  }


def bench_levels(backend, vocab_size: int, *, levels: Sequence[int], prompt_len: int,
                 decode_tokens: int, warm_tokens: int = 4, seed: int = 0) -> dict[str, Any]:
  """Warm-up round then timed round per level (warm-up prompts differ from the timed ones,
  so no prefix is reused). -> {"levels": {str(c): round}, "warmup_s": {str(c): s}}."""
  levels = sorted(set(int(c) for c in levels))
  warm = stream_prompts(vocab_size, max(levels), prompt_len, seed + 1000)
  timed = stream_prompts(vocab_size, max(levels), prompt_len, seed)
  out: dict[str, Any] = {"levels": {}, "warmup_s": {}}
  # Every batch bucket compiles on first use: warm every level before timing any (a level's
  # stragglers form the smaller batches of the others).
  for c in levels:
    t0 = time.perf_counter()
    run_round(backend, warm[:c], warm_tokens)
    out["warmup_s"][str(c)] = time.perf_counter() - t0
  for c in levels:
    out["levels"][str(c)] = run_round(backend, timed[:c], decode_tokens)
  return out


# ------------------------------------------------------------------------------- report
GOAL_SPEEDUP_AT = 8


def _mean_rows(r: dict[str, Any]) -> float | None:
  v = [s["mean_rows"] for s in r["stages"] if s["mean_rows"] is not None]
  return float(np.mean(v)) if v else None


def _ms_per_call(r: dict[str, Any]) -> float | None:
  v = [s["ms_per_call"] for s in r["stages"] if s["ms_per_call"] is not None]
  return float(np.sum(v)) if v else None


def _goal(name, value, threshold, op) -> dict[str, Any]:
  met = None if value is None else bool(value >= threshold if op == ">=" else value <= threshold)
  return {"name": name, "value": value, "threshold": threshold, "op": op, "met": met}


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
  """Adds ratios to c=1 per configuration and the goals list to `results` (in place).

  results["configs"]: {name: {"label", "levels": {str(c): round}, ...}}, "single" first.
  """
  goals = []
  configs = results["configs"]
  for name, cfg in configs.items():
    base = cfg["levels"].get("1")
    for r in cfg["levels"].values():
      r["mean_rows"], r["ms_per_call"] = _mean_rows(r), _ms_per_call(r)
      r["ratio_tok_s"] = r["tok_s"] / base["tok_s"] if base else None
      r["ratio_p99"] = r["itl_ms_p99"] / base["itl_ms_p99"] if base else None
    at = cfg["levels"].get(str(GOAL_SPEEDUP_AT))
    kind = name.split("@")[0]  # "single@tree" with --trees
    if kind in ("single", "split3"):
      goals.append(_goal(f"{cfg['label']}: aggregate tok/s, {GOAL_SPEEDUP_AT} streams / 1 stream",
                         at and at["ratio_tok_s"], 5.0, ">="))
    if kind == "single":  # issue 21: both levels warmed up (bench_levels' untimed rounds)
      goals.append(_goal(f"{cfg['label']}: aggregate tok/s, {GOAL_SPEEDUP_AT} streams / 1 "
                         "stream (issue 21)", at and at["ratio_tok_s"], 4.0, ">="))
    goals.append(_goal(f"{cfg['label']}: p99 ITL, {GOAL_SPEEDUP_AT} streams / 1 stream",
                       at and at["ratio_p99"], 2.0, "<="))
  single1 = configs.get("single", {}).get("levels", {}).get("1")
  for name, thr in (("split1", 0.9), ("split3", 0.85)):
    one = configs.get(name, {}).get("levels", {}).get("1")
    if single1 and one:
      goals.append(_goal(f"{configs[name]['label']} / single process: decode tok/s at 1 stream "
                         "(separate runs)", one["tok_s"] / single1["tok_s"], thr, ">="))
  parity = {}
  for name, cfg in configs.items():
    if name != "single" and single1 and "1" in cfg["levels"]:
      parity[f"{cfg['label']}, 1 stream: greedy tokens identical to the single process"] = (
          cfg["levels"]["1"]["tokens_out"] == single1["tokens_out"])
  for name, cfg in configs.items():
    one = cfg["levels"].get("1")
    top = cfg["levels"].get(str(max(int(c) for c in cfg["levels"])))
    if one and top and top is not one:
      parity[f"{cfg['label']}, {top['concurrency']} streams: stream 0 decodes the same tokens "
             "as 1 stream"] = top["tokens_out"][0] == one["tokens_out"][0]
  results["goals"], results["parity"] = goals, parity
  return results


def _f(x, nd=1):
  return "n/a" if x is None else f"{x:.{nd}f}"


def to_markdown(results: dict[str, Any]) -> str:
  s, m = results["settings"], results["machine"]
  out = [f"Model `{results['model']['preset']}`: {results['model']['n_layers']} layers. Each "
         f"stream: its own session and random {s['prompt_len']}-token prompt, then "
         f"{s['decode_tokens']} greedy decode tokens; streams released together after "
         f"prefill. Machine: {m['cpu']}, {m['cpus']} CPUs, load average before/after "
         f"{m['loadavg_before']} / {m['loadavg_after']}.", ""]
  hdr = ["concurrency", "aggregate tok/s", "/ c=1", "p50 ITL ms", "p99 ITL ms", "p99 / c=1",
         "mean batch rows", "decode ms/call"]
  for cfg in results["configs"].values():
    out.append(f"### {cfg['label']} ({' '.join(f'`{x}`' for x in cfg['stages'])})\n")
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---:|" * len(hdr))
    for c, r in sorted(cfg["levels"].items(), key=lambda kv: int(kv[0])):
      out.append("| " + " | ".join([
          c, _f(r["tok_s"]), _f(r["ratio_tok_s"], 2), _f(r["itl_ms_p50"]), _f(r["itl_ms_p99"]),
          _f(r["ratio_p99"], 2), _f(r["mean_rows"], 2), _f(r["ms_per_call"])]) + " |")
    if all(r["mean_rows"] is None for r in cfg["levels"].values()):
      out.append("\nmean batch rows / ms per call: n/a (no stage batcher stats in this "
                 "process: the workers' are theirs).")
    out.append("")
  out.append("decode ms/call: stage batcher compute time per decode call in the timed window, "
             "summed over the stages of this process.\n")
  if results.get("parity"):
    out.append("### Same numbers\n")
    out += [f"- {k}: {v}" for k, v in results["parity"].items()]
    out.append("")
  out.append("### Goals\n")
  out.append("| goal | value | threshold | verdict |")
  out.append("|---|---:|---|---|")
  for g in results["goals"]:
    verdict = {True: "PASS", False: "**MISS**", None: "n/a"}[g["met"]]
    out.append(f"| {g['name']} | {_f(g['value'], 2)} | {g['op']} {g['threshold']} | {verdict} |")
  return "\n".join(out) + "\n"


__all__ = ["bench_levels", "evaluate", "run_round", "stage_stats", "stream_prompts",
           "to_markdown"]
