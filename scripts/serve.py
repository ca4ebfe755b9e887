r"""Serves a ds4 GGUF over an OpenAI-compatible HTTP API, whole or as the coordinator of a split.

    # One process, the built-in tiny model:
    python scripts/serve.py --gguf=tiny --http=127.0.0.1:8000
    # Coordinator of a split: owns layers 0:1, workers dial in on :7000 for the rest.
    python scripts/serve.py --gguf=m.gguf --layers=0:1 --listen=0.0.0.0:7000 \
        --http=0.0.0.0:8000 --route_timeout=60 --key_file=bridge.key
    python scripts/worker.py --gguf=m.gguf --layers=2:output --coordinator=HOST:7000

    curl -s localhost:8000/health
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Once both sockets are bound it prints one line on stdout:
`serving http://HOST:PORT model=NAME listen=HOST:PORT|-` (with port 0, the real ports).
See docs/serving.md.
"""

import logging
import os
import socket
import sys

from absl import flags

from ds4jax import cli

cli.define_run_flags(prompt=False)
_HTTP = flags.DEFINE_string("http", "127.0.0.1:8000", "HOST:PORT for the HTTP API (port 0: any).")
_MODEL_NAME = flags.DEFINE_string("model_name", None,
                                  "The model id clients name (default: the GGUF's file name).")
_MAX_CONCURRENCY = flags.DEFINE_integer("max_concurrency", 16,
                                        "Requests generating at once; the rest queue.",
                                        lower_bound=1)
_LOG_LEVEL = flags.DEFINE_enum("http_log_level", "warning", ["debug", "info", "warning", "error"],
                               "uvicorn's log level (access lines at info).")


def _bind(spec: str) -> socket.socket:
  host, port = cli.parse_hostport(spec)
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(128)
  return sock


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  import uvicorn  # deferred: a bad flag should not pay for the import

  from ds4jax.serving.app import create_app
  from ds4jax.tokenizer import Tokenizer

  cli.enable_compilation_cache(cli.option("cache_dir"))
  gguf = cli.resolve_gguf(cli.option("gguf"), cli.option("cache_dir"))
  sock = _bind(_HTTP.value)  # before loading: a busy port fails in a second, not a minute
  backend, close = cli.build_backend()
  try:
    tokenizer = Tokenizer.from_gguf(gguf)
    name = _MODEL_NAME.value or os.path.splitext(os.path.basename(gguf))[0]
    app = create_app(backend, tokenizer, name,
                     route_timeout=float(cli.option("route_timeout", 60.0)),
                     max_concurrency=_MAX_CONCURRENCY.value,
                     default_max_tokens=int(cli.option("max_new_tokens", 256)))
    host, port = sock.getsockname()[:2]
    address = getattr(backend, "address", None)
    listen = f"{address[0]}:{address[1]}" if address else "-"
    print(f"serving http://{host}:{port} model={name} listen={listen}", flush=True)
    ok, reason = backend.route_ready() if hasattr(backend, "route_ready") else (True, "")
    if not ok:
      logging.info("waiting for workers: %s (requests wait up to %.0fs)", reason,
                   float(cli.option("route_timeout", 60.0)))
    server = uvicorn.Server(uvicorn.Config(app, log_level=_LOG_LEVEL.value, lifespan="on",
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
  finally:
    close()
    sock.close()
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main)
