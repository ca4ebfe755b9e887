"""Slice loading: only the tensors of a layer range, read from the memory map.

The file is mapped by `gguf.GGUFReader`; each tensor is read (packed) or dequantised from its
own view, so the pages of other layers are never touched and the whole file is never
materialised. A split GGUF (`scripts/split_gguf.py`) loads exactly like the full file.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import numpy as np
from absl import logging

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf import dequant, names
from ds4jax.gguf.reader import DS4File, open_gguf
from ds4jax.gguf.writer import RawTensor

# GGML types a packed stage keeps as they are (block types with an in-step dequantiser, and
# 16-bit floats); F32 and I32 are plain arrays either way.
PACKED_TYPES = frozenset(dequant.SUPPORTED) - {dequant.Q.F32, dequant.Q.I32}


def packs(qtype, numpy_shape) -> bool:
  """True if a tensor of this type and shape stays packed: a packed type, two or more dims
  (1-D norms, biases and sinks are tiny and are read as float32)."""
  return int(qtype) in PACKED_TYPES and len(numpy_shape) >= 2

# Seconds between progress lines for big loads.
PROGRESS_EVERY_S = 5.0


def slice_range(f: DS4File, layers: LayerRange | str | None,
                output: bool | None) -> LayerRange:
  """Resolves `layers` (None: the slice a split file holds, else all); `output` (if not None)
  overrides whether the head is included."""
  rng = f.held if layers is None and f.held is not None else f.resolve(layers or "all")
  if output is not None:
    rng = LayerRange(rng.start, rng.end, bool(output))
  return rng


def iter_tensors(f: DS4File, rng: LayerRange, *, progress: bool = True,
                 fill_optional: bool = True, release: bool = True,
                 packed: bool = False,
                 skip=None) -> Iterator[tuple[str, np.ndarray | RawTensor]]:
  """Yields `(gguf_name, array)` for the slice `rng` of `f`, one tensor at a time.

  A consumer that places each array and drops it (runtime.load) never holds more than one
  tensor on the host: the slice is not materialised twice. With `packed`, a tensor that
  `packs` comes as a `RawTensor` holding a copy of its GGUF data (uint8 blocks shaped
  `[*numpy_shape[:-1], row_bytes]`, or the float16/bfloat16 array), the rest dequantised.
  `skip(name) -> bool`: tensors left unread in the file (expert streaming). Other arguments
  as in `load_tensors`.
  """
  entries = [e for e in f.validate(rng) if skip is None or not skip(e.name)]
  total = sum(f.nbytes(e.name) for e in entries)
  seen = set()
  t0 = last = time.monotonic()
  done = 0
  for e in entries:
    t = f.tensor(e.name)
    if packed and packs(t.tensor_type, e.numpy_shape(f.cfg)):
      # A copy, so the device never aliases the memory map (released below).
      arr = RawTensor(np.array(t.data), dequant.Q(int(t.tensor_type)))
    else:
      arr = dequant.dequantize_tensor(t)
    if release:
      f.release(e.name)
    done += f.nbytes(e.name)
    seen.add(e.name)
    now = time.monotonic()
    if progress and now - last >= PROGRESS_EVERY_S:
      last = now
      logging.info("loading %s layers %s: %.1f / %.1f MB (%.0f%%), %.0fs", os.path.basename(f.path),
                   rng.describe(), done / 1e6, total / 1e6, 100.0 * done / max(total, 1), now - t0)
    yield e.name, arr
    del arr  # not kept alive while the next tensor is dequantised
  if fill_optional:
    for e in names.entries(f.cfg, rng, optional=True):
      if e.name not in seen and (skip is None or not skip(e.name)):
        yield e.name, np.zeros(e.numpy_shape(f.cfg), np.float32)
  if progress and time.monotonic() - t0 >= PROGRESS_EVERY_S:
    logging.info("loaded %d tensors (%.1f MB in the file) in %.1fs", len(entries), total / 1e6,
                 time.monotonic() - t0)


def load_tensors(path: str | os.PathLike | DS4File, layers: LayerRange | str | None = None, *,
                 output: bool | None = None, progress: bool = True,
                 fill_optional: bool = True,
                 release: bool = True) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Loads one slice's tensors.

  Args:
    path: a full or split ds4 GGUF (or an open `DS4File`).
    layers: "A:B", "A:output", "all" (ds4's inclusive syntax) or a LayerRange; None means
      the slice a split file holds, or "all" for a full file.
    output: include the head (`output*` tensors); None means "if the range says output".
    progress: log a line every few seconds while loading.
    fill_optional: give absent optional tensors (the router bias) as zeros, so every
      parameter of the stage has an array.
    release: drop each tensor's mapped pages once it is dequantised (see DS4File.release).
  Returns:
    (cfg, {gguf_name: array}), arrays in numpy orientation: float32, int32 for tid2eid.
    `token_embd` is included only when the slice starts at layer 0.
  """
  f = path if isinstance(path, DS4File) else open_gguf(path)
  rng = slice_range(f, layers, output)
  return f.cfg, dict(iter_tensors(f, rng, progress=progress, fill_optional=fill_optional,
                                  release=release))
