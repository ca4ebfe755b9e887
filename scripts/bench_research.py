r"""What looking inside costs: decode tok/s plain, with ds4 steering on every layer, capturing
one point at one layer, and capturing router_ids on every layer (issue 22 item 8).

    python scripts/bench_research.py --gguf=bench --decode=32 --rounds=3

One process (`build.local_backend`, compiled first). Each round runs every mode in turn on a
fresh session (the prompt's prefill, then `--decode` greedy tokens fed back) and times the
decode steps only; the table gives the median over rounds and the ratio to plain.
"""

import statistics
import sys
import time

import numpy as np
from absl import flags

from ds4jax import cli

_GGUF = flags.DEFINE_string("gguf", "bench", "GGUF path or built-in name (docs, tiny, bench).")
_DECODE = flags.DEFINE_integer("decode", 32, "Decode tokens per run.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds (every mode once per round).",
                               lower_bound=1)
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.", lower_bound=1)
_CACHE = flags.DEFINE_string("cache_dir", None, "The compilation cache directory.")


def _modes(cfg):
  from ds4jax.runtime.capture import CaptureSpec
  from ds4jax.runtime.edits import Edit, Interventions
  dirs = np.random.default_rng(0).standard_normal((cfg.n_layers, cfg.d_model))
  dirs = (dirs / np.linalg.norm(dirs, axis=1, keepdims=True)).astype(np.float32)
  steer = Interventions([Edit("project", "ffn_out", il, dirs[il], 1.0)
                         for il in range(cfg.n_layers)])
  mid = cfg.n_layers // 2
  return {
      "plain": {},
      "steering, every layer's ffn_out": {"edits": steer},
      f"capture ffn_out.{mid}": {"capture": CaptureSpec.parse("ffn_out", layers=str(mid))},
      "capture router_ids, every layer": {"capture": CaptureSpec.parse("router_ids")},
  }


def _decode_s(backend, prompt, n, kw) -> float:
  from ds4jax.runtime.sampling import SamplingParams
  sid, toks, spent = backend.new_session(), list(prompt), 0.0
  try:
    for k in range(n + 1):
      t0 = time.perf_counter()
      res = backend.step(sid, toks, SamplingParams(), k, **kw)
      if k:  # step 0 is the prefill
        spent += time.perf_counter() - t0
      toks.append(res.token)
  finally:
    backend.close_session(sid)
  return spent


def main(argv):
  path = cli.begin(argv, _GGUF.value, _CACHE.value)
  from ds4jax import build
  n = _DECODE.value
  backend = build.local_backend(path, ctx_size=_PROMPT.value + n + 8, prefill_chunk=64,
                                max_sessions=1)
  try:
    modes = _modes(backend.cfg)
    prompt = np.random.default_rng(1).integers(2, backend.cfg.vocab_size,
                                               _PROMPT.value).tolist()
    for kw in modes.values():  # compiles each mode's programs outside the timing
      _decode_s(backend, prompt, 2, kw)
    times = {m: [] for m in modes}
    for _ in range(_ROUNDS.value):
      for m, kw in modes.items():
        times[m].append(_decode_s(backend, prompt, n, kw))
  finally:
    backend.close()
  plain = statistics.median(times["plain"])
  print(f"{path}: {n} decode tokens after a {_PROMPT.value}-token prompt, median of "
        f"{_ROUNDS.value} interleaved rounds\n")
  print("| mode | decode tok/s | cost vs plain |\n|---|---:|---:|")
  for m, ts in times.items():
    t = statistics.median(ts)
    print(f"| {m} | {n / t:.1f} | {100 * (t / plain - 1):+.1f} % |")


if __name__ == "__main__":
  cli.run(main)
  sys.exit(0)
