"""What one batched decode call costs against its rows, on one stage runner, no threads.

    python -m ds4jax.bench.batch_cost --preset=bench --prompt_len=64 --rounds=8 [--weights=dequantized]

For B = 1, 2, 4, 8, 16 sessions whose slots each hold a `prompt_len`-token prefix, times
`StageRunner.forward_batch` with one decode token per row (all B rows in one call, as a
perfectly coalesced batcher would issue it), next to the single-session `forward` (the path
the split's stages ran before issue 13). Rounds alternate over the sizes so every size sees
the same load. Answers: does an 8-row call cost ~1x or ~8x a 1-row call, and does the pooled
path cost more than `forward` at one row?
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from absl import flags

_PRESET = flags.DEFINE_string("preset", "bench", "Test model preset (or a GGUF path).")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Tokens each slot holds before decoding.")
_ROUNDS = flags.DEFINE_integer("rounds", 8, "Timed calls per size (alternating sizes).")
_SIZES = flags.DEFINE_list("sizes", ["1", "2", "4", "8", "16"], "Batch rows to time.")
_WEIGHTS = flags.DEFINE_enum("weights", "packed", ["packed", "dequantized"], "GGUF blocks "
                             "dequantised in the step (packed) or at load.")
_CACHE = flags.DEFINE_string("cache_dir", None, "ds4jax cache dir.")


def main(argv) -> None:
  del argv
  import jax
  from ds4jax import cli
  from ds4jax import build
  cli.enable_compilation_cache(_CACHE.value)
  sizes = sorted(int(s) for s in _SIZES.value)
  gguf = cli.resolve_gguf(_PRESET.value, _CACHE.value)
  n = _PROMPT.value
  # Compiled at load: the decode batches up to max(sizes) rows and the n-token chunk.
  runner = build.load_runner(gguf, "all", ctx_size=n + _ROUNDS.value + 8, prefill_chunk=n,
                             max_sessions=max(sizes), weights=_WEIGHTS.value)
  rng = np.random.default_rng(0)
  v = runner.cfg.vocab_size
  pool = runner.init_pool(max(sizes))
  for s in range(max(sizes)):  # every slot holds an n-token prefix
    _, pool = runner.forward_batch(pool, [s], rng.integers(2, v, (1, n)), None, [n])
  state = runner.init_state()
  _, state = runner.forward(state, rng.integers(2, v, n).astype(np.int32), None, 0)
  jax.block_until_ready(pool)
  times: dict[str, list[float]] = {"forward": []} | {str(b): [] for b in sizes}
  for r in range(_ROUNDS.value + 1):  # round 0 untimed (first-call effects)
    t0 = time.perf_counter()
    out, state = runner.forward(state, rng.integers(2, v, 1).astype(np.int32), None, n + r)
    np.asarray(out)
    if r:
      times["forward"].append(time.perf_counter() - t0)
    for b in sizes:
      # Each size advances its own slots' positions once per round; row positions differ
      # by at most a round, so attention reads the same ~n tokens for every size.
      slots = list(range(b))
      t0 = time.perf_counter()
      out, pool = runner.forward_batch(pool, slots, rng.integers(2, v, (b, 1)), None,
                                       [1] * b)
      np.asarray(out)
      if r:
        times[str(b)].append(time.perf_counter() - t0)
  med = {k: 1e3 * float(np.median(t)) for k, t in times.items()}
  one = med[str(sizes[0])]
  print("| rows | ms per call (median) | / 1-row call | ms per row |")
  print("|---:|---:|---:|---:|")
  print(f"| forward (1 session) | {med['forward']:.1f} | {med['forward'] / one:.2f} | "
        f"{med['forward']:.1f} |")
  for b in sizes:
    print(f"| {b} | {med[str(b)]:.1f} | {med[str(b)] / one:.2f} | {med[str(b)] / b:.1f} |")
  json.dump(med, sys.stderr)
  print(file=sys.stderr)


if __name__ == "__main__":
  from ds4jax import cli
  cli.run(main)
