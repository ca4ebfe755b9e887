"""Shared plumbing for the absl scripts: flags, config files, backends, one-line errors.

Scripts stay short (style rule 8): they define their own few flags, call `define_run_flags()`
for the shared ones and `run(main)` instead of `app.run(main)`. Everything here is importable
from a notebook.

Precedence of run options: an explicit `--flag` beats `--config.field`, which beats the
config file, which beats the flag's default. `--gguf=tiny` (or `bench`) names the built-in
test model, built once into the cache directory (`$DS4JAX_CACHE`, default ~/.cache/ds4jax);
`--gguf=docs` the small trained model that ships in `ds4jax/data/`.
"""

from __future__ import annotations

import _thread
import collections.abc
import errno
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from absl import app, flags
from ml_collections import config_flags

from ds4jax.runtime.sampling import SamplingParams

FLAGS = flags.FLAGS
PRESETS = ("tiny", "bench")


def define_run_flags(*, prompt: bool = True) -> None:
  """The flags every launch script shares (names are a contract, see issue 4 'Scripts')."""
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file (get_config()).",
                                  lock_config=False)
  flags.DEFINE_string("gguf", None, "Path of the GGUF, 'docs' for the shipped trained model, "
                      "or 'tiny'/'bench' for a random test model.")
  flags.DEFINE_string("layers", "all", "The layers this process runs: 'all' or 0:K.")
  flags.DEFINE_string("listen", None, "HOST:PORT to listen on for workers (port 0: any).")
  flags.DEFINE_float("route_timeout", 60.0, "Seconds to wait for a complete route.")
  flags.DEFINE_integer("ctx_size", 4096, "KV capacity in tokens.")
  define_weight_flags()
  define_device_flags()
  flags.DEFINE_integer("prefill_chunk", 256, "Most tokens per prefill call.")
  flags.DEFINE_integer("max_sessions", 8, "Sessions whose decode state this process keeps (the "
                       "pool slots of each stage); that many generations at once batch their "
                       "steps.", lower_bound=1)
  flags.DEFINE_enum("activation_dtype", "f32", ["f32", "bf16", "int8"],
                    "Activation dtype on the wire (split runs).")
  flags.DEFINE_string("key_file", None, "Pre-shared bridge key file (else $DS4JAX_KEY).")
  flags.DEFINE_string("tls_cert", None, "With --listen: serve the bridge over TLS with this "
                      "PEM certificate (workers verify it: scripts/worker.py --tls_ca).")
  flags.DEFINE_string("tls_key", None, "The PEM private key of --tls_cert (if not in it).")
  flags.DEFINE_string("cache_dir", None, "Where the tiny test models are built and cached.")
  flags.DEFINE_integer("max_new_tokens", 32, "Most tokens to generate.", lower_bound=1)
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).", lower_bound=0)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.", lower_bound=0)
  flags.DEFINE_boolean("thinking", False, "Chat format with <think> instead of </think>.")
  flags.DEFINE_string("system", None, "A system prompt for the chat format.")
  flags.DEFINE_boolean("warmup", False, "Run a 2-token generation first, so reported speeds "
                       "exclude XLA compilation.")
  if prompt:
    flags.DEFINE_string("prompt", None, "Text prompt.")
    flags.DEFINE_list("prompt_tokens", None, "Exact prompt token ids, e.g. 0,17,42.")
    flags.DEFINE_boolean("chat", True, "Wrap --prompt in the ds4 chat format.")
    flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")


