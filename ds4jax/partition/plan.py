"""Balanced contiguous layer split: pure Python, no JAX.

`plan_ranges(layer_bytes, n_stages)` cuts layers 0..L-1 into `n_stages` contiguous inclusive
ranges minimising the largest stage's bytes (the stage that bounds memory per host).
"""

from __future__ import annotations

from typing import Sequence

from ds4jax.config import LayerRange


def plan_ranges(layer_bytes: Sequence[int], n_stages: int, *, embed_bytes: int = 0,
                head_bytes: int = 0) -> list[LayerRange]:
  """Minimax contiguous partition.

  Args:
    layer_bytes: bytes of each layer, in order.
    n_stages: number of ranges (1 <= n_stages <= len(layer_bytes)).
    embed_bytes, head_bytes: added to the first and the last stage (the embedding and head).
  Returns:
    The ranges in order; the last has `has_output`. Among optimal plans, the one whose cuts
    come earliest is chosen, so the answer is deterministic.
  """
  n = len(layer_bytes)
  if n_stages < 1:
    raise ValueError(f"n_stages must be >= 1, got {n_stages}")
  if n_stages > n:
    raise ValueError(f"cannot split {n} layers into {n_stages} non-empty stages")
  if any(b < 0 for b in layer_bytes):
    raise ValueError("layer bytes must be non-negative")
  prefix = [0]
  for b in layer_bytes:
    prefix.append(prefix[-1] + int(b))

  def cost(i: int, j: int, k: int) -> int:
    """Bytes of a stage holding layers i..j-1 that is stage k of n_stages."""
    extra = (embed_bytes if k == 0 else 0) + (head_bytes if k == n_stages - 1 else 0)
    return prefix[j] - prefix[i] + extra

  inf = float("inf")
  # best[k][j]: minimal max-cost covering layers 0..j-1 with stages 0..k;
  # cut[k][j]: where stage k starts in that optimum.
  best = [[inf] * (n + 1) for _ in range(n_stages)]
  cut = [[0] * (n + 1) for _ in range(n_stages)]
  for j in range(1, n + 1):
    best[0][j] = cost(0, j, 0)
  for k in range(1, n_stages):
    for j in range(k + 1, n + 1):
      for i in range(k, j):
        v = max(best[k - 1][i], cost(i, j, k))
        if v < best[k][j]:
          best[k][j], cut[k][j] = v, i
  bounds, j = [], n
  for k in range(n_stages - 1, 0, -1):
    i = cut[k][j]
    bounds.append((i, j))
    j = i
  bounds.append((0, j))
  bounds.reverse()
  return [LayerRange(i, j - 1, k == n_stages - 1) for k, (i, j) in enumerate(bounds)]


def stage_bytes(ranges: Sequence[LayerRange], layer_bytes: Sequence[int], *, embed_bytes: int = 0,
                head_bytes: int = 0) -> list[int]:
  """Bytes each range holds (the embedding goes to a range starting at 0, the head to output)."""
  out = []
  for r in ranges:
    b = sum(int(layer_bytes[il]) for il in r.layers())
    out.append(b + (embed_bytes if r.embeds else 0) + (head_bytes if r.has_output else 0))
  return out
