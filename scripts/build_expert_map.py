r"""Builds a ds4 expert-steering map (L x E float32 + JSON sidecar) from two prompt files, by
ds4's method (dir-steering/tools/build_expert_steering.py; ds4jax.research.expert_map), in
one process or as the coordinator of a split.

    # One process: out/poems.f32 and its sidecar out/poems.json
    python scripts/build_expert_map.py --gguf=model.gguf --good_file=poems.txt \
        --bad_file=forms.txt --activate_per_layer=2 --deactivate_per_layer=2 --out=out/poems.json
    # Coordinator of a split: owns layers 0:1, workers dial in for the rest
    python scripts/build_expert_map.py --gguf=model.gguf --layers=0:1 --listen=0.0.0.0:7000 \
        --good_file=poems.txt --bad_file=forms.txt --out=out/poems.json
    # Then steer with it:
    python scripts/generate.py --gguf=model.gguf --prompt="Hello" \
        --expert_steering_file=out/poems.f32 --expert_steering_scale=1

Prompt files hold one prompt a line (`#` starts a comment); line i of each is pair i, and
the longer file is cut to the shorter's length. Each prompt is rendered in ds4's chat format
(--system, --think) unless the model is no chat model or --nochat is given. Hash-routed
layers are never marked (their rows are zero).
"""

import sys

from absl import flags

from ds4jax import cli
from ds4jax.cli import builders
from ds4jax.research import expert_map
from ds4jax.runtime import sources

builders.define_flags("the L x E float32 map")
_ACTIVATE = flags.DEFINE_integer("activate_per_layer", 2, "Experts of largest positive risk "
                                 "difference to promote (+1) per layer.", lower_bound=0)
_DEACTIVATE = flags.DEFINE_integer("deactivate_per_layer", 2, "Experts of most negative risk "
                                   "difference to suppress (-1) per layer.", lower_bound=0)
_MIN_RD = flags.DEFINE_float("min_rd", 0.0, "Least |risk difference| an expert needs to be "
                             "marked.", lower_bound=0.0)
_FOCUS = flags.DEFINE_integer("focus_last_tokens", 0, "Count only each prompt's last N "
                              "positions (0: all).", lower_bound=0)
_MAX_PAIRS = flags.DEFINE_integer("max_pairs", 0, "Use at most this many pairs (0: all).",
                                  lower_bound=0)
_STEER_LAYERS = flags.DEFINE_string("steer_layers", "all", "The layers to mark (ds4's "
                                    "--layers; --layers is this process's range): all routed "
                                    "layers, or e.g. 3-42 or 1,3.")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")

  def check(gguf):  # a bad layer list fails before the load
    expert_map.routed_layers(sources.model_info(gguf)[0], _STEER_LAYERS.value)

  with builders.open_lab(check) as (lab, good, bad, gguf, render):
    m = expert_map.build_expert_map(
        lab, good, bad, layers=_STEER_LAYERS.value, activate=_ACTIVATE.value,
        deactivate=_DEACTIVATE.value, min_rd=_MIN_RD.value, focus_last_tokens=_FOCUS.value,
        max_pairs=_MAX_PAIRS.value, **render)
  js, f32 = m.save(flags.FLAGS.out, target_file=flags.FLAGS.good_file,
                   contrast_file=flags.FLAGS.bad_file, model=gguf)
  marked = int((m.map_LE != 0).sum())
  if not marked:
    print("note: no expert passed the marks (the prompt sets route alike, or --min_rd is too "
          "high): the map is all zero and steers nothing", file=sys.stderr)
  print(f"marked {marked} (layer, expert) entries on layers {m.meta['layers']}", file=sys.stderr)
  print(f"wrote {js}")
  print(f"wrote {f32}")


if __name__ == "__main__":
  cli.run(main)