def define_weight_flags() -> None:
  """--weights and --dtype, shared by every script that loads weights (issue 12)."""
  flags.DEFINE_enum("weights", "packed", ["packed", "dequantized"],
                    "packed: quantised tensors stay GGUF blocks in device memory and are "
                    "dequantised inside the step; dequantized: dequantise at load (the old path).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                    "Compute dtype (default: float32 for a GGUF, the stored dtype for a "
                    "checkpoint directory).")


def define_device_flags() -> None:
  """--devices, shared by every script that loads a stage (issue 14)."""
  flags.DEFINE_string("devices", "1", "Local devices this process's stage spans: 1 (one "
                      "device), N, or 'all'. The routed experts are sharded over them (expert "
                      "parallelism); N must divide the model's expert count.")


def parse_devices(spec) -> int | str:
  """A --devices value as an int >= 1 or 'all' (one-line ValueError otherwise). Whether
  this host has that many devices is checked where the stage loads."""
  text = str(spec).strip()
  if text == "all":
    return "all"
  if isinstance(spec, bool) or not text.isdigit() or int(text) < 1:
    raise ValueError(f"--devices must be a positive integer or 'all', got {spec!r}")
  return int(text)


def weight_options() -> dict[str, str | int | None]:
  """{'weights': ..., 'dtype': ... or None (the source's), 'devices': N or 'all'} from the
  run options."""
  dtype = option("dtype")
  return {"weights": str(option("weights", "packed")),
          "dtype": None if dtype is None else str(dtype),
          "devices": parse_devices(option("devices", 1))}


_config_path: str | None = None


def config() -> Any:
  """The loaded --config (None without one); a missing or broken file is a one-line error."""
  if "config" not in FLAGS:
    return None
  try:
    cfg = FLAGS["config"].value
  except Exception as e:  # config_flags defers some load errors to the first access
    if _config_path and not os.path.isfile(_config_path):
      raise FileNotFoundError(f"config file not found: {_config_path}") from None
    raise ValueError(f"cannot load config file {_config_path}: {e.__cause__ or e}") from None
  if type(cfg).__name__ == "_ErrorConfig":  # config_flags' placeholder for a failed load
    if _config_path and not os.path.isfile(_config_path):
      raise FileNotFoundError(f"config file not found: {_config_path}")
    raise ValueError(f"cannot load config file {_config_path}")
  if cfg is not None and not isinstance(cfg, collections.abc.Mapping) and not hasattr(
      type(cfg), "keys"):
    raise ValueError(f"config file {_config_path}: get_config() must return a ConfigDict, "
                     f"got {type(cfg).__name__}")
  return cfg


def option(name: str, default: Any = None) -> Any:
  """A run option: explicit flag > --config(.field) > flag default (or `default`)."""
  cfg = config()
  if name in FLAGS and FLAGS[name].present:
    return FLAGS[name].value
  if cfg is not None and name in cfg:
    return cfg[name]
  if name in FLAGS:
    return FLAGS[name].value
  return default


def worker_layers() -> str | None:
  """A worker's range: --layers, else the only entry of the config's `workers` (a route
  config with several workers needs --layers)."""
  if FLAGS["layers"].present or config() is None or not config().get("workers"):
    return FLAGS["layers"].value
  workers = list(config()["workers"])
  if len(workers) != 1:
    raise ValueError(f"the config lists {len(workers)} workers ({', '.join(workers)}): pick "
                     "this one's with --layers")
  return workers[0]


def sampling_params() -> SamplingParams:
  return SamplingParams(temperature=float(option("temperature", 0.0)),
                        top_k=int(option("top_k", 0)), top_p=float(option("top_p", 1.0)),
                        seed=int(option("seed", 0)))


def resolve_gguf(spec: str | None, cache_dir: str | None = None) -> str:
  """A GGUF path, or a preset name built into the cache; one-line errors otherwise."""
  if not spec:
    raise ValueError("--gguf is required (a GGUF path, or 'tiny' for the built-in test model)")
  named = spec in PRESETS or spec == "docs"
  # A model name wins over a directory that is not a checkpoint (the repo's own docs/).
  if os.path.exists(spec) and not (named and os.path.isdir(spec) and not os.path.isfile(
      os.path.join(spec, "ds4jax_checkpoint.json"))):
    if os.path.isdir(spec):  # an orbax checkpoint (scripts/convert_to_orbax.py)
      from ds4jax.runtime import sources
      sources.open_source(spec)  # reads the manifest: a one-line error if it is not one
      return spec
    if not os.path.isfile(spec):
      raise ValueError(f"--gguf={spec} is not a file")
    return spec
  if spec == "docs":
    from ds4jax.data import docs_gguf_path
    return docs_gguf_path()
  if spec in PRESETS:
    from ds4jax.testing import tiny  # deferred: only needed for the test models
    return tiny.tiny_gguf_path(spec, cache_dir)
  raise FileNotFoundError(f"GGUF file not found: {spec}")


def parse_hostport(spec: str) -> tuple[str, int]:
  host, sep, port = str(spec).rpartition(":")
  if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
    raise ValueError(f"bad address {spec!r}: expected HOST:PORT")
  return host or "127.0.0.1", int(port)


def parse_tokens(values) -> list[int] | None:
  if values is None:
    return None
  if isinstance(values, str):
    values = [v for v in values.split(",") if v.strip()]
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--prompt_tokens must be comma-separated integers, got {values!r}") from None


# ------------------------------------------------------------------------------- backends
def local_backend(gguf: str, *, ranges=("all",), ctx_size: int = 4096, prefill_chunk: int = 256,
                  weights: str = "packed", dtype: str | None = None, devices=1,
                  max_sessions: int = 8):
  from ds4jax.runtime.local import LocalBackend
  return LocalBackend.from_gguf(gguf, ranges=ranges, ctx_size=ctx_size,
                                prefill_chunk=prefill_chunk, weights=weights, dtype=dtype,
                                devices=devices, max_sessions=max_sessions)


def build_backend():
  """The backend the run options ask for: local without --listen, else a listening coordinator.

  Returns (backend, closer) where closer() releases sockets and threads.
  """
  gguf = resolve_gguf(option("gguf"), option("cache_dir"))
  ctx_size, chunk = int(option("ctx_size", 4096)), int(option("prefill_chunk", 256))
  listen = option("listen")
  if not listen:
    layers = option("layers", "all") or "all"
    ranges = ("all",) if layers == "all" else tuple(layers.split(","))
    backend = local_backend(gguf, ranges=ranges, ctx_size=ctx_size, prefill_chunk=chunk,
                            max_sessions=int(option("max_sessions", 8)), **weight_options())
    return backend, lambda: None
  return coordinator_backend(gguf, layers=option("layers", "0:0"), listen=listen,
                             ctx_size=ctx_size, prefill_chunk=chunk,
                             route_timeout=float(option("route_timeout", 60.0)),
                             activation_dtype=option("activation_dtype", "f32"),
                             key_file=option("key_file"), tls_cert=option("tls_cert"),
                             tls_key=option("tls_key"),
                             max_sessions=int(option("max_sessions", 8)), **weight_options())


def coordinator_backend(gguf: str, *, layers: str, listen: str, ctx_size: int = 4096,
                        prefill_chunk: int = 256, route_timeout: float = 60.0,
                        activation_dtype: str = "f32", key_file: str | None = None,
                        tls_cert: str | None = None, tls_key: str | None = None,
                        weights: str = "packed", dtype: str | None = None, devices=1,
                        max_sessions: int = 8):
  """A listening `Coordinator` that runs `layers` (0:K) here. Returns (coordinator, close).

  tls_cert (+ tls_key): workers connect over TLS (stdlib ssl, TLS >= 1.2)."""
  from ds4jax.wire import auth  # deferred: the bridge is optional
  from ds4jax.bridge.coordinator import coordinator as coord_lib
  from ds4jax.config import LayerRange
  from ds4jax.runtime.progress import heartbeat
  from ds4jax.runtime import sources
  from ds4jax.runtime.load import load_stage
  from ds4jax.runtime.runner import StageRunner

  host, port = parse_hostport(listen)
  key = auth.load_key(key_file)
  if tls_key and not tls_cert:
    raise ValueError("--tls_key needs --tls_cert")
  tls = auth.server_ssl_context(tls_cert, tls_key) if tls_cert else None  # fail before loading
  if port:
    check_port_free(host, port)  # before a possibly long model load, not after
  src = sources.open_source(gguf)  # a GGUF or an orbax checkpoint directory
  rng = LayerRange.parse(layers, src.cfg.n_layers)
  with heartbeat(f"loading layers {rng.describe()} of {os.path.basename(gguf)}"):
    stage = load_stage(src, rng, weights=weights, dtype=dtype, devices=devices)
  runner = StageRunner(stage, ctx_size=ctx_size, fingerprint=src.fingerprint)
  auth.warn_if_exposed(host, key)
  try:
    coord = coord_lib.Coordinator(runner, coord_lib.CoordinatorOptions(
        host=host, port=port, route_timeout=route_timeout, prefill_chunk=prefill_chunk,
        activation_dtype=activation_dtype, key=key, tls=tls, max_sessions=max_sessions))
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      raise ValueError(f"cannot listen on {host}:{port}: address already in use") from None
    raise
  return coord, coord.close


def check_port_free(host: str, port: int) -> None:
  """Raises a one-line error if HOST:PORT cannot be listened on right now."""
  import socket
  with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise ValueError(f"cannot listen on {host}:{port}: address already in use") from None
      raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def wait_for_route(backend, timeout: float, *, every_s: float = 2.0,
                   say: Callable[[str], None] | None = None,
                   poll: Callable[[], None] | None = None) -> None:
  """Waits for a complete route, saying "waiting for route: missing layer N" periodically.

  Raises the bridge's RouteUnavailable (a one-line error) after `timeout` seconds. `poll`
  runs on every check (e.g. to raise if a local worker process died).
  """
  if not hasattr(backend, "route_ready"):
    return
  say = say or (lambda m: logging.getLogger("ds4jax").info("%s", m))
  deadline = time.monotonic() + timeout
  last, last_reason = -1e9, None
  while True:
    if poll is not None:
      poll()
    ok, reason = backend.route_ready()
    if ok:
      if last_reason is not None:
        say("route ready")
      return
    now = time.monotonic()
    if now >= deadline:
      from ds4jax.wire.errors import RouteUnavailable
      raise RouteUnavailable(f"route unavailable: {reason} (waited {timeout:.0f}s for workers)")
    if now - last >= every_s or reason != last_reason:
      say(f"waiting for route: {reason}")
      last, last_reason = now, reason
    time.sleep(0.05)


# ------------------------------------------------------------------------------- sessions
def save_session(backend, sid: str, path: str, transcript) -> dict:
  """Saves session `sid` (transcript and every stage's KV state) to `path`, replacing an
  older snapshot there, and says so on stderr; returns the snapshot manifest."""
  from ds4jax.checkpoints import snapshots
  m = snapshots.save_session(backend, sid, path, overwrite=True, transcript=transcript)
  print(f"saved session: {len(m['tokens'])} tokens ({m['n_kv']} with KV state) to {path}",
        file=sys.stderr)
  return m


def restore_session(backend, sid: str, path: str) -> list[int]:
  """Restores the snapshot at `path` into session `sid`; returns its transcript."""
  from ds4jax.checkpoints import snapshots
  ids = snapshots.load_session(backend, sid, path)
  print(f"restored session: {len(ids)} tokens from {path}", file=sys.stderr)
  return ids


# --------------------------------------------------------------------------------- output
def format_route(info: dict) -> str:
  stages = info.get("route", [])
  parts = [f"{s.get('layers', s.get('range', '?'))}@{s.get('host', '?')}" for s in stages]
  return "route: " + " -> ".join(parts)


def format_hop_table(hops: list[dict]) -> str:
  """A fixed-width per-hop table from `GenerationResult.hop_summary()`."""
  head = (f"{'stage':<12}{'host':<22}{'prefill ms':>11}{'decode ms/tok':>14}{'queue ms':>10}"
          f"{'KiB in':>9}{'KiB out':>9}")
  lines = [head, "-" * len(head)]
  for h in hops:
    per_tok = 1e3 * h["decode_s"] / h["decode_steps"] if h["decode_steps"] else 0.0
    lines.append(f"{h['stage']:<12}{h['host']:<22}{1e3 * h['prefill_s']:>11.1f}{per_tok:>14.2f}"
                 f"{1e3 * h['queue_s']:>10.1f}{h['bytes_in'] / 1024:>9.1f}"
                 f"{h['bytes_out'] / 1024:>9.1f}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- error handling
def _one_line(e: BaseException) -> str:
  if isinstance(e, KeyError) and e.args:
    msg = str(e.args[0])
  elif isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
    msg = f"address already in use: {e.filename or e}"
  elif isinstance(e, OSError) and e.strerror and e.filename:
    msg = f"{e.strerror}: {e.filename}"
  else:
    msg = str(e)
  first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
  return first


def _input_errors() -> tuple[type[BaseException], ...]:
  from ds4jax.extras import MissingExtra  # a missing optional extra: what to pip install
  errs: list[type[BaseException]] = [ValueError, OSError, KeyError, TimeoutError, MissingExtra]
  try:
    from ds4jax.wire.errors import BridgeError
    errs.append(BridgeError)
  except ImportError:
    pass
  return tuple(errs)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag is one line on stderr (exit 2), not a usage dump."""
  global _config_path
  for k, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      _config_path = a.split("=", 1)[1]
    elif a == "--config" and k + 1 < len(argv):
      _config_path = argv[k + 1]
  try:
    return FLAGS(argv)
  except Exception as e:  # flags.Error, or whatever a broken config file raises on import
    if _config_path and not os.path.isfile(_config_path):
      msg = f"config file not found: {_config_path}"
    elif isinstance(e, flags.Error) and "config" not in str(e).lower():
      msg = _one_line(e)
    elif _config_path:
      msg = f"cannot load config file {_config_path}: {type(e).__name__}: {_one_line(e)}"
    else:
      msg = _one_line(e)
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[list[str]], int | None]) -> None:
  """`app.run(main)` with one-line errors: `error: <message>`, exit status 2, no traceback."""

  def wrapped(argv):
    logging.getLogger("gguf").setLevel(logging.WARNING)
    install_sigint_handler()
    try:
      return main(argv)
    except _input_errors() as e:
      print(f"error: {_one_line(e)}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      interrupt_handled()
      print("interrupted", file=sys.stderr)
      hard_exit(130)

  app.run(wrapped, flags_parser=parse_flags)


_SIGINT_RETRY_S = 0.5
_sigint_pending: threading.Event | None = None


def install_sigint_handler() -> None:
  """Ctrl-C raises KeyboardInterrupt, and raises it again until someone has handled it.

  Python drops an exception raised while it runs a gc callback or a `__del__` ("Exception
  ignored in ..."); jax registers such a gc callback, so a plain Ctrl-C is sometimes lost.
  The first SIGINT starts a thread that re-delivers it every 0.5 s until the code that catches
  KeyboardInterrupt calls `interrupt_handled()` (`run` does).
  """
  if threading.current_thread() is not threading.main_thread():
    return

  def redeliver(done: threading.Event):
    while not done.wait(_SIGINT_RETRY_S):
      _thread.interrupt_main(signal.SIGINT)

  def on_sigint(signum, frame):
    global _sigint_pending
    if _sigint_pending is None:
      _sigint_pending = threading.Event()
      threading.Thread(target=redeliver, args=(_sigint_pending,), name="sigint-redeliver",
                       daemon=True).start()
    raise KeyboardInterrupt

  def quiet_dropped_interrupt(unraisable):
    # The dropped KeyboardInterrupt is delivered again: no "Exception ignored" traceback.
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
      default_hook(unraisable)

  default_hook = sys.unraisablehook
  sys.unraisablehook = quiet_dropped_interrupt
  signal.signal(signal.SIGINT, on_sigint)


def interrupt_handled() -> None:
  """Tells the handler of `install_sigint_handler` that a KeyboardInterrupt was caught."""
  global _sigint_pending
  if _sigint_pending is not None:
    _sigint_pending.set()
    _sigint_pending = None


def hard_exit(code: int) -> None:
  """Exits now, skipping interpreter teardown, after stopping any local worker processes.

  After Ctrl-C, XLA may still be running a computation or a compilation on its own threads;
  a normal shutdown can then crash in native code, so the exit skips finalization.
  """
  cluster = sys.modules.get("ds4jax.local_cluster")
  if cluster is not None:
    cluster.stop_all()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def setup_logging() -> None:
  """INFO progress lines on stderr with a short prefix; library chatter (jax, gguf) muted."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().setFormatter(
      logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
  for name in ("jax", "gguf"):
    logging.getLogger(name).setLevel(logging.WARNING)


def compilation_cache_env(cache_dir: str | None = None) -> str:
  """Points JAX's persistent compilation cache at the cache dir via the environment, so this
  process (before JAX starts) and every child process (workers) share it."""
  from ds4jax.testing.tiny import cache_root
  d = str(cache_root(cache_dir) / "xla")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = d
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return d


def enable_compilation_cache(cache_dir: str | None = None) -> str:
  """Persists XLA compilations under the cache dir, so a second run starts in seconds."""
  import jax
  d = compilation_cache_env(cache_dir)
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return d


def free_port(host: str = "127.0.0.1") -> int:
  """An ephemeral port that is free right now (for starting workers before the listener)."""
  import socket
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]
