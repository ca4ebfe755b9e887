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

from ds4jax import cli, research
from ds4jax.research import directions, prompt_sets
from ds4jax.runtime import sources

cli.define_run_flags(prompt=False)
flags.adopt_module_key_flags(cli.flags)  # --helpshort lists the shared flags too
flags.FLAGS.set_default("max_sessions", 1)  # one prompt at a time: one decode shape to compile
flags.FLAGS.set_default("system", prompt_sets.DS4_SYSTEM)  # ds4's builder's default
flags.DEFINE_alias("think", "thinking")  # ds4's spelling
flags.DEFINE_alias("ctx", "ctx_size")
_GOOD = flags.DEFINE_string("good_file", None, "Target prompts, one a line (# comments).")
_BAD = flags.DEFINE_string("bad_file", None, "Contrast prompts, one a line (# comments).")
_OUT = flags.DEFINE_string("out", None, "The sidecar's path (.json); the L x D float32 "
                           "direction file is written next to it (.f32).")
_COMPONENT = flags.DEFINE_enum("component", "ffn_out", list(directions.COMPONENTS),
                               "The sublayer output whose last-position rows are compared "
                               "(steered by --dir_steering_ffn / --dir_steering_attn).")
_PAIR = flags.DEFINE_boolean("pair_normalize", False,
                             "Average the normalised per-pair differences instead.")
_NO_ORTHO = flags.DEFINE_boolean("no_orthogonalize", False, "Do not remove the direction's "
                                 "part along the normalised contrast mean.")
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
  backend, close = cli.build_backend()
  try:
    cli.wait_for_route(backend, float(cli.option("route_timeout")))
    tokenizer = sources.open_tokenizer(gguf)
    lab = research.Lab(backend, tokenizer)
    d = directions.build_direction(
        lab, good, bad, component=_COMPONENT.value, pair_normalize=_PAIR.value,
        orthogonalize=not _NO_ORTHO.value, chat=cli.chat_mode(tokenizer),
        system=cli.option("system"), thinking=bool(cli.option("thinking")))
    route = backend.route_info()
  finally:
    close()
  js, f32 = d.save(_OUT.value, good_file=_GOOD.value, bad_file=_BAD.value, model=gguf)
  print(cli.format_route(route), file=sys.stderr)
  if d.meta["zero_layers"]:
    print(f"note: the prompt sets do not differ at layers {d.meta['zero_layers']}: their "
          "directions are zero (left alone when steering)", file=sys.stderr)
  print(f"wrote {js}")
  print(f"wrote {f32}")


if __name__ == "__main__":
  cli.run(main)
