"""Per-layer export/import of a stage's decode state, as raw bytes plus a JSON description.

Only the rows that hold the first `n` positions are kept (the decode state is indexed by
position, see `model.decode_state`), so a layer's blob does not depend on the runner's
ctx_size or chunk slack, nor on which stage held the layer: a blob exported from one split
imports into any other split, or a single process, with enough context.

Rows kept for n positions (W window, m ratio):

    kv          W + n        (rows < W are the never-written "before 0" rows)
    comp_a/g    m + n        (rows < m hold the -inf gates of the window before 0)
    comp        n // m       (completed windows; later entries are rewritten before use)
    idx_a/g     4 + n
    idx_keys    n // 4

A layer blob is the concatenation of those arrays (C order, little-endian), described by
`{"fields": [{"name", "dtype", "shape", "offset"}], "nbytes", "sha256"}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ds4jax.config import ModelConfig

FIELDS = ("kv", "comp_a", "comp_g", "comp", "idx_a", "idx_g", "idx_keys")
STATE_DTYPES = ("float32", "bfloat16", "float16")


class StateError(ValueError):
  """A state blob that does not fit the runner (layout, dtype, size, checksum)."""


@dataclasses.dataclass
class LayerBlob:
  """One layer's state: `meta` (fields, nbytes, sha256) and the raw bytes."""

  meta: dict[str, Any]
  data: bytes

  @property
  def nbytes(self) -> int:
    return len(self.data)


def valid_rows(cfg: ModelConfig, il: int, name: str, n: int) -> int:
  """Rows of field `name` of layer `il` that hold the first n positions (module docstring)."""
  m = cfg.ratio(il)
  if name == "kv":
    return cfg.window + n
  if name in ("comp_a", "comp_g"):
    return m + n
  if name == "comp":
    return n // m
  if name in ("idx_a", "idx_g"):
    return 4 + n
  if name == "idx_keys":
    return n // 4
  raise StateError(f"unknown state field {name!r}")


def sha256(data) -> str:
  return hashlib.sha256(data).hexdigest()


def export_layer(cfg: ModelConfig, il: int, layer_state, n: int) -> LayerBlob:
  """The first n positions of one LayerState as a LayerBlob."""
  fields, parts, off = [], [], 0
  for name in FIELDS:
    buf = getattr(layer_state, name)
    if buf is None:
      continue
    arr = np.ascontiguousarray(jax.device_get(buf[:valid_rows(cfg, il, name, n)]))
    raw = arr.tobytes()  # host order: little-endian on every supported platform
    fields.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape),
                   "offset": off})
    parts.append(raw)
    off += len(raw)
  data = b"".join(parts)
  return LayerBlob({"fields": fields, "nbytes": len(data), "sha256": sha256(data)}, data)


def export_stage(runner, state, n: int | None = None) -> tuple[int, dict[int, LayerBlob]]:
  """(pos, {absolute layer: blob}) of a runner's StageState holding pos positions: the blobs
  of its first n positions (default: all of them; the rows are indexed by position, so a
  prefix of them is the state of a prefix of the timeline)."""
  pos = int(state.pos)
  n = pos if n is None else int(n)
  if not 0 <= n <= pos:
    raise StateError(f"cannot export {n} positions of a state holding {pos}")
  return pos, {il: export_layer(runner.cfg, il, ls, n)
               for il, ls in zip(runner.layers.layers(), state.layers)}


def expected_nbytes(runner, n: int) -> int:
  """Bytes of every layer blob of `runner` for n positions (bounds what a peer may send)."""
  state = jax.eval_shape(runner.init_state)
  total = 0
  for il, ls in zip(runner.layers.layers(), state.layers):
    for name in FIELDS:
      buf = getattr(ls, name)
      if buf is not None:
        total += valid_rows(runner.cfg, il, name, n) * int(np.prod(buf.shape[1:])) * \
            jnp.dtype(buf.dtype).itemsize
  return total


def _decode_field(f: dict[str, Any], data: bytes, where: str) -> tuple[str, np.ndarray]:
  try:
    name, dtype, shape, off = str(f["name"]), str(f["dtype"]), f["shape"], int(f["offset"])
    shape = tuple(int(s) for s in shape)
  except (KeyError, TypeError, ValueError):
    raise StateError(f"{where}: malformed field description {f!r}") from None
  if dtype not in STATE_DTYPES:
    raise StateError(f"{where}: field {name} has unsupported dtype {dtype!r}")
  dt = jnp.dtype(dtype)
  size = int(np.prod(shape)) * dt.itemsize
  if off < 0 or any(s < 0 for s in shape) or off + size > len(data):
    raise StateError(f"{where}: field {name} {list(shape)} does not fit the {len(data)}-byte blob")
  arr = np.frombuffer(data, dtype=np.dtype(dt), count=int(np.prod(shape)),
                      offset=off).reshape(shape)
  return name, arr


