"""The backend a script's run options ask for, built by `ds4jax.build`, and what scripts do
with it: wait for its route, save and restore sessions.

    backend, close = cli.build_backend()   # local without --listen, else a coordinator
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from ds4jax import build
from ds4jax.cli.flags import kv_disk_options, option, weight_options
from ds4jax.cli.paths import resolve_gguf


def build_backend():
  """The backend the run options ask for, compiled for every shape it serves: a
  `LocalBackend` without --listen (--layers: one range, or several comma-separated for an
  in-process split), else a listening `Coordinator` for --layers (0:K); with
  --kv_disk_dir, either one keeps ds4's disk KV cache there.

  Returns (backend, close) where close() stops its threads and releases its sockets.
  """
  kv_disk = kv_disk_options()  # its one-line errors before the model is looked for
  gguf = resolve_gguf(option("gguf"), option("cache_dir"))
  common = dict(ctx_size=int(option("ctx_size", 4096)),
                prefill_chunk=int(option("prefill_chunk", 256)),
                max_sessions=int(option("max_sessions", 8)), **weight_options(), **kv_disk)
  listen = option("listen")
  layers = option("layers", "all") or "all"
  if not listen:
    ranges = ("all",) if layers == "all" else tuple(layers.split(","))
    try:
      backend = build.local_backend(gguf, ranges=ranges, **common)
    except ValueError as e:
      if layers == "all":
        raise
      raise ValueError(f"--layers={layers} without --listen runs every stage in this process, "
                       f"and {e}: list ranges for every layer (e.g. --layers=0:1,2:output), or "
                       "pass --listen=HOST:PORT to coordinate workers for the rest") from None
    return backend, backend.close
  if layers == "all":
    raise ValueError(f"--listen={listen} makes this process the coordinator of layers 0:K and "
                     "the workers own the rest: pass --layers=0:K (or drop --listen to run "
                     "every layer here)")
  coord = build.coordinator(gguf, layers=layers, listen=listen,
                            route_timeout=float(option("route_timeout", 60.0)),
                            activation_dtype=option("activation_dtype", "f32"),
                            key_file=option("key_file"), tls_cert=option("tls_cert"),
                            tls_key=option("tls_key"), **common)
  return coord, coord.close


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
