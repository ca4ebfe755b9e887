r"""The main demo: a small trained DeepSeek V4 split over a coordinator and two local workers.

    python scripts/demo.py
    python scripts/demo.py --prompt='The "with" statement' --temperature=0.8 --top_p=0.95
    python scripts/demo.py --config=configs/tiny_split3.py --config.prompt="Once upon a time"

The default model is `docs` (ds4jax/data/docs.gguf, 4 layers: SWA, SWA, CSA, HCA), trained
by scripts/train.py on Python's help topics, so a plain prompt continues in the words of the
Python documentation; `--gguf=tiny` is the random test model. The demo listens as the
coordinator for layers 0:1, starts workers for 2:2 and 3:output, streams a generation, prints
the route and a per-hop timing table, then runs the same generation in one process and checks
that tokens and logits agree (PASS, or FAIL with exit status 1). Workers are stopped on exit,
on Ctrl-C and on SIGTERM.
"""

import sys
import time

import numpy as np
from absl import flags

from ds4jax import build, cli, local_cluster
from ds4jax.runtime import sources
from ds4jax.generate.loop import Generator
from ds4jax.runtime.sampling import SamplingParams

cli.define_run_flags()
flags.adopt_module_key_flags(cli.flags)  # --helpshort lists the shared flags too
_WORKERS = flags.DEFINE_list("workers", ["2:2", "3:output"], "Worker ranges, in route order.")
_CHECK = flags.DEFINE_boolean("check", True, "Compare with a single-process run.")
flags.FLAGS.set_default("gguf", "docs")
flags.FLAGS.set_default("layers", "0:1")
flags.FLAGS.set_default("listen", "127.0.0.1:0")
flags.FLAGS.set_default("ctx_size", 512)
# Every stage compiles the shapes it serves (decode batches up to --max_sessions, the prefill
# chunk's buckets) before it reports ready: one stream and a small chunk keep that short.
flags.FLAGS.set_default("prefill_chunk", 16)
flags.FLAGS.set_default("max_sessions", 1)
flags.FLAGS.set_default("max_new_tokens", 32)
# docs was trained on plain text (no chat turns): a plain prompt continues the documentation.
flags.FLAGS.set_default("prompt", "The assert statement")
flags.FLAGS.set_default("chat", False)


def say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  t_start = time.perf_counter()
  cli.setup_logging()
  cache_dir = cli.option("cache_dir")
  gguf = cli.resolve_gguf(cli.option("gguf"), cache_dir)
  say(f"model: {gguf}")
  ctx, sessions = int(cli.option("ctx_size")), int(cli.option("max_sessions"))
  host, port = cli.parse_hostport(cli.option("listen") or "127.0.0.1:0")
  port = port or local_cluster.free_port(host)
  # Workers start first (they dial until the coordinator is up), before this process starts
  # JAX's threads, and share its persistent compilation cache.
  cli.compilation_cache_env(cache_dir)
  workers = local_cluster.LocalWorkers(gguf, list(cli.option("workers")), (host, port),
                                       ctx_size=ctx, cache_dir=cache_dir,
                                       extra_args=[f"--max_sessions={sessions}"])
  close = lambda: None
  try:
    workers.start()
    say(f"workers {', '.join(workers.ranges)} started (logs in {workers.log_dir}, removed at "
        "exit unless a worker fails)")
    cli.enable_compilation_cache(cache_dir)
    coord = build.coordinator(
        gguf, layers=cli.option("layers"), listen=f"{host}:{port}", ctx_size=ctx,
        prefill_chunk=int(cli.option("prefill_chunk")), max_sessions=sessions,
        route_timeout=float(cli.option("route_timeout")),
        activation_dtype=cli.option("activation_dtype"), key_file=cli.option("key_file"))
    close = coord.close
    cli.wait_for_route(coord, float(cli.option("route_timeout")), say=say, poll=workers.check)
    say(cli.format_route(coord.route_info()))
    tokenizer = sources.open_tokenizer(gguf)
    kw = dict(prompt_tokens=cli.parse_tokens(cli.option("prompt_tokens")),
              max_new_tokens=int(cli.option("max_new_tokens")), sampling=cli.sampling_params(),
              chat=cli.chat_mode(tokenizer), system=cli.option("system"),
              thinking=bool(cli.option("thinking")), stop=list(cli.option("stop") or []))
    prompt = None if kw["prompt_tokens"] else cli.option("prompt")
    say(f"prompt: {prompt!r}" if prompt is not None else f"prompt tokens: {kw['prompt_tokens']}")
    if cli.option("warmup"):
      say("warming up (compiling the prefill and decode shapes) ...")
      Generator(coord, tokenizer).generate(prompt, **dict(kw, max_new_tokens=2))
    stream = Generator(coord, tokenizer).stream(prompt, **kw)
    sys.stdout.write("--- split generation ---\n")
    for piece in stream:
      sys.stdout.write(cli.visible(piece))
      sys.stdout.flush()
    res = stream.result
    t = res.timings
    sys.stdout.write("\n")
    say(f"{len(res.tokens)} tokens ({res.finish_reason}); prefill {t['prefill_tokens']} tok at "
        f"{t['prefill_tok_s']:.1f} tok/s, decode {t['decode_tok_s']:.1f} tok/s")
    say(cli.format_hop_table(res.hop_summary()))
    if not _CHECK.value:
      return 0
    # The next-token logits of the whole transcript, from the split and from one process.
    transcript = res.prompt_tokens + res.tokens[:-1]
    sid = coord.new_session()
    split_V = coord.step(sid, transcript, SamplingParams(), 0, return_logits=True).logits_V
    coord.close_session(sid)
  finally:
    # The coordinator first: stopping workers under it would log each as lost.
    try:
      close()
    finally:
      workers.stop()
  say("checking against a single-process run of the whole model ...")
  local = build.local_backend(gguf, ctx_size=ctx, prefill_chunk=int(cli.option("prefill_chunk")),
                              max_sessions=sessions)
  ref = Generator(local, tokenizer).generate(prompt, **kw)
  sid = local.new_session()
  ref_V = local.step(sid, transcript, SamplingParams(), 0, return_logits=True).logits_V
  dlogit = float(np.max(np.abs(ref_V - split_V)))
  same = ref.tokens == res.tokens and ref.text == res.text
  say(f"tokens {'identical' if same else 'DIFFER'} ({len(res.tokens)}), max |Δlogit| at the last "
      f"position = {dlogit:.3g}; total {time.perf_counter() - t_start:.1f}s")
  if same and dlogit <= 1e-4:
    print("PASS: the split run matches the single-process run")
    return 0
  print(f"FAIL: split {res.tokens} vs single-process {ref.tokens}")
  sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
