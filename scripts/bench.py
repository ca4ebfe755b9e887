r"""Benchmarks ds4jax in one run on this machine: single process, split over 1..N local
workers (real processes on loopback), the per-hop cost against raw TCP, peak memory, and HF
transformers eager on the same weights. Writes JSON and markdown tables.

    python scripts/bench.py --preset=bench --prompt_lens=512,4096 --decode_tokens=32 \
        --workers=1,2,3 --out_json=bench.json --out_md=bench.md
    # smallest run (CI smoke test):
    python scripts/bench.py --preset=tiny --prompt_lens=16 --decode_tokens=2 --workers=1 \
        --chunk=16 --skip_hf --out_json=/tmp/b.json
    # the concurrency study (issue 13) instead: 1..16 concurrent streams, one process and
    # split over 1 and 3 workers (ds4jax/bench/concurrency.py)
    python scripts/bench.py --preset=bench --concurrency=1,4,8,16 --stream_prompt_len=64 \
        --stream_decode_tokens=32 --stream_workers=1,3 --out_md=conc.md
    # first-use costs (issue 20 item 8): generate.py against the model's own step, the
    # server's first burst against its later ones, restarts; this tree and another (A/B)
    python scripts/bench.py --preset=bench --first_use --trees=.,/tmp/base
    # A/B: every configuration runs once per repository root, in turn (--concurrency too)
    python scripts/bench.py --preset=bench --concurrency=1,8 --stream_workers=1 \
        --trees=.,/tmp/base

Every configuration runs in a fresh process (ds4jax/bench/child.py), one after the other.
"""

import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags

from ds4jax import cli
from ds4jax.bench import report
from ds4jax.bench.measure import env_info

_PRESET = flags.DEFINE_enum("preset", "bench", ["tiny", "bench"], "Built-in test model.")
_GGUF = flags.DEFINE_string("gguf", None, "A GGUF path instead of --preset.")
_LENS = flags.DEFINE_list("prompt_lens", ["512", "4096"], "Prompt lengths to prefill.")
_DECODE = flags.DEFINE_integer("decode_tokens", 32, "Greedy decode steps (after the first "
                               "prompt length).", lower_bound=1)
_WORKERS = flags.DEFINE_list("workers", ["1", "2", "3"], "Worker counts for the split runs.")
_SKIP_HF = flags.DEFINE_boolean("skip_hf", False, "Do not run HF transformers.")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Write the results here (JSON).")
_OUT_MD = flags.DEFINE_string("out_md", None, "Write the markdown tables here.")
_CHUNK = flags.DEFINE_integer("chunk", 256, "Prefill chunk (a power of two).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Prompt token seed.")
_FLOOR_ROUNDS = flags.DEFINE_integer("floor_rounds", 200, "Raw TCP round trips per size.",
                                     lower_bound=1)
_COLD = flags.DEFINE_boolean("cold_compile", False, "Use an empty XLA cache (compile times "
                             "from scratch) instead of the shared persistent one.")
_CACHE = flags.DEFINE_string("cache_dir", None, "ds4jax cache dir (test models, XLA cache).")
_PAIRED = flags.DEFINE_integer("paired_rounds", 4, "Split runs also decode against a "
                               "one-process reference loaded in the coordinator's process, in "
                               "this many alternating rounds (same load for both; the loaded "
                               "reference slows the split ~10%, see docs); 0: off.",
                               lower_bound=0)
_CONC = flags.DEFINE_list("concurrency", None, "Run the concurrency study instead: these "
                         "numbers of concurrent streams (e.g. 1,4,8,16).")
_S_PROMPT = flags.DEFINE_integer("stream_prompt_len", 64, "--concurrency: prompt tokens per "
                                 "stream (random, its own per stream).", lower_bound=1)
_S_DECODE = flags.DEFINE_integer("stream_decode_tokens", 32, "--concurrency: greedy decode "
                                 "tokens per stream.", lower_bound=2)
_S_WORKERS = flags.DEFINE_list("stream_workers", ["1", "3"], "--concurrency: worker counts for "
                               "the split runs (empty: one process only).")
_S_WARM = flags.DEFINE_integer("stream_warm_tokens", 4, "--concurrency: decode tokens per "
                               "stream of each level's untimed warm-up round.", lower_bound=1)
_FIRST = flags.DEFINE_boolean("first_use", False, "Measure first-use costs instead "
                              "(ds4jax/bench/first_use.py): generate.py against the model's "
                              "step, the server's bursts, its time to ready.")
_TREES = flags.DEFINE_list("trees", ["."], "Repository roots to measure, each with its own "
                           "code (A/B against another checkout): every configuration of "
                           "--first_use and --concurrency runs once per tree, in turn.")
_ROUNDS = flags.DEFINE_integer("first_use_rounds", 3, "--first_use: alternating rounds of "
                               "generate.py and the model's step.", lower_bound=1)
_CHILD_TIMEOUT = flags.DEFINE_integer("child_timeout", 3600, "Seconds per configuration.")


