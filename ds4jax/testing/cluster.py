"""One split route for a whole test session, shared by the front ends under test.

Worker processes (`scripts/worker.py`, through `local_cluster.LocalWorkers`) serve the layers
after the coordinator's and dial one fixed loopback port for the whole session. A front end
under test (generate.py --listen, serve.py, the LocalAI backend) gets its route by listening
on that port with the coordinator's layers. When it exits, the workers see the link close,
drop its sessions and redial; the next front end to listen there gets them, already loaded
and compiled.

    route = SharedRoute(gguf, ctx_size=128, cache_dir=d, log_dir=logs).start()
    ...  # scripts/generate.py --layers=0:1 --listen={route.listen} --ctx_size=128
    route.pause()  # the workers are stopped (SIGSTOP): no route ...
    route.resume()  # ... until they redial and join

Rules for a front end on the shared route: the same model, `layers` = `route.layers`, a
context of at most `route.ctx_size`, no key and no TLS. A refused HELLO ends a worker for
good; `ensure()` restarts any worker that has exited.

The port is taken below the kernel's ephemeral range, so no port-0 listener of another test
can be handed it while the workers dial.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import socket
from typing import Sequence

from ds4jax.local_cluster import LocalWorkers


def _ephemeral_low() -> int:
  try:
    return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
  except (OSError, ValueError, IndexError):
    return 32768


def reserved_port(host: str = "127.0.0.1", tries: int = 200) -> int:
  """A free port below the ephemeral range (so the kernel never hands it to a port-0 bind)."""
  hi = min(_ephemeral_low(), 32768)
  rng = random.Random()
  for _ in range(tries):
    port = rng.randrange(10000, hi)
    with socket.socket() as s:
      try:
        s.bind((host, port))
      except OSError:
        continue
      return port
  raise RuntimeError(f"no free port in 10000..{hi} on {host}")


class SharedRoute:
  """Workers for `ranges` dialing `127.0.0.1:port` until `stop()`."""

  def __init__(self, gguf: str, *, layers: str = "0:1", ranges: Sequence[str] = ("2:output",),
               ctx_size: int, cache_dir: str | None = None, log_dir: str | None = None,
               max_sessions: int = 10):
    self.gguf = str(gguf)
    self.layers = layers
    self.ctx_size = int(ctx_size)
    self.port = reserved_port()
    self.listen = f"127.0.0.1:{self.port}"
    self.workers = LocalWorkers(
        self.gguf, list(ranges), ("127.0.0.1", self.port), ctx_size=self.ctx_size,
        cache_dir=cache_dir, log_dir=log_dir,
        extra_args=["--backoff_min=0.05", "--backoff_max=0.3", f"--max_sessions={max_sessions}"])

  def start(self) -> "SharedRoute":
    self.workers.start()
    return self

  def ensure(self) -> None:
    """Restarts every worker that has exited (its log keeps the reason)."""
    w = self.workers
    for i, p in enumerate(w.procs):
      if p.poll() is not None:
        single = LocalWorkers(w.gguf, [w.ranges[i]], w.coordinator, ctx_size=w.ctx_size,
                              cache_dir=w.cache_dir, log_dir=str(w.log_dir),
                              extra_args=w.extra_args).start()
        w.procs[i], w.logs[i] = single.procs[0], single.logs[0]

  def _signal(self, sig: int) -> None:
    for p in self.workers.procs:
      if p.poll() is None:
        os.killpg(p.pid, sig)

  def pause(self) -> None:
    """Stops the workers (SIGSTOP): a coordinator that starts meanwhile has no route; once
    resumed they redial and join it."""
    self.ensure()
    self._signal(signal.SIGSTOP)

  def resume(self) -> None:
    self._signal(signal.SIGCONT)

  def logs(self, n: int = 20) -> str:
    return "\n".join(f"--- {r}: {self.workers.tail(log, n)}"
                     for r, log in zip(self.workers.ranges, self.workers.logs))

  def stop(self) -> None:
    self.resume()
    self.workers.stop()
