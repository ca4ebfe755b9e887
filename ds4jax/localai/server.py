"""The LocalAI backend: a `grpc.aio` server speaking `backend.Backend` (docs/localai.md).

    python scripts/localai_backend.py --addr 127.0.0.1:50051     # what LocalAI spawns
    asyncio.run(serve("127.0.0.1:50051"))                        # the same, from Python

Everything runs on one event loop, and only Health, Status, LoadModel, Free, Predict(Stream),
TokenizeString and Detokenize are served (the rest answer UNIMPLEMENTED). Nothing on the loop
blocks: option checks, the tokenizer and the model process start run in threads
(`asyncio.to_thread`; GGUF parsing and the tokenizer live in a child process), the
route wait polls a snapshot, and generation events arrive from the model process's reader
thread. LoadModel and Free take a lock; Health and Status never do, so both answer within
milliseconds while a model loads or a Predict waits for workers.

Errors, as LocalAI's ds4 backend gives them:
  LoadModel problem                    Result(success=false, one-line message)
  no model loaded                      FAILED_PRECONDITION "ds4: model not loaded"
  ModelIdentity != the loaded Model    NOT_FOUND "model identity mismatch: ..."
  route incomplete after the timeout   UNAVAILABLE "ds4 distributed route incomplete: ..."
  a bad request                        INVALID_ARGUMENT "ds4jax: ..."
  the generation failed                INTERNAL "ds4 generation failed: ..."
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

import grpc

from ds4jax.wire.errors import RouteUnavailable
from ds4jax.errors import one_line
from ds4jax.localai import backend_pb2 as pb
from ds4jax.localai import backend_pb2_grpc as pb_grpc
from ds4jax.localai import options, predict
from ds4jax.localai.auth import BearerTokenInterceptor
from ds4jax.localai.model import LoadedModel
from ds4jax.serving.engine import Busy, RouteNotReady
from ds4jax.serving.generation import Finished, Piece, Stepped

log = logging.getLogger("ds4jax.localai")

MAX_MESSAGE_BYTES = 50 * 2**20  # LocalAI's limit, both ends
GRPC_OPTIONS = [("grpc.max_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0)]  # a port in use is an error, not a shared port
Code = grpc.StatusCode


class _Abort(Exception):
  """Ends an RPC with a status code (raised inside, turned into context.abort at the edge)."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


def _layers_text(layers: list[int]) -> str:
  """[2, 3, 5] -> 'layers 2-3, 5'."""
  runs: list[list[int]] = []
  for il in sorted(layers):
    if runs and il == runs[-1][1] + 1:
      runs[-1][1] = il
    else:
      runs.append([il, il])
  text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
  return ("layer " if len(layers) == 1 else "layers ") + text


def route_incomplete_message(e: RouteNotReady, listen: str | None) -> str:
  missing = _layers_text(e.missing_layers) if e.missing_layers else e.reason
  where = f"; workers dial {listen}" if listen else ""
  return (f"ds4 distributed route incomplete: workers not connected (layers uncovered): "
          f"missing {missing} after {e.waited_s:.1f} s{where}")


