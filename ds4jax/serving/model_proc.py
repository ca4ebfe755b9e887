"""The model process: runs the backend (LocalBackend or Coordinator) apart from the HTTP server.

Why a second process: JAX tracing and XLA compilation hold the GIL for hundreds of ms (seconds
on a loaded host), so an HTTP server sharing the interpreter cannot promise that `/health`
answers within 100 ms. The server process never imports JAX; it talks to this one over a
socketpair with JSON lines (no pickle):

  server -> model   {"op": "generate", "rid": R, "job": {...}}   {"op": "cancel", "rid": R}
                    (a job's optional "steering" and "capture": the request's fields)
                    {"op": "shutdown"}
  model -> server   {"op": "ready", "listen": "HOST:PORT"|null, "model": NAME}
                    {"op": "route", "ok": b, "reason": s, "info": {...}, "missing": [...],
                     "sessions": n}                                 (on change, else every 1 s)
                    {"op": "event", "rid": R, "ev": {"type": "stepped"|"piece"|"finished", ...}}
                    {"op": "error", "rid": R, "kind": "route"|"request"|"value"|"internal",
                     "message": s}
  (a "finished" event carries "captured", research.encode_captured's form, when asked)
                    {"op": "done", "rid": R}

Started by `ds4jax.serving.remote.ModelProcess` as
`python -m ds4jax.serving.model_proc --fd=N <the run flags of scripts/serve.py>`.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from typing import Any

from absl import flags

from ds4jax import cli
from ds4jax.serving import generation
from ds4jax.serving.engine import SessionTracker
from ds4jax.serving.research import DEFAULT_MAX_CAPTURE_BYTES, BadRequest, Research

log = logging.getLogger("ds4jax.serving")
# How often the route is re-checked and pushed to the server (also a push at every change).
ROUTE_PUSH_S = 0.05
ROUTE_REFRESH_S = 1.0


def define_flags() -> None:
  """The flags of scripts/serve.py (the model process accepts the same command line)."""
  cli.define_run_flags(prompt=False)
  flags.DEFINE_string("http", "127.0.0.1:8000", "HOST:PORT for the HTTP API (port 0: any).")
  flags.DEFINE_string("model_name", None, "The model id clients name (default: the GGUF's name).")
  # 8 matches the session caches of LocalBackend and of workers (--max_sessions): more live
  # sessions than a worker keeps makes it evict and rebuild KV on every step.
  flags.DEFINE_integer("max_concurrency", 8, "Requests generating at once; the rest queue. "
                       "Keep it <= the workers' --max_sessions.", lower_bound=1)
  flags.DEFINE_float("queue_timeout", 30.0, "Seconds a request waits for a generation slot "
                     "(--max_concurrency) before HTTP 429 with Retry-After.", lower_bound=0.0)
  flags.DEFINE_enum("http_log_level", "warning", ["debug", "info", "warning", "error"],
                    "uvicorn's log level (access lines at info).")
  flags.DEFINE_string("steering_dir", None, "A directory of steering files that requests may "
                      "name (plain file names in their `steering` field); none: requests may "
                      "only re-scale the --dir_steering_*/--expert_steering_* files.")
  flags.DEFINE_float("max_capture_mb", DEFAULT_MAX_CAPTURE_BYTES / 2**20, "The most MiB of "
                     "captured arrays one response may carry (a request over it: HTTP 400 "
                     "before any compute); 0 refuses captures.", lower_bound=0.0)
  flags.DEFINE_boolean("in_process", False, "Run the model inside the HTTP server's process "
                       "(saves a process; /health may stall while JAX compiles).")


def research_from_flags(gguf: str) -> Research:
  """The server's `Research` from its flags: the ds4 steering flags as every request's
  default (a bad file fails here, before any load), --steering_dir, --max_capture_mb."""
  from ds4jax.runtime import sources
  cfg = sources.model_info(gguf)[0]
  return Research(cfg, defaults=cli.steering_options(), steering_dir=flags.FLAGS.steering_dir,
                  max_capture_bytes=int(flags.FLAGS.max_capture_mb * 2**20))


def job_from_dict(d: dict[str, Any]) -> generation.GenerationJob:
  from ds4jax.runtime.sampling import SamplingParams
  return generation.GenerationJob(prompt=d["prompt"], messages=d["messages"],
                                  max_tokens=int(d["max_tokens"]),
                                  sampling=SamplingParams.from_dict(d["sampling"]),
                                  stop=tuple(d["stop"]), steering=d.get("steering"),
                                  capture=d.get("capture"))


def event_to_dict(ev) -> dict[str, Any]:
  if isinstance(ev, generation.Stepped):
    return {"type": "stepped", "n": ev.n, "wall_s": ev.wall_s,
            "telemetry": [h.to_dict() for h in ev.telemetry]}
  if isinstance(ev, generation.Piece):
    return {"type": "piece", "text": ev.text}
  out = {"type": "finished", "finish_reason": ev.finish_reason,
         "prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
         "timings": ev.timings, "cached_tokens": ev.cached_tokens}
  if ev.captured is not None:
    out["captured"] = ev.captured
  return out


def error_kind(e: BaseException) -> str:
  if type(e).__name__ == "RouteUnavailable":
    return "route"
  if isinstance(e, BadRequest):
    return "request"
  return "value" if isinstance(e, ValueError) else "internal"


class ModelServer:
  """The model side of the socketpair: one thread per request, a route pusher, a reader."""

  def __init__(self, conn: socket.socket, backend, tokenizer, generator_cls, research=None):
    self.conn = conn
    self.research = research  # the server's default steering, request steering and capture
    self.tracked = SessionTracker(backend)
    self.tokenizer = tokenizer
    self.generator_cls = generator_cls
    self._send_lock = threading.Lock()
    self._running: dict[str, threading.Event] = {}
    self._stop = threading.Event()

  def send(self, msg: dict[str, Any]) -> None:
    data = (json.dumps(msg, ensure_ascii=False) + "\n").encode()
    with self._send_lock:
      try:
        self.conn.sendall(data)
      except OSError:  # the server is gone; the reader loop ends too
        self._stop.set()

  def route_msg(self) -> dict[str, Any]:
    ok, reason = self.tracked.route_ready()
    try:
      info = dict(self.tracked.route_info())
    except Exception as e:
      info = {"route_info_error": f"{type(e).__name__}: {e}"}
    missing = self.tracked.uncovered_layers(info)
    return {"op": "route", "ok": ok, "reason": reason, "info": info, "missing": missing,
            "sessions": len(self.tracked.open)}

  def _route_loop(self) -> None:
    last, last_t = None, 0.0
    while not self._stop.wait(ROUTE_PUSH_S):
      msg = self.route_msg()
      key = json.dumps(msg, sort_keys=True, default=str)
      if key != last or time.monotonic() - last_t >= ROUTE_REFRESH_S:
        self.send(msg)
        last, last_t = key, time.monotonic()

  def _run(self, rid: str, job: generation.GenerationJob, cancel: threading.Event) -> None:
    try:
      work = generation.make_work(self.tracked, self.tokenizer, job, self.generator_cls,
                                  self.research)
      work(cancel, lambda ev: self.send({"op": "event", "rid": rid, "ev": event_to_dict(ev)}))
    except Exception as e:
      kind = error_kind(e)
      if kind == "internal":
        log.exception("generation %s failed", rid)
      # A bad request field's message is the client's answer as it stands.
      message = str(e) if kind == "request" else f"{type(e).__name__}: {e}"
      self.send({"op": "error", "rid": rid, "kind": kind, "message": message})
    finally:
      self._running.pop(rid, None)
      self.send({"op": "done", "rid": rid})

  def serve(self, ready: dict[str, Any]) -> None:
    self.send(self.route_msg())
    self.send({"op": "ready", **ready})
    threading.Thread(target=self._route_loop, daemon=True, name="route-push").start()
    reader = self.conn.makefile("rb")
    try:
      for line in reader:
        msg = json.loads(line)
        op = msg.get("op")
        if op == "generate":
          cancel = threading.Event()
          self._running[msg["rid"]] = cancel
          threading.Thread(target=self._run, args=(msg["rid"], job_from_dict(msg["job"]), cancel),
                           daemon=True, name=f"gen-{msg['rid']}").start()
        elif op == "cancel":
          ev = self._running.get(msg["rid"])
          if ev is not None:
            ev.set()
        elif op == "shutdown":
          break
    finally:
      self._stop.set()
      for ev in list(self._running.values()):
        ev.set()


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  conn = socket.socket(fileno=flags.FLAGS.fd)
  cli.enable_compilation_cache(cli.option("cache_dir"))
  from ds4jax.generate.loop import Generator
  from ds4jax.runtime import sources

  gguf = cli.resolve_gguf(cli.option("gguf"), cli.option("cache_dir"))
  try:
    research = research_from_flags(gguf)  # a bad steering file fails before the load
    backend, close = cli.build_backend()
  except Exception as e:  # one line to the server, which prints it and exits
    conn.sendall((json.dumps({"op": "failed", "message": cli.one_line(e)}) + "\n").encode())
    raise
  try:
    tokenizer = sources.open_tokenizer(gguf)
    address = getattr(backend, "address", None)
    ready = {"listen": f"{address[0]}:{address[1]}" if address else None}
    ModelServer(conn, backend, tokenizer, Generator, research).serve(ready)
  finally:
    close()


if __name__ == "__main__":
  define_flags()
  flags.DEFINE_integer("fd", None, "The socketpair end to talk to the server on.")
  sys.exit(cli.run(main))
