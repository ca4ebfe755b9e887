"""GGML tensor data -> numpy, through gguf-py (`gguf.quants.dequantize`, bit-exact with ggml).

One function per supported `GGMLQuantizationType` in `DEQUANT`. Every function takes the raw
data as `gguf.GGUFReader` exposes it (typed for F32/F16/I32, uint8 blocks otherwise) and the
GGUF dims, and returns a fresh array (never a view of the memory map) in the numpy
orientation, i.e. shaped as the reversed GGUF dims: float32, or int32 for I32.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

from ds4jax.gguf.errors import TensorTypeError


def _float32(data: np.ndarray) -> np.ndarray:
  return np.array(data.view(np.float32), dtype=np.float32, copy=True)


def _float16(data: np.ndarray) -> np.ndarray:
  return data.view(np.float16).astype(np.float32)


def _int32(data: np.ndarray) -> np.ndarray:
  return np.array(data.view(np.int32), dtype=np.int32, copy=True)


def _gguf_py(qtype: Q) -> Callable[[np.ndarray], np.ndarray]:
  def f(data: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(data.view(np.uint8), qtype).astype(np.float32, copy=False)
  f.__name__ = f"dequant_{qtype.name.lower()}"
  return f


DEQUANT: dict[Q, Callable[[np.ndarray], np.ndarray]] = {
    Q.F32: _float32,
    Q.F16: _float16,
    Q.BF16: _gguf_py(Q.BF16),
    Q.Q8_0: _gguf_py(Q.Q8_0),
    Q.Q2_K: _gguf_py(Q.Q2_K),
    Q.Q4_K: _gguf_py(Q.Q4_K),
    Q.IQ2_XXS: _gguf_py(Q.IQ2_XXS),
    Q.MXFP4: _gguf_py(Q.MXFP4),
    Q.I32: _int32,
}
SUPPORTED = frozenset(DEQUANT)


def dequantize(data: np.ndarray, qtype: Q | int, ggml_dims: Sequence[int],
               name: str = "") -> np.ndarray:
  """Dequantises one tensor's data. `ggml_dims` are in GGUF order; the result is reversed."""
  qtype = Q(int(qtype))
  fn = DEQUANT.get(qtype)
  if fn is None:
    what = f"tensor {name!r}: " if name else ""
    raise TensorTypeError(f"{what}unsupported GGML type {qtype.name}")
  shape = tuple(int(d) for d in reversed(list(ggml_dims)))
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  if int(shape[-1]) % block or data.nbytes != int(np.prod(shape)) // block * type_size:
    raise TensorTypeError(f"tensor {name!r}: {data.nbytes} bytes do not hold {qtype.name} dims "
                          f"{list(ggml_dims)}")
  # Rows of bytes: gguf-py then works through groups of rows, which bounds its temporaries.
  row_bytes = shape[-1] // block * type_size
  rows = np.ascontiguousarray(data).view(np.uint8).reshape(-1, row_bytes)
  return fn(rows).reshape(shape)


def dequantize_tensor(t) -> np.ndarray:
  """Dequantises a `gguf.ReaderTensor`."""
  return dequantize(t.data, t.tensor_type, [int(d) for d in t.shape], t.name)
