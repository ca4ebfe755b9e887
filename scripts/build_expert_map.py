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

from ds4jax import cli, research
from ds4jax.research import expert_map, prompt_sets
from ds4jax.runtime import sources

cli.define_run_flags(prompt=False)
flags.adopt_module_key_flags(cli.flags)  # --helpshort lists the shared flags too
flags.FLAGS.set_default("max_sessions", 1)  # one prompt at a time: one decode shape to compile
flags.FLAGS.set_default("system", prompt_sets.DS4_SYSTEM)  # ds4's builder's default
flags.DEFINE_alias("think", "thinking")  # ds4's spelling
flags.DEFINE_alias("ctx", "ctx_size")
_GOOD = flags.DEFINE_string("good_file", None, "Target prompts, one a line (# comments).")
_BAD = flags.DEFINE_string("bad_file", None, "Contrast prompts, one a line (# comments).")
_OUT = flags.DEFINE_string("out", None, "The sidecar's path (.json); the L x E float32 map "
                           "is written next to it (.f32).")
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
flags.DEFINE_boolean("chat", None, "Render prompts in ds4's chat format (default: the "
                     "model's own: chat for ds4's GGUFs, plain for the docs model).")
_STEERING = ("dir_steering_file", "dir_steering_ffn", "dir_steering_attn",
             "expert_steering_file", "expert_steering_scale")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name, holder in (("good_file", _GOOD), ("bad_file", _BAD), ("out", _OUT)):
    if not holder.value:
      raise ValueError(f"--{name} is required")
  if any(cli.option(k) is not None for k in _STEERING):
    raise ValueError("the builders read the unsteered model: drop the --*_steering_* flags")
  cli.setup_logging()
  cli.enable_compilation_cache(cli.option("cache_dir"))
  good = prompt_sets.read_prompt_file(_GOOD.value)  # bad input fails here, before any load
  bad = prompt_sets.read_prompt_file(_BAD.value)
  gguf = cli.resolve_gguf(cli.option("gguf"), cli.option("cache_dir"))
  expert_map.routed_layers(sources.model_info(gguf)[0], _STEER_LAYERS.value)  # before loads
  backend, close = cli.build_backend()
  try:
    cli.wait_for_route(backend, float(cli.option("route_timeout")))
    tokenizer = sources.open_tokenizer(gguf)
    lab = research.Lab(backend, tokenizer)
    m = expert_map.build_expert_map(
        lab, good, bad, layers=_STEER_LAYERS.value, activate=_ACTIVATE.value,
        deactivate=_DEACTIVATE.value, min_rd=_MIN_RD.value, focus_last_tokens=_FOCUS.value,
        max_pairs=_MAX_PAIRS.value, chat=cli.chat_mode(tokenizer), system=cli.option("system"),
        thinking=bool(cli.option("thinking")))
    route = backend.route_info()
  finally:
    close()
  js, f32 = m.save(_OUT.value, target_file=_GOOD.value, contrast_file=_BAD.value, model=gguf)
  print(cli.format_route(route), file=sys.stderr)
  marked = int((m.map_LE != 0).sum())
  if not marked:
    print("note: no expert passed the marks (the prompt sets route alike, or --min_rd is too "
          "high): the map is all zero and steers nothing", file=sys.stderr)
  print(f"marked {marked} (layer, expert) entries on layers {m.meta['layers']}", file=sys.stderr)
  print(f"wrote {js}")
  print(f"wrote {f32}")


if __name__ == "__main__":
  cli.run(main)
