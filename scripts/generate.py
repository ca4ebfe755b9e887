r"""Generates from a prompt, whole model in one process or as the coordinator of a split.

    # One process, the built-in tiny model:
    python scripts/generate.py --gguf=tiny --prompt="Hello" --max_new_tokens=16
    # From a config file, with an override:
    python scripts/generate.py --config=configs/tiny_local.py --config.max_new_tokens=8
    # Coordinator of a split: owns layers 0:1 and waits for workers to dial in.
    python scripts/generate.py --gguf=m.gguf --layers=0:1 --listen=0.0.0.0:7000 \
        --prompt_tokens=0,17,42 --max_new_tokens=32 --output_json=out.json
    # Save the session (transcript + every stage's KV) and continue it later, on any route:
    python scripts/generate.py --gguf=tiny --prompt="Hello" --save_session=/tmp/s1
    python scripts/generate.py --gguf=tiny --load_session=/tmp/s1 --max_new_tokens=16
    # ds4's disk KV cache: a later run sharing the prompt's prefix loads it instead of
    # computing it (--output_json reports cached_prompt_tokens):
    python scripts/generate.py --gguf=tiny --prompt="$(cat long.txt)" --kv_disk_dir=/tmp/kv
    # Capture named points of every processed position (prompt, then each token fed back):
    python scripts/generate.py --gguf=tiny --prompt="Hello" --capture=ffn_out,router_ids,lens \
        --capture_layers=1:2 --capture_out=/tmp/cap.npz
    # Routed experts streamed from the file through a 1 GB cache (ds4's --ssd-streaming):
    python scripts/generate.py --gguf=m.gguf --prompt="Hello" --ssd_streaming \
        --ssd_streaming_cache_experts=1GB
"""

import json
import sys

from absl import flags

from ds4jax import cli
from ds4jax.gguf import streaming
from ds4jax.runtime import sources
from ds4jax.generate.loop import Generator

cli.define_run_flags()
flags.adopt_module_key_flags(cli.flags)  # --helpshort lists the shared flags too
# One conversation at a time: every stage compiles its single-session decode step and the
# prefill chunk's shapes at load (more sessions: more decode batch shapes to compile).
flags.FLAGS.set_default("max_sessions", 1)
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write tokens, text, speed, route, telemetry.")
_STREAM = flags.DEFINE_boolean("stream", True, "Print text as it is generated.")
_SAVE = flags.DEFINE_string("save_session", None, "After generating, save the session "
                            "(transcript and every stage's KV state) to this directory.")
_LOAD = flags.DEFINE_string("load_session", None, "Restore a saved session and continue it; a "
                            "--prompt (a new user turn with --chat) or --prompt_tokens is appended.")
cli.define_capture_flags()