class Servicer(pb_grpc.BackendServicer):
  """The backend. One model at a time; any number of concurrent requests on it."""

  def __init__(self, *, cache_dir: str | None = None, env: dict | None = None):
    self.cache_dir = cache_dir
    self.env = env
    self.model: LoadedModel | None = None
    self.loading = 0
    self._lock: asyncio.Lock | None = None  # LoadModel and Free; never Health or Status

  def _load_lock(self) -> asyncio.Lock:
    if self._lock is None:  # created on the server's loop
      self._lock = asyncio.Lock()
    return self._lock

  # ---- probes -------------------------------------------------------------------------------

  async def Health(self, request, context):
    return pb.Reply(message=b"OK")

  async def Status(self, request, context):
    model = self.model
    if model is None:
      state = pb.StatusResponse.BUSY if self.loading else pb.StatusResponse.UNINITIALIZED
      from ds4jax.localai.status import memory
      total, breakdown = memory()
    else:
      if model.exited:
        state = pb.StatusResponse.ERROR
      elif self.loading or model.active:
        state = pb.StatusResponse.BUSY
      else:
        state = pb.StatusResponse.READY
      total, breakdown = model.memory()
    return pb.StatusResponse(state=state, memory=pb.MemoryUsageData(total=total,
                                                                    breakdown=breakdown))

  # ---- lifecycle ----------------------------------------------------------------------------

  async def LoadModel(self, request, context):
    async with self._load_lock():
      self.loading += 1
      try:
        return await self._load(request)
      finally:
        self.loading -= 1

  async def _load(self, request) -> pb.Result:
    # Like ds4: every LoadModel starts from scratch (the old model is freed first, so its
    # ds4_listen port is free for the new one).
    await self._unload()
    try:
      spec = await asyncio.to_thread(options.load_spec, request)
      model = await asyncio.to_thread(LoadedModel.start, spec, cache_dir=self.cache_dir,
                                      env=self.env)
    except options.LoadError as e:
      log.warning("LoadModel failed: %s", e)
      return pb.Result(success=False, message=str(e))
    except Exception as e:  # a bug, not bad input: keep the traceback in the log
      log.exception("LoadModel failed")
      return pb.Result(success=False, message=f"ds4jax: load failed: {one_line(e)}")
    self.model = model
    log.info("%s", model.describe())
    return pb.Result(success=True, message=model.describe())

  async def Free(self, request, context):
    async with self._load_lock():
      await self._unload()
    return pb.Result(success=True, message="ds4jax: model freed")

  async def _unload(self) -> None:
    old, self.model = self.model, None
    if old is not None:
      await asyncio.to_thread(old.close)

  def close(self) -> None:
    """Stops the model process (server shutdown)."""
    old, self.model = self.model, None
    if old is not None:
      old.close()

  # ---- requests -----------------------------------------------------------------------------

  def _require(self, request) -> LoadedModel:
    model = self.model
    if model is None:
      raise _Abort(Code.FAILED_PRECONDITION, "ds4: model not loaded")
    if model.exited:
      raise _Abort(Code.FAILED_PRECONDITION, f"ds4: model not loaded ({model.exited})")
    want = getattr(request, "ModelIdentity", "")
    if want and model.spec.identity and want != model.spec.identity:
      raise _Abort(Code.NOT_FOUND, f"model identity mismatch: loaded {model.spec.identity!r}, "
                   f"requested {want!r}")
    return model

  async def TokenizeString(self, request, context):
    try:
      model = self._require(request)
      ids = await asyncio.to_thread(predict.prompt_ids, request, model.tokenizer,
                                    allow_empty=True)
    except _Abort as e:
      await context.abort(e.code, e.message)
    except predict.RequestError as e:
      await context.abort(Code.INVALID_ARGUMENT, str(e))
    return pb.TokenizationResponse(length=len(ids), tokens=ids)

  async def Detokenize(self, request, context):
    try:
      model = self._require(request)
      ids = list(request.tokens)
      bad = [t for t in ids if not 0 <= t < model.tokenizer.vocab_size]
      if bad:
        raise _Abort(Code.INVALID_ARGUMENT, f"ds4jax: token id {bad[0]} is outside the vocab "
                     f"(0..{model.tokenizer.vocab_size - 1})")
      text = await asyncio.to_thread(model.tokenizer.decode, ids)
    except _Abort as e:
      await context.abort(e.code, e.message)
    return pb.DetokenizeResponse(content=text)

  async def Predict(self, request, context):
    pieces: list[str] = []
    final = pb.Reply()
    try:
      async with contextlib.aclosing(self._generate(request)) as events:
        async for reply, text in events:
          if text is None:
            final = reply
          else:
            pieces.append(text)
    except _Abort as e:
      await context.abort(e.code, e.message)
    final.message = "".join(pieces).encode("utf-8")
    return final

  async def PredictStream(self, request, context):
    try:
      async with contextlib.aclosing(self._generate(request)) as events:
        async for reply, _ in events:
          yield reply
    except _Abort as e:
      await context.abort(e.code, e.message)

  async def _generate(self, request):
    """Yields (Reply, text) per text piece, then (final Reply, None) with the totals."""
    model = self._require(request)
    try:
      job, n_prompt = await asyncio.to_thread(predict.build_job, request, model.tokenizer,
                                              ctx_size=model.spec.ctx_size)
    except predict.RequestError as e:
      raise _Abort(Code.INVALID_ARGUMENT, str(e)) from None
    except Exception as e:  # the tokenizer process failed
      raise _Abort(Code.INTERNAL, f"ds4 generation failed: {one_line(e)}") from None
    model.active += 1
    try:
      await self._wait_route(model)
      async with model.engine.slot():
        steps = 0
        work = model.process.make_work(job)
        async with contextlib.aclosing(model.engine.run(work)) as events:
          async for ev in events:
            if isinstance(ev, Stepped):
              steps = ev.n
            elif isinstance(ev, Piece):
              yield pb.Reply(message=ev.text.encode("utf-8"), tokens=steps,
                             prompt_tokens=n_prompt), ev.text
            elif isinstance(ev, Finished):
              t = ev.timings
              yield pb.Reply(tokens=ev.completion_tokens, prompt_tokens=n_prompt,
                             timing_prompt_processing=1e3 * float(t.get("prefill_s", 0.0)),
                             timing_token_generation=1e3 * float(t.get("decode_s", 0.0))), None
    except (_Abort, GeneratorExit):
      raise
    except Busy as e:
      raise _Abort(Code.RESOURCE_EXHAUSTED, f"ds4jax: {one_line(e)}") from None
    except RouteUnavailable as e:
      raise _Abort(Code.UNAVAILABLE, f"ds4 distributed route error: {one_line(e)}") from None
    except Exception as e:
      if not isinstance(e, ValueError):
        log.warning("generation failed: %s: %s", type(e).__name__, e)
      raise _Abort(Code.INTERNAL, f"ds4 generation failed: {one_line(e)}") from None
    finally:
      model.active -= 1

  async def _wait_route(self, model: LoadedModel) -> None:
    async def gone() -> bool:
      return self.model is not model or model.exited is not None

    try:
      state = await model.engine.wait_route(gone=gone)
    except RouteNotReady as e:
      raise _Abort(Code.UNAVAILABLE, route_incomplete_message(e, model.listen)) from None
    if state is None:
      if model.exited:
        raise _Abort(Code.FAILED_PRECONDITION, f"ds4: model not loaded ({model.exited})")
      raise _Abort(Code.UNAVAILABLE, "ds4: model unloaded while waiting for distributed route")


