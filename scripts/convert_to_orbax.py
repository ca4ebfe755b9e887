r"""Writes a layer slice of a ds4 GGUF as an orbax checkpoint directory: packed (the GGUF
blocks, about the GGUF's bytes; any compute dtype at load) or dequantised to --dtype.

    python scripts/convert_to_orbax.py --gguf=model.gguf --layers=all --out=ckpt/
    python scripts/convert_to_orbax.py --gguf=model.gguf --out=ckpt-bf16/ \
        --weights=dequantized --dtype=bfloat16
    python scripts/convert_to_orbax.py --gguf=tiny --layers=2:output --out=/tmp/tiny-2-out
    # Then time loading the slice from the GGUF and from the checkpoint (3 alternating runs):
    python scripts/convert_to_orbax.py --gguf=bench --out=/tmp/bench-ckpt --compare_load=3

The directory then replaces the GGUF wherever a stage loads (`--gguf=DIR` in generate.py and
worker.py, `load_stage(DIR, ...)`); any sub-range of the converted one can be served.
"""

import time

from absl import flags

from ds4jax import cli

_GGUF = flags.DEFINE_string("gguf", None, "Input ds4 GGUF, or 'tiny'/'bench'.")
_LAYERS = flags.DEFINE_string("layers", "all", "Slice to convert: all, A:B or A:output.")
_OUT = flags.DEFINE_string("out", None, "Output checkpoint directory (must not exist).")
_WEIGHTS = flags.DEFINE_enum("weights", "packed", ["packed", "dequantized"],
                             "packed: store the GGUF blocks (quantised / 16-bit tensors); "
                             "dequantized: store every parameter dequantised to --dtype.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Stored dtype of a --weights=dequantized checkpoint (default "
                           "float32); a packed one is given its compute dtype at load.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing checkpoint at --out.")
_CACHE = flags.DEFINE_string("cache_dir", None, "Where the tiny test models are cached.")
_COMPARE = flags.DEFINE_integer("compare_load", 0, "After converting, time this many loads of "
                                "the slice from the GGUF and from the checkpoint.", lower_bound=0)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUT.value:
    raise ValueError("--out is required (the checkpoint directory to write)")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  from ds4jax.runtime import checkpoint  # deferred: imports JAX
  path = cli.resolve_gguf(_GGUF.value, _CACHE.value)
  t0 = time.perf_counter()
  m = checkpoint.save_stage_checkpoint(path, _LAYERS.value, _OUT.value, weights=_WEIGHTS.value,
                                      dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
  what = "packed" if m["weights"] == "packed" else f"dequantized {m['dtype']}"
  print(f"wrote {_OUT.value} (layers {m['layers']}, {what}, {len(m['params'])} arrays, "
        f"fingerprint {m['fingerprint'][:16]}) in {time.perf_counter() - t0:.1f}s")
  times = {"gguf": [], "orbax": []}
  load = dict(weights=m["weights"], dtype=m["dtype"])
  for _ in range(_COMPARE.value):  # alternating, so machine load hits both alike
    times["gguf"].append(_timed_load(path, m["layers"], **load))
    times["orbax"].append(_timed_load(_OUT.value, m["layers"], **load))
  if _COMPARE.value:
    g, o = (sorted(v)[len(v) // 2] for v in (times["gguf"], times["orbax"]))
    print(f"load layers {m['layers']} (median of {_COMPARE.value}): GGUF {g:.2f}s, orbax {o:.2f}s "
          f"({g / o:.1f}x); GGUF runs {', '.join(f'{t:.2f}' for t in times['gguf'])}; orbax runs "
          f"{', '.join(f'{t:.2f}' for t in times['orbax'])}")



def _timed_load(path, layers, **kw) -> float:
  """Seconds to load `layers` of a GGUF or a checkpoint, every array ready."""
  import jax
  from flax import nnx

  from ds4jax.runtime import sources
  t0 = time.perf_counter()
  stage = sources.load_stage(path, layers, **kw)
  jax.block_until_ready(nnx.state(stage))
  return time.perf_counter() - t0


if __name__ == "__main__":
  cli.run(main)
