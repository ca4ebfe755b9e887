"""Builds a Stage from a `quant.source.TensorSource`, abstract-first (style rule 9).

A source (a GGUF, `gguf.source.GGUFSource`, or an orbax checkpoint,
`checkpoints.orbax_io.OrbaxSource`) gives the tensors of a slice by stage-local parameter
path: first their table (`abstract`: packed type, shape, dtype), then the tensors one at a
time. `nnx.eval_shape` gives the stage's parameter tree without allocating it; the table is
checked against it (packed entries become abstract `Packed` leaves); each tensor is checked
and placed; then `nnx.merge` builds the module. Layers outside the range never exist, not
even abstractly. Tensors stream in one at a time: the host never holds the slice twice.

This module opens GGUF files itself (`as_source`) but never imports `ds4jax.checkpoints`:
opening a path of either kind is `ds4jax.runtime.sources.open_source` (docs/design.md §8).

Weights (docs/design.md §8): `"packed"` (the default) keeps every quantised or 16-bit tensor
of two or more dims as its GGUF bytes (`quant.Packed`), dequantised inside the step;
`"dequantized"` dequantises on the host at load (f32, or bf16) as before.

`load_runner` is the low-peak way to start a stage process (issue 7): compile from shapes
first, then load; `return_big_frees` and `trim_heap` keep glibc from holding freed memory.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf import names, streaming
from ds4jax.gguf.writer import RawTensor
from ds4jax.model import sharding
from ds4jax.runtime.runner import StageRunner
from ds4jax.model.stage import Stage
from ds4jax.quant.packed import Packed, with_activations
from ds4jax.quant.source import Stored, TensorSource

WEIGHTS = ("packed", "dequantized")

_DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16}


def parse_dtype(dtype) -> jnp.dtype:
  """'float32' | 'bfloat16' (or a jnp dtype) -> jnp dtype; ValueError otherwise."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unsupported dtype {dtype!r}: expected 'float32' or 'bfloat16'")
    return jnp.dtype(_DTYPES[dtype])
  dt = jnp.dtype(dtype)
  if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"unsupported dtype {dt}: expected float32 or bfloat16")
  return dt


def parse_weights(weights: str) -> str:
  """'packed' | 'dequantized' (ValueError otherwise)."""
  if weights not in WEIGHTS:
    raise ValueError(f"unsupported weights {weights!r}: expected 'packed' or 'dequantized'")
  return weights


def abstract_stage(cfg: ModelConfig, layers: LayerRange, dtype="float32",
                   stored: Mapping[tuple, Stored] | None = None, experts=None):
  """(graphdef, {local path: abstract Param}) of a stage, with nothing allocated.

  stored: a source's table (`TensorSource.abstract`); its packed entries become abstract
  `Packed` values (the shapes a packed stage compiles with). Every entry is checked against
  the stage: a path the stage lacks, or another shape, is a ValueError.
  experts: a `gguf.streaming.ExpertCache`: the MoE modules hold no routed expert parameters
  and read the chosen experts through it (expert streaming).
  """
  dt = parse_dtype(dtype)
  abstract = nnx.eval_shape(lambda: Stage(cfg, layers, rngs=nnx.Rngs(0), dtype=dt))
  if experts is not None:
    for block in abstract.blocks:
      for name in streaming.EXPERT_PARAMS:
        delattr(block.moe, name)
      block.moe.expert_source = experts
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  for path, st in (stored or {}).items():
    var = flat.get(path)
    if var is None:
      raise ValueError(f"parameter {_dotted(path)} of the source is not in the stage")
    if tuple(st.shape) != tuple(var.shape):
      raise ValueError(f"parameter {_dotted(path)} is stored with shape {list(st.shape)}, the "
                       f"stage needs {list(var.shape)}")
    if st.qtype is not None:
      flat[path] = var.replace(Packed.abstract(st.qtype, var.shape, var.dtype))
  return graphdef, flat


