"""Writes a split GGUF holding only one layer slice's tensors (raw bytes, same metadata).

  python scripts/split_gguf.py --gguf=model.gguf --layers=0:20 --out=stage0.gguf
  python scripts/split_gguf.py --gguf=model.gguf --layers=21:output --out=stage1.gguf
"""

from absl import flags

from ds4jax import cli
from ds4jax.gguf import split

_GGUF = flags.DEFINE_string("gguf", None, "Input ds4 GGUF (full or split).", required=True)
_LAYERS = flags.DEFINE_string("layers", None, "Slice to keep: A:B, A:output or all.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output GGUF path.", required=True)


def main(argv):
  del argv
  out, rng = split.split_gguf(_GGUF.value, _LAYERS.value, _OUT.value)
  print(f"wrote {out} (layers {rng.describe()})")


if __name__ == "__main__":
  cli.run(main)
