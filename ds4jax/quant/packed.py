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
  """A packed weight: `planes` (the pytree children) plus static `qtype`, `shape`, `dtype`.

  Attributes:
    planes: block types: the block fields de-interleaved into typed arrays
      (`kernels.PLANES`: e.g. Q8_0 `(d f16 [*lead, B], qs int8 [*lead, B, 32])`, lead =
      shape[:-1], B = blocks per row), exactly the GGUF bytes, rearranged so that XLA reads
      them with vector loads; F16/BF16: `(array [*shape],)`. ShapeDtypeStructs in `abstract`.
    qtype: the GGML type id (int).
    shape: the element shape, numpy orientation (the contraction axis is last).
    dtype: what `dense()` returns: float32 or bfloat16.
    act: how products with it treat their activations (`quant.matmul`): "exact" (default)
      or "q8" (x rounded to int8 blocks first); a load option (`runtime.load`).
  `data` gives the GGUF bytes back (`storage` layout), e.g. for a checkpoint.
  """

  planes: tuple
  qtype: int = dataclasses.field(metadata={"static": True})
  shape: tuple = dataclasses.field(metadata={"static": True})
  dtype: Any = dataclasses.field(metadata={"static": True})
  act: str = dataclasses.field(default="exact", metadata={"static": True})

  @classmethod
  def abstract(cls, qtype: Q | int, shape, dtype, act: str = "exact") -> Packed:
    """The Packed of a tensor not yet loaded: its planes are ShapeDtypeStructs."""
    return cls(tuple(jax.ShapeDtypeStruct(s, d) for s, d in plane_specs(qtype, shape)),
               int(qtype), tuple(int(s) for s in shape), jnp.dtype(dtype), act)

  @classmethod
  def from_gguf_data(cls, data, qtype: Q | int, shape, dtype) -> Packed:
    """From the data of a GGUF tensor (as `gguf.GGUFReader` maps it, or `data` of another
    Packed, e.g. restored from a checkpoint) after checking its size: split into planes on
    the host, each placed on the device."""
    dshape, ddtype = storage(qtype, shape)
    arr = np.asarray(data)
    if arr.nbytes != int(np.prod(dshape)) * ddtype.itemsize:
      raise ValueError(f"{Q(int(qtype)).name} data of {arr.nbytes} bytes does not hold "
                       f"shape {list(shape)}")
    arr = arr.view(ddtype).reshape(dshape)
    q = Q(int(qtype))
    if q in FLOAT16_TYPES:
      planes = (arr,)
    else:
      from ds4jax.quant import kernels
      planes = kernels.split_planes(arr, q, int(shape[-1]))
    return cls(tuple(jax.device_put(np.ascontiguousarray(p)) for p in planes), int(qtype),
               tuple(int(s) for s in shape), jnp.dtype(dtype))

  @property
  def data(self):
    """The GGUF bytes (`storage(qtype, shape)`), as a host numpy array (a ShapeDtypeStruct
    for an abstract Packed)."""
    dshape, ddtype = storage(self.qtype, self.shape)
    if isinstance(self.planes[0], jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(dshape, ddtype)
    if Q(self.qtype) in FLOAT16_TYPES:
      return np.asarray(self.planes[0])
    from ds4jax.quant import kernels
    return kernels.join_planes(tuple(np.asarray(p) for p in self.planes), self.qtype)

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
    """Device bytes of the packed planes (= the GGUF bytes of the tensor)."""
    return sum(int(np.prod(p.shape)) * jnp.dtype(p.dtype).itemsize for p in self.planes)

  def blocks(self):
    """float32 `[*shape[:-1], B, *kernels.BLOCK_SHAPE]` for block types (the GGUF element
    order, row-major), `[*shape[:-1], K / 32, 32]` (or `[*shape]`) for F16 / BF16: what a
    fused reduction consumes."""
    from ds4jax.quant import kernels
    q = Q(self.qtype)
    if q in FLOAT16_TYPES:
      x = (kernels.f16_to_f32 if q == Q.F16 else kernels.bf16_to_f32)(self.planes[0])
      # Rows as [B, 32] too: XLA:CPU vectorises a reduction over 32-wide minor blocks, not
      # over a long row (a 256 x 512 matvec: 0.08 ms vs 0.6 ms).
      k = self.shape[-1]
      return x.reshape(self.shape[:-1] + (k // 32, 32)) if k % 32 == 0 else x
    return kernels.dequant_blocks(self.planes, q)

  def dense(self):
    """Dequantised weight, `dtype [*shape]` (via float32, exactly as the host path rounds)."""
    x = self.blocks().reshape(self.shape)
    return x if self.dtype == jnp.float32 else x.astype(self.dtype)

  def _lead(self, fn, shape) -> Packed:
    """The Packed whose planes are `fn(plane)` (an op on the leading axes) and shape `shape`."""
    return Packed(tuple(fn(p) for p in self.planes), self.qtype, tuple(shape), self.dtype,
                  self.act)

  def index(self, i) -> Packed:
    """Entry `i` (traced or not) of axis 0, still packed: `[*shape[1:]]`."""
    if self.ndim < 2:
      raise ValueError("index() needs a leading axis")
    return self._lead(lambda p: jax.lax.dynamic_index_in_dim(p, i, 0, keepdims=False),
                      self.shape[1:])

  def take(self, idx) -> Packed:
    """Entries `idx` (int array [N]) of axis 0, still packed: `[N, *shape[1:]]`."""
    if self.ndim < 2:
      raise ValueError("take() needs a leading axis")
    return self._lead(lambda p: jnp.take(p, idx, axis=0),
                      (int(idx.shape[0]),) + self.shape[1:])

  def rows(self, start: int, size: int) -> Packed:
    """Rows `start .. start+size` of axis 0 (static bounds), still packed."""
    return self._lead(lambda p: jax.lax.slice_in_dim(p, start, start + size, axis=0),
                      (size,) + self.shape[1:])

  def tiles(self, n: int) -> Packed:
    """Axis 0 cut into `n` equal tiles: `[n, shape[0] / n, *shape[1:]]` (for `lax.map`)."""
    rows = self.shape[0]
    if rows % n:
      raise ValueError(f"{rows} rows do not split into {n} tiles")
    return self._lead(lambda p: p.reshape((n, rows // n) + tuple(p.shape[1:])),
                      (n, rows // n) + self.shape[1:])

  def reshape_lead(self, lead) -> Packed:
    """Reshapes the leading axes (never the contraction axis): `[*lead, shape[-1]]`."""
    lead = tuple(int(s) for s in lead)
    old = len(self.shape) - 1
    if int(np.prod(lead)) != int(np.prod(self.shape[:-1])):
      raise ValueError(f"cannot reshape leading axes {self.shape[:-1]} to {lead}")
    return self._lead(lambda p: p.reshape(lead + tuple(p.shape[old:])), lead + self.shape[-1:])


def plane_specs(qtype: Q | int, shape) -> tuple[tuple[tuple[int, ...], np.dtype], ...]:
  """((shape, dtype), ...) of the planes of a tensor of numpy `shape` stored as `qtype`."""
  q = Q(int(qtype))
  shape = tuple(int(s) for s in shape)
  if q in FLOAT16_TYPES:
    return ((shape, np.dtype(FLOAT16_TYPES[q])),)
  storage(q, shape)  # the checks
  from ds4jax.quant import kernels
  return kernels.plane_specs(q, shape)


def is_packed(x) -> bool:
  return isinstance(x, Packed)


def with_activations(tree, act: str):
  """`tree` (any pytree, e.g. an nnx State or a flat {path: Param} dict) with every Packed
  leaf's `act` set to `act` ("exact" | "q8")."""
  if act not in ("exact", "q8"):
    raise ValueError(f"unsupported activations {act!r}: expected 'exact' or 'q8'")
  return jax.tree.map(lambda x: dataclasses.replace(x, act=act) if isinstance(x, Packed) else x,
                      tree, is_leaf=lambda x: isinstance(x, Packed))