def stage_from_tensors(cfg: ModelConfig, layers: LayerRange | str,
                       tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], *,
                       dtype="float32") -> Stage:
  """Builds the stage of `layers` from `{gguf_name: array}` (numpy orientation), or from an
  iterable of `(gguf_name, array)` pairs, which is consumed one array at a time (each is
  placed, then dropped, so the host never holds the slice twice). A value may also be a
  `gguf.writer.RawTensor` (packed GGUF data), which becomes a `Packed` parameter.

  Tensors the slice does not own are ignored; a missing parameter is an error, except the
  optional router bias (zeros).
  """
  layers = (LayerRange.parse(layers, cfg.n_layers) if isinstance(layers, str)
            else layers.resolve(cfg.n_layers))
  graphdef, flat = abstract_stage(cfg, layers, dtype)
  items = tensors.items() if isinstance(tensors, Mapping) else tensors

  def by_path():
    for name, arr in items:
      if names.owner(name, layers):
        if isinstance(arr, RawTensor):
          yield names.local_path(name, layers), arr.data, int(arr.qtype)
        else:
          yield names.local_path(name, layers), arr, None
      del arr

  return nnx.merge(graphdef, nnx.from_flat_state(_place(flat, by_path())))


def _dotted(path: tuple) -> str:
  return ".".join(map(str, path))


def _place(flat, items: Iterable[tuple[tuple, Any, int | None]], mesh=None):
  """{path: Param holding a device array} for every abstract parameter in `flat`, from
  `(path, data, qtype)` triples (`TensorSource.tensors`). With a `mesh`, each parameter is
  placed as `sharding.PARAM_AXES` says, every device given only its shard."""
  filled = {}
  shard = (lambda path, value: None) if mesh is None else (
      lambda path, value: sharding.leaf_shardings(path, value, mesh))
  for path, arr, qtype in items:
    var = flat.get(path)
    if var is None:
      raise ValueError(f"tensor for {_dotted(path)}: the stage has no such parameter")
    want = var.get_value()
    if qtype is not None:  # packed: the GGUF bytes, checked against the element shape
      if isinstance(want, Packed) and want.qtype != int(qtype):
        raise ValueError(f"parameter {_dotted(path)} is {_qname(qtype)}, the stage expects "
                         f"{_qname(want.qtype)}")
      try:
        abstract = Packed.abstract(qtype, var.shape, var.dtype)
        filled[path] = var.replace(sharding.put_packed(arr, qtype, var.shape, var.dtype,
                                                       shard(path, abstract)))
      except ValueError as e:
        raise ValueError(f"parameter {_dotted(path)}: {e}") from None
      del arr
      continue
    if tuple(np.shape(arr)) != tuple(var.shape):
      raise ValueError(f"parameter {_dotted(path)} has shape {list(np.shape(arr))}, "
                       f"expected {list(var.shape)}")
    if isinstance(want, Packed):
      raise ValueError(f"parameter {_dotted(path)} is dense, but the stage expects it packed")
    if isinstance(arr, jax.Array) and arr.dtype == var.dtype:
      # Already on the device, in the stage's dtype.
      filled[path] = var.replace(arr if mesh is None else jax.device_put(arr, shard(path, arr)))
    else:
      # device_put copies straight from the host array (jnp.asarray compiles a copy per
      # shape); the cast happens on the host, one tensor at a time (round-to-nearest-even
      # either way).
      host = np.asarray(arr, dtype=var.dtype)
      filled[path] = var.replace(sharding.put(host, shard(path, host)))
      del host
    del arr
  for path, var in flat.items():
    if path in filled:
      continue
    if path[-1] == "bias" and path[-2] == "moe":
      zeros = np.zeros(var.shape, var.dtype)
      filled[path] = var.replace(sharding.put(zeros, shard(path, zeros)))
    else:
      raise ValueError(f"no tensor for parameter {_dotted(path)}")
  return filled


def _with_activations(flat: dict, activations: str) -> dict:
  """`flat` ({path: Param}) with every Packed value's activation mode set (`quant.matmul`);
  ValueError for a mode other than 'exact' or 'q8'."""
  with_activations((), activations)  # the check, also for a stage with nothing packed
  return {path: var.replace(with_activations(var.get_value(), activations))
          if isinstance(var.get_value(), Packed) else var for path, var in flat.items()}


def _qname(qtype: int) -> str:
  from gguf import GGMLQuantizationType as Q
  return Q(int(qtype)).name


