"""`Packed`: one quantised (or 16-bit) weight as it sits in the GGUF, as a JAX pytree.

The device holds the GGUF's own bytes; the jitted step dequantises what it reads
(docs/design.md §8). A block-type tensor of numpy shape `[*lead, n]` is stored as
`uint8 [*lead, row_bytes]`, `row_bytes = n / block * type_size`: every row is whole blocks,
so slicing leading axes (an expert, embedding rows, a tile of output rows) is a slice of
bytes. F16 / BF16 tensors are stored as themselves.

`qtype`, `shape` and `dtype` (the compute dtype it dequantises to) are static, so a jitted
function sees them as Python values and traces one dequant function per type.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q

FLOAT16_TYPES = {Q.F16: np.float16, Q.BF16: jnp.bfloat16}


def storage(qtype: Q | int, shape) -> tuple[tuple[int, ...], Any]:
  """(shape, dtype) of the packed data of a tensor of numpy `shape` stored as `qtype`."""
  qtype = Q(int(qtype))
  shape = tuple(int(s) for s in shape)
  if qtype in FLOAT16_TYPES:
    return shape, np.dtype(FLOAT16_TYPES[qtype])
  if qtype not in gguf.GGML_QUANT_SIZES or qtype in (Q.F32, Q.I32):
    raise ValueError(f"{qtype.name} is not a packed type")
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  if shape[-1] % block:
    raise ValueError(f"{qtype.name} rows hold whole blocks of {block}: shape {list(shape)}")
  return shape[:-1] + (shape[-1] // block * type_size,), np.dtype(np.uint8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packed:
  """A packed weight: `data` (the only pytree child) plus static `qtype`, `shape`, `dtype`.

  Attributes:
    data: uint8 [*shape[:-1], row_bytes] for block types, float16/bfloat16 [*shape] for
      F16/BF16 (or a ShapeDtypeStruct of that, see `abstract`).
    qtype: the GGML type id (int).
    shape: the element shape, numpy orientation (the contraction axis is last).
    dtype: what `dense()` returns: float32 or bfloat16.
  """

  data: Any
  qtype: int = dataclasses.field(metadata={"static": True})
  shape: tuple = dataclasses.field(metadata={"static": True})
  dtype: Any = dataclasses.field(metadata={"static": True})

  @classmethod
  def abstract(cls, qtype: Q | int, shape, dtype) -> Packed:
    """The Packed of a tensor not yet loaded: `data` is a ShapeDtypeStruct."""
    dshape, ddtype = storage(qtype, shape)
    return cls(jax.ShapeDtypeStruct(dshape, ddtype), int(qtype), tuple(int(s) for s in shape),
               jnp.dtype(dtype))

  @classmethod
  def from_gguf_data(cls, data: np.ndarray, qtype: Q | int, shape, dtype) -> Packed:
    """Wraps the data of a GGUF tensor (as `gguf.GGUFReader` maps it) after checking its size;
    the array is placed as is (no host copy beyond the one the device makes)."""
    dshape, ddtype = storage(qtype, shape)
    arr = np.asarray(data)
    if arr.nbytes != int(np.prod(dshape)) * ddtype.itemsize:
      raise ValueError(f"{Q(int(qtype)).name} data of {arr.nbytes} bytes does not hold "
                       f"shape {list(shape)}")
    arr = arr.view(ddtype).reshape(dshape)
    return cls(jax.device_put(arr), int(qtype), tuple(int(s) for s in shape), jnp.dtype(dtype))

  # -- what the model uses ---------------------------------------------------------------

  def __getitem__(self, key):
    """`p[...]` is `p` (so `nnx.Param[...]` hands the Packed itself to the model)."""
    if key is Ellipsis:
      return self
    raise TypeError("index a Packed with .index(i) / .take(idx), or dense() it first")

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Device bytes of the packed data."""
    return int(np.prod(self.data.shape)) * jnp.dtype(self.data.dtype).itemsize

  def dense(self):
    """Dequantised weight, `dtype [*shape]` (via float32, exactly as the host path rounds)."""
    q = Q(self.qtype)
    if q in FLOAT16_TYPES:
      x = self.data.astype(jnp.float32)
    else:
      from ds4jax.quant import kernels
      x = kernels.dequant_rows(self.data, q, self.shape[-1])
    return x if self.dtype == jnp.float32 else x.astype(self.dtype)

  def _with(self, data, shape) -> Packed:
    return Packed(data, self.qtype, tuple(shape), self.dtype)

  def index(self, i) -> Packed:
    """Entry `i` (traced or not) of axis 0, still packed: `[*shape[1:]]`."""
    if self.ndim < 2:
      raise ValueError("index() needs a leading axis")
    return self._with(jax.lax.dynamic_index_in_dim(self.data, i, 0, keepdims=False),
                      self.shape[1:])

  def take(self, idx) -> Packed:
    """Entries `idx` (int array [N]) of axis 0, still packed: `[N, *shape[1:]]`."""
    if self.ndim < 2:
      raise ValueError("take() needs a leading axis")
    return self._with(jnp.take(self.data, idx, axis=0), (int(idx.shape[0]),) + self.shape[1:])

  def rows(self, start: int, size: int) -> Packed:
    """Rows `start .. start+size` of axis 0 (static bounds), still packed."""
    return self._with(jax.lax.slice_in_dim(self.data, start, start + size, axis=0),
                      (size,) + self.shape[1:])

  def tiles(self, n: int) -> Packed:
    """Axis 0 cut into `n` equal tiles: `[n, shape[0] / n, *shape[1:]]` (for `lax.map`)."""
    rows = self.shape[0]
    if rows % n:
      raise ValueError(f"{rows} rows do not split into {n} tiles")
    data = self.data.reshape((n, rows // n) + tuple(self.data.shape[1:]))
    return self._with(data, (n, rows // n) + self.shape[1:])

  def reshape_lead(self, lead) -> Packed:
    """Reshapes the leading axes (never the contraction axis): `[*lead, shape[-1]]`."""
    lead = tuple(int(s) for s in lead)
    if int(np.prod(lead)) != int(np.prod(self.shape[:-1])):
      raise ValueError(f"cannot reshape leading axes {self.shape[:-1]} to {lead}")
    data = self.data.reshape(lead + tuple(self.data.shape[-1:]))
    return self._with(data, lead + self.shape[-1:])


def is_packed(x) -> bool:
  return isinstance(x, Packed)
