"""Worker processes on this machine, for demos, notebooks and tests of the real split.

    with LocalWorkers(gguf, ["2:2", "3:output"], coordinator=("127.0.0.1", port)) as workers:
      ...  # the coordinator's route forms as they dial in

Each worker is `python scripts/worker.py` in its own process group, with its log in a file.
They are stopped (SIGTERM, then SIGKILL) when the block exits, at interpreter exit, on
SIGTERM/SIGHUP to this process, and by themselves if this process dies without cleaning up
(`--exit_with_parent`), so no worker outlives the process that started it.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER_SCRIPT = REPO / "scripts" / "worker.py"

_LIVE: "weakref.WeakSet[LocalWorkers]" = weakref.WeakSet()


class WorkerDied(RuntimeError):
  """A worker process exited while it was expected to serve."""


class LocalWorkers:
  """Starts one `scripts/worker.py` per range, dialing `coordinator`."""

  def __init__(self, gguf: str, ranges: Sequence[str], coordinator: tuple[str, int], *,
               ctx_size: int = 4096, cache_dir: str | None = None, log_dir: str | None = None,
               extra_args: Sequence[str] = ()):
    self.gguf = str(gguf)
    self.ranges = list(ranges)
    self.coordinator = coordinator
    self.ctx_size = int(ctx_size)
    self.cache_dir = cache_dir
    self.log_dir = pathlib.Path(log_dir or tempfile.mkdtemp(prefix="ds4jax-workers-"))
    self.extra_args = list(extra_args)
    self.procs: list[subprocess.Popen] = []
    self.logs: list[pathlib.Path] = []

  def start(self) -> "LocalWorkers":
    if not WORKER_SCRIPT.is_file():
      raise FileNotFoundError(f"worker script not found: {WORKER_SCRIPT}")
    _install_handlers()
    _LIVE.add(self)
    host, port = self.coordinator
    for rng in self.ranges:
      log = self.log_dir / f"worker-{rng.replace(':', '_')}.log"
      # --exit_with_parent: the worker watches its parent and exits if orphaned. (No
      # preexec_fn: running Python between fork and exec is unsafe with JAX's threads.)
      args = [sys.executable, str(WORKER_SCRIPT), f"--gguf={self.gguf}", f"--layers={rng}",
              f"--coordinator={host}:{port}", f"--ctx_size={self.ctx_size}", "--exit_with_parent",
              *self.extra_args]
      if self.cache_dir:
        args.append(f"--cache_dir={self.cache_dir}")
      env = dict(os.environ, DS4JAX_PARENT_PID=str(os.getpid()))
      with open(log, "wb") as f:
        self.procs.append(subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO),
            env=env, start_new_session=True))
      self.logs.append(log)
    return self

  def check(self) -> None:
    """Raises WorkerDied, with the last line of its log, if a worker has exited."""
    for rng, p, log in zip(self.ranges, self.procs, self.logs):
      if p.poll() is not None:
        raise WorkerDied(f"worker {rng} exited with status {p.returncode}: {self.tail(log)}")

  @staticmethod
  def tail(log: pathlib.Path, n: int = 1) -> str:
    try:
      lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
      return "(no log)"
    return " | ".join(lines[-n:]) if lines else "(empty log)"

  def stop(self, timeout: float = 5.0) -> None:
    """SIGTERM every worker's process group, then SIGKILL what is left after `timeout`."""
    for p in self.procs:
      if p.poll() is None:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in self.procs:
      try:
        p.wait(max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        _signal_group(p, signal.SIGKILL)
        p.wait()
    _LIVE.discard(self)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(p.pid, sig)  # start_new_session: the group id is the child's pid
  except (ProcessLookupError, PermissionError):
    pass


def stop_all() -> None:
  for w in list(_LIVE):
    w.stop(timeout=2.0)


_installed = False


def _install_handlers() -> None:
  """Stops workers at exit and on SIGTERM/SIGHUP (SIGINT already raises KeyboardInterrupt)."""
  global _installed
  if _installed:
    return
  _installed = True
  atexit.register(stop_all)

  def on_signal(signum, frame):
    stop_all()
    # Skip interpreter teardown: XLA threads may be mid-computation (see cli.hard_exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)

  for sig in (signal.SIGTERM, signal.SIGHUP):
    try:
      if signal.getsignal(sig) in (signal.SIG_DFL, None):
        signal.signal(sig, on_signal)
    except ValueError:
      pass  # not the main thread: atexit still covers a normal exit


__all__ = ["LocalWorkers", "WorkerDied", "stop_all"]