def _ints(values, name):
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--{name} must be comma-separated integers, got {values}") from None
  if not out or min(out) < 1:
    raise ValueError(f"--{name} must be positive integers, got {values}")
  return out


def _cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return "unknown"


def _trees() -> list[tuple[str, str]]:
  """(label, absolute path) of each --trees entry (label: the directory's name)."""
  return [(os.path.basename(os.path.abspath(t)), os.path.abspath(t)) for t in _TREES.value]


def _run_child(spec: dict, workdir: pathlib.Path, name: str, tree: str | None = None) -> dict:
  spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.json"
  spec_path.write_text(json.dumps(spec))
  print(f"bench: running {name} ...", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  env = None if tree is None else dict(os.environ, PYTHONPATH=tree)
  proc = subprocess.run([sys.executable, "-m", "ds4jax.bench.child", str(spec_path),
                         str(out_path)], stdin=subprocess.DEVNULL, stdout=sys.stderr,
                        timeout=_CHILD_TIMEOUT.value, env=env, cwd=tree)
  if proc.returncode != 0 or not out_path.exists():
    raise RuntimeError(f"benchmark configuration {name} failed (exit {proc.returncode})")
  print(f"bench: {name} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
  return json.loads(out_path.read_text())


def _logits(workdir: pathlib.Path, name: str, n: int):
  p = workdir / f"{name}.logits{n}.npy"
  return np.load(p) if p.exists() else None


def _machine() -> dict:
  return {"cpu": _cpu_model(), "cpus": os.cpu_count(), "loadavg_before": env_info()["loadavg"]}


def _write(results: dict, md: str) -> None:
  if _OUT_JSON.value:
    pathlib.Path(_OUT_JSON.value).write_text(json.dumps(results, indent=1))
  if _OUT_MD.value:
    pathlib.Path(_OUT_MD.value).write_text(md)
  print(md)


def concurrency_main() -> None:
  """The concurrency study: one process, then each split, each in its own child process."""
  from ds4jax.bench import concurrency
  levels = sorted(set(_ints(_CONC.value, "concurrency")))
  workers = _ints(_S_WORKERS.value, "stream_workers") if _S_WORKERS.value else []
  if _CHUNK.value & (_CHUNK.value - 1):
    raise ValueError(f"--chunk must be a power of two, got {_CHUNK.value}")
  gguf = cli.resolve_gguf(_GGUF.value or _PRESET.value, _CACHE.value)
  from ds4jax.gguf.reader import read_config
  cfg = read_config(gguf)
  if max(levels) > 16:
    raise ValueError(f"--concurrency: at most 16 streams (the largest batch bucket), got "
                     f"{max(levels)}")
  ctx = _S_PROMPT.value + max(_S_DECODE.value, _S_WARM.value) + 8
  if ctx > cfg.context_length:
    raise ValueError(f"prompt + decode ({ctx} tokens) exceeds the model context "
                     f"{cfg.context_length}")
  if workers and max(workers) + 1 > cfg.n_layers:
    raise ValueError(f"--stream_workers={max(workers)} needs {max(workers) + 1} stages, the "
                     f"model has {cfg.n_layers} layers")
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="ds4jax-bench-"))
  base = {"mode": "concurrency", "gguf": gguf, "ctx": ctx, "levels": levels,
          "prompt_len": _S_PROMPT.value, "decode_tokens": _S_DECODE.value,
          "warm_tokens": _S_WARM.value, "seed": _SEED.value, "chunk": _CHUNK.value,
          "cache_dir": str(workdir / "cache") if _COLD.value else _CACHE.value}
  results = {
      "command": " ".join(["python", "scripts/bench.py"] + sys.argv[1:]),
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": _machine(),
      "model": {"preset": os.path.basename(_GGUF.value) if _GGUF.value else _PRESET.value,
                "gguf": gguf, "n_layers": cfg.n_layers},
      "settings": {"levels": levels, "prompt_len": _S_PROMPT.value,
                   "decode_tokens": _S_DECODE.value, "warm_tokens": _S_WARM.value,
                   "workers": workers, "chunk": _CHUNK.value, "ctx": ctx, "seed": _SEED.value},
      "configs": {},
  }
  try:
    runs = [("single", "single process", ["all"])]
    runs += [(f"split{n}", f"split, {n} worker(s)", report.split_ranges(cfg.n_layers, n + 1))
             for n in workers]
    trees = _trees()
    for name, label, ranges in runs:
      for tree_label, tree in trees:
        key = name if len(trees) == 1 else f"{name}@{tree_label}"
        spec = dict(base, ranges=ranges, log_dir=str(workdir / f"logs-{key}"))
        res = _run_child(spec, workdir, f"concurrency-{key}", tree)
        res["label"] = label if len(trees) == 1 else f"{label}, tree {tree_label}"
        results["configs"][key] = res
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  results["machine"]["loadavg_after"] = env_info()["loadavg"]
  concurrency.evaluate(results)
  _write(results, concurrency.to_markdown(results))


