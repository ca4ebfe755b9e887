"""A human-readable summary of a ds4 GGUF: config, layer schedule, bytes per layer and slice,
and a balanced split suggestion. Used by `scripts/inspect_gguf.py` and notebooks."""

from __future__ import annotations

import collections
import os

from ds4jax.config import LayerRange
from ds4jax.gguf.reader import DS4File, open_gguf
from ds4jax.partition.plan import plan_ranges, stage_bytes


def _mb(n: int) -> str:
  return f"{n / 2**20:9.2f} MiB"


def describe(path: str | os.PathLike | DS4File, *, split: int = 0,
             layers: str | None = None) -> str:
  """The summary text; `split` > 0 adds a balanced plan, `layers` the bytes of one slice."""
  f = path if isinstance(path, DS4File) else open_gguf(path)
  cfg = f.cfg
  embed, per_layer, head = f.layer_bytes()
  types = collections.Counter(t.tensor_type.name for t in f.tensors.values())
  lines = [f"file: {f.path}", f"fingerprint: {f.fingerprint()}"]
  if f.held is not None:
    lines.append(f"split file holding layers {f.held.describe()}")
  mix = ", ".join(f"{k} {v}" for k, v in sorted(types.items()))
  lines.append(f"tensors: {len(f.tensors)} ({mix})")
  lines.append("config:")
  for k, v in cfg.to_dict().items():
    if isinstance(v, tuple) and len(v) > 8:
      v = f"({', '.join(map(str, v[:8]))}, ... {len(v)} entries)"
    lines.append(f"  {k} = {v}")
  lines.append("layers:")
  lines.append("  layer  kind    ratio  hash  indexer  rope        bytes")
  for il in range(cfg.n_layers):
    lines.append(f"  {il:5d}  {cfg.layer_kind(il):6s}  {cfg.ratio(il):5d}  "
                 f"{'yes' if cfg.is_hash_layer(il) else 'no':4s}  "
                 f"{'yes' if cfg.has_indexer(il) else 'no':7s}  {cfg.rope_kind(il):8s}  "
                 f"{_mb(per_layer[il])}")
  lines.append(f"  embedding {_mb(embed)}   head {_mb(head)}   "
               f"total {_mb(embed + sum(per_layer) + head)}")
  if layers is not None:
    rng = f.resolve(layers)
    b = stage_bytes([rng], per_layer, embed_bytes=embed, head_bytes=head)[0]
    lines.append(f"slice {rng.describe()}: {_mb(b)}")
  if split:
    ranges = plan_ranges(per_layer, split, embed_bytes=embed, head_bytes=head)
    sizes = stage_bytes(ranges, per_layer, embed_bytes=embed, head_bytes=head)
    lines.append(f"balanced split into {split}: "
                 + "  ".join(f"{r}" for r in ranges))
    for r, b in zip(ranges, sizes):
      lines.append(f"  --layers={str(r):12s} {_mb(b)}")
  return "\n".join(lines)
