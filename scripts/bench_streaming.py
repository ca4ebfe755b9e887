r"""Expert streaming speed (issue 23 item 1): decode tok/s and the expert cache's hit rate at
cache sizes from the minimum (one token's experts) to the whole slice, against the resident
run, in one process.

    python scripts/bench_streaming.py --gguf=bench
    python scripts/bench_streaming.py --gguf=/tmp/flash4.gguf --caches=6,64,1GB,all

For each cache (and `resident`): the backend loads (compile-first), one greedy generation
warms the cache, then a second one with another prompt is measured: its decode tok/s, the
hit rate and MiB read from the file per token over that generation (the steady state a long
session sees), the live entries and their bytes. Every row's tokens must equal the resident
run's (exit 1 otherwise).
"""

import gc
import json
import sys

from absl import flags

from ds4jax import build, cli
from ds4jax.generate.loop import Generator
from ds4jax.gguf import streaming
from ds4jax.gguf.reader import open_gguf
from ds4jax.tokenizer import Tokenizer

_GGUF = flags.DEFINE_string("gguf", "bench", "A ds4 GGUF, or 'tiny'/'bench'.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Where the test models are built.")
_CACHES = flags.DEFINE_list("caches", ["min", "2min", "25%", "50%", "all"], "Cache sizes: "
                            "--ssd_streaming_cache_experts values (N slots, 1GB), 'min' (one "
                            "token's experts: k slots), 'Nmin', 'P%' of the slice's experts, "
                            "'all' (every expert of the slice).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.", lower_bound=1)
_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Greedy tokens per generation.",
                            lower_bound=2)
_CTX = flags.DEFINE_integer("ctx_size", 256, "KV capacity.", lower_bound=8)
_CHUNK = flags.DEFINE_integer("prefill_chunk", 32, "Most tokens per prefill call.")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Write the rows here (JSON).")


def _slots(spec: str, k: int, n_experts: int) -> str:
  """A --caches entry as an --ssd_streaming_cache_experts value."""
  if spec == "all":
    return str(n_experts)
  if spec.endswith("min"):
    return str(k * int(spec[:-3] or 1))
  if spec.endswith("%"):
    return str(max(k, n_experts * int(spec[:-1]) // 100))
  return spec


def _run(path: str, cache: str | None) -> dict:
  """One row: load, warm, measure (cache None: resident)."""
  opts = None if cache is None else streaming.StreamingOptions.parse(cache)
  be = build.local_backend(path, ctx_size=_CTX.value, prefill_chunk=_CHUNK.value,
                           max_sessions=1, streaming=opts)
  try:
    gen = Generator(be, Tokenizer.from_gguf(path))
    n, v = _PROMPT_LEN.value, be.cfg.vocab_size
    warm = [(7 * i + 3) % (v - 2) + 2 for i in range(n)]
    gen.generate(None, prompt_tokens=warm, max_new_tokens=_NEW.value)
    before = streaming.stats() or {}
    prompt = [(11 * i + 5) % (v - 2) + 2 for i in range(n)]
    res = gen.generate(None, prompt_tokens=prompt, max_new_tokens=_NEW.value)
    after = streaming.stats() or {}
  finally:
    be.close()
  row = {"cache": cache or "resident", "tokens": res.tokens,
         "decode_tok_s": res.timings["decode_tok_s"],
         "prefill_tok_s": res.timings["prefill_tok_s"]}
  if after:
    d = {k: after[k] - before.get(k, 0) for k in ("hits", "misses", "bytes_read")}
    looks = d["hits"] + d["misses"]
    row.update(hit_rate=d["hits"] / looks if looks else 0.0, entries=after["entries"],
               cache_mib=after["bytes"] / 2**20,
               read_mib_per_token=d["bytes_read"] / 2**20 / (n + len(res.tokens)))
  return row


def main(argv):
  path = cli.begin(argv, _GGUF.value, _CACHE_DIR.value)
  f = open_gguf(path)
  k, n_layers, n_exp = f.cfg.n_experts_used, f.cfg.n_layers, f.cfg.n_experts
  total = n_layers * n_exp
  rows = [_run(path, None)]
  for spec in _CACHES.value:
    gc.collect()  # the last backend's caches leave the process's stats
    rows.append(_run(path, _slots(spec, k, total)))
  print(f"\n{path}: {n_layers} layers x {n_exp} experts, k={k}; decode of "
        f"{_NEW.value} tokens after a {_PROMPT_LEN.value}-token prompt, cache warmed by one "
        "generation")
  print(f"{'cache':>10} {'entries':>8} {'MiB':>8} {'hit rate':>9} {'MiB read/tok':>13} "
        f"{'decode tok/s':>13} {'tokens':>7}")
  ok = True
  for r in rows:
    same = r["tokens"] == rows[0]["tokens"]
    ok &= same
    if "hit_rate" in r:
      print(f"{r['cache']:>10} {r['entries']:>8} {r['cache_mib']:>8.1f} "
            f"{100 * r['hit_rate']:>8.1f}% {r['read_mib_per_token']:>13.3f} "
            f"{r['decode_tok_s']:>13.1f} {'same' if same else 'DIFFER':>7}")
    else:
      print(f"{r['cache']:>10} {'-':>8} {'-':>8} {'-':>9} {'-':>13} {r['decode_tok_s']:>13.1f} "
            f"{'ref':>7}")
  if _OUT_JSON.value:
    with open(_OUT_JSON.value, "w") as out:
      json.dump(rows, out, indent=1)
  if not ok:
    print("error: a streaming run's tokens differ from the resident run's", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