def import_layer(cfg: ModelConfig, il: int, fresh, blob: LayerBlob, n: int, *,
                 verify: bool = True, where: str = ""):
  """Writes `blob` (n positions) into `fresh` (an init LayerState); returns the new state."""
  where = where or f"layer {il}"
  meta = blob.meta
  if not isinstance(meta, dict) or not isinstance(meta.get("fields"), list):
    raise StateError(f"{where}: malformed layer description")
  if meta.get("nbytes") != len(blob.data):
    raise StateError(f"{where}: {len(blob.data)} bytes, the description says {meta.get('nbytes')}")
  if verify and meta.get("sha256") != sha256(blob.data):
    raise StateError(f"{where}: state bytes fail their sha256 check (corrupt)")
  got = dict(_decode_field(f, blob.data, where) for f in meta["fields"])
  want = [name for name in FIELDS if getattr(fresh, name) is not None]
  if sorted(got) != sorted(want):
    raise StateError(f"{where}: holds fields {sorted(got)}, this layer needs {sorted(want)} "
                     "(another model layout)")
  upd = {}
  for name in want:
    buf, arr = getattr(fresh, name), got[name]
    rows = valid_rows(cfg, il, name, n)
    if arr.shape != (rows,) + tuple(buf.shape[1:]):
      raise StateError(f"{where}: field {name} is {list(arr.shape)}, expected "
                       f"{[rows] + list(buf.shape[1:])} for {n} positions")
    if jnp.dtype(arr.dtype) != jnp.dtype(buf.dtype):
      raise StateError(f"{where}: field {name} is {arr.dtype}, this runner keeps "
                       f"{jnp.dtype(buf.dtype)} state")
    if rows > buf.shape[0]:
      raise StateError(f"{where}: {n} positions do not fit this runner's context")
    # On the host, then placed as `fresh` is: an eager `.at[].set` compiles a program per
    # field shape on first use (0.27 s for the 8 layers of the bench preset).
    host = np.array(buf)
    host[:rows] = arr
    upd[name] = (jnp.asarray(host) if len(buf.sharding.device_set) == 1
                 else jax.device_put(host, buf.sharding))
  return fresh.replace(**upd)


def import_stage(runner, n: int, blobs: dict[int, LayerBlob], *, verify: bool = True,
                 where: str = ""):
  """A StageState of `runner` holding n positions, from the blobs of its layers."""
  if not 0 <= n <= runner.ctx_size:
    raise StateError(f"{where or 'snapshot'}: {n} positions exceed the runner's ctx_size "
                     f"{runner.ctx_size}")
  missing = [il for il in runner.layers.layers() if il not in blobs]
  if missing:
    raise StateError(f"{where or 'snapshot'}: no state for layer {missing[0]}")
  fresh = runner.init_state()
  layers = tuple(
      import_layer(runner.cfg, il, ls, blobs[il], n, verify=verify,
                   where=f"{where + ': ' if where else ''}layer {il}")
      for il, ls in zip(runner.layers.layers(), fresh.layers))
  return fresh.replace(pos=jnp.asarray(n, jnp.int32), layers=layers)


# ------------------------------------------------------------------------ concatenated form
# Snapshot transfers over the bridge move a stage's packed state in parts of at most this.
CHUNK_BYTES = 8 << 20


def n_parts(total: int) -> int:
  """How many parts of at most CHUNK_BYTES carry `total` bytes (at least one)."""
  return max(1, -(-total // CHUNK_BYTES))


def pack(blobs: dict[int, LayerBlob]) -> tuple[dict[str, Any], bytes]:
  """Layer blobs in layer order as one buffer: ({str(il): meta + offset}, bytes)."""
  meta, parts, off = {}, [], 0
  for il in sorted(blobs):
    b = blobs[il]
    meta[str(il)] = dict(b.meta, offset=off)
    parts.append(b.data)
    off += len(b.data)
  return meta, b"".join(parts)


def unpack(meta: dict[str, Any], data, where: str = "") -> dict[int, LayerBlob]:
  """The inverse of `pack` (bounds-checked; checksums are checked on import)."""
  out = {}
  if not isinstance(meta, dict):
    raise StateError(f"{where or 'state'}: malformed layer table")
  for key, m in meta.items():
    try:
      il, off, nb = int(key), int(m["offset"]), int(m["nbytes"])
    except (KeyError, TypeError, ValueError):
      raise StateError(f"{where or 'state'}: malformed entry for layer {key!r}") from None
    if off < 0 or nb < 0 or off + nb > len(data):
      raise StateError(f"{where or 'state'}: layer {il} lies outside the {len(data)}-byte buffer")
    out[il] = LayerBlob({k: v for k, v in m.items() if k != "offset"}, bytes(data[off:off + nb]))
  return out
