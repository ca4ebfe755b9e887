"""Test doubles for the server: a tokenizer over the tiny vocab and a fake split backend.

`FakeBackend` is a deterministic stand-in for the Coordinator: the next token is a hash of
the whole transcript (so a session that lost or mixed state would produce different text),
steps take `step_s` seconds, and the route is incomplete ("missing layer 2") until
`join()` is called. It records every session it opens and closes. A test can hold every step
(`hold`, an Event the steps wait for) and wait for one to be under way (`in_step`).

`linked_model` runs `model_proc.ModelServer` over any backend in a thread, joined to a
`ModelProcess` by a real socketpair: the server's model-process path without a child.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import subprocess
import threading
import time

import uvicorn

from ds4jax.config import LayerRange
from ds4jax.local_cluster import free_port
from ds4jax.runtime.types import HopTelemetry, StepResult
from ds4jax.testing import tiny_vocab
from ds4jax.tokenizer.tokenizer import Tokenizer

LETTERS = [tiny_vocab.BYTE_OFFSET + b for b in b"abcdefghij "]


def tiny_tokenizer(vocab_size: int = 300) -> Tokenizer:
  v = tiny_vocab.build_vocab(vocab_size)
  return Tokenizer.from_vocab(v.tokens, v.merges, v.token_type)


def next_token(transcript, eos: bool = True) -> int:
  h = hashlib.sha256(",".join(map(str, transcript)).encode()).digest()
  if eos and h[0] < 8:  # about 3% EOS, so some generations end early
    return tiny_vocab.EOS_ID
  return LETTERS[h[1] % len(LETTERS)]


class FakeBackend:
  """A thread-safe fake Backend with a route that completes on `join()`."""

  reports_prefill_progress = False  # the Generator logs prefill progress itself
  ctx_size = 1 << 16

  def __init__(self, *, n_layers: int = 4, coord_end: int = 1, ready: bool = True,
               step_s: float = 0.002, fail_on_token: int | None = None, eos: bool = True):
    self.n_layers = n_layers
    self.coord_end = coord_end
    self.local = LayerRange(0, coord_end)
    self.step_s = step_s
    self.fail_on_token = fail_on_token
    self.eos = eos
    self._ready = threading.Event()
    if ready:
      self._ready.set()
    self._lock = threading.Lock()
    self.open: set[str] = set()
    self.closed: list[str] = []
    self.steps = 0
    self._n = 0
    self.in_step = threading.Event()  # set once a step is under way
    self.hold: threading.Event | None = None  # when given, steps wait for it (up to 60 s)

  def join(self) -> None:
    self._ready.set()

  def leave(self) -> None:
    self._ready.clear()

  def route_ready(self):
    if self._ready.is_set():
      return True, "complete"
    return False, f"missing layer {self.coord_end + 1}"

  def route_info(self) -> dict:
    # The Coordinator's shape: workers with 'A:B[+output]' ranges and a ready flag, and the
    # layers no ready stage serves.
    ready = self._ready.is_set()
    workers = ([{"peer": "127.0.0.1:9", "ready": True,
                 "layers": f"{self.coord_end + 1}:{self.n_layers - 1}+output"}] if ready else [])
    missing = [] if ready else list(range(self.coord_end + 1, self.n_layers))
    return {"ready": ready, "workers": workers, "n_layers": self.n_layers,
            "missing_layers": missing}

  def new_session(self) -> str:
    with self._lock:
      self._n += 1
      sid = f"fake-{self._n}"
      self.open.add(sid)
    return sid

  def close_session(self, sid: str) -> None:
    with self._lock:
      self.open.discard(sid)
      self.closed.append(sid)

  def step(self, sid, transcript, sampling, step, *, top_logprobs=0, return_logits=False):
    if not self._ready.is_set():
      from ds4jax.wire.errors import RouteUnavailable
      raise RouteUnavailable("route lost")
    with self._lock:
      if sid not in self.open:
        raise KeyError(f"unknown session {sid}")
      self.steps += 1
    if self.fail_on_token is not None and self.fail_on_token in transcript:
      raise ValueError(f"token {self.fail_on_token} is outside the vocab")
    self.in_step.set()
    if self.hold is not None:
      self.hold.wait(60)
    time.sleep(self.step_s)
    hops = [HopTelemetry(stage=f"0:{self.coord_end}", host="local", compute_s=self.step_s / 2),
            HopTelemetry(stage=f"{self.coord_end + 1}:output", host="127.0.0.1:9",
                         compute_s=self.step_s / 2, queue_s=0.0001)]
    return StepResult(token=next_token(transcript, self.eos), logprobs=[], logits_V=None,
                      telemetry=hops, n_computed=1)


@contextlib.contextmanager
def serve_in_thread(app, port: int | None = None):
  """Runs `app` under uvicorn on 127.0.0.1 in a daemon thread; yields the base URL."""
  port = port or free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                         lifespan="on"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 10
  while not server.started:
    if time.monotonic() > deadline or not thread.is_alive():
      raise RuntimeError("uvicorn did not start")
    time.sleep(0.01)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(10)


class FakeProc:
  """Stands in for the child's Popen: 'exits' when the model server thread returns."""

  def __init__(self):
    self.returncode = None
    self.exited = threading.Event()

  def wait(self, timeout=None):
    if not self.exited.wait(timeout):
      raise subprocess.TimeoutExpired("model", timeout)
    self.returncode = 0
    return 0

  def terminate(self):
    self.exited.set()

  kill = terminate


@contextlib.contextmanager
def linked_model(backend, tokenizer, research=None, listen: str = "127.0.0.1:1"):
  """A `ModelProcess` whose model server (over `backend`, with `research`) runs in a thread
  of this process; yields it once ready, closes it after."""
  from ds4jax.generate.loop import Generator
  from ds4jax.serving import model_proc
  from ds4jax.serving.remote import ModelProcess
  ours, theirs = socket.socketpair()
  proc = FakeProc()
  server = model_proc.ModelServer(theirs, backend, tokenizer, Generator, research)

  def run():
    try:
      server.serve({"listen": listen})
    finally:
      theirs.close()
      proc.exited.set()

  threading.Thread(target=run, daemon=True).start()
  model = ModelProcess([], _attach=(ours, proc))
  try:
    assert model.wait_ready(10) == {"op": "ready", "listen": listen}
    yield model
  finally:
    model.close()
