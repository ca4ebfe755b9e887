"""Prefill and decode throughput of ds4jax next to HF transformers on the same GGUF.

Both models run in one process in alternating rounds (the order rotates), so on a shared,
loaded machine they see the same load; `speedup` is the median over rounds of that round's
ds4jax tok/s over the row's.

    python scripts/bench_model.py                      # the `bench` preset fixture
    python scripts/bench_model.py --gguf=model.gguf --prompt=512 --decode=64 --rounds=5
    python scripts/bench_model.py --weights=packed,dequantized --nohf   # issue 12
    python scripts/bench_model.py --weights=packed --nohf --layer_gguf=/tmp/flash4.gguf
    # A stage over 1, 2 and 4 devices (issue 14; on CPU, forced host devices sharing the
    # cores), one process per count: tok/s and the bytes each device holds.
    python scripts/bench_model.py --devices=1,2,4 --prompt=128 --decode=32
    # Decode at the byte-read floor (issue 21): ms/token next to the floor measured in the
    # same run, and the B = 1 and B = 8 step costs, per activation mode (one row each).
    python scripts/make_tiny_gguf.py --preset=flash --n_layers=4 --out=/tmp/flash4.gguf
    python scripts/bench_model.py --floor=/tmp/flash4.gguf --activations=exact,q8
"""

import json
import os
import subprocess
import sys

from absl import app, flags, logging

_GGUF = flags.DEFINE_string("gguf", None, "ds4 GGUF; default: the cached `bench` preset fixture")
_PROMPT = flags.DEFINE_integer("prompt", 512, "prompt tokens (one-shot prefill)")
_DECODE = flags.DEFINE_integer("decode", 64, "single-token decode steps per round")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "alternating timed rounds per implementation")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "ds4jax compute dtype")
_HF = flags.DEFINE_bool("hf", True, "also run HF transformers on the same weights")
_LAYER_GGUF = flags.DEFINE_string("layer_gguf", None, "also time decode of --layer_range of "
                                   "this GGUF (e.g. the Flash-dims fixture) against its floor")
_LAYER_RANGE = flags.DEFINE_string("layer_range", "2:2", "the slice --layer_gguf times")
_WEIGHTS = flags.DEFINE_list("weights", ["packed"], "ds4jax weight modes, one row each "
                             "(packed, dequantized); the first is the paired reference")
_DEVICES = flags.DEFINE_list("devices", None, "Time a stage spanning each of these device "
                             "counts instead (one process each, ds4jax only, the first "
                             "--weights); on CPU the devices are forced host devices.")
_DEVICES_CHILD = flags.DEFINE_integer("devices_child", None, "(internal) one --devices run.")
_FLOOR = flags.DEFINE_string("floor", None, "Time decode of this GGUF (--floor_layers of it) "
                             "against its byte-read floor, plus the --batches step costs, "
                             "instead of the comparison with HF.")
_FLOOR_LAYERS = flags.DEFINE_string("floor_layers", "all", "the slice --floor times")
_ACTIVATIONS = flags.DEFINE_list("activations", ["exact"], "--floor: activation modes of the "
                                 "packed products (exact, q8), one row each")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "--floor: decode rows per batched step")
_HF_THREADS = flags.DEFINE_list(
    "hf_threads", ["1"], "torch thread counts to run HF with, one row each (on a shared "
    "2-core CPU torch's intra-op threads thrash: 1 thread is ~8x faster there)")