def as_source(source) -> TensorSource:
  """`source` itself, or a `GGUFSource` for the path of a GGUF file. The model opens GGUFs
  (it depends on `gguf`) but never checkpoints: open a directory with
  `ds4jax.runtime.sources.open_source` (docs/design.md §8)."""
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if os.path.isdir(path):
      raise ValueError(f"{path} is a directory: open a checkpoint with "
                       "ds4jax.runtime.sources.open_source(path)")
    from ds4jax.gguf.source import GGUFSource  # deferred: the gguf package imports lazily
    return GGUFSource(path)
  return source


def _abstract(source: TensorSource, layers, dtype, weights: str, stream=None, mesh=None,
              activations: str = "exact"):
  """(graphdef, flat, tensors) for a load of `layers` of `source`; `tensors()`
  iterates what `_place` takes. stream: `gguf.streaming.StreamingOptions` (None: every
  weight resident); the routed experts then stay in the file, read through an ExpertCache
  (its budget checked here, before anything compiles), or an `ExpertCache` over these layers
  (and maybe others: one cache, one budget, for the stages of a process)."""
  packed = parse_weights(weights) == "packed"
  rng = source.resolve(layers)
  dt = str(parse_dtype(dtype if dtype is not None else source.dtype))
  cache = None
  if stream is not None:
    from ds4jax.gguf.source import GGUFSource
    if not isinstance(source, GGUFSource):
      raise ValueError(f"--ssd_streaming reads experts from a GGUF file; {source.path} is not "
                       "one (a checkpoint directory)")
    if not packed:
      raise ValueError("--ssd_streaming keeps the experts' GGUF bytes: it needs "
                       "--weights=packed, not --weights=dequantized")
    cache = stream if isinstance(stream, streaming.ExpertCache) else streaming.ExpertCache(
        source.file, rng.layers(), stream, k=source.cfg.n_experts_used, dtype=parse_dtype(dt),
        act=activations)
    if not set(rng.layers()) <= set(cache.layers):
      raise ValueError(f"the expert cache holds layers {cache.layers}, not all of "
                       f"{rng.describe()}")
  stored = source.abstract(rng, packed=packed, dtype=dt,
                           **({} if cache is None else {"experts": False}))
  graphdef, flat = abstract_stage(source.cfg, rng, dt, stored, cache)
  tensors = (lambda: source.tensors(rng, packed=packed)) if cache is None else (
      lambda: source.tensors(rng, packed=packed, experts=False))
  return graphdef, flat, tensors


def load_stage(source: TensorSource | str | os.PathLike, layers: LayerRange | str | None = None,
               *, dtype=None, weights: str = "packed", devices=1,
               activations: str = "exact", streaming_options=None) -> Stage:
  """Loads the slice `layers` of a source (only its tensors are read).

  source: a `quant.source.TensorSource` (a GGUF or an orbax checkpoint, see
    `ds4jax.runtime.sources.open_source`), or the path of a GGUF file.
  layers: "all", "A:B", "A:output" or a LayerRange; None is the slice the source holds
    (all of a full GGUF, a split file's slice, a checkpoint's stored range).
  dtype: the compute dtype; None is the source's (float32 for a GGUF, the stored dtype for
    a dequantised checkpoint).
  weights: 'packed' (what the source holds packed, quantised and 16-bit tensors, stays GGUF
    blocks, dequantised in the step) or 'dequantized' (every tensor dequantised to `dtype`
    on the host at load).
  devices: the stage's local devices, 1 (default: one device, no mesh), N, "all", or a
    `jax.sharding.Mesh` with an "expert" axis: the routed experts are sharded over them
    (expert parallelism, `model.sharding`), each device receiving only its experts' bytes.
  activations: 'exact' (default) or 'q8': how the packed weights' products treat their
    activations (`quant.matmul`; q8 rounds them to int8 blocks first, within a stated bound).
  streaming_options: a `gguf.streaming.StreamingOptions`: the routed experts stay in the
    GGUF, read on demand into a bounded host cache (expert streaming); or an ExpertCache
    shared with other stages of the process; None: resident.
  """
  source = as_source(source)
  mesh = sharding.make_mesh(devices)
  sharding.check_experts(source.cfg.n_experts, mesh)
  graphdef, flat, tensors = _abstract(source, layers, dtype, weights, streaming_options,
                                      mesh, activations)
  stage = nnx.merge(graphdef, nnx.from_flat_state(
      _with_activations(_place(flat, tensors(), mesh), activations)))
  sharding.attach(stage, mesh)
  return stage


