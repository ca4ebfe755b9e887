r"""Serve a layer range of a ds4 GGUF to a coordinator (dials in; retries until it is up, or
for --connect_timeout seconds).

    python scripts/worker.py --gguf=PATH --layers=A:B|A:output --coordinator=HOST:PORT
    # ds4-worker's spelling works too (what LocalAI's --ds4-args pass; docs/localai.md):
    python scripts/worker.py --role worker --model PATH --layers A:B --coordinator HOST PORT -c N
    # A stage over every GPU of this host (expert parallelism), from a route config:
    python scripts/worker.py --config=configs/flash_2x4gpu.py --coordinator=HOST_A:7000

With a pre-shared key, pass --key_file (or set DS4JAX_KEY); never the key itself. For TLS,
--tls_ca=CA.pem (the coordinator runs with --tls_cert/--tls_key). A rejected key or
certificate, or a refused HELLO, exits with status 2 and the reason. When the
coordinator restarts, the worker drops its sessions and dials again on its own.
"""

import logging
import os
import sys
import threading
import time

from absl import flags
from ml_collections import config_flags

from ds4jax import cli

_GGUF = flags.DEFINE_string("gguf", None, "Path of the GGUF, 'docs' for the shipped trained "
                            "model, or 'tiny'/'bench' (random test models).")
_LAYERS = flags.DEFINE_string("layers", None, "Inclusive range A:B, or A:output with the head.")
_COORD = flags.DEFINE_string("coordinator", None, "HOST:PORT of the coordinator.")
_CTX = flags.DEFINE_integer("ctx_size", 4096, "KV capacity per session, in tokens.",
                            lower_bound=1)
_SESSIONS = flags.DEFINE_integer("max_sessions", 8, "Sessions kept before LRU eviction; "
                                 "every decode batch size up to it compiles before READY.",
                                 lower_bound=1)
_KEY_FILE = flags.DEFINE_string("key_file", None, "File with the pre-shared key "
                                "(default: the DS4JAX_KEY environment variable).")
_TLS_CA = flags.DEFINE_string("tls_ca", None, "Use TLS, verifying the coordinator's certificate "
                               "with this CA file (PEM; a self-signed certificate is its own CA).")
_TLS = flags.DEFINE_boolean("tls", False, "Use TLS, verifying the coordinator with the system "
                            "CA store (implied by --tls_ca and --tls_insecure).")
_TLS_INSECURE = flags.DEFINE_boolean("tls_insecure", False, "Use TLS without verifying the "
                                     "coordinator's certificate (encrypted, not authenticated: "
                                     "pair it with a key).")
_TLS_NAME = flags.DEFINE_string("tls_server_name", None, "The name to verify in the "
                                "coordinator's certificate (default: the --coordinator host).")
_DIAL_TIMEOUT = flags.DEFINE_float("connect_timeout", None, "Exit (status 2) once the "
                                   "coordinator has been unreachable this many seconds, from "
                                   "the start or a lost link (default: redial forever, as a "
                                   "service should; scripts and tests set it).", lower_bound=0)
_BACKOFF_MIN = flags.DEFINE_float("backoff_min", 0.2, "First redial delay (s).", lower_bound=0.01)
_BACKOFF_MAX = flags.DEFINE_float("backoff_max", 5.0, "Longest redial delay (s).", lower_bound=0.01)
cli.define_weight_flags()
cli.define_device_flags()
config_flags.DEFINE_config_file("config", None, "A route config (configs/*.py): gguf, ctx_size, "
                                "devices, coordinator, key_file and (if it has one worker) "
                                "--layers come from it; flags override.", lock_config=False)
_CACHE = flags.DEFINE_string("cache_dir", None, "Where the tiny test models are cached.")
_WITH_PARENT = flags.DEFINE_boolean("exit_with_parent", False,
                                    "Exit when the launching process dies (tests, launchers).")


def _exit_with_parent() -> None:
  # A launcher may name itself: a parent that died while we were still importing is then
  # noticed too (os.getppid() alone would already be the reaper's pid).
  parent = int(os.environ.get("DS4JAX_PARENT_PID", "0")) or os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(3)  # orphaned: nobody will stop us otherwise

  threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(argv):
  del argv
  cli.setup_logging()
  if _WITH_PARENT.value:
    _exit_with_parent()
  from ds4jax import build
  from ds4jax.wire import auth
  from ds4jax.bridge.worker.worker import WorkerOptions
  layers, coordinator = cli.worker_layers(), cli.option("coordinator")
  if not layers:
    raise ValueError("--layers is required (A:B or A:output)")
  if not coordinator:
    raise ValueError("--coordinator is required (HOST:PORT)")
  path = cli.resolve_gguf(cli.option("gguf"), _CACHE.value)
  addr = cli.parse_hostport(coordinator)
  if addr[1] == 0:
    raise ValueError("--coordinator needs the coordinator's real port, not 0")
  if _TLS_INSECURE.value and _TLS_CA.value:
    raise ValueError("--tls_insecure skips the verification that --tls_ca asks for: pick one")
  tls = None
  if _TLS.value or _TLS_CA.value or _TLS_INSECURE.value or _TLS_NAME.value:
    tls = auth.client_ssl_context(_TLS_CA.value, insecure=_TLS_INSECURE.value)
  opt = WorkerOptions(ctx=int(cli.option("ctx_size")), max_sessions=_SESSIONS.value,
                      key=auth.load_key(cli.option("key_file")), tls=tls,
                      tls_server_name=_TLS_NAME.value,
                      dial_timeout=_DIAL_TIMEOUT.value, backoff_min=_BACKOFF_MIN.value,
                      backoff_max=_BACKOFF_MAX.value)
  cli.enable_compilation_cache(_CACHE.value)
  import jax  # deferred: flag errors stay fast
  from ds4jax.runtime.load import return_big_frees
  return_big_frees()  # freed buffers leave RSS (issue 7: peak memory)
  logging.info("jax %s, devices %s", jax.__version__, jax.devices())
  worker = build.worker(path, layers, addr, options=opt, **cli.weight_options())
  logging.info("worker for layers %s of %s, dialing %s:%d", worker.layers.describe(), path, *addr)
  try:
    worker.run()
  except cli.input_errors() as e:  # its slice may still load on another thread: no teardown
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    cli.hard_exit(2)
  finally:
    from ds4jax.gguf import streaming  # --ssd_streaming: this worker's expert cache
    if streaming.stats() is not None:
      print(streaming.format_stats(streaming.stats()), file=sys.stderr)


if __name__ == "__main__":
  from ds4jax.localai import ds4_args  # stdlib only
  sys.argv = ds4_args.translate_or_exit(
      sys.argv, ctx_flag="ctx_size" if "ctx_size" in flags.FLAGS else "ctx")
  cli.run(main)
