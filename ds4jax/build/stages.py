"""Stage runners from a user's path, compile-first: every shape a stage will serve compiles
(or loads from the persistent compilation cache) from the abstract stage before its weights
load, with a progress line per shape, so no request pays for a compilation (issue 20 item 8).

    runner = load_runner("model.gguf", "0:3", ctx_size=4096, prefill_chunk=256, max_sessions=8)
    model = load_model("model.gguf")          # the notebook API (`ds4jax.load_model`)

The shapes are the runner's `serving_shapes`: the decode batch buckets up to `max_sessions`
rows and the buckets of one prefill chunk (docs/design.md §11).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from ds4jax.config import LayerRange

log = logging.getLogger("ds4jax.build")

DEFAULT_MAX_CHUNK = 256


def max_chunk_for(prefill_chunk: int) -> int:
  """The runner's largest chunk for a prefill chunk: 256 (what the decode state is sized for),
  or the power of two that holds a larger chunk."""
  if int(prefill_chunk) < 1:
    raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
  top = DEFAULT_MAX_CHUNK
  while top < prefill_chunk:
    top *= 2
  return top


def _describe(shapes_BT) -> str:
  decode = [b for b, t in shapes_BT if t == 1]
  chunks = [t for b, t in shapes_BT if t > 1]
  out = f"decode batches {_span(decode)}"
  return out + (f", prefill chunks {_span(chunks)}" if chunks else "")


def _span(values) -> str:
  return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def compile_serving(runner, prefill_chunk: int, n_slots: int, *, only: bool = False) -> float:
  """Compiles every (B, T) that a StageBatcher of `n_slots` slots runs on `runner` with
  chunks of up to `prefill_chunk` tokens (those it lacks), saying so per shape; returns the
  seconds spent. `only`: they become the runner's whole set for that pool
  (`StageRunner.compile_shapes`)."""
  shapes = runner.serving_shapes(prefill_chunk, n_slots)
  name = runner.layers.describe()
  log.info("layers %s: compiling %d shapes (%s), or loading them from the compilation cache",
           name, len(shapes), _describe(shapes))
  t0 = time.perf_counter()

  def said(k, n, shape, dt):
    log.info("layers %s: compiled [B=%d, T=%d] in %.1fs (%d/%d)", name, *shape, dt, k, n)

  runner.compile_shapes(shapes, n_slots, on_shape=said, only=only)
  return time.perf_counter() - t0


def _open(path, layers):
  """(source, resolved range, label) of a path (GGUF file or checkpoint dir) or a source."""
  from ds4jax.runtime import sources  # deferred: the loaders import JAX
  src = sources.open_source(sources.resolve(path)) if isinstance(path, (str, os.PathLike)) \
      else path
  return src, src.resolve(layers), os.path.basename(os.fspath(src.path))


def load_runner(path, layers: str | LayerRange = "all", *, ctx_size: int = 4096,
                prefill_chunk: int = 256, max_sessions: int = 8, dtype: str | None = None,
                weights: str = "packed", devices=1, activations: str = "exact",
                streaming=None):
  """A `StageRunner` for `layers` of the GGUF or orbax checkpoint directory at `path` (or a
  `quant.source.TensorSource`), carrying the model fingerprint, ready to serve a
  `StageBatcher` of `max_sessions` slots fed chunks of up to `prefill_chunk` tokens.

  Compile-first (`runtime.load.load_runner`): every shape that batcher runs compiles from
  the abstract stage before the weights stream in (the compiler's peak never stacks on
  them). dtype None: float32 for a GGUF, the stored dtype for a checkpoint. weights:
  'packed' or 'dequantized'. devices: 1, N or 'all' local devices (`model.sharding`).
  activations: 'exact' or 'q8' (the packed products' activations, `quant.matmul`).
  streaming: a `gguf.streaming.StreamingOptions` (ds4's --ssd_streaming*): the routed
  experts stay in the GGUF, read into a bounded host cache; None: every weight resident.
  ctx_size is capped at the model's context length.
  """
  from ds4jax.runtime import load
  from ds4jax.runtime.progress import heartbeat
  if int(max_sessions) < 1:
    raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
  src, rng, name = _open(path, layers)
  spent = [0.0]
  t0 = time.perf_counter()
  with contextlib.ExitStack() as loading:

    def prepare(runner):  # compiled shapes first; then the weights stream in, with a heartbeat
      spent[0] = compile_serving(runner, prefill_chunk, max_sessions)
      loading.enter_context(heartbeat(f"loading the weights of layers {rng.describe()} of "
                                        f"{name}"))

    runner = load.load_runner(src, rng, ctx_size=min(int(ctx_size), src.cfg.context_length),
                              max_chunk=max_chunk_for(prefill_chunk), dtype=dtype,
                              weights=weights, devices=devices, prepare=prepare,
                              activations=activations, streaming_options=streaming)
  log.info("layers %s loaded in %.1fs (%.1fs of it compiling)", rng.describe(),
           time.perf_counter() - t0, spent[0])
  return runner


def load_model(path, layers: str | LayerRange = "all", dtype: str | None = None, *,
               ctx_size: int = 4096, max_chunk: int = DEFAULT_MAX_CHUNK,
               weights: str = "packed", devices=1, activations: str = "exact",
               streaming=None):
  """Loads `layers` of a ds4 GGUF (or an orbax checkpoint directory, or a `TensorSource`) for
  notebooks: a `runtime.api.Model` (`logits(ids)`, `session()`). Its decode step compiles
  before the weights load; prefill lengths compile on first use (bucketed: 1, 2, 4, ...).

  dtype: compute dtype ('float32' | 'bfloat16'); None is float32 for a GGUF and the stored
  dtype for a checkpoint. weights: 'packed' (default: quantised tensors stay GGUF blocks in
  device memory, dequantised inside the step) or 'dequantized' (dequantised to `dtype` at
  load, ~13x the GGUF bytes for a q2 file in f32). devices: 1 (default, one device), N or
  "all" local devices, the routed experts sharded over them (expert parallelism,
  docs/design.md §12); N must divide the expert count. max_chunk: the longest chunk one
  call runs (a power of two; longer prompts run in pieces). activations: 'exact' (default)
  or 'q8': the packed products round activations to int8 blocks first (`quant.matmul`).
  streaming: expert streaming options (`load_runner`).
  """
  from ds4jax.runtime import load
  from ds4jax.runtime.api import Model
  from ds4jax.runtime.progress import heartbeat
  src, rng, name = _open(path, layers)
  with heartbeat(f"loading layers {rng.describe()} of {name}"):
    return Model(load.load_runner(src, rng, ctx_size=min(int(ctx_size), src.cfg.context_length),
                                  max_chunk=max_chunk, dtype=dtype, weights=weights,
                                  devices=devices, compile_sizes=(1,),
                                  activations=activations, streaming_options=streaming))


__all__ = ["compile_serving", "load_model", "load_runner", "max_chunk_for"]
