"""numpy arrays <-> wire bytes. Explicit little-endian, described by {"dtype", "shape"}.

Wire dtypes for activations (negotiated per session):
  f32   raw IEEE float32, exact (the default).
  bf16  the top 16 bits of float32, rounded to nearest even (keeps the f32 exponent range
        for outlier activations, as ds4 chose); decoded by shifting back.
  int8  per-row symmetric scaling: one float32 scale per row (the last axis is the row), then
        the int8 values round(x / scale), scale = max|x| / 127. Layout: scales, then values.
Logits always travel as f32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ds4jax.wire.errors import ProtocolError

WIRE_DTYPES = ("f32", "bf16", "int8")
MAX_RANK = 4
# Refuse descriptors for absurd element counts before touching the payload.
MAX_ELEMS = 1 << 31


def _bf16_bits(x: np.ndarray) -> np.ndarray:
  u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
  # Round to nearest even on the dropped 16 bits; NaN keeps a quiet-NaN payload.
  rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
  nan = np.isnan(x)
  if nan.any():
    rounded = np.where(nan, (u >> 16) | np.uint32(0x40), rounded)
  return rounded.astype("<u2")


def encode(x: np.ndarray, dtype: str = "f32") -> tuple[dict[str, Any], bytes]:
  """Encodes a float array for the wire. Returns (descriptor, payload bytes)."""
  x = np.asarray(x, dtype=np.float32)
  desc = {"dtype": dtype, "shape": [int(d) for d in x.shape]}
  if dtype == "f32":
    return desc, x.astype("<f4", copy=False).tobytes()
  if dtype == "bf16":
    return desc, _bf16_bits(x).tobytes()
  if dtype == "int8":
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    amax_R = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    scale_R = (amax_R / 127.0).astype(np.float32)
    safe_R = np.where(scale_R > 0, scale_R, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / safe_R[:, None]), -127, 127).astype(np.int8)
    return desc, scale_R.astype("<f4").tobytes() + q.tobytes()
  raise ValueError(f"unknown wire dtype {dtype!r} (expected one of {', '.join(WIRE_DTYPES)})")


def check_desc(desc: Any) -> tuple[str, tuple[int, ...], int]:
  """Validates a descriptor; returns (dtype, shape, expected payload bytes)."""
  if not isinstance(desc, dict):
    raise ProtocolError("tensor descriptor must be an object")
  dtype, shape = desc.get("dtype"), desc.get("shape")
  if dtype not in WIRE_DTYPES:
    raise ProtocolError(f"unknown wire dtype {dtype!r}")
  if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK
      or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_ELEMS
                 for d in shape)):
    raise ProtocolError(f"bad tensor shape {shape!r}")
  n = math.prod(shape)
  if n > MAX_ELEMS:
    raise ProtocolError(f"tensor of {n} elements exceeds the {MAX_ELEMS} cap")
  if dtype == "f32":
    nbytes = 4 * n
  elif dtype == "bf16":
    nbytes = 2 * n
  else:
    nbytes = 4 * (n // shape[-1] if shape[-1] else 0) + n
  return dtype, tuple(shape), nbytes


def decode(desc: Any, buf) -> np.ndarray:
  """Decodes wire bytes into a float32 array; ProtocolError on any inconsistency."""
  dtype, shape, nbytes = check_desc(desc)
  if len(buf) != nbytes:
    raise ProtocolError(f"{dtype} tensor {list(shape)} needs {nbytes} bytes, got {len(buf)}")
  if dtype == "f32":
    return np.frombuffer(buf, dtype="<f4").astype(np.float32).reshape(shape)
  if dtype == "bf16":
    u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
    return u.view(np.float32).reshape(shape)
  w = shape[-1]
  rows = len(buf) // (4 + w) if w else 0
  scale_R = np.frombuffer(buf, dtype="<f4", count=rows).astype(np.float32)
  q = np.frombuffer(buf, dtype=np.int8, offset=4 * rows).reshape(rows, w)
  return (q.astype(np.float32) * scale_R[:, None]).reshape(shape)


def slice_tokens(desc: dict[str, Any], buf, lo: int, hi: int) -> tuple[dict[str, Any], bytes]:
  """Rows [lo, hi) of the leading (token) axis of an encoded tensor, without re-rounding."""
  dtype, shape, _ = check_desc(desc)
  per_tok = math.prod(shape[1:])
  out = {"dtype": dtype, "shape": [hi - lo, *shape[1:]]}
  if dtype in ("f32", "bf16"):
    w = 4 if dtype == "f32" else 2
    return out, bytes(buf[lo * per_tok * w: hi * per_tok * w])
  rows_per_tok = per_tok // shape[-1]
  rows = shape[0] * rows_per_tok
  scales = bytes(buf[4 * lo * rows_per_tok: 4 * hi * rows_per_tok])
  vals = bytes(buf[4 * rows + lo * per_tok: 4 * rows + hi * per_tok])
  return out, scales + vals
