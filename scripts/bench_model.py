"""Prefill and decode throughput of ds4jax next to HF transformers on the same GGUF.

    python scripts/bench_model.py                      # the `bench` preset fixture
    python scripts/bench_model.py --gguf=model.gguf --prompt=512 --decode=64 --dtype=bfloat16
"""

from absl import app, flags, logging

_GGUF = flags.DEFINE_string("gguf", None, "ds4 GGUF; default: the cached `bench` preset fixture")
_PROMPT = flags.DEFINE_integer("prompt", 512, "prompt tokens (one-shot prefill)")
_DECODE = flags.DEFINE_integer("decode", 64, "single-token decode steps")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "ds4jax compute dtype")
_HF = flags.DEFINE_bool("hf", True, "also run HF transformers on the same weights")
_HF_THREADS = flags.DEFINE_list(
    "hf_threads", ["1"], "torch thread counts to run HF with (on a shared 2-core CPU torch's "
    "intra-op threads thrash: 1 thread is ~8x faster there)")


def main(argv):
  del argv
  import sys
  import jax
  import numpy as np
  from ds4jax.model import bench
  from ds4jax.testing import tiny
  if _PROMPT.value < 1 or _DECODE.value < 1:
    print("error: --prompt and --decode must be >= 1", file=sys.stderr)
    sys.exit(2)
  logging.info("jax %s on %s", jax.__version__, jax.devices())
  path = _GGUF.value or tiny.tiny_gguf_path("bench")
  try:
    ours = bench.bench_ds4jax(path, n_prompt=_PROMPT.value, n_decode=_DECODE.value,
                              dtype=_DTYPE.value)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  rows = [ours]
  if _HF.value:
    for th in _HF_THREADS.value:
      r = bench.bench_hf(path, ours["ids"], n_prompt=_PROMPT.value, n_decode=_DECODE.value,
                         threads=int(th))
      r["impl"] = f"hf/{th}thr"
      rows.append(r)
  print(f"{'impl':9s} {'dtype':9s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'compile s':>10s}")
  for r in rows:
    print(f"{r['impl']:9s} {r['dtype']:9s} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
          f"{r['compile_s']:10.1f}")
  if _HF.value:
    d = np.abs(rows[0]["logits"] - rows[1]["logits"])
    print(f"prefill logits ds4jax vs HF: max |d| {d.max():.3g}")


if __name__ == "__main__":
  app.run(main)