def build_server(addr: str, *, token: str | None = None, cache_dir: str | None = None,
                 env: dict | None = None) -> tuple[grpc.aio.Server, Servicer, int]:
  """(server, servicer, bound port); call on the loop that will run it."""
  interceptors = [BearerTokenInterceptor(token)] if token else []
  server = grpc.aio.server(interceptors=interceptors, options=GRPC_OPTIONS)
  servicer = Servicer(cache_dir=cache_dir, env=env)
  pb_grpc.add_BackendServicer_to_server(servicer, server)
  try:
    port = server.add_insecure_port(addr)
  except RuntimeError:
    raise ValueError(f"cannot listen on {addr}: address in use or not valid") from None
  if not port:
    raise ValueError(f"cannot listen on {addr}: address in use or not valid")
  return server, servicer, port


async def serve(addr: str, *, token: str | None = None, cache_dir: str | None = None,
                stop: asyncio.Event | None = None, signals: bool = True,
                on_ready: Callable[[int], None] | None = None) -> None:
  """Serves until SIGTERM/SIGINT (or `stop` is set), then frees the model process."""
  server, servicer, port = build_server(addr, token=token, cache_dir=cache_dir)
  stop = stop or asyncio.Event()
  if signals:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
      loop.add_signal_handler(sig, stop.set)
  await server.start()
  host = addr.rpartition(":")[0] or "0.0.0.0"
  print(f"ds4jax LocalAI backend listening on {host}:{port}"
        f"{' (bearer token required)' if token else ''}", flush=True)
  if on_ready is not None:
    on_ready(port)
  try:
    await stop.wait()
  finally:
    await server.stop(grace=2.0)
    await asyncio.to_thread(servicer.close)


def watch_parent(interval_s: float, on_gone: Callable[[], None]) -> None:
  """Calls on_gone once the process that started us (LocalAI) is gone."""
  parent = os.getppid()
  if parent <= 1 or interval_s <= 0:
    return

  def loop():
    while os.getppid() == parent:
      threading.Event().wait(interval_s)
    log.warning("the parent process %d is gone: stopping", parent)
    on_gone()

  threading.Thread(target=loop, daemon=True, name="parent-watch").start()
