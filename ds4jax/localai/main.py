"""The command line of the LocalAI backend (scripts/localai_backend.py, ds4jax-localai).

    ds4jax-localai --addr 127.0.0.1:50051      # LocalAI passes --addr HOST:PORT (two tokens)
    ds4jax-localai --addr=127.0.0.1:50051      # its e2e suite passes one token: both work

Environment: LOCALAI_GRPC_AUTH_TOKEN (bearer auth), LOCALAI_BACKEND_PARENT_WATCH (seconds
between checks that LocalAI is still alive, default 2; 0 turns it off), DS4JAX_CACHE (the
compilation cache of the model process).
"""

import asyncio
import os

from absl import flags

from ds4jax import cli, extras
from ds4jax.errors import one_line

_ADDR = flags.DEFINE_string("addr", "localhost:50051", "HOST:PORT to serve gRPC on.")
_CACHE = flags.DEFINE_string("cache_dir", None, "The model process's cache directory "
                             "(compilations; default $DS4JAX_CACHE or ~/.cache/ds4jax).")

PARENT_WATCH_ENV = "LOCALAI_BACKEND_PARENT_WATCH"
_WATCH = flags.DEFINE_float(
    "parent_watch", None, "Seconds between checks that the process that started this backend "
    "(LocalAI) is alive; when it is gone the backend exits. Started from a shell, it exits "
    "with that shell: pass --parent_watch=0 to run it on its own. Default: "
    f"${PARENT_WATCH_ENV}, else 2.", lower_bound=0)


def _parent_watch_s() -> float:
  if _WATCH.value is not None:
    return float(_WATCH.value)
  v = os.environ.get(PARENT_WATCH_ENV, "2").strip().lower()
  if v in ("", "0", "false", "off", "no"):
    return 0.0
  try:
    return max(float(v), 0.0)
  except ValueError:
    return 2.0


def _import_server():
  extras.check("localai", "the LocalAI backend")
  try:
    from ds4jax.localai import server
  except ImportError as e:  # grpcio or protobuf older than the committed stubs
    raise extras.MissingExtra(f"the LocalAI backend needs newer grpcio/protobuf: pip install "
                              f"-U 'ds4jax[localai]' ({one_line(e)})") from None
  except Exception as e:  # protobuf's VersionError, grpc's "generated code" RuntimeError
    raise extras.MissingExtra(f"the LocalAI backend needs newer grpcio/protobuf: pip install "
                              f"-U 'ds4jax[localai]' ({one_line(e)})") from None
  return server


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  server = _import_server()
  from ds4jax.localai.auth import token_from_env
  cli.parse_hostport(_ADDR.value)  # one-line error for a malformed address

  async def run_server():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    server.watch_parent(_parent_watch_s(), lambda: loop.call_soon_threadsafe(stop.set))
    await server.serve(_ADDR.value, token=token_from_env(), cache_dir=_CACHE.value, stop=stop)

  asyncio.run(run_server())


def run() -> None:
  cli.run(main)
