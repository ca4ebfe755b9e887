"""`Status` for LocalAI's backend monitor: the state and a memory breakdown per stage.

    total      resident memory of this backend: the gRPC process and its two children
    breakdown  "backend_rss", "model_process_rss", "tokenizer_process_rss", and one
               "stage A:B[+output]@HOST" entry per
               stage of the current route: the GGUF bytes of that slice (what that host maps;
               workers do not report their memory over the bridge)
"""

from __future__ import annotations

import os

from ds4jax.config import LayerRange
from ds4jax.local_cluster import rss_bytes
from ds4jax.partition.plan import stage_bytes


def memory(route: list[dict] = (), sizes=None, n_layers: int = 0,
           **child_pids: int | None) -> tuple[int, dict[str, int]]:
  """(total, breakdown) as described in the module docstring. sizes: (embed bytes, per-layer
  bytes, head bytes) of the GGUF, or None; child_pids: name -> pid (None: not running)."""
  breakdown = {"backend_rss": rss_bytes(os.getpid())}
  for name, pid in child_pids.items():
    if pid is not None:
      breakdown[f"{name}_rss"] = rss_bytes(pid)
  total = sum(breakdown.values())
  if sizes is not None:
    embed, per_layer, head = sizes
    for stage in route:
      try:
        rng = LayerRange.parse(str(stage.get("layers", "")), n_layers)
      except ValueError:
        continue
      n = stage_bytes([rng], per_layer, embed_bytes=embed, head_bytes=head)[0]
      breakdown[f"stage {rng.describe()}@{stage.get('host', '?')}"] = int(n)
  return total, breakdown
