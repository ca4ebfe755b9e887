"""One request's generation as a thread-side `work(cancel, emit)` function for `Engine.run`.

The work function drives `generate.loop.Generator` (so the server's text is exactly what
`scripts/generate.py` prints for the same request) and emits, in order:

  Stepped(n)   after every backend step (the first one marks the end of the prefill),
  Piece(text)  for every streamed text piece,
  Finished(…)  once, with the finish reason, token counts and the asked capture (encoded).

A job's `steering` and `capture` (the request's fields) are resolved by the server's
`research.Research` before the first step: a bad one is a `BadRequest` and nothing runs.

Cancellation is checked before every backend step: a set flag raises inside the generator's
loop, whose `finally` closes the session, so a client that leaves frees its KV state at once.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Optional, Sequence

from ds4jax.runtime.sampling import SamplingParams
from ds4jax.serving.research import BadRequest, encode_captured

# OpenAI knows "stop" and "length"; the loop's "eos" is a natural stop.
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclasses.dataclass(frozen=True)
class GenerationJob:
  """What to generate: a text or token prompt, or chat messages ({'role', 'content'}).

  steering: ds4 steering options overriding the server's (`Research.options`); None: the
    server's own.
  capture: {"points", "layers", "positions"} to capture (`Research.capture`); None: none.
  """

  prompt: Optional[str | list[int]]
  messages: Optional[list[dict[str, str]]]
  max_tokens: int
  sampling: SamplingParams
  stop: Sequence[str] = ()
  steering: Optional[dict[str, Any]] = None
  capture: Optional[dict[str, Any]] = None


@dataclasses.dataclass(frozen=True)
class Stepped:
  n: int  # steps done so far in this request
  wall_s: float = 0.0  # this step's wall time
  telemetry: tuple = ()  # its HopTelemetry (or dicts with the same fields)


@dataclasses.dataclass(frozen=True)
class Piece:
  text: str


@dataclasses.dataclass(frozen=True)
class Finished:
  finish_reason: str
  prompt_tokens: int
  completion_tokens: int
  timings: dict[str, float]
  captured: Optional[dict[str, Any]] = None  # research.encode_captured's form
  cached_tokens: int = 0  # prompt tokens reused, not computed (session or disk KV cache)


class Cancelled(Exception):
  """Raised inside the generation loop when the client has gone away."""


class _StepHook:
  """A per-request view of the shared backend: checks cancel and reports each step."""

  def __init__(self, backend, cancel: threading.Event, on_step: Callable[[Any], None]):
    self._backend = backend
    self._cancel = cancel
    self._on_step = on_step

  @property
  def reports_prefill_progress(self) -> bool:
    return self._backend.reports_prefill_progress

  @property
  def ctx_size(self) -> int:
    return self._backend.ctx_size

  @property
  def cfg(self):
    return self._backend.cfg

  def new_session(self) -> str:
    return self._backend.new_session()

  def close_session(self, sid: str) -> None:
    self._backend.close_session(sid)

  def step(self, *args, **kw):
    if self._cancel.is_set():
      raise Cancelled()
    t0 = time.perf_counter()
    res = self._backend.step(*args, **kw)
    self._on_step(res, time.perf_counter() - t0)
    return res

  def route_info(self) -> dict:
    return self._backend.route_info()


def prompt_ids(tokenizer, job: GenerationJob) -> Optional[list[int]]:
  """The transcript for chat jobs (the ds4 chat format); None for text/token prompts."""
  if job.messages is None:
    return None
  return tokenizer.chat_prompt([(m["role"], m["content"]) for m in job.messages])


def make_work(backend, tokenizer, job: GenerationJob, generator_cls, research=None):
  """The `work(cancel, emit)` function that runs `job` on `backend` in a thread; `research`
  (a `research.Research`) resolves the job's steering (the server's flags by default) and
  capture. Without one, a job that asks for either is a BadRequest."""

  def work(cancel: threading.Event, emit: Callable[[Any], None]) -> None:
    steps = [0]

    def on_step(res, wall_s):
      steps[0] += 1
      emit(Stepped(steps[0], wall_s, tuple(res.telemetry or ())))

    gen = generator_cls(_StepHook(backend, cancel, on_step), tokenizer)
    if job.messages is not None:
      ids = prompt_ids(tokenizer, job)
    elif isinstance(job.prompt, str):
      ids = gen.prompt_ids(job.prompt)
    else:
      ids = gen.prompt_ids(prompt_tokens=list(job.prompt))
    kw: dict[str, Any] = dict(max_new_tokens=job.max_tokens, sampling=job.sampling,
                              stop=list(job.stop))
    if research is not None:  # before any step: a bad field runs nothing
      edits = research.edits(job.steering)
      capture = research.capture(job.capture, len(ids), job.max_tokens, backend.ctx_size)
      if edits is not None:
        kw["edits"] = edits
      if capture is not None:
        kw["capture"] = capture
    elif job.steering is not None or job.capture is not None:
      raise BadRequest("this server takes no steering or capture")
    stream = gen.stream(prompt_tokens=ids, **kw)
    try:
      for piece in stream:
        emit(Piece(piece))
    except Cancelled:
      return
    finally:
      stream.close()  # a no-op when exhausted; otherwise runs the loop's close_session
    res = stream.result
    captured = None if res.captured is None else encode_captured(res.captured)
    emit(Finished(_FINISH.get(res.finish_reason, res.finish_reason), len(res.prompt_tokens),
                  len(res.tokens), dict(res.timings), captured, res.cached_prompt_tokens))

  return work
