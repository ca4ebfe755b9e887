"""`Status` for LocalAI's backend monitor: the state and a memory breakdown per stage.

    total      resident memory of this backend: the gRPC process plus the model process
    breakdown  "backend_rss", "model_process_rss", and one "stage A:B[+output]@HOST" entry per
               stage of the current route: the GGUF bytes of that slice (what that host maps;
               workers do not report their memory over the bridge)
"""

from __future__ import annotations

import os

import psutil

from ds4jax.config import LayerRange
from ds4jax.partition.plan import stage_bytes


def slice_sizes(path: str):
  """(embed bytes, per-layer bytes, head bytes, n_layers) of a GGUF; None for a directory."""
  if not os.path.isfile(path):
    return None
  from ds4jax.gguf.reader import open_gguf
  f = open_gguf(path)
  embed, per_layer, head = f.layer_bytes()
  return embed, per_layer, head, f.cfg.n_layers


def _rss(pid: int | None) -> int:
  try:
    return int(psutil.Process(pid).memory_info().rss)
  except (psutil.Error, OSError):
    return 0


def memory(model_pid: int | None, route: list[dict], sizes) -> tuple[int, dict[str, int]]:
  """(total, breakdown) as described in the module docstring."""
  breakdown = {"backend_rss": _rss(os.getpid())}
  if model_pid is not None:
    breakdown["model_process_rss"] = _rss(model_pid)
  total = sum(breakdown.values())
  if sizes is not None:
    embed, per_layer, head, n_layers = sizes
    for stage in route:
      try:
        rng = LayerRange.parse(str(stage.get("layers", "")), n_layers)
      except ValueError:
        continue
      n = stage_bytes([rng], per_layer, embed_bytes=embed, head_bytes=head)[0]
      breakdown[f"stage {rng.describe()}@{stage.get('host', '?')}"] = int(n)
  return total, breakdown