def main(argv):
  del argv
  if _PROMPT.value < 1 or _DECODE.value < 1 or _ROUNDS.value < 1:
    print("error: --prompt, --decode and --rounds must be >= 1", file=sys.stderr)
    sys.exit(2)
  if not _WEIGHTS.value or any(w not in ("packed", "dequantized") for w in _WEIGHTS.value):
    print(f"error: --weights must list packed and/or dequantized, got {_WEIGHTS.value}",
          file=sys.stderr)
    sys.exit(2)
  try:
    threads = [int(t) for t in _HF_THREADS.value] if _HF.value else []
  except ValueError:
    print(f"error: --hf_threads must be integers, got {_HF_THREADS.value}", file=sys.stderr)
    sys.exit(2)
  if any(t < 1 for t in threads):
    print("error: --hf_threads must be >= 1", file=sys.stderr)
    sys.exit(2)
  if _FLOOR.value:
    return _floor_table()
  if _DEVICES_CHILD.value is not None:
    return _devices_child(_DEVICES_CHILD.value)
  if _DEVICES.value:
    return _devices_table(_DEVICES.value)
  if _HF.value:
    from ds4jax import extras
    try:
      extras.check("reference", "scripts/bench_model.py --hf (--nohf skips HF)")
    except extras.MissingExtra as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  import jax
  from ds4jax.bench import model as bench
  from ds4jax.gguf import tiny
  logging.info("jax %s on %s", jax.__version__, jax.devices())
  path = _GGUF.value or tiny.tiny_gguf_path("bench")
  try:
    res = bench.bench_interleaved(path, n_prompt=_PROMPT.value, n_decode=_DECODE.value,
                                  dtype=_DTYPE.value, hf_threads=threads, rounds=_ROUNDS.value,
                                  weights=_WEIGHTS.value)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"prompt {_PROMPT.value}, decode {_DECODE.value}, {_ROUNDS.value} alternating rounds; "
        f"load average before {_fmt(res['load'][0])}, after {_fmt(res['load'][1])}")
  print(f"{'impl':13s} {'dtype':9s} {'prefill tok/s':>14s} {'(best)':>7s} {'cpu s':>6s} "
        f"{'decode tok/s':>13s} {'(best)':>7s} {'cpu s':>6s} {'speedup p/d':>12s} "
        f"{'compile s':>9s}")
  for r in res["rows"]:
    print(f"{r['impl']:13s} {r['dtype']:9s} {r['prefill_tok_s']:14.1f} {r['prefill_best']:7.1f} "
          f"{r['prefill_cpu_s']:6.2f} {r['decode_tok_s']:13.1f} {r['decode_best']:7.1f} "
          f"{r['decode_cpu_s']:6.2f} {r['paired_prefill']:5.2f}/{r['paired_decode']:<6.2f} "
          f"{r['compile_s']:9.1f}")
  if _LAYER_GGUF.value:
    print(f"\n{'slice':10s} {'weights':8s} {'ms/token':>9s} {'MB read/token':>14s} "
          f"{'GB/s':>6s} {'floor ms':>9s} {'floor/measured':>15s}")
    for w in _WEIGHTS.value:
      r = bench.bench_layer_decode(_LAYER_GGUF.value, _LAYER_RANGE.value, weights=w)
      print(f"{r['layers']:10s} {w[:8]:8s} {r['ms_per_token']:9.1f} {r['read_bytes'] / 1e6:14.1f} "
            f"{r['gbs']:6.1f} {r['floor_ms']:9.2f} {r['floor_ms'] / r['ms_per_token']:15.3f}")
  if res["max_abs_dlogit"] is not None:
    print(f"last prefill logits row, {res['ref']} vs {res['other']}: "
          f"max |d| {res['max_abs_dlogit']:.3g}")


