r"""Interactive chat with a local or a split model; the KV prefix carries over between turns.

    python scripts/chat.py --gguf=tiny
    python scripts/chat.py --config=configs/tiny_local.py --config.max_new_tokens=32
    python scripts/chat.py --gguf=m.gguf --layers=0:1 --listen=0.0.0.0:7000   # split
    # Keep the chat (transcript + every stage's KV) and continue it later, on any route:
    python scripts/chat.py --gguf=tiny --save_session=/tmp/c1
    python scripts/chat.py --gguf=tiny --load_session=/tmp/c1 --save_session=/tmp/c1

Each turn prints how many tokens the backend had to compute: only the new user turn (plus the
previous reply's last token), never the whole transcript again; a restored chat computes no
more than the uninterrupted one would. Commands: /reset, /quit. Reads stdin line by line, so
`echo hi | python scripts/chat.py --gguf=tiny` works too. `--capture=POINTS --capture_layers=...
--capture_out=PATH.npz` keeps every position each turn computes (as generate.py does).
"""

import sys

try:
  import readline  # noqa: F401  (line editing and history for input())
except ImportError:
  pass

from absl import flags

from ds4jax import cli
from ds4jax.runtime import sources
from ds4jax.checkpoints import snapshots
from ds4jax.generate.loop import Generator

cli.define_run_flags(prompt=False)
flags.adopt_module_key_flags(cli.flags)  # --helpshort lists the shared flags too
# One conversation at a time: every stage compiles its single-session decode step and the
# prefill chunk's shapes at load (more sessions: more decode batch shapes to compile).
flags.FLAGS.set_default("max_sessions", 1)
_SAVE = flags.DEFINE_string("save_session", None, "After every reply, save the chat so far "
                            "(transcript and every stage's KV state) to this directory.")
_LOAD = flags.DEFINE_string("load_session", None, "Continue a chat saved with --save_session "
                            "(it keeps its own system prompt; /reset starts a new one).")
cli.define_capture_flags()  # every turn's positions, written to --capture_out at the end


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  # Bad session paths fail now, not after the model has loaded or the first reply.
  if _LOAD.value:
    snapshots.read_manifest(_LOAD.value)
  if _SAVE.value:
    snapshots.check_target(_SAVE.value, overwrite=True)
  cli.enable_compilation_cache(cli.option("cache_dir"))
  edits = cli.steering()  # a bad steering file fails here, before any load
  capture = cli.capture_spec()
  captured = []  # each turn's Captured (--capture), written at the end
  backend, close = cli.build_backend()
  try:
    if capture is not None:
      capture = capture.resolve(backend.cfg)  # layers past the model: before any compute
    cli.wait_for_route(backend, float(cli.option("route_timeout")))
    gguf = cli.resolve_gguf(cli.option("gguf"), cli.option("cache_dir"))
    tokenizer = sources.open_tokenizer(gguf)
    gen = Generator(backend, tokenizer)
    print(cli.format_route(backend.route_info()), file=sys.stderr)
    new_chat = lambda: gen.chat(system=cli.option("system"), thinking=bool(cli.option("thinking")))
    chat = new_chat()
    if _LOAD.value:
      chat.transcript = cli.restore_session(backend, chat.sid, _LOAD.value)
    interactive = sys.stdin.isatty()
    while True:
      try:
        line = input("you> " if interactive else "")
      except EOFError:
        break
      except KeyboardInterrupt:
        cli.interrupt_handled()
        print()
        break
      text = line.strip()
      if not text:
        continue
      if text in ("/quit", "/exit"):
        break
      if text == "/reset":
        chat.close()
        chat = new_chat()
        print("(new conversation)", file=sys.stderr)
        continue
      sys.stdout.write("assistant> ")
      kw = {} if capture is None else {"capture": capture}
      stream = chat.stream(text, max_new_tokens=int(cli.option("max_new_tokens")),
                           sampling=cli.sampling_params(), edits=edits, **kw)
      try:
        for piece in stream:
          sys.stdout.write(cli.visible(piece) if sys.stdout.isatty() else piece)
          sys.stdout.flush()
      except KeyboardInterrupt:
        # Ctrl-C stops this reply only; the conversation goes on without it.
        cli.interrupt_handled()
        stream.close()
        print("\n(interrupted)", file=sys.stderr)
        continue
      res = stream.result
      if capture is not None:
        captured.append(res.captured)
      t = res.timings
      print(f"\n[turn {len(chat.turns)}: computed {res.n_prefill_computed} of "
            f"{len(res.prompt_tokens)} prompt tokens, {len(res.tokens)} new at "
            f"{t['decode_tok_s']:.1f} tok/s, {res.finish_reason}]", file=sys.stderr)
      if _SAVE.value:
        # After every reply, so an interrupted reply or an abrupt exit keeps the chat so far.
        cli.save_session(backend, chat.sid, _SAVE.value, chat.transcript)
    chat.close()
  finally:
    close()
  if captured:
    from ds4jax.runtime.capture import Captured
    Captured.concat(captured).save_npz(cli.option("capture_out"))
    print(f"captured {len(captured)} turns -> {cli.option('capture_out')}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
