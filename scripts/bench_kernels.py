"""The packed-product candidates on the real DeepSeek V4 Flash shapes (issue 21 item 1):
ms per call and packed GB/s for M = 1 and 8 rows, next to the rate XLA reads a 2 GiB array.

    python scripts/bench_kernels.py                    # every type, M = 1, 8
    python scripts/bench_kernels.py --types=Q8_0,F16 --rows=1,8 --rounds=5
    python scripts/bench_kernels.py --experts          # + expert_matmul, B = 1 and 8 rows

Candidates: ds4jax/bench/kernels.py. Rounds alternate the candidates, so on a loaded machine
they see the same load; the load average is printed.
"""

import sys

from absl import app, flags

_TYPES = flags.DEFINE_list("types", None, "GGML types to time (default: all of SHAPES)")
_ROWS = flags.DEFINE_list("rows", ["1", "8"], "rows of x (M)")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "alternating rounds (the median is printed)")
_EXPERTS = flags.DEFINE_bool("experts", False, "also time expert_matmul on [256, 2048, 4096]")
_SKIP = flags.DEFINE_list("skip", [], "candidates to leave out (e.g. xla-dot)")


def main(argv):
  del argv
  from ds4jax.bench import kernels as kb
  shapes = kb.SHAPES
  if _TYPES.value:
    names = {s.upper() for s in _TYPES.value}
    shapes = [s for s in shapes if s[0].name in names]
    if not shapes:
      print(f"error: no shapes for --types={_TYPES.value}", file=sys.stderr)
      sys.exit(2)
  rows = [int(r) for r in _ROWS.value]
  print(f"load average {kb.load()}; XLA reads a 2 GiB array at {kb.read_gbs():.1f} GB/s")
  print(f"{'type':8s} {'N x K':>13s} {'what':16s} {'M':>2s} {'impl':10s} {'ms':>8s} "
        f"{'GB/s':>6s}")
  for r in kb.bench_matmul(shapes, rows, rounds=_ROUNDS.value, skip=_SKIP.value):
    print(f"{r['qtype']:8s} {r['n']:>6d}x{r['k']:<6d} {r['what']:16s} {r['m']:2d} "
          f"{r['impl']:10s} {r['ms']:8.3f} {r['gbs']:6.1f}", flush=True)
  if _EXPERTS.value:
    print("\nexpert_matmul, IQ2_XXS [256, 2048, 4096], k = 6 distinct experts per row")
    for r in kb.bench_experts(rounds=_ROUNDS.value, skip=_SKIP.value):
      print(f"B={r['b']:<2d} {r['impl']:10s} {r['ms']:8.3f} ms {r['gbs']:6.1f} GB/s")
  print(f"load average after {kb.load()}")


if __name__ == "__main__":
  app.run(main)