def _floor_table() -> None:
  """Decode ms/token of --floor next to the floor measured in the same process (the bytes a
  token reads over the rate XLA reads a 2 GiB array), and the batched step costs."""
  if any(a not in ("exact", "q8") for a in _ACTIVATIONS.value):
    print(f"error: --activations must list exact and/or q8, got {_ACTIVATIONS.value}",
          file=sys.stderr)
    sys.exit(2)
  try:
    batches = tuple(int(b) for b in _BATCHES.value)
  except ValueError:
    print(f"error: --batches must be integers, got {_BATCHES.value}", file=sys.stderr)
    sys.exit(2)
  from ds4jax.bench import model as bench
  rows = []
  for act in _ACTIVATIONS.value:
    try:
      rows.append(bench.bench_floor(_FLOOR.value, _FLOOR_LAYERS.value, weights=_WEIGHTS.value[0],
                                    activations=act, n_decode=_DECODE.value,
                                    batches=batches, rounds=_ROUNDS.value))
    except (OSError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
  r0 = rows[0]
  print(f"{_FLOOR.value} layers {r0['layers']}, weights {r0['weights']}: a token reads "
        f"{r0['floor_bytes'] / 2**20:.0f} MiB")
  steps = " ".join(f"{'B=' + str(b) + ' ms':>9s} {'tok/s':>6s}" for b in batches)
  print(f"{'activations':11s} {'ms/token':>9s} {'read GB/s':>9s} {'floor ms':>9s} "
        f"{'floor/meas':>10s} {steps} {'B=' + str(batches[-1]) + ' / B=' + str(batches[0]):>10s} "
        f"{'load before/after':>18s}")
  for r in rows:
    cols = " ".join(f"{r['steps'][b]:9.1f} {r['agg_tok_s'][b]:6.2f}" for b in batches)
    gain = r["agg_tok_s"][batches[-1]] / r["agg_tok_s"][batches[0]]
    print(f"{r['activations']:11s} {r['ms_per_token']:9.1f} {r['read_gbs']:9.1f} "
          f"{r['floor_ms']:9.1f} {r['ratio']:10.3f} {cols} {gain:9.2f}x "
          f"{r['load'][0][0]:8.1f}/{r['load'][1][0]:<8.1f}")


def _devices_child(n: int) -> None:
  """One --devices count in this process: prints the row as a JSON line."""
  from ds4jax.bench import model as bench
  from ds4jax.gguf import tiny
  path = _GGUF.value or tiny.tiny_gguf_path("bench")
  row = bench.bench_devices(path, n, n_prompt=_PROMPT.value, n_decode=_DECODE.value,
                            rounds=_ROUNDS.value, dtype=_DTYPE.value, weights=_WEIGHTS.value[0])
  print(json.dumps(row))


def _devices_table(counts) -> None:
  """Runs each device count in a fresh process (the CPU device count is fixed when JAX
  starts) and prints the table."""
  try:
    counts = [int(c) for c in counts]
  except ValueError:
    print(f"error: --devices must be comma-separated integers, got {counts}", file=sys.stderr)
    sys.exit(2)
  if min(counts) < 1:
    print("error: --devices must be >= 1", file=sys.stderr)
    sys.exit(2)
  if _GGUF.value is None:
    from ds4jax.gguf import tiny
    tiny.tiny_gguf_path("bench")  # built once, before the children race for it
  print(f"prompt {_PROMPT.value}, decode {_DECODE.value}, {_ROUNDS.value} rounds, "
        f"weights {_WEIGHTS.value[0]}, dtype {_DTYPE.value}; load average {os.getloadavg()[0]:.1f}")
  print(f"{'devices':>7s} {'prefill tok/s':>14s} {'(best)':>7s} {'decode tok/s':>13s} "
        f"{'(best)':>7s} {'compile s':>9s} {'expert MB/dev':>13s} {'other MB/dev':>12s} "
        f"{'total MB/dev':>12s} {'stage MB':>9s}")
  for n in counts:
    flags_env = os.environ.get("XLA_FLAGS", "")
    env = dict(os.environ, XLA_FLAGS=f"{flags_env} --xla_force_host_platform_device_count={n}")
    args = [sys.executable, __file__, f"--devices_child={n}", f"--prompt={_PROMPT.value}",
            f"--decode={_DECODE.value}", f"--rounds={_ROUNDS.value}", f"--dtype={_DTYPE.value}",
            f"--weights={_WEIGHTS.value[0]}"] + ([f"--gguf={_GGUF.value}"] if _GGUF.value else [])
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    if p.returncode:
      print(f"error: --devices={n}: {(p.stderr.strip().splitlines() or ['failed'])[-1]}",
            file=sys.stderr)
      sys.exit(1)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    b = r["bytes_per_device"]
    print(f"{r['devices']:7d} {r['prefill_tok_s']:14.1f} {r['prefill_best']:7.1f} "
          f"{r['decode_tok_s']:13.1f} {r['decode_best']:7.1f} {r['compile_s']:9.1f} "
          f"{b['experts'] / 1e6:13.2f} {b['other'] / 1e6:12.2f} {b['total'] / 1e6:12.2f} "
          f"{r['param_bytes'] / 1e6:9.2f}", flush=True)


def _fmt(load) -> str:
  return "/".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
  app.run(main)
