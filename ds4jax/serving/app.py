"""The OpenAI-compatible HTTP server: FastAPI app factory.

    app = create_app(backend, tokenizer, "ds4-flash", route_timeout=60)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both streaming as server-sent
events or not), `GET /v1/models`, `GET /health` (route state, workers, sessions; answers within
~50 ms whatever the model is doing), `GET /ready` (200 only with a complete route) and
`GET /metrics` (Prometheus text).

A request first waits for a complete route (up to `route_timeout`, polling without blocking the
loop), then for a generation slot, then generates in its own thread as its own backend session.
Route timeout -> HTTP 503 with the missing layers; bad body -> HTTP 400; wrong model -> 404.
Both generation endpoints take two extensions (serving/research.py): `steering` (ds4's
options over the server's flags) and `capture` (named points, returned as `capture` in the
completion or the stream's final chunk); a bad one is HTTP 400 before any compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, Optional

from ds4jax import extras

fastapi = extras.need("serve", "fastapi", "ds4jax.serving.app (the OpenAI server)")
from fastapi import exceptions as fastapi_exceptions  # noqa: E402
from fastapi import responses

from ds4jax.serving import schemas
from ds4jax.serving.engine import Busy, Engine, RouteNotReady, SessionTracker
from ds4jax.serving.generation import Finished, GenerationJob, Piece, Stepped, make_work
from ds4jax.serving.metrics import Metrics
from ds4jax.serving.research import BadRequest, Research

log = logging.getLogger("ds4jax.serving")

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


def _route_error_kind(exc: BaseException) -> bool:
  """True for the backend's own 'no route' errors (the bridge's RouteUnavailable)."""
  return type(exc).__name__ == "RouteUnavailable"


class InProcess(SessionTracker):
  """The model in the server's own process: a Backend plus what turns a job into work."""

  def __init__(self, backend, tokenizer, generator_cls, serialize_steps: bool = False,
               research: Optional[Research] = None):
    super().__init__(backend, serialize_steps=serialize_steps)
    self.tokenizer = tokenizer
    self.generator_cls = generator_cls
    # Requests may steer and capture by default; a backend without a config refuses both.
    self.research = research or Research(getattr(backend, "cfg", None))

  def n_open(self) -> int:
    return len(self.open)

  def make_work(self, job: GenerationJob):
    return make_work(self, self.tokenizer, job, self.generator_cls, self.research)


