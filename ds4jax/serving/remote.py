"""The server side of the model process (see model_proc.py for the why and the wire format).

`ModelProcess` starts `python -m ds4jax.serving.model_proc`, keeps the latest route snapshot it
pushes (so route queries cost a dict read, never a model call), and turns each request into
event-driven work for `Engine.run` (`start(emit, fail, done)` / `cancel()`), fed by the one
thread that reads the model process's messages.

    model = ModelProcess(["--gguf=m.gguf", "--layers=0:1", "--listen=0.0.0.0:7000"])
    ready = model.wait_ready(timeout=600)        # {"listen": "0.0.0.0:7000"}
    app = create_app(model, None, "m")
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

from ds4jax.wire.errors import RouteUnavailable
from ds4jax.serving import generation
from ds4jax.serving.research import BadRequest

log = logging.getLogger("ds4jax.serving")

_EXIT = object()


class ModelProcessError(ChildProcessError):
  """The model process failed to start, or exited."""


def read_messages(conn: socket.socket) -> Iterator[dict[str, Any]]:
  """The messages arriving on one end of the model process's socket (JSON objects, one a
  line: the wire format of model_proc.py), until it closes; ValueError for a bad line."""
  for line in conn.makefile("rb"):
    yield json.loads(line)


def _job_to_dict(job: generation.GenerationJob) -> dict[str, Any]:
  d = {"prompt": job.prompt, "messages": job.messages, "max_tokens": job.max_tokens,
       "sampling": job.sampling.to_dict(), "stop": list(job.stop)}
  for k in ("steering", "capture"):
    if getattr(job, k) is not None:
      d[k] = getattr(job, k)
  return d


def _event(d: dict[str, Any]):
  kind = d["type"]
  if kind == "stepped":
    return generation.Stepped(d["n"], d["wall_s"], tuple(d["telemetry"]))
  if kind == "piece":
    return generation.Piece(d["text"])
  return generation.Finished(d["finish_reason"], d["prompt_tokens"], d["completion_tokens"],
                             d["timings"], d.get("captured"), d.get("cached_tokens", 0))


def _error(kind: str, message: str) -> Exception:
  if kind == "route":
    return RouteUnavailable(message)
  if kind == "request":
    return BadRequest(message)
  if kind == "value":
    return ValueError(message)
  return RuntimeError(message)


class ModelProcess:
  """A child process running the model; quacks like the server's in-process backend."""

  # route_ready/route_info/uncovered_layers read the pushed snapshot: instant, never blocking.
  route_is_cached = True

  def __init__(self, args: Sequence[str], *, env: Optional[dict[str, str]] = None,
               _attach: Optional[tuple[socket.socket, Any]] = None):
    if _attach is not None:  # tests: (socket, process-like) of a model server run elsewhere
      self.conn, self.proc = _attach
    else:
      ours, theirs = socket.socketpair()
      cmd = [sys.executable, "-m", "ds4jax.serving.model_proc", f"--fd={theirs.fileno()}",
             *args]
      # The child's stdout/stderr are the server's: its log lines show up with the server's.
      self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=env or dict(os.environ))
      theirs.close()
      self.conn = ours
    self._send_lock = threading.Lock()
    self._handlers: dict[str, Callable] = {}
    self._ids = itertools.count(1)
    self._ready = threading.Event()
    self._ready_msg: dict[str, Any] = {}
    self._route: dict[str, Any] = {"ok": False, "reason": "model process starting", "info": {},
                                   "missing": None, "sessions": 0}
    self.exited: Optional[str] = None
    self._closing = False
    threading.Thread(target=self._read_loop, daemon=True, name="model-proc-reader").start()

  # ---- lifecycle ----------------------------------------------------------------------------

  def wait_ready(self, timeout: Optional[float] = None) -> dict[str, Any]:
    """Blocks until the model is loaded (and listening); ModelProcessError if it died."""
    self._ready.wait(timeout)
    if self.exited:
      raise ModelProcessError(self.exited)
    if not self._ready.is_set():
      raise ModelProcessError(f"the model process was not ready after {timeout:.0f}s")
    return dict(self._ready_msg)

  def close(self, timeout: float = 10.0) -> None:
    self._closing = True
    try:
      self._send({"op": "shutdown"})
    except OSError:
      pass
    try:
      self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.terminate()
      try:
        self.proc.wait(5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.conn.close()

  def _send(self, msg: dict[str, Any]) -> None:
    data = (json.dumps(msg) + "\n").encode()
    with self._send_lock:
      self.conn.sendall(data)

  def _read_loop(self) -> None:
    try:
      for msg in read_messages(self.conn):
        op = msg.get("op")
        if op == "route":
          self._route = msg
        elif op == "ready":
          self._ready_msg = msg
          self._ready.set()
        elif op == "failed":
          self.exited = msg.get("message", "the model process failed")
        elif op in ("event", "error", "done"):
          handler = self._handlers.get(msg["rid"])
          if handler is not None:
            handler(msg)
    except (OSError, ValueError) as e:
      log.error("model process link failed: %s", e)
    code = self.proc.wait()
    self.exited = self.exited or f"the model process exited (code {code})"
    if self._ready.is_set() and not self._closing:  # it died while serving: requests now wait, then get 503
      log.error("%s; requests will get 503 until the server is restarted", self.exited)
    self._route = {"ok": False, "reason": self.exited, "info": {}, "missing": None,
                   "sessions": 0}
    self._ready.set()
    for handler in list(self._handlers.values()):
      handler(_EXIT)

  # ---- what Engine and the app use ------------------------------------------------------------

  def route_ready(self) -> tuple[bool, str]:
    r = self._route
    return bool(r["ok"]), str(r["reason"])

  def route_info(self) -> dict:
    return dict(self._route.get("info") or {})

  def uncovered_layers(self, info: dict) -> Optional[list[int]]:
    return self._route.get("missing")

  def n_open(self) -> int:
    return int(self._route.get("sessions", 0))

  def make_work(self, job: generation.GenerationJob) -> "_RemoteJob":
    """The job as event-driven work for `Engine.run` (see `_RemoteJob`)."""
    return _RemoteJob(self, job)


class _RemoteJob:
  """One request in the model process. No thread of its own: the reader thread delivers its
  events through the callbacks given to `start`, so many concurrent requests cost the server
  no extra threads (and no GIL contention next to the event loop)."""

  def __init__(self, model: ModelProcess, job: generation.GenerationJob):
    self.model = model
    self.job = job
    self.rid = f"r{next(model._ids)}"
    self._cancelled = False
    self._finished = False

  def start(self, emit: Callable, fail: Callable, done: Callable) -> None:
    model = self.model

    def on_message(msg) -> None:
      if self._finished:
        return
      if msg is _EXIT:
        self._finish()
        fail(ModelProcessError(model.exited or "the model process exited"))
        done()
      elif msg["op"] == "done":
        self._finish()
        done()
      elif msg["op"] == "error":
        self._finish()
        fail(_error(msg["kind"], msg["message"]))
        done()
      elif not self._cancelled:
        emit(_event(msg["ev"]))

    if model.exited:
      fail(ModelProcessError(model.exited))
      done()
      return
    model._handlers[self.rid] = on_message
    try:
      model._send({"op": "generate", "rid": self.rid, "job": _job_to_dict(self.job)})
    except OSError as e:
      self._finish()
      fail(ModelProcessError(f"the model process is gone: {e}"))
      done()

  def _finish(self) -> None:
    self._finished = True
    self.model._handlers.pop(self.rid, None)

  def cancel(self) -> None:
    """Stops the generation (the model process frees its session); idempotent."""
    if self._cancelled or self._finished:
      return
    self._cancelled = True
    try:
      self.model._send({"op": "cancel", "rid": self.rid})
    except OSError:
      pass


__all__ = ["ModelProcess", "ModelProcessError"]
