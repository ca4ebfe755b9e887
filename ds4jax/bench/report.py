"""Benchmark results -> ratios, the issue-7 targets, and markdown tables.

`results` is what scripts/bench.py collects: {"model", "settings", "single", "split": {N: ...},
"hf", ...}. `evaluate` adds ratios and `targets` (each with value, threshold and met); `to_markdown`
renders the tables that docs/benchmarks.md carries.
"""

from __future__ import annotations

from typing import Any


def split_ranges(n_layers: int, n_stages: int) -> list[str]:
  """Even contiguous ranges for n_stages (the first embeds, the last owns the head)."""
  if not 1 <= n_stages <= n_layers:
    raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages")
  base, extra = divmod(n_layers, n_stages)
  out, start = [], 0
  for k in range(n_stages):
    end = start + base + (1 if k < extra else 0) - 1
    out.append(f"{start}:{'output' if k == n_stages - 1 else end}")
    start = end + 1
  return out


def _target(name: str, value, threshold, op: str, detail: str = "") -> dict[str, Any]:
  if value is None:
    met = None
  else:
    met = bool(value >= threshold) if op == ">=" else bool(value <= threshold)
  return {"name": name, "value": value, "threshold": threshold, "op": op, "met": met,
          "detail": detail}


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
  """Adds split/single ratios, HF ratios and the targets list to `results` (in place)."""
  single = results["single"]
  row = results["model"]["activation_row_bytes"]
  lens = [str(n) for n in results["settings"]["prompt_lens"]]
  targets = []
  for n, sp in sorted(results.get("split", {}).items(), key=lambda kv: int(kv[0])):
    sp["ratio_decode"] = sp["decode"]["tok_s"] / single["decode"]["tok_s"]
    sp["ratio_prefill"] = {L: sp["prefill"][L]["tok_s"] / single["prefill"][L]["tok_s"]
                           for L in lens}
    hops = sp.get("hops", [])
    for h in hops:
      h["added_over_floor"] = h["added_s"] / h["tcp_floor_rtt_s"] if h["tcp_floor_rtt_s"] else None
    # Per decode token the coordinator relays: n activation rows go out, n - 1 come back.
    rows = 2 * len(hops) - 1
    sp["wire_bytes_per_token"] = sum(h["bytes_in"] + h["bytes_out"] for h in hops)
    sp["wire_overhead_bytes_per_row"] = ((sp["wire_bytes_per_token"] - rows * row) / rows
                                         if rows > 0 else None)
    extra_ms = 1e3 * (1 / sp["decode"]["tok_s"] - 1 / single["decode"]["tok_s"])
    sp["added_ms_per_hop_end_to_end"] = extra_ms / max(len(hops), 1)
  sp_by = results.get("split", {})
  for n, thr in (("1", 0.9), ("3", 0.85)):
    if n not in sp_by:
      continue
    sp = sp_by[n]
    targets.append(_target(f"split decode, {n} worker(s) / single (separate runs)",
                           sp["ratio_decode"], thr, ">="))
    if "paired" in sp:
      targets.append(_target(f"split decode, {n} worker(s) / single (paired rounds, same "
                             "process and time)", sp["paired"]["ratio_decode"], thr, ">="))
  worst = [(h["added_over_floor"], n, h["layers"]) for n, sp in sp_by.items()
           for h in sp.get("hops", []) if h.get("added_over_floor") is not None]
  if worst:
    v, n, layers = max(worst)
    targets.append(_target("added per-hop latency / raw TCP round trip (worst hop)", v, 2.0, "<=",
                           f"{n} worker(s), hop {layers}"))
  if "1" in sp_by:
    b = sp_by["1"]["wire_bytes_per_token"]
    targets.append(_target("wire bytes per decode token (1 worker) - activation row", b - row,
                           256, "<=", f"{b} B total, row {row} B"))
  hf = results.get("hf") or {}
  if "decode" in hf:
    results["hf_ratio_decode"] = single["decode"]["tok_s"] / hf["decode"]["tok_s"]
    targets.append(_target("single decode / HF eager decode", results["hf_ratio_decode"], 5.0,
                           ">="))
    results["hf_ratio_prefill"] = {L: single["prefill"][L]["tok_s"] / hf["prefill"][L]["tok_s"]
                                   for L in lens if L in hf.get("prefill", {})}
    for L, r in results["hf_ratio_prefill"].items():
      targets.append(_target(f"single prefill / HF eager prefill ({L} tokens)", r, 2.0, ">="))
  half = _half_worker(results)
  if half is not None:
    targets.append(_target("peak RSS: worker with half the layers / single process", half[0],
                           0.6, "<=", half[1]))
  results["targets"] = targets
  return results


