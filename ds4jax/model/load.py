"""Builds a Stage from GGUF tensors, abstract-first (style rule 9).

`nnx.eval_shape` gives the stage's parameter tree without allocating it; each tensor of the
slice is matched to its parameter path through `ds4jax.gguf.names`, checked and placed; then
`nnx.merge` builds the module. Layers outside the range never exist, not even abstractly.
Tensors stream in one at a time: the host never holds the slice twice.

Weights (docs/design.md §8): `"packed"` (the default) keeps every quantised or 16-bit tensor
of two or more dims as its GGUF bytes (`quant.Packed`), dequantised inside the step;
`"dequantized"` dequantises on the host at load (f32, or bf16) as before.

`load_runner` is the low-peak way to start a stage process (issue 7): compile from shapes
first, then load; `return_big_frees` and `trim_heap` keep glibc from holding freed memory.
"""

from __future__ import annotations

import ctypes
import os
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf import names
from ds4jax.gguf.writer import RawTensor
from ds4jax.model.runner import StageRunner
from ds4jax.model.stage import Stage
from ds4jax.quant.packed import Packed

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
                   packed: Mapping[str, int] | None = None):
  """(graphdef, {local path: abstract Param}) of a stage, with nothing allocated.

  packed: {gguf_name: GGML type} of the tensors that stay packed; their parameters become
  abstract `Packed` values (the shapes a packed stage compiles with).
  """
  dt = parse_dtype(dtype)
  abstract = nnx.eval_shape(lambda: Stage(cfg, layers, rngs=nnx.Rngs(0), dtype=dt))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  for name, qtype in (packed or {}).items():
    path = names.local_path(name, layers)
    var = flat[path]
    flat[path] = var.replace(Packed.abstract(qtype, var.shape, var.dtype))
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
  return nnx.merge(graphdef, nnx.from_flat_state(_place(flat, layers, items)))


def _place(flat, layers: LayerRange, items: Iterable[tuple[str, np.ndarray]]):
  """{path: Param holding a device array} for every abstract parameter in `flat`."""
  filled = {}
  for name, arr in items:
    if not names.owner(name, layers):
      continue
    path = names.local_path(name, layers)
    var = flat.get(path)
    if var is None:
      raise ValueError(f"tensor {name!r} maps to {path}, which the stage does not have")
    if isinstance(arr, RawTensor):  # packed: the GGUF bytes, checked against the element shape
      try:
        filled[path] = var.replace(Packed.from_gguf_data(arr.data, arr.qtype, var.shape,
                                                         var.dtype))
      except ValueError as e:
        raise ValueError(f"tensor {name!r}: {e}") from None
      del arr
      continue
    if tuple(np.shape(arr)) != tuple(var.shape):
      raise ValueError(f"tensor {name!r} has shape {tuple(np.shape(arr))}, "
                       f"expected {tuple(var.shape)}")
    if isinstance(var.get_value(), Packed):
      raise ValueError(f"tensor {name!r} is dense, but the stage expects it packed")
    # device_put copies straight from the host array (jnp.asarray compiles a copy per shape);
    # the cast happens on the host, one tensor at a time (round-to-nearest-even either way).
    filled[path] = var.replace(jax.device_put(np.asarray(arr, dtype=var.dtype)))
    del arr
  for path, var in flat.items():
    if path in filled:
      continue
    if path[-1] == "bias" and path[-2] == "moe":
      filled[path] = var.replace(jax.device_put(np.zeros(var.shape, var.dtype)))
    else:
      raise ValueError(f"no tensor for parameter {'.'.join(map(str, path))}")
  return filled


def load_stage(path, layers: LayerRange | str = "all", *, dtype=None,
               weights: str = "packed") -> Stage:
  """Loads the slice `layers` of a ds4 GGUF (only its tensors are read), or restores it from an
  orbax checkpoint directory (scripts/convert_to_orbax.py).

  dtype: the compute dtype; None means float32 for a GGUF and the stored dtype for a
    checkpoint.
  weights: 'packed' (quantised and 16-bit tensors stay GGUF blocks, dequantised in the step)
    or 'dequantized' (every tensor dequantised to `dtype` on the host at load).
  """
  parse_weights(weights)
  if os.path.isdir(path):
    from ds4jax.checkpoints.orbax_io import load_stage_checkpoint  # deferred: imports orbax
    return load_stage_checkpoint(path, layers, dtype=dtype)
  from ds4jax.gguf.load import iter_tensors  # deferred: the gguf package imports lazily
  from ds4jax.gguf.reader import open_gguf
  f = open_gguf(path)
  rng = f.resolve(layers) if isinstance(layers, str) else layers.resolve(f.cfg.n_layers)
  graphdef, flat = abstract_stage(f.cfg, rng, dtype or "float32", _packed_types(f, rng, weights))
  return nnx.merge(graphdef, nnx.from_flat_state(
      _place(flat, rng, iter_tensors(f, rng, packed=weights == "packed"))))


def _packed_types(f, rng: LayerRange, weights: str) -> dict[str, int]:
  """{gguf_name: GGML type} of the slice's tensors that load packed under `weights`."""
  if weights != "packed":
    return {}
  from ds4jax.gguf.load import packs
  out = {}
  for e in f.validate(rng):
    t = f.tensor(e.name)
    if packs(t.tensor_type, e.numpy_shape(f.cfg)):
      out[e.name] = int(t.tensor_type)
  return out


def load_runner(path, layers: LayerRange | str = "all", *, ctx_size: int, max_chunk: int = 256,
                dtype=None, weights: str = "packed", fingerprint: str | None = None,
                compile_sizes: Sequence[int] = ()) -> StageRunner:
  """A StageRunner for `layers` of a GGUF (or an orbax checkpoint directory), built in the
  order that keeps the process's peak memory low (issue 7):

  1. the chunk shapes `compile_sizes` are compiled from the abstract stage (packed leaves
     included), before any weight or state exists, so the compiler's transient peak does
     not stack on top of them; the freed compiler heap is handed back to the OS;
  2. the weights are streamed in one tensor at a time (read or dequantise, place, drop).

  What was compiled is what `forward` runs: nothing compiles again for those sizes.
  """
  parse_weights(weights)
  if os.path.isdir(path):  # a checkpoint restores into its own abstract tree
    runner = StageRunner(load_stage(path, layers, dtype=dtype), ctx_size=ctx_size,
                         max_chunk=max_chunk, fingerprint=fingerprint)
    runner.compile(compile_sizes)
    return runner
  from ds4jax.gguf.load import iter_tensors
  from ds4jax.gguf.reader import open_gguf
  f = open_gguf(path)
  rng = f.resolve(layers) if isinstance(layers, str) else layers.resolve(f.cfg.n_layers)
  graphdef, flat = abstract_stage(f.cfg, rng, dtype or "float32", _packed_types(f, rng, weights))
  runner = StageRunner(nnx.merge(graphdef, nnx.from_flat_state(flat)), ctx_size=ctx_size,
                       max_chunk=max_chunk, fingerprint=fingerprint)
  if compile_sizes:
    runner.compile(compile_sizes)
    trim_heap()
  items = iter_tensors(f, rng, packed=weights == "packed")
  runner.set_params(nnx.merge(graphdef, nnx.from_flat_state(_place(flat, rng, items))))
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