def load_runner(source: TensorSource | str | os.PathLike, layers: LayerRange | str | None = None,
                *, ctx_size: int, max_chunk: int = 256, dtype=None, weights: str = "packed",
                fingerprint: str | None = None, compile_sizes: Sequence[int] = (),
                compile_batches=None, devices=1,
                prepare: Callable[[StageRunner], None] | None = None,
                activations: str = "exact", streaming_options=None) -> StageRunner:
  """A StageRunner for `layers` of a source (as in `load_stage`), built in the order that
  keeps the process's peak memory low (issue 7):

  1. the chunk shapes `compile_sizes` are compiled from the abstract stage (packed leaves
     included), before any weight or state exists, so the compiler's transient peak does
     not stack on top of them; the freed compiler heap is handed back to the OS;
  2. the weights are streamed in one tensor at a time (read or dequantise, place, drop).

  What was compiled is what `forward` runs: nothing compiles again for those sizes.
  compile_batches: (batch_sizes, chunk_sizes, n_slots) of `forward_batch` to compile in
  step 1 as well (`StageRunner.compile_batch`; what a worker's StageBatcher runs).
  prepare: called with the weightless runner in step 1, after those (the builder compiles
  every shape a stage serves here: `ds4jax.build`).
  fingerprint: None is the source's; another one is a ValueError (the wrong model).
  devices, activations, streaming_options: as in `load_stage` (the step compiles for the
  sharded placement).
  """
  source = as_source(source)
  mesh = sharding.make_mesh(devices)
  sharding.check_experts(source.cfg.n_experts, mesh)
  if fingerprint is not None and fingerprint != source.fingerprint:
    raise ValueError(f"{source.path} is of another model (fingerprint "
                     f"{source.fingerprint[:16]}, expected {fingerprint[:16]})")
  graphdef, flat, tensors = _abstract(source, layers, dtype, weights, streaming_options,
                                      mesh, activations)
  flat = _with_activations(flat, activations)
  abstract = nnx.merge(graphdef, nnx.from_flat_state(flat))
  sharding.attach(abstract, mesh)
  runner = StageRunner(abstract, ctx_size=ctx_size, max_chunk=max_chunk,
                       fingerprint=source.fingerprint)
  if compile_sizes or compile_batches or prepare is not None:
    if compile_sizes:
      runner.compile(compile_sizes)
    if compile_batches:
      batch_sizes, chunk_sizes, n_slots = compile_batches
      runner.compile_batch(batch_sizes, chunk_sizes, n_slots=n_slots)
    if prepare is not None:
      prepare(runner)
    trim_heap()
  items = tensors()
  stage = nnx.merge(graphdef, nnx.from_flat_state(
      _with_activations(_place(flat, items, mesh), activations)))
  sharding.attach(stage, mesh)
  runner.set_params(stage)
  trim_heap()
  return runner


def return_big_frees(threshold: int = 1 << 20) -> None:
  """Serves C allocations of `threshold` bytes or more with their own mappings, which go back
  to the OS when freed (glibc `mallopt(M_MMAP_THRESHOLD)`; a no-op elsewhere).

  glibc's default threshold rises to the largest block freed so far (up to 32 MB): after
  the first decode-state or weight buffer is freed, later ones come from malloc's heaps and
  stay resident once freed, so a process holds its old buffers next to its new ones (60-80 MB
  of a bench-preset worker's peak). A fixed threshold also switches that rise off.
  Call it once, early, in a process that serves a stage.
  """
  libc = _libc()
  if libc:
    libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))


def trim_heap() -> None:
  """Returns the C heap's free pages to the OS (glibc `malloc_trim`; a no-op elsewhere).

  XLA compiles on its own threads, whose malloc arenas keep ~100 MB of freed compiler memory
  resident on the bench preset unless asked to give it back.
  """
  libc = _libc()
  if libc:
    libc.malloc_trim(0)


_LIBC = None
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def _libc():
  """glibc through ctypes, or False where there is none (musl, macOS)."""
  global _LIBC
  if _LIBC is None:
    try:
      _LIBC = ctypes.CDLL("libc.so.6")
      _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 (AttributeError outside glibc)
    except (OSError, AttributeError):
      _LIBC = False
  return _LIBC