def _half_worker(results):
  sp = results.get("split", {}).get("1")
  single_mb = results["single"].get("memory", {}).get("process_peak_rss_mb")
  if not sp or not single_mb or not sp.get("memory", {}).get("workers"):
    return None
  w = sp["memory"]["workers"][0]
  if not w.get("peak_rss_mb"):
    return None
  return w["peak_rss_mb"] / single_mb, f"worker {w['layers']}: {w['peak_rss_mb']:.0f} MB vs " \
                                        f"{single_mb:.0f} MB"


# ------------------------------------------------------------------------------- markdown
def _f(x, nd=1):
  return "n/a" if x is None else f"{x:.{nd}f}"


def to_markdown(results: dict[str, Any]) -> str:
  lens = [str(n) for n in results["settings"]["prompt_lens"]]
  single = results["single"]
  out = []
  m, s = results["model"], results["settings"]
  out.append(f"Model `{m['preset']}`: {m['n_layers']} layers, d_model {m['d_model']}, "
             f"{m['n_hc']} HC copies, vocab {m['vocab_size']}; activation row "
             f"{m['activation_row_bytes']} B (f32). Decode: {s['decode_tokens']} greedy tokens "
             f"after the {lens[0]}-token prompt. Machine: {results['machine']['cpu']}, "
             f"{results['machine']['cpus']} CPUs, load average before/after "
             f"{results['machine']['loadavg_before']} / {results['machine']['loadavg_after']}.")
  out.append("")
  out.append("### Throughput\n")
  hdr = (["configuration", "stages"] + [f"prefill {L} tok/s" for L in lens] +
         ["decode tok/s", "decode ms/token", "prefill ratio", "decode ratio",
          "decode ratio (paired)", "compile s", "load s"])
  out.append("| " + " | ".join(hdr) + " |")
  out.append("|" + "---|" * len(hdr))

  def row(name, r, ratio_p, ratio_d, paired):
    cells = [name, " ".join(f"`{x}`" for x in r.get("stages", []))]
    cells += [_f(r["prefill"][L]["tok_s"]) for L in lens]
    cells += [_f(r["decode"]["tok_s"], 2), _f(r["decode"]["ms_per_token_median"]), ratio_p,
              ratio_d, paired, _f(r["warmup"]["compile_s"]), _f(r.get("load_s"))]
    out.append("| " + " | ".join(cells) + " |")

  row("single process", single, "1", "1", "1")
  for n, sp in sorted(results.get("split", {}).items(), key=lambda kv: int(kv[0])):
    rp = " / ".join(_f(sp["ratio_prefill"][L], 2) for L in lens)
    pr = sp.get("paired")
    paired = (f"{pr['ratio_decode']:.2f} ({pr['split_ms_per_token']:.1f} vs "
              f"{pr['single_ms_per_token']:.1f} ms)" if pr else "n/a")
    row(f"split, {n} worker(s)", sp, rp, _f(sp["ratio_decode"], 2), paired)
  hf = results.get("hf") or {}
  if "decode" in hf:
    cells = ["HF transformers eager (torch CPU f32)", "all"]
    cells += [_f(hf["prefill"][L]["tok_s"]) if L in hf["prefill"] else "not run" for L in lens]
    cells += [_f(hf["decode"]["tok_s"], 2), _f(hf["decode"]["ms_per_token_median"]),
              " / ".join(_f(1 / results["hf_ratio_prefill"][L], 3)
                         for L in results["hf_ratio_prefill"]),
              _f(1 / results["hf_ratio_decode"], 3), "-", "-", _f(hf.get("load_s"))]
    out.append("| " + " | ".join(cells) + " |")
  elif hf.get("skipped"):
    out.append(f"\nHF transformers: not run ({hf['skipped']}).")

  out.append("\n### Per decode token, per hop (medians; ms unless noted)\n")
  hdr = ["workers", "hop", "compute", "serialize", "wire", "queue", "round trip",
         "added (RTT - compute)", "raw TCP RTT", "added / TCP", "raw TCP RTT after idle gap",
         "bytes to hop", "bytes back"]
  out.append("| " + " | ".join(hdr) + " |")
  out.append("|" + "---|" * len(hdr))
  for n, sp in sorted(results.get("split", {}).items(), key=lambda kv: int(kv[0])):
    for h in sp.get("hops", []):
      ser = _f(1e3 * h["serialize_s"], 3) + ("" if h["worker_serialize_reported"] else "*")
      out.append("| " + " | ".join([
          n, f"`{h['layers']}`", _f(1e3 * h["compute_s"], 2), ser, _f(1e3 * h["wire_s"], 3),
          _f(1e3 * h["queue_s"], 3), _f(1e3 * h["rtt_s"], 2), _f(1e3 * h["added_s"], 3),
          _f(1e3 * h["tcp_floor_rtt_s"], 3), _f(h.get("added_over_floor"), 1),
          _f(1e3 * h["tcp_floor_after_gap_s"], 3) if "tcp_floor_after_gap_s" in h else "n/a",
          str(h["bytes_in"]), str(h["bytes_out"])]) + " |")
    out.append(f"| {n} | coordinator `{sp['stages'][0]}` | "
               f"{_f(1e3 * sp['coordinator_compute_s'], 2)} |" + " |" * (len(hdr) - 3))

  out.append("\n### Peak memory (VmHWM)\n")
  out.append("| process | layers | peak RSS MB | / single process |")
  out.append("|---|---|---|---|")
  single_mb = single["memory"]["process_peak_rss_mb"]
  out.append(f"| single process | `all` | {_f(single_mb, 0)} | 1 |")
  for n, sp in sorted(results.get("split", {}).items(), key=lambda kv: int(kv[0])):
    mem = sp["memory"]
    c = mem["coordinator_peak_rss_mb"]
    out.append(f"| coordinator ({n} worker(s)) | `{sp['stages'][0]}` | {_f(c, 0)} | "
               f"{_f(c / single_mb, 2)} |")
    for w in mem["workers"]:
      out.append(f"| worker ({n} worker(s)) | `{w['layers']}` | {_f(w['peak_rss_mb'], 0)} | "
                 f"{_f(w['peak_rss_mb'] / single_mb if w['peak_rss_mb'] else None, 2)} |")
  if "memory" in hf:
    out.append(f"| HF transformers | `all` | {_f(hf['memory']['process_peak_rss_mb'], 0)} | "
               f"{_f(hf['memory']['process_peak_rss_mb'] / single_mb, 2)} |")

  par = results.get("parity", {})
  if par:
    out.append("\n### Same numbers\n")
    for k, v in par.items():
      out.append(f"- {k}: {v}")

  out.append("\n### Targets\n")
  out.append("| target | value | threshold | met |")
  out.append("|---|---|---|---|")
  for t in results["targets"]:
    met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
    det = f" ({t['detail']})" if t["detail"] else ""
    out.append(f"| {t['name']}{det} | {_f(t['value'], 2)} | {t['op']} {t['threshold']} | {met} |")
  return "\n".join(out) + "\n"