def create_app(backend, tokenizer, model_name: str = "ds4jax", *, route_timeout: float = 60.0,
               max_concurrency: int = 8, default_max_tokens: int = 256,
               serialize_steps: bool = False, generator_cls=None,
               queue_timeout: float = 30.0,
               research: Optional[Research] = None) -> fastapi.FastAPI:
  """Builds the server around a `Backend` (LocalBackend or Coordinator) and its tokenizer.

  Args:
    backend: a `ds4jax.runtime.types.Backend` run in this process, or a
      `serving.remote.ModelProcess` (the model in a child process; scripts/serve.py's default).
    tokenizer: the model's `Tokenizer` (unused with a ModelProcess, which has its own).
    model_name: the id `/v1/models` lists and requests must name (or omit).
    route_timeout: seconds a request waits for a complete route before HTTP 503.
    max_concurrency: requests generating at once (their steps batch in the backend); the
      rest queue (see /metrics) for up to `queue_timeout` seconds, then get HTTP 429 with
      Retry-After.
    default_max_tokens: chat completion length when the request gives none.
    serialize_steps: one `step` at a time, for backends that are not thread-safe.
    generator_cls: `(backend, tokenizer) -> Generator`; defaults to `generate.loop.Generator`.
    research: the in-process model's default steering and capture limit
      (`research.Research`; default: no steering, captures up to 64 MiB). A ModelProcess
      has its own, from its flags.
  """
  metrics = Metrics()
  if hasattr(backend, "make_work"):
    tracked = backend
  else:
    if generator_cls is None:
      from ds4jax.generate.loop import Generator as generator_cls
    tracked = InProcess(backend, tokenizer, generator_cls, serialize_steps, research)
  engine = Engine(tracked, route_timeout=route_timeout, max_concurrency=max_concurrency,
                  metrics=metrics, queue_timeout=queue_timeout)
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    lag = asyncio.ensure_future(_watch_loop_lag(metrics))
    yield
    lag.cancel()
    engine.close()

  app = fastapi.FastAPI(title="ds4jax", version="0.1.0", lifespan=lifespan)
  app.state.engine = engine
  app.state.sessions = tracked
  app.state.model_name = model_name

  def error_response(status: int, message: str, type_: str, code: Optional[str] = None,
                     endpoint: str = "", **extra) -> responses.JSONResponse:
    if endpoint:
      metrics.count_request(endpoint, status)
      metrics.count_error(code or type_)
    return responses.JSONResponse(schemas.error(message, type_, code, **extra), status_code=status)

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def _bad_body(request: fastapi.Request, exc: fastapi_exceptions.RequestValidationError):
    return error_response(400, _validation_message(exc), "invalid_request_error",
                          "invalid_request", endpoint=request.url.path)

  # ---- probes ---------------------------------------------------------------------------------

  @app.get("/health")
  async def health():
    state = await engine.route_state()
    return {"status": "ok" if state.complete else "waiting_for_route", "model": model_name,
            "route": state.to_dict(), "sessions": tracked.n_open(),
            "queue_depth": metrics.queue_depth, "active_requests": metrics.active,
            "route_timeout_s": engine.route_timeout}

  @app.get("/ready")
  async def ready():
    state = await engine.route_state()
    body = {"ready": state.complete, "reason": state.reason}
    return responses.JSONResponse(body, status_code=200 if state.complete else 503)

  @app.get("/metrics")
  async def metrics_text():
    state = await engine.route_state()
    workers = state.info.get("workers") or []
    text = metrics.render(route_complete=state.complete, n_workers=len(workers),
                          n_sessions=tracked.n_open())
    return responses.PlainTextResponse(text, media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [_model_card(model_name, created)]}

  @app.get("/v1/models/{model_id}")
  async def model(model_id: str):
    if model_id != model_name:
      return error_response(404, f"model {model_id!r} not found; this server serves "
                            f"{model_name!r}", "invalid_request_error", "model_not_found")
    return _model_card(model_name, created)

  # ---- generation -----------------------------------------------------------------------------

  async def serve(request: fastapi.Request, body: schemas._Sampling, job: GenerationJob,
                  endpoint: str, chat: bool):
    t0 = time.monotonic()
    if body.model not in (None, "", model_name):
      return error_response(404, f"model {body.model!r} not found; this server serves "
                            f"{model_name!r}", "invalid_request_error", "model_not_found",
                            endpoint=endpoint)
    watch = _Watch(request)
    metrics.add_queue(1)
    try:
      if await engine.wait_route(gone=watch.gone) is None:
        metrics.count_request(endpoint, 499)  # the client left while waiting for the route
        return responses.Response(status_code=499)
    except RouteNotReady as e:
      return error_response(503, str(e), "service_unavailable", "route_incomplete",
                            endpoint=endpoint, missing_layers=e.missing_layers)
    finally:
      metrics.add_queue(-1)
    rid = schemas.new_id("chatcmpl" if chat else "cmpl")
    events = _events(engine, tracked.make_work(job), metrics)
    # Run up to the first step (the prefill) before answering, so a prompt the model refuses
    # or a route lost during the prefill still gets a proper HTTP status, streaming or not.
    first: list[Any] = []
    try:
      while True:
        ev = await _next_or_gone(events, watch)
        if ev is _GONE:
          return await _client_gone(events, metrics, endpoint)
        first.append(ev)
        if not isinstance(ev, Piece):
          break
    except StopAsyncIteration:
      pass
    except Exception as e:
      return _generation_error(e, endpoint, error_response)
    if body.stream:
      sse = _sse_chat if chat else _sse_completion
      gen = sse(_chain(first, events), rid, model_name, body.include_usage(), metrics, endpoint,
                t0)
      return responses.StreamingResponse(gen, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
    pieces, fin = [], None
    try:
      for ev in first:
        pieces, fin = _take(ev, pieces, fin)
      while True:
        ev = await _next_or_gone(events, watch)
        if ev is _GONE:
          return await _client_gone(events, metrics, endpoint)
        pieces, fin = _take(ev, pieces, fin)
    except StopAsyncIteration:
      pass
    except Exception as e:
      return _generation_error(e, endpoint, error_response)
    if fin is None:
      return _generation_error(RuntimeError("generation ended without a result"), endpoint,
                               error_response)
    text = "".join(pieces)
    metrics.observe_prompt(fin.prompt_tokens)
    use = schemas.usage(fin.prompt_tokens, fin.completion_tokens, fin.cached_tokens)
    metrics.count_request(endpoint, 200)
    metrics.observe_duration(endpoint, time.monotonic() - t0)
    if chat:
      out = schemas.chat_completion(rid, model_name, text, fin.finish_reason, use)
    else:
      out = schemas.completion(rid, model_name, text, fin.finish_reason, use)
    if fin.captured is not None:
      out["capture"] = fin.captured
    return out

  @app.post("/v1/completions")
  async def completions(body: schemas.CompletionRequest, request: fastapi.Request):
    job = GenerationJob(prompt=body.prompt, messages=None,
                        max_tokens=body.max_tokens or default_max_tokens,
                        sampling=body.sampling(), stop=body.stop_list(), **body.research())
    return await serve(request, body, job, "/v1/completions", chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: schemas.ChatCompletionRequest, request: fastapi.Request):
    job = GenerationJob(prompt=None, messages=body.message_dicts(),
                        max_tokens=body.max_new_tokens(default_max_tokens),
                        sampling=body.sampling(), stop=body.stop_list(), **body.research())
    return await serve(request, body, job, "/v1/chat/completions", chat=True)

  return app


async def _watch_loop_lag(metrics: Metrics, period_s: float = 0.02) -> None:
  """Records how late the event loop wakes up: what any request (health included) would wait
  before the server even looks at it. Large values mean something blocks the loop."""
  while True:
    t0 = time.perf_counter()
    await asyncio.sleep(period_s)
    metrics.observe_loop_lag(max(0.0, time.perf_counter() - t0 - period_s))


def _model_card(name: str, created: int) -> dict[str, Any]:
  return {"id": name, "object": "model", "created": created, "owned_by": "ds4jax"}


def _validation_message(exc: fastapi_exceptions.RequestValidationError) -> str:
  """One line naming each bad field: 'body.temperature: Input should be ... (got -1)'."""
  parts = []
  for err in exc.errors()[:5]:
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if err.get("type") == "json_invalid":
      parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}")
    elif err.get("type") == "extra_forbidden":
      parts.append(f"{loc}: unknown field")
    else:
      parts.append(f"{loc}: {msg}")
  return "invalid request: " + "; ".join(parts)


