r"""Builds a ds4 steering direction (L x D float32 + JSON sidecar) from two prompt files, by
ds4's method (dir-steering/tools/build_direction.py; ds4jax.research.directions), in one
process or as the coordinator of a split.

    # One process: out/cats.f32 and its sidecar out/cats.json
    python scripts/build_direction.py --gguf=model.gguf --good_file=cats.txt \
        --bad_file=taxes.txt --out=out/cats.json
    # Coordinator of a split: owns layers 0:1, workers dial in for the rest
    python scripts/build_direction.py --gguf=model.gguf --layers=0:1 --listen=0.0.0.0:7000 \
        --good_file=cats.txt --bad_file=taxes.txt --component=attn_out --out=out/cats.json
    # Then steer with it:
    python scripts/generate.py --gguf=model.gguf --prompt="Hello" \
        --dir_steering_file=out/cats.f32 --dir_steering_ffn=1

Prompt files hold one prompt a line (`#` starts a comment); line i of each is pair i, and
the longer file is cut to the shorter's length. Each prompt is rendered in ds4's chat format
(--system, --think) unless the model is no chat model or --nochat is given.
"""

import sys

from absl import flags

from ds4jax import cli
from ds4jax.cli import builders
from ds4jax.research import directions

builders.define_flags("the L x D float32 direction file")
_COMPONENT = flags.DEFINE_enum("component", "ffn_out", list(directions.COMPONENTS),
                               "The sublayer output whose last-position rows are compared "
                               "(steered by --dir_steering_ffn / --dir_steering_attn).")
_PAIR = flags.DEFINE_boolean("pair_normalize", False,
                             "Average the normalised per-pair differences instead.")
_NO_ORTHO = flags.DEFINE_boolean("no_orthogonalize", False, "Do not remove the direction's "
                                 "part along the normalised contrast mean.")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  with builders.open_lab() as (lab, good, bad, gguf, render):
    d = directions.build_direction(
        lab, good, bad, component=_COMPONENT.value, pair_normalize=_PAIR.value,
        orthogonalize=not _NO_ORTHO.value, **render)
  js, f32 = d.save(flags.FLAGS.out, good_file=flags.FLAGS.good_file,
                   bad_file=flags.FLAGS.bad_file, model=gguf)
  if d.meta["zero_layers"]:
    print(f"note: the prompt sets do not differ at layers {d.meta['zero_layers']}: their "
          "directions are zero (left alone when steering)", file=sys.stderr)
  print(f"wrote {js}")
  print(f"wrote {f32}")


if __name__ == "__main__":
  cli.run(main)