def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  cli.enable_compilation_cache(cli.option("cache_dir"))
  prompt, prompt_tokens = cli.option("prompt"), cli.parse_tokens(cli.option("prompt_tokens"))
  if prompt is not None and prompt_tokens is not None:
    raise ValueError("give exactly one of --prompt and --prompt_tokens")
  if prompt is None and prompt_tokens is None and not _LOAD.value:
    raise ValueError("give exactly one of --prompt and --prompt_tokens (or --load_session)")
  capture = cli.capture_spec()  # a bad point or layer list fails here, before any load
  edits = cli.steering()  # a bad steering file fails here, before any load
  gguf = cli.resolve_gguf(cli.option("gguf"), cli.option("cache_dir"))
  tokenizer = sources.open_tokenizer(gguf)
  backend, close = cli.build_backend(prefill_chunk=_prefill_chunk(tokenizer, prompt,
                                                                  prompt_tokens))
  try:
    if capture is not None:
      capture = capture.resolve(backend.cfg)  # layers past the model: before any compute
    cli.wait_for_route(backend, float(cli.option("route_timeout")))
    gen = Generator(backend, tokenizer)
    if cli.option("warmup") and not _LOAD.value:
      # A throwaway 2-token run compiles the prefill and decode shapes (own session).
      gen.generate(prompt, prompt_tokens=prompt_tokens, max_new_tokens=2,
                   chat=cli.chat_mode(tokenizer), system=cli.option("system"),
                   thinking=bool(cli.option("thinking")), edits=edits)
    sid = backend.new_session()
    if _LOAD.value:  # the restored transcript, then the new prompt (if any)
      prompt_tokens = _restore(backend, sid, _LOAD.value, tokenizer, prompt, prompt_tokens)
      prompt = None
    stream = gen.stream(prompt, prompt_tokens=prompt_tokens, sid=sid,
                        max_new_tokens=int(cli.option("max_new_tokens")),
                        sampling=cli.sampling_params(), stop=list(cli.option("stop") or []),
                        chat=cli.chat_mode(tokenizer), system=cli.option("system"),
                        thinking=bool(cli.option("thinking")), capture=capture,
                        edits=edits)
    show = cli.visible if sys.stdout.isatty() else str  # a pipe gets the exact text
    for piece in stream:
      if _STREAM.value:
        sys.stdout.write(show(piece))
        sys.stdout.flush()
    res = stream.result
    if not _STREAM.value:
      sys.stdout.write(show(res.text))
    if not res.text.endswith("\n"):
      sys.stdout.write("\n")
    if _SAVE.value:
      print(file=sys.stderr)  # ends the streamed text's line
      cli.save_session(backend, sid, _SAVE.value, res.prompt_tokens + res.tokens)
    route = backend.route_info()
    experts = streaming.stats()  # this process's expert caches (--ssd_streaming), or None
  finally:
    close()
  t = res.timings
  print(f"\n{cli.format_route(route)}", file=sys.stderr)
  cached = f" ({res.cached_prompt_tokens} cached)" if res.cached_prompt_tokens else ""
  print(f"prefill {t['prefill_tokens']} tok at {t['prefill_tok_s']:.1f} tok/s{cached}, decode "
        f"{t['decode_tokens']} tok at {t['decode_tok_s']:.1f} tok/s ({res.finish_reason})",
        file=sys.stderr)
  print(cli.format_hop_table(res.hop_summary()), file=sys.stderr)
  if experts is not None:
    experts["bytes_read_per_token"] = experts["bytes_read"] / max(
        t["prefill_tokens"] + t["decode_tokens"], 1)
    print(streaming.format_stats(experts), file=sys.stderr)
  if capture is not None:
    res.captured.save_npz(cli.option("capture_out"))
    print(f"captured {len(res.captured.keys())} arrays x {len(res.captured.positions)} positions "
          f"-> {cli.option('capture_out')}", file=sys.stderr)
  if _OUTPUT_JSON.value:
    out = res.to_dict()
    out.update(prefill_tok_s=t["prefill_tok_s"], decode_tok_s=t["decode_tok_s"], route=route)
    if experts is not None:
      out["expert_cache"] = experts
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(out, f, indent=1)


def _prefill_chunk(tokenizer, prompt, prompt_tokens) -> int | None:
  """This one run's prompt is known before the load, so every stage compiles only the
  prefill shapes it runs (`runner.prefill_chunk_for`: the same programs, at the same
  chunking). None (--prefill_chunk as given) for a restored session, whose transcript is
  not known yet, and with --kv_disk_dir, whose entries sit at --prefill_chunk boundaries."""
  from ds4jax.runtime.runner import prefill_chunk_for
  if _LOAD.value or cli.option("kv_disk_dir"):
    return None
  ids = prompt_tokens if prompt is None else tokenizer.prompt(
      prompt, chat=cli.chat_mode(tokenizer), system=cli.option("system"),
      thinking=bool(cli.option("thinking")))
  return prefill_chunk_for(len(ids), int(cli.option("prefill_chunk")))


def _restore(backend, sid, path, tokenizer, prompt, prompt_tokens) -> list[int]:
  ids = cli.restore_session(backend, sid, path)
  if prompt_tokens is not None:
    return ids + list(prompt_tokens)
  if prompt is not None:
    if cli.chat_mode(tokenizer):
      return ids + tokenizer.user_turn(prompt, thinking=bool(cli.option("thinking")))
    return ids + tokenizer.encode(prompt)
  return ids


if __name__ == "__main__":
  cli.run(main)
