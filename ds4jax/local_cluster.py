"""Processes on this machine, for demos, notebooks, benchmarks and tests of the real split:
worker processes, the ports they meet on, and their memory.

    port = free_port()
    with LocalWorkers(gguf, ["2:2", "3:output"], coordinator=("127.0.0.1", port)) as workers:
      ...  # the coordinator's route forms as they dial in

Each worker is `python scripts/worker.py` in its own process group (`spawn`), with its log in
a file. They are stopped (SIGTERM, then SIGKILL) when the block exits, at interpreter exit, on
SIGTERM/SIGHUP to this process, and by themselves if this process dies without cleaning up
(`--exit_with_parent`), so no worker outlives the process that started it.

`rss_bytes(pid)` is a process's resident memory now, `tree_rss_bytes` that of it and its
descendants, `peak_rss_bytes` its high-water mark (VmHWM).
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Sequence

import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER_SCRIPT = REPO / "scripts" / "worker.py"

_LIVE: "weakref.WeakSet[LocalWorkers]" = weakref.WeakSet()


def free_port(host: str = "127.0.0.1") -> int:
  """An ephemeral port that is free right now (for starting workers before the listener)."""
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def spawn(args: Sequence[str], log: pathlib.Path | None, env: dict[str, str] | None = None
            ) -> subprocess.Popen:
  """`python *args` in its own process group (stop it with `signal_group`), from the
  repository root, stdin closed, stdout and stderr into the file `log` (None: this
  process's)."""
  # No preexec_fn: running Python between fork and exec is unsafe with JAX's threads.
  argv = [sys.executable, *map(str, args)]
  if log is None:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=str(REPO), env=env,
                            start_new_session=True)
  with open(log, "wb") as f:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                            cwd=str(REPO), env=env, start_new_session=True)


def log_tail(log: pathlib.Path, n: int = 1) -> str:
  """The last `n` non-empty lines of a log, joined with " | "."""
  try:
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
  except OSError:
    return "(no log)"
  return " | ".join(lines[-n:]) if lines else "(empty log)"


def rss_bytes(pid: int | None = None) -> int:
  """The resident memory of process `pid` (None: this one) now; 0 if it is gone."""
  try:
    return int(psutil.Process(pid).memory_info().rss)
  except (psutil.Error, OSError):
    return 0


def tree_rss_bytes(pid: int) -> int:
  """The resident memory of `pid` and all its descendants now."""
  try:
    kids = psutil.Process(pid).children(recursive=True)
  except (psutil.Error, OSError):
    return 0
  return rss_bytes(pid) + sum(rss_bytes(k.pid) for k in kids)


def peak_rss_bytes(pid: int | str = "self") -> int | None:
  """The peak resident memory (VmHWM) of `pid`; None where /proc cannot tell (for this
  process, getrusage's ru_maxrss then)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return 1024 * int(line.split()[1])
  except OSError:
    pass
  if pid == "self":
    import resource
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return None


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
    # A folder of our own goes at stop() unless a worker died (its log says why).
    self._own_logs, self.failed = log_dir is None, False
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
      # --exit_with_parent: the worker watches its parent and exits if orphaned.
      args = [WORKER_SCRIPT, f"--gguf={self.gguf}", f"--layers={rng}",
              f"--coordinator={host}:{port}", f"--ctx_size={self.ctx_size}", "--exit_with_parent",
              *self.extra_args]
      if self.cache_dir:
        args.append(f"--cache_dir={self.cache_dir}")
      env = dict(os.environ, DS4JAX_PARENT_PID=str(os.getpid()))
      self.procs.append(spawn(args, log, env))
      self.logs.append(log)
    return self

  def check(self) -> None:
    """Raises WorkerDied, with the last line of its log, if a worker has exited."""
    for rng, p, log in zip(self.ranges, self.procs, self.logs):
      if p.poll() is not None:
        self.failed = True
        raise WorkerDied(f"worker {rng} exited with status {p.returncode}: {log_tail(log)}")

  def stop(self, timeout: float = 5.0) -> None:
    """SIGTERM every worker's process group, then SIGKILL what is left after `timeout`."""
    for p in self.procs:
      if p.poll() is None:
        signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in self.procs:
      try:
        p.wait(max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        signal_group(p, signal.SIGKILL)
        p.wait()
    _LIVE.discard(self)
    if self._own_logs and not self.failed:
      shutil.rmtree(self.log_dir, ignore_errors=True)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


def signal_group(p: subprocess.Popen, sig: int) -> None:
  """Sends `sig` to the process group of a `spawn`ed process (gone already: nothing)."""
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


__all__ = ["LocalWorkers", "WorkerDied", "free_port", "log_tail", "peak_rss_bytes", "rss_bytes",
           "signal_group", "spawn", "stop_all", "tree_rss_bytes"]
