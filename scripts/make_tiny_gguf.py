"""Writes a deterministic, seeded ds4-layout GGUF with the real quant mix.

  python scripts/make_tiny_gguf.py --preset=tiny --out=/tmp/tiny.gguf
  python scripts/make_tiny_gguf.py --preset=bench --experts=q4 --out=/tmp/bench-q4.gguf
"""

from absl import flags, logging

from ds4jax.gguf import cli
from ds4jax.testing import tiny

_PRESET = flags.DEFINE_enum("preset", "tiny", tiny.PRESETS, "Model dims: tiny or bench.")
_OUT = flags.DEFINE_string("out", None, "Output GGUF path.", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the random weights.")
_EXPERTS = flags.DEFINE_enum("experts", "iq2", sorted(tiny.EXPERT_RECIPES),
                             "Routed expert types: iq2 (IQ2_XXS gate/up, Q2_K down), q4, q8.")
_TYPES = flags.DEFINE_enum("types", "ds4", ["ds4", "f32"],
                           "Types of the other tensors: ds4's mix or F32 everywhere.")


def main(argv):
  del argv
  path = tiny.make_tiny_gguf(_OUT.value, _PRESET.value, seed=_SEED.value,
                             experts=_EXPERTS.value, types=_TYPES.value)
  logging.info("wrote %s (preset=%s seed=%d experts=%s types=%s)", path, _PRESET.value,
               _SEED.value, _EXPERTS.value, _TYPES.value)
  print(path)


if __name__ == "__main__":
  cli.run(main)
