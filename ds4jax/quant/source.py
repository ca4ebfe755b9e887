"""`TensorSource`: the tensors of a slice, packed, by parameter path (docs/design.md §8).

The one interface the model loads through. A source is a GGUF (`gguf.source.GGUFSource`) or
an orbax stage checkpoint (`checkpoints.orbax_io.OrbaxSource`); `runtime.load` takes either and
imports neither package's opener. Which one a path is, is decided by `ds4jax.runtime.sources`, a
module the model never imports.

Paths are stage-local parameter paths (`("blocks", 0, "attn", "q_a")`, the `blocks` index
relative to `layers.start`), exactly the paths of `nnx.to_flat_state` on the stage.

This module imports only the stdlib, numpy and the config: any package may implement it.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Protocol

import numpy as np

from ds4jax.config import LayerRange, ModelConfig

Path = tuple  # a stage-local parameter path: ("blocks", 0, "attn", "q_a")


class Stored(NamedTuple):
  """How one parameter is stored in a source.

  Attributes:
    qtype: the GGML type id of packed data (a block type, F16 or BF16), or None for a plain
      array (float32, bfloat16, int32).
    shape: the element shape, numpy orientation: the parameter's shape either way.
    dtype: the dtype of the data `tensors` yields: uint8 / float16 / bfloat16 for packed
      data (`quant.packed.storage`), the array's dtype otherwise.
  """

  qtype: int | None
  shape: tuple[int, ...]
  dtype: np.dtype


class TensorSource(Protocol):
  """A model's weights, read one slice at a time.

  Attributes:
    path: what to name in messages (the file or directory).
    cfg: the model's config.
    fingerprint: the model fingerprint (docs/design.md §3); every slice of one model has one.
    dtype: the compute dtype a caller that names none gets ('float32' for a GGUF, the stored
      dtype for a dequantised checkpoint).
  """

  path: str
  cfg: ModelConfig
  fingerprint: str
  dtype: str

  def resolve(self, layers: LayerRange | str | None = None) -> LayerRange:
    """`layers` ("all", "A:B", "A:output", a LayerRange) resolved against the model; None
    means the slice the source holds. Raises ValueError for a slice it cannot serve."""
    ...

  def abstract(self, layers: LayerRange, *, packed: bool = True,
               dtype: str | None = None) -> dict[Path, Stored]:
    """{path: Stored} of every parameter of the slice the source holds, reading no tensor
    data. With `packed`, what the source holds packed is reported packed; without it, every
    entry is a plain array (`qtype` None). `dtype`: the compute dtype the caller will build
    (a source that cannot serve it without a silent cast raises ValueError). An optional
    parameter the source lacks (the router bias) is simply absent."""
    ...

  def tensors(self, layers: LayerRange, *,
              packed: bool = True) -> Iterator[tuple[Path, Any, int | None]]:
    """Yields `(path, data, qtype)` for the entries of `abstract(layers, packed=packed)`, one
    tensor at a time (the consumer places each and drops it). `data` is a numpy array or a
    jax.Array, shaped and typed as `abstract` says (packed data may be any array of the
    packed bytes, e.g. a GGUF view); `qtype` as in `Stored`."""
    ...