async def _client_gone(events, metrics, endpoint: str):
  """The client disconnected: stop its generation and log a 499 (nginx's 'client closed')."""
  await events.aclose()
  metrics.count_request(endpoint, 499)
  return responses.Response(status_code=499)


def _generation_error(e: BaseException, endpoint: str, error_response):
  if isinstance(e, Busy):
    resp = error_response(429, str(e), "rate_limit_error", "busy", endpoint=endpoint)
    resp.headers["Retry-After"] = str(int(round(e.retry_after_s)))
    return resp
  if _route_error_kind(e):
    return error_response(503, f"distributed route lost: {e}", "service_unavailable",
                          "route_unavailable", endpoint=endpoint)
  if isinstance(e, BadRequest):  # a steering or capture field, before any compute
    return error_response(400, str(e), "invalid_request_error", "invalid_request",
                          endpoint=endpoint)
  if isinstance(e, ValueError):  # e.g. prompt longer than the context, bad token id
    return error_response(400, str(e), "invalid_request_error", "invalid_prompt",
                          endpoint=endpoint)
  log.exception("generation failed")
  return error_response(500, f"generation failed: {type(e).__name__}: {e}", "server_error",
                        "generation_failed", endpoint=endpoint)


_GONE = object()


async def _events(engine: Engine, work, metrics: Metrics):
  """A generation slot, then the work's events; the slot is released when this closes."""
  async with engine.slot():
    async for ev in engine.run(work):
      if isinstance(ev, Stepped):
        metrics.observe_step(ev.telemetry, ev.wall_s)
      yield ev


