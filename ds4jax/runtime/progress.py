"""Progress lines for long waits (GGUF loads, prefills) that have no finer-grained hook."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

log = logging.getLogger("ds4jax.generate")


@contextlib.contextmanager
def heartbeat(what: str, every_s: float = 5.0):
  """Logs "<what>: 12s" every `every_s` seconds until the block ends; silent if it is quick."""
  done = threading.Event()
  t0 = time.perf_counter()

  def beat():
    while not done.wait(every_s):
      log.info("%s: %.0fs", what, time.perf_counter() - t0)

  t = threading.Thread(target=beat, daemon=True, name="ds4jax-heartbeat")
  t.start()
  try:
    yield
  finally:
    done.set()
    t.join()


__all__ = ["heartbeat"]
