"""The command line that ds4's two builders share (scripts/build_direction.py,
scripts/build_expert_map.py): ds4's prompt-file flags, and a `Lab` over the backend the run
flags ask for (one process, or the coordinator of a split).

    builders.define_flags("the L x D float32 direction file")
    with builders.open_lab() as (lab, good, bad, gguf, render):
      d = directions.build_direction(lab, good, bad, **render)
"""

from __future__ import annotations

import contextlib
import sys

from absl import flags

from ds4jax import cli
from ds4jax.research import Lab, prompt_sets
from ds4jax.runtime import sources

STEERING = ("dir_steering_file", "dir_steering_ffn", "dir_steering_attn",
            "expert_steering_file", "expert_steering_scale")


def define_flags(out_file: str) -> None:
  """The run flags, with ds4's builder defaults, and --good_file, --bad_file, --out, --chat;
  `out_file` says what --out's .f32 neighbour holds."""
  cli.define_run_flags(prompt=False)
  flags.adopt_module_key_flags(cli.flags)  # --helpshort lists the shared flags too
  flags.FLAGS.set_default("max_sessions", 1)  # one prompt at a time: one decode shape
  flags.FLAGS.set_default("system", prompt_sets.DS4_SYSTEM)  # ds4's builders' default
  flags.DEFINE_alias("think", "thinking")  # ds4's spelling
  flags.DEFINE_alias("ctx", "ctx_size")
  flags.DEFINE_string("good_file", None, "Target prompts, one a line (# comments).")
  flags.DEFINE_string("bad_file", None, "Contrast prompts, one a line (# comments).")
  flags.DEFINE_string("out", None, f"The sidecar's path (.json); {out_file} is written next "
                      "to it (.f32).")
  flags.DEFINE_boolean("chat", None, "Render prompts in ds4's chat format (default: the "
                       "model's own: chat for ds4's GGUFs, plain for the docs model).")


@contextlib.contextmanager
def open_lab(check=None):
  """Checks the flags and reads both prompt files (one-line errors before any load), runs
  `check(gguf)` (more checks before the load), builds the backend and yields (lab, target
  prompts, contrast prompts, gguf path, the prompts' rendering as the builders' chat=,
  system=, thinking= keywords). Closes the backend after and prints its route."""
  for name in ("good_file", "bad_file", "out"):
    if not flags.FLAGS[name].value:
      raise ValueError(f"--{name} is required")
  if any(cli.option(k) is not None for k in STEERING):
    raise ValueError("the builders read the unsteered model: drop the --*_steering_* flags")
  cli.setup_logging()
  cli.enable_compilation_cache(cli.option("cache_dir"))
  good = prompt_sets.read_prompt_file(flags.FLAGS.good_file)
  bad = prompt_sets.read_prompt_file(flags.FLAGS.bad_file)
  gguf = cli.resolve_gguf(cli.option("gguf"), cli.option("cache_dir"))
  if check is not None:
    check(gguf)
  backend, close = cli.build_backend()
  route = None
  try:
    cli.wait_for_route(backend, float(cli.option("route_timeout")))
    tokenizer = sources.open_tokenizer(gguf)
    render = dict(chat=cli.chat_mode(tokenizer), system=cli.option("system"),
                  thinking=bool(cli.option("thinking")))
    yield Lab(backend, tokenizer), good, bad, gguf, render
    route = backend.route_info()
  finally:
    close()
  if route is not None:
    print(cli.format_route(route), file=sys.stderr)


__all__ = ["STEERING", "define_flags", "open_lab"]
