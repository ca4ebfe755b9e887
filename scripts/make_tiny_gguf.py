"""Writes a deterministic, seeded ds4-layout GGUF with the real quant mix.

  python scripts/make_tiny_gguf.py --preset=tiny --out=/tmp/tiny.gguf
  python scripts/make_tiny_gguf.py --preset=bench --experts=q4 --out=/tmp/bench-q4.gguf
  python scripts/make_tiny_gguf.py --preset=flash --n_layers=4 --out=/tmp/flash4.gguf

`flash` has the real DeepSeek V4 Flash dims and the first N layers of its schedule (SWA, SWA,
CSA, HCA, ...; layers 0-2 hash-routed), random valid blocks in ds4's q2 mix. It is written
tensor by tensor (peak RSS about 0.2 GB), about 2 GB a layer plus 1.6 GB of embedding and
head: N=2 is 5.5 GB, N=4 9.5 GB (about 35 s here), all 43 layers 86.7 GB. `--n_experts=E` keeps
the real dims but only E routed experts a layer (the experts are about 1.9 GB of a layer's 2 GB
at 256), for a many-layer fixture that fits a small disk and RAM:

  python scripts/make_tiny_gguf.py --preset=flash --n_layers=12 --n_experts=16 --out=/tmp/flash12x16.gguf
"""

import os
import shutil

from absl import flags, logging

from ds4jax import cli
from ds4jax.gguf import table, tiny

_PRESET = flags.DEFINE_enum("preset", "tiny", tiny.PRESETS,
                            "Model dims: tiny, bench, or flash (the real DeepSeek V4 Flash).")
_OUT = flags.DEFINE_string("out", None, "Output GGUF path.", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the random weights.")
_N_LAYERS = flags.DEFINE_integer("n_layers", None, "Keep the first N layers of the preset's "
                                 "schedule (default: all; flash has 43).", lower_bound=1)
_N_EXPERTS = flags.DEFINE_integer("n_experts", None, "Routed experts a layer (default: the "
                                  "preset's; flash has 256). At least the routing's k experts "
                                  "(n_experts_used: flash 6).", lower_bound=1)
_EXPERTS = flags.DEFINE_enum("experts", "iq2", sorted(tiny.EXPERT_RECIPES),
                             "Routed expert types: iq2 (IQ2_XXS gate/up, Q2_K down), q4, q8.")
_TYPES = flags.DEFINE_enum("types", "ds4", ["ds4", "f32"],
                           "Types of the other tensors: ds4's mix or F32 everywhere.")


def main(argv):
  del argv
  overrides = {}
  if _N_LAYERS.value is not None:
    overrides["n_layers"] = _N_LAYERS.value
  if _N_EXPERTS.value is not None:
    overrides["n_experts"] = _N_EXPERTS.value
  cfg = tiny.preset_config(_PRESET.value, **overrides)
  if _PRESET.value == "flash":
    size = sum(t.nbytes for t in table.tensor_table(cfg, experts=_EXPERTS.value,
                                                    types=_TYPES.value))
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(_OUT.value))).free
    if size + 2**30 > free:
      raise OSError(f"--out={_OUT.value}: the file needs {size / 1e9:.1f} GB, the disk has "
                    f"{free / 1e9:.1f} GB free")
  path = tiny.make_tiny_gguf(_OUT.value, _PRESET.value, seed=_SEED.value,
                             experts=_EXPERTS.value, types=_TYPES.value, **overrides)
  logging.info("wrote %s (preset=%s layers=%d routed experts=%d seed=%d experts=%s types=%s, "
               "%.2f GB)", path, _PRESET.value, cfg.n_layers, cfg.n_experts, _SEED.value,
               _EXPERTS.value, _TYPES.value,
               os.path.getsize(path) / 1e9)
  print(path)


if __name__ == "__main__":
  cli.run(main)