class _Watch:
  """Checks, at most every DISCONNECT_POLL_S, whether the client has disconnected."""

  def __init__(self, request: fastapi.Request):
    self.request = request
    self.last = time.monotonic()

  async def gone(self) -> bool:
    now = time.monotonic()
    if now - self.last < DISCONNECT_POLL_S:
      return False
    self.last = now
    return await self.request.is_disconnected()


async def _next_or_gone(events, watch: _Watch):
  """The next event, or _GONE (and `events` closed) once the client has disconnected."""
  task = asyncio.ensure_future(events.__anext__())
  try:
    while True:
      done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
      # Events can arrive faster than the poll period, so check the client on a clock.
      if await watch.gone():
        task.cancel()  # engine.run sets the cancel flag; the thread closes the session
        await asyncio.wait({task})
        return _GONE
      if done:
        return task.result()
  except asyncio.CancelledError:
    task.cancel()
    raise


def _take(ev, pieces: list[str], fin):
  if isinstance(ev, Piece):
    pieces.append(ev.text)
  elif isinstance(ev, Finished):
    fin = ev
  return pieces, fin


async def _chain(first: list[Any], events):
  for ev in first:
    yield ev
  async for ev in events:
    yield ev


def _with_capture(chunk: dict[str, Any], fin: Finished) -> dict[str, Any]:
  """The final chunk of a stream carries the request's capture, if it asked for one."""
  if fin.captured is not None:
    chunk["capture"] = fin.captured
  return chunk


def _sse(obj: Any) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream_events(events, metrics: Metrics, endpoint: str, t0: float):
  """Yields generation events; on failure yields one ('error', dict) instead of raising."""
  status = 200
  try:
    async for ev in events:
      if isinstance(ev, Finished):
        metrics.observe_prompt(ev.prompt_tokens)
      yield ev
  except (asyncio.CancelledError, GeneratorExit):
    status = 499  # client closed the stream; engine.run already cancelled the thread
    raise
  except Exception as e:
    status = 503 if _route_error_kind(e) else (400 if isinstance(e, ValueError) else 500)
    code = {503: "route_unavailable", 400: "invalid_prompt", 500: "generation_failed"}[status]
    metrics.count_error(code)
    if status == 500:
      log.exception("generation failed mid-stream")
    yield ("error", schemas.error(f"{type(e).__name__}: {e}", "server_error", code))
  finally:
    metrics.count_request(endpoint, status)
    metrics.observe_duration(endpoint, time.monotonic() - t0)


async def _sse_completion(events, rid, model, include_usage, metrics, endpoint, t0):
  created = int(time.time())
  async for ev in _stream_events(events, metrics, endpoint, t0):
    if isinstance(ev, Piece):
      if ev.text:
        yield _sse(schemas.completion(rid, model, ev.text, None, created=created))
    elif isinstance(ev, Stepped):
      continue
    elif isinstance(ev, Finished):
      yield _sse(_with_capture(schemas.completion(rid, model, "", ev.finish_reason,
                                                  created=created), ev))
      if include_usage:
        use = schemas.usage(ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens)
        body = schemas.completion(rid, model, "", None, created=created, use=use)
        body["choices"] = []
        yield _sse(body)
    else:
      yield _sse(ev[1])
  yield "data: [DONE]\n\n"


async def _sse_chat(events, rid, model, include_usage, metrics, endpoint, t0):
  created = int(time.time())
  yield _sse(schemas.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
  async for ev in _stream_events(events, metrics, endpoint, t0):
    if isinstance(ev, Piece):
      if ev.text:
        yield _sse(schemas.chat_chunk(rid, model, created, {"content": ev.text}))
    elif isinstance(ev, Stepped):
      continue
    elif isinstance(ev, Finished):
      yield _sse(_with_capture(schemas.chat_chunk(rid, model, created, {}, ev.finish_reason),
                               ev))
      if include_usage:
        use = schemas.usage(ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens)
        yield _sse(schemas.chat_chunk(rid, model, created, None, use=use))
    else:
      yield _sse(ev[1])
  yield "data: [DONE]\n\n"
