"""Builds bridge endpoints from a GGUF path or a checkpoint directory (deferred JAX imports
live here, not in the wire modules; the path is opened by `ds4jax.runtime.sources`)."""

from __future__ import annotations

from ds4jax.config import LayerRange, LayerRangeError


def load_runner(path: str, layers: str | LayerRange, *, ctx_size: int,
                dtype: str | None = None, weights: str = "packed", max_chunk: int = 256,
                compile_sizes=(), compile_batches=None, devices=1):
  """A StageRunner for `layers` of the GGUF (or orbax checkpoint directory) at path, carrying
  the model fingerprint. dtype None: float32 for a GGUF, the stored dtype for a checkpoint.
  compile_sizes: chunk sizes to compile before the weights load (lower peak memory);
  compile_batches: (batch sizes, chunk sizes, n_slots) of the batched step, likewise.
  devices: local devices the stage spans (1, N, "all"; model.sharding)."""
  from ds4jax.runtime import sources
  from ds4jax.runtime import load
  src = sources.open_source(path)
  cfg = src.cfg
  rng = layers if isinstance(layers, LayerRange) else LayerRange.parse(layers, cfg.n_layers)
  rng = rng.resolve(cfg.n_layers)
  ctx = min(int(ctx_size), int(cfg.context_length))
  return load.load_runner(src, rng, ctx_size=ctx, max_chunk=max_chunk, dtype=dtype,
                          weights=weights, compile_sizes=compile_sizes,
                          compile_batches=compile_batches, devices=devices)


def requested_range(spec: str, n_layers: int) -> LayerRange:
  """The range a worker asks for: resolved when it fits the model, else as written, so the
  coordinator (not the worker) refuses it and both sides show the reason."""
  rng = LayerRange.parse(spec)
  try:
    return rng.resolve(n_layers)
  except LayerRangeError:
    return LayerRange(rng.start, n_layers - 1 if rng.end < 0 else rng.end, rng.has_output)


def worker_from_gguf(path: str, layers: str, coordinator: tuple[str, int], *, dtype=None,
                     weights: str = "packed", options=None, devices=1):
  """A Worker for `layers` of the GGUF: HELLO needs only metadata; weights load on ACCEPT."""
  from ds4jax.bridge.worker.worker import Worker, WorkerOptions
  from ds4jax.runtime import sources
  cfg, fp = sources.model_info(path)  # a GGUF or an orbax checkpoint directory
  opt = options or WorkerOptions()
  opt.ctx = min(opt.ctx, int(cfg.context_length))  # the runner cannot hold more
  rng = requested_range(layers, cfg.n_layers)
  if devices != 1:  # a bad device count fails here, before dialing, not on ACCEPT
    from ds4jax.model import sharding
    sharding.check_experts(cfg.n_experts, sharding.make_mesh(devices))
  # The load runs after ACCEPT, which names the prefill chunk: the batched shapes the worker
  # serves compile from the abstract stage before the weights load, so the compiler's peak
  # does not stack on them (worker.warmup_batched then finds them compiled).
  def load():
    batches = ((tuple(opt.warm_batches) or (1,), w.warm_sizes, opt.max_sessions)
               if opt.warmup and w.warm_sizes else None)
    return load_runner(path, rng, ctx_size=opt.ctx, dtype=dtype, weights=weights,
                       compile_batches=batches, devices=devices)

  w = Worker(coordinator, fingerprint=fp, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size,
             layers=rng, options=opt, load=load)
  return w
