r"""Serves a ds4 GGUF over an OpenAI-compatible HTTP API, whole or as the coordinator of a split.

    # The whole model here (no workers), the built-in tiny model:
    python scripts/serve.py --gguf=tiny --http=127.0.0.1:8000
    # Coordinator of a split: owns layers 0:1, workers dial in on :7000 for the rest.
    python scripts/serve.py --gguf=m.gguf --layers=0:1 --listen=0.0.0.0:7000 \
        --http=0.0.0.0:8000 --route_timeout=60 --key_file=bridge.key
    python scripts/worker.py --gguf=m.gguf --layers=2:output --coordinator=HOST:7000

    curl -s localhost:8000/health
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
    # ds4 steering flags are every request's default; a request's "steering" overrides them
    # (files: plain names in --steering_dir) and its "capture" returns named points.
    python scripts/serve.py --gguf=tiny --dir_steering_file=dir.f32 --steering_dir=steer/

The model runs in a child process (`ds4jax.serving.model_proc`) so that JAX compilation never
stalls `/health`; `--in_process` keeps it in this one. Once both sockets are bound it prints
one line on stdout:
`serving http://HOST:PORT model=NAME listen=HOST:PORT|-` (with port 0, the real ports).
See docs/serving.md.
"""

import logging
import os
import signal
import socket
import sys

from absl import flags

from ds4jax import cli, extras
from ds4jax.serving import model_proc

model_proc.define_flags()
flags.adopt_module_key_flags(cli.flags)  # --helpshort lists the shared flags too
flags.adopt_module_key_flags(model_proc)
FLAGS = flags.FLAGS


def _bind(spec: str) -> socket.socket:
  host, port = cli.parse_hostport(spec)
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(128)
  return sock


def _exit_cleanly(signum, frame):
  raise SystemExit(0)


def _in_process(gguf: str):
  """(backend, tokenizer, listen, close, research) with the model in this process."""
  from ds4jax.runtime import sources
  cli.enable_compilation_cache(cli.option("cache_dir"))
  research = model_proc.research_from_flags(gguf)  # a bad steering file fails before the load
  backend, close = cli.build_backend()
  address = getattr(backend, "address", None)
  listen = f"{address[0]}:{address[1]}" if address else None
  return backend, sources.open_tokenizer(gguf), listen, close, research


def _child_process():
  """(model process, None, listen, close, None): the model runs in `serving.model_proc`
  (with its own steering and capture settings, from the same flags)."""
  from ds4jax.serving.remote import ModelProcess
  model = ModelProcess(sys.argv[1:])
  try:
    ready = model.wait_ready()
  except BaseException:
    model.close()
    raise
  return model, None, ready.get("listen"), model.close, None


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  extras.check("serve", "scripts/serve.py")  # one line naming the extra, not a traceback
  import uvicorn  # deferred: a bad flag should not pay for the import

  from ds4jax.serving.app import create_app

  sock = _bind(FLAGS.http)  # first: a busy port fails in a second, not after a model load
  gguf = cli.resolve_gguf(cli.option("gguf"), cli.option("cache_dir"))
  backend, tokenizer, listen, close, research = (_in_process(gguf) if FLAGS.in_process
                                                 else _child_process())
  try:
    name = FLAGS.model_name or os.path.splitext(os.path.basename(gguf))[0]
    timeout = float(cli.option("route_timeout", 60.0))
    app = create_app(backend, tokenizer, name, route_timeout=timeout,
                     max_concurrency=FLAGS.max_concurrency, queue_timeout=FLAGS.queue_timeout,
                     default_max_tokens=int(cli.option("max_new_tokens", 256)),
                     research=research)
    host, port = sock.getsockname()[:2]
    print(f"serving http://{host}:{port} model={name} listen={listen or '-'}", flush=True)
    ok, reason = backend.route_ready() if hasattr(backend, "route_ready") else (True, "")
    if not ok:
      logging.info("waiting for workers: %s (requests wait up to %.0fs)", reason, timeout)
    server = uvicorn.Server(uvicorn.Config(app, log_level=FLAGS.http_log_level, lifespan="on",
                                           timeout_graceful_shutdown=5))
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it against the handler it found:
    # make that one a normal exit, so the model process is closed below and the status is 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run(sockets=[sock])
  finally:
    close()
    sock.close()


if __name__ == "__main__":
  cli.run(main)