def first_use_main() -> None:
  """First-use costs of each tree in --trees, in one run (first_use.run)."""
  from ds4jax.bench import first_use
  from ds4jax.gguf.reader import read_config
  gguf = os.path.abspath(cli.resolve_gguf(_GGUF.value or _PRESET.value, _CACHE.value))
  trees = [tree for _, tree in _trees()]
  with tempfile.TemporaryDirectory(prefix="ds4jax-bench-") as work:
    res = first_use.run(trees, gguf, read_config(gguf).vocab_size, work,
                        rounds=_ROUNDS.value, decode_tokens=_DECODE.value)
  results = {"command": " ".join(["python", "scripts/bench.py"] + sys.argv[1:]),
             "machine": _machine(), "model": gguf, "trees": res}
  results["machine"]["loadavg_after"] = env_info()["loadavg"]
  _write(results, first_use.to_markdown(res, {tree: label for label, tree in _trees()}))


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _FIRST.value:
    return first_use_main()
  if _CONC.value:
    return concurrency_main()
  lens = _ints(_LENS.value, "prompt_lens")
  workers = _ints(_WORKERS.value, "workers")
  if _CHUNK.value & (_CHUNK.value - 1):
    raise ValueError(f"--chunk must be a power of two, got {_CHUNK.value}")
  gguf = cli.resolve_gguf(_GGUF.value or _PRESET.value, _CACHE.value)
  from ds4jax.gguf.reader import read_config
  cfg = read_config(gguf)
  ctx = max(lens) + _DECODE.value + 8
  if ctx > cfg.context_length:
    raise ValueError(f"prompt + decode ({ctx} tokens) exceeds the model context "
                     f"{cfg.context_length}")
  if max(workers) + 1 > cfg.n_layers:
    raise ValueError(f"--workers={max(workers)} needs {max(workers) + 1} stages, the model has "
                     f"{cfg.n_layers} layers")
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="ds4jax-bench-"))
  cache_dir = str(workdir / "cache") if _COLD.value else _CACHE.value
  base = {"gguf": gguf, "ctx": ctx, "prompt_lens": lens, "decode_tokens": _DECODE.value,
          "seed": _SEED.value, "chunk": _CHUNK.value, "cache_dir": cache_dir,
          "floor_rounds": _FLOOR_ROUNDS.value, "paired_rounds": _PAIRED.value}
  results = {
      "command": " ".join(["python", "scripts/bench.py"] + sys.argv[1:]),
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": _machine(),
      "model": {"preset": os.path.basename(_GGUF.value) if _GGUF.value else _PRESET.value, "gguf": gguf, "n_layers": cfg.n_layers,
                "d_model": cfg.d_model, "n_hc": cfg.n_hc, "vocab_size": cfg.vocab_size,
                "activation_row_bytes": 4 * cfg.n_hc * cfg.d_model},
      "settings": {"prompt_lens": lens, "decode_tokens": _DECODE.value, "workers": workers,
                   "chunk": _CHUNK.value, "ctx": ctx, "cold_compile": _COLD.value,
                   "seed": _SEED.value, "paired_rounds": _PAIRED.value},
  }
  try:
    results["single"] = _run_child(dict(base, mode="single"), workdir, "single")
    results["split"] = {}
    for n in workers:
      ranges = report.split_ranges(cfg.n_layers, n + 1)
      spec = dict(base, mode="split", ranges=ranges, log_dir=str(workdir / f"logs-{n}"))
      results["split"][str(n)] = _run_child(spec, workdir, f"split{n}")
    from ds4jax.bench.hf import hf_available
    if _SKIP_HF.value:
      results["hf"] = {"skipped": "--skip_hf"}
    elif not hf_available():
      results["hf"] = {"skipped": "transformers with DeepseekV4ForCausalLM is not installed"}
    else:
      results["hf"] = _run_child(dict(base, mode="hf"), workdir, "hf")
    parity = {}
    single_toks = results["single"]["decode"]["tokens_out"]
    for n, sp in results["split"].items():
      parity[f"split {n} worker(s): greedy decode tokens identical to single process"] = (
          sp["decode"]["tokens_out"] == single_toks)
      if "paired" in sp:
        parity[f"split {n} worker(s), paired rounds: tokens identical to the reference"] = (
            sp["paired"]["same_tokens"])
    for L in lens:
      a, b = _logits(workdir, "single", L), _logits(workdir, "hf", L)
      if a is not None and b is not None:
        parity[f"HF vs ds4jax last logits, {L}-token prompt"] = (
            f"max |diff| {float(np.abs(a - b).max()):.2e}, same argmax: "
            f"{bool(a.argmax() == b.argmax())}")
    results["parity"] = parity
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  results["machine"]["loadavg_after"] = env_info()["loadavg"]
  report.evaluate(results)
  _write(results, report.to_markdown(results))


if __name__ == "__main__":
  cli.run(main)
