"""Backends and workers from a user's path: the one place that builds them (issue 20 item 3).

    backend = local_backend("model.gguf", ranges=("0:1", "2:output"), ctx_size=512)
    coord = coordinator("model.gguf", layers="0:1", listen="0.0.0.0:7000")
    worker = worker("model.gguf", "2:output", ("coordinator-host", 7000))

Every stage is built by `stages.load_runner`: the shapes it will serve compile (or load from
the persistent compilation cache) before its weights load, so a backend is ready to serve
at full speed when it is returned, and a worker says READY only once its shapes are in.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Sequence

from ds4jax.build.stages import DEFAULT_MAX_CHUNK, compile_serving, load_runner, max_chunk_for
from ds4jax.config import LayerRange, LayerRangeError

log = logging.getLogger("ds4jax.build")


def parse_hostport(spec: str) -> tuple[str, int]:
  """'HOST:PORT' (HOST may be empty: 127.0.0.1) -> (host, port); one-line ValueError."""
  host, sep, port = str(spec).rpartition(":")
  if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
    raise ValueError(f"bad address {spec!r}: expected HOST:PORT")
  return host or "127.0.0.1", int(port)


def check_port_free(host: str, port: int) -> None:
  """Raises a one-line error if HOST:PORT cannot be listened on right now."""
  with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise ValueError(f"cannot listen on {host}:{port}: address already in use") from None
      raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def local_backend(path, *, ranges: Sequence[str] = ("all",), ctx_size: int = 4096,
                  prefill_chunk: int = 256, max_sessions: int = 8, dtype: str | None = None,
                  weights: str = "packed", devices=1, streaming=None, kv_disk_dir=None,
                  kv_disk_space_mb: float | None = None):
  """A `LocalBackend` over `ranges` of a GGUF or checkpoint directory, each range its own
  in-process stage (e.g. `("0:1", "2:output")`); `max_sessions` sessions keep their KV and
  batch their decode steps. streaming: expert streaming options (`stages.load_runner`); the
  stages share one cache (ds4's budget is the process's). `kv_disk_dir` (+
  `kv_disk_space_mb`, default 4096): ds4's disk KV cache there. Returns once every stage is
  loaded and compiled."""
  from ds4jax.runtime import sources
  from ds4jax.runtime.local import LocalBackend, check_chain
  _check_kv_disk(kv_disk_dir, kv_disk_space_mb)  # before any loads
  src = sources.open_source(sources.resolve(path)) if isinstance(path, (str, os.PathLike)) \
      else path
  rngs = [src.resolve(spec) for spec in ranges]
  check_chain(rngs, src.cfg.n_layers)  # before any loads
  if streaming is not None and len(rngs) > 1:  # one cache and one budget for the process
    streaming = _shared_cache(src, rngs, streaming, dtype)
  runners = [load_runner(src, spec, ctx_size=ctx_size, prefill_chunk=prefill_chunk,
                         max_sessions=max_sessions, dtype=dtype, weights=weights,
                         devices=devices, streaming=streaming) for spec in ranges]
  backend = LocalBackend(runners, prefill_chunk=prefill_chunk, max_sessions=max_sessions)
  return attach_kv_disk(backend, kv_disk_dir, kv_disk_space_mb)


def _check_kv_disk(directory, space_mb) -> None:
  from ds4jax.checkpoints.kv_disk import KVDiskError, check_dir
  if directory is None:
    if space_mb is not None:
      raise KVDiskError("kv_disk_space_mb needs kv_disk_dir")
    return
  if space_mb is not None and not space_mb > 0:
    raise KVDiskError(f"kv_disk_space_mb must be > 0, got {space_mb}")
  check_dir(directory)


def attach_kv_disk(backend, directory, space_mb: float | None = None):
  """Gives a built backend ds4's disk KV cache in `directory` (None: none); returns it."""
  if directory is None:
    return backend
  import jax.numpy as jnp
  from ds4jax.checkpoints.kv_disk import DEFAULT_SPACE_MB, KVDiskCache
  dtypes = sorted({str(jnp.dtype(r.state_dtype)) for r in backend.runners})
  backend.kv_disk = KVDiskCache(directory, cfg=backend.cfg, fingerprint=backend.fingerprint,
                                state_dtype=",".join(dtypes), every=backend.prefill_chunk,
                                space_mb=DEFAULT_SPACE_MB if space_mb is None else space_mb)
  log.info("%s", backend.kv_disk.describe())
  # A hit installs a state through programs a step never runs (a fresh state, a slot write):
  # run them once now, so the first hit in a process is not 0.6 s slower than the rest.
  for runner, batcher in zip(backend.runners, backend.batchers):
    slot = batcher.alloc()
    try:
      batcher.put(slot, runner.init_state())
    finally:
      batcher.free(slot)
  return backend


def _shared_cache(src, rngs, options, dtype):
  """One `ExpertCache` over every layer of `rngs` (a GGUF source), for in-process stages."""
  from ds4jax.gguf.source import GGUFSource
  from ds4jax.gguf.streaming import ExpertCache
  from ds4jax.runtime.load import parse_dtype
  if not isinstance(src, GGUFSource):
    return options  # the loader says why streaming needs a GGUF
  layers = [il for rng in rngs for il in rng.layers()]
  return ExpertCache(src.file, layers, options, k=src.cfg.n_experts_used,
                     dtype=parse_dtype(dtype or src.dtype))


