"""Running a script's main: one-line errors, Ctrl-C that is never lost, quiet logging.

    cli.run(main)       # instead of absl's app.run(main)

Bad input (a ValueError, OSError, KeyError, TimeoutError, a missing extra, a bridge error)
prints `error: <one line>` on stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
from typing import Callable

from absl import app

from ds4jax.cli.flags import parse_flags
from ds4jax.errors import one_line


def input_errors() -> tuple[type[BaseException], ...]:
  """The exception types that mean bad input (one line, exit status 2), not a bug."""
  from ds4jax.extras import MissingExtra  # a missing optional extra: what to pip install
  errs: list[type[BaseException]] = [ValueError, OSError, KeyError, TimeoutError, MissingExtra]
  try:
    from ds4jax.wire.errors import BridgeError
    errs.append(BridgeError)
  except ImportError:
    pass
  return tuple(errs)


def run(main: Callable[[list[str]], int | None]) -> None:
  """`app.run(main)` with one-line errors: `error: <message>`, exit status 2, no traceback."""

  def wrapped(argv):
    logging.getLogger("gguf").setLevel(logging.WARNING)
    install_sigint_handler()
    try:
      return main(argv)
    except input_errors() as e:
      print(f"error: {one_line(e)}", file=sys.stderr)
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


def begin(argv: list[str], gguf: str | None = None, cache_dir: str | None = None) -> str | None:
  """A script's first lines: no stray arguments, progress logging, the persistent compilation
  cache in `cache_dir`; returns the path of `gguf` (a built-in name or a file), if given."""
  from ds4jax.cli.paths import enable_compilation_cache, resolve_gguf
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  setup_logging()
  enable_compilation_cache(cache_dir)
  return None if gguf is None else resolve_gguf(gguf, cache_dir)


def setup_logging() -> None:
  """INFO progress lines on stderr with a short prefix; library chatter (jax, gguf) muted."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().setFormatter(
      logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
  for name in ("jax", "gguf"):
    logging.getLogger(name).setLevel(logging.WARNING)
