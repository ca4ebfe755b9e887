"""Prints a ds4 GGUF's config, layer schedule, bytes per layer / slice, and a balanced split.

  python scripts/inspect_gguf.py --gguf=model.gguf --split=3
  python scripts/inspect_gguf.py --gguf=model.gguf --layers=0:20
"""

from absl import flags

from ds4jax.gguf import cli, summary

_GGUF = flags.DEFINE_string("gguf", None, "A ds4 GGUF (full or split).", required=True)
_SPLIT = flags.DEFINE_integer("split", 0, "Suggest a balanced split into N contiguous ranges.",
                              lower_bound=0)
_LAYERS = flags.DEFINE_string("layers", None,
                              "Also print the bytes of this slice (A:B, A:output, all).")


def main(argv):
  del argv
  print(summary.describe(_GGUF.value, split=_SPLIT.value, layers=_LAYERS.value))


if __name__ == "__main__":
  cli.run(main)