def coordinator(path, *, layers: str = "0:0", listen: str = "127.0.0.1:0",
                ctx_size: int = 4096, prefill_chunk: int = 256, max_sessions: int = 8,
                dtype: str | None = None, weights: str = "packed", devices=1,
                streaming=None, key_file: str | None = None, tls_cert: str | None = None,
                tls_key: str | None = None, kv_disk_dir=None,
                kv_disk_space_mb: float | None = None, **options):
  """A listening `Coordinator` that runs `layers` (0:K) of the model here; workers dial
  `listen` (HOST:PORT, port 0: any free one, then `coord.address`) for the rest.

  The pre-shared key comes from `key_file` or $DS4JAX_KEY (never a flag value; `key=` in
  `options` sets it directly, None for none). tls_cert (+ tls_key): workers connect over
  TLS. `kv_disk_dir` (+ `kv_disk_space_mb`): ds4's disk KV cache, of the whole model's state
  (the coordinator gathers the workers' layers to store an entry, and scatters them to load
  one). `options`: further `CoordinatorOptions` fields (route_timeout, activation_dtype,
  ...). Bad addresses, keys, certificates and cache directories fail before the model loads.
  Close it with `coord.close()`.
  """
  from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
  from ds4jax.wire import auth  # stdlib only
  host, port = parse_hostport(listen)
  key = options.pop("key") if "key" in options else auth.load_key(key_file)
  if tls_key and not tls_cert:
    raise ValueError("--tls_key needs --tls_cert")
  tls = auth.server_ssl_context(tls_cert, tls_key) if tls_cert else None
  _check_kv_disk(kv_disk_dir, kv_disk_space_mb)
  if port:
    check_port_free(host, port)  # before a possibly long model load, not after
  runner = load_runner(path, layers, ctx_size=ctx_size, prefill_chunk=prefill_chunk,
                       max_sessions=max_sessions, dtype=dtype, weights=weights, devices=devices,
                       streaming=streaming)
  try:
    coord = Coordinator(runner, CoordinatorOptions(
        host=host, port=port, prefill_chunk=prefill_chunk, max_sessions=max_sessions, key=key,
        tls=tls, **options))
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      raise ValueError(f"cannot listen on {host}:{port}: address already in use") from None
    raise
  try:
    return attach_kv_disk(coord, kv_disk_dir, kv_disk_space_mb)
  except BaseException:
    coord.close()
    raise


def requested_range(spec: str, n_layers: int) -> LayerRange:
  """The range a worker asks for: resolved when it fits the model, else as written, so the
  coordinator (not the worker) refuses it and both sides show the reason."""
  rng = LayerRange.parse(spec)
  try:
    return rng.resolve(n_layers)
  except LayerRangeError:
    return LayerRange(rng.start, n_layers - 1 if rng.end < 0 else rng.end, rng.has_output)


def worker(path, layers: str, coordinator_addr: tuple[str, int], *, dtype: str | None = None,
           weights: str = "packed", devices=1, options=None, streaming=None):
  """A `Worker` for `layers` of the model that dials `coordinator_addr` when `run()`.

  HELLO needs only the metadata, so the slice loads while the worker dials (issue 24 item 4:
  a route forms in max(load, connect)): the decode shapes (batches up to
  `options.max_sessions`) compile, then the weights load. ACCEPT names the coordinator's
  prefill chunk: its ladder compiles (with the weights resident: the one compile-first
  exception, since only the coordinator knows the chunk), then READY. options:
  `WorkerOptions` (ctx, max_sessions, key, tls, ...).
  """
  from ds4jax.bridge.worker.worker import Worker, WorkerOptions
  from ds4jax.runtime import sources
  cfg, fp = sources.model_info(path)  # a GGUF or an orbax checkpoint directory
  opt = options or WorkerOptions()
  opt.ctx = min(opt.ctx, int(cfg.context_length))  # the runner cannot hold more
  rng = requested_range(layers, cfg.n_layers)
  if devices != 1:  # a bad device count fails here, before dialing, not on ACCEPT
    from ds4jax.model import sharding
    sharding.check_experts(cfg.n_experts, sharding.make_mesh(devices))

  def load():  # at run(), while dialing: the decode shapes (the chunk's come with ACCEPT)
    return load_runner(path, rng, ctx_size=opt.ctx, prefill_chunk=w.chunk or 1,
                       max_sessions=opt.max_sessions, dtype=dtype, weights=weights,
                       devices=devices, streaming=streaming)

  def refit(runner):  # after ACCEPT: the coordinator's chunk ladder, and only it
    chunk = w.chunk or DEFAULT_MAX_CHUNK
    if max_chunk_for(chunk) > runner.max_chunk:  # sized for a smaller chunk: load again
      log.info("the coordinator's prefill chunk %d needs a larger runner: loading again", chunk)
      return load()
    compile_serving(runner, chunk, opt.max_sessions, only=True)
    return runner

  w = Worker(coordinator_addr, fingerprint=fp, n_layers=cfg.n_layers,
             vocab_size=cfg.vocab_size, layers=rng, options=opt, load=load, refit=refit)
  return w


__all__ = ["attach_kv_disk", "check_port_free", "coordinator", "local_backend", "parse_hostport",
           "requested_range", "worker"]
