"""`GGUFSource`: a ds4 GGUF (full or split) as a `quant.source.TensorSource`.

The table (`abstract`) comes from the header alone; `tensors` streams the slice through
`load.iter_tensors` (one tensor at a time, read from its own view of the memory map, the
pages released after). Packed: every tensor that `load.packs` (a block type or F16/BF16,
two or more dims) is its GGUF bytes; the rest (F32, I32, 1-D tensors) is dequantised.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from ds4jax.config import LayerRange
from ds4jax.gguf import load, names
from ds4jax.gguf.reader import DS4File, open_gguf
from ds4jax.gguf.writer import RawTensor
from ds4jax.quant.source import Path, Stored

class GGUFSource:
  """The tensors of a ds4 GGUF, by stage-local parameter path (see the module docstring).

  Attributes: path, cfg, fingerprint, dtype ('float32'), file (the open `DS4File`).
  """

  dtype = "float32"

  def __init__(self, path: str | os.PathLike | DS4File):
    self.file = path if isinstance(path, DS4File) else open_gguf(path)
    self.path = self.file.path
    self.cfg = self.file.cfg
    self._fingerprint = None

  @property
  def fingerprint(self) -> str:
    if self._fingerprint is None:
      self._fingerprint = self.file.fingerprint()
    return self._fingerprint

  def __repr__(self) -> str:
    return f"GGUFSource({self.path!r})"

  def resolve(self, layers: LayerRange | str | None = None) -> LayerRange:
    """None: the slice a split file holds, else all layers."""
    return load.slice_range(self.file, layers, None)

  def abstract(self, layers: LayerRange, *, packed: bool = True,
               dtype: str | None = None, experts: bool = True) -> dict[Path, Stored]:
    """Checks the slice's tensor table (dims, types) and describes it; any dtype is served.
    experts: False leaves out the routed expert tensors (expert streaming)."""
    del dtype  # the loader casts F32 tensors and packed data dequantises to any dtype
    out = {}
    for e in self.file.validate(layers):
      if not experts and _routed_expert(e.name):
        continue
      t = self.file.tensor(e.name)
      shape = e.numpy_shape(self.cfg)
      path = names.local_path(e.name, layers)
      if packed and load.packs(t.tensor_type, shape):
        qtype = int(t.tensor_type)
        out[path] = Stored(qtype, shape, _packed_dtype(qtype))
      else:
        dt = np.int32 if t.tensor_type == load.dequant.Q.I32 else np.float32
        out[path] = Stored(None, shape, np.dtype(dt))
    return out

  def tensors(self, layers: LayerRange, *, packed: bool = True,
              experts: bool = True) -> Iterator[tuple[Path, Any, int | None]]:
    """The slice's tensors one at a time; experts=False leaves the routed experts unread."""
    skip = None if experts else _routed_expert
    for name, arr in load.iter_tensors(self.file, layers, fill_optional=False, packed=packed,
                                       skip=skip):
      path = names.local_path(name, layers)
      if isinstance(arr, RawTensor):
        yield path, arr.data, int(arr.qtype)
      else:
        yield path, arr, None
      del arr


def _routed_expert(name: str) -> bool:
  """True for `blk.{i}.ffn_{gate,up,down}_exps.weight`."""
  return name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"))


def _packed_dtype(qtype: int) -> np.dtype:
  """The dtype of a packed tensor's data (`quant.packed.storage`, without importing JAX)."""
  if qtype == int(load.dequant.Q.BF16):
    import ml_dtypes  # a JAX dependency; only the BF16 type needs it
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(np.float16 if qtype == int(load.dequant.Q.F16) else np.uint8)
