"""The route planner: the coordinator's slice plus a contiguous chain of workers to the head.

Pure Python, no sockets. A route is the ordered list of worker hops after the coordinator's
local slice `[0, K]`; it is empty when the coordinator owns the head itself (`0:output`).
The coordinator cannot run the head apart from its slice (a `StageRunner` runs its layers and
head in one call), so the last hop must own the output head.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ds4jax.config import LayerRange


@dataclasses.dataclass(frozen=True)
class HopInfo:
  """What the planner needs to know about one registered, ready worker."""

  wid: int  # registration order: lower ids are preferred, later ones are spares
  layers: LayerRange
  peer: str = "?"


def plan_route(n_layers: int, local: LayerRange, hops: Sequence[HopInfo],
               pin: Sequence[str] = ()) -> tuple[list[HopInfo] | None, str]:
  """Finds a contiguous chain from local.end + 1 to the last layer, ending at the head.

  Args:
    n_layers: layers in the model.
    local: the coordinator's slice (must start at 0).
    hops: candidate workers.
    pin: if given, only workers whose range string ('1:2', '3:output') is listed are used
      (operators and tests pin a chain this way). Among candidates, earlier-registered
      workers win and later ones stand by as spares.

  Returns:
    (route, '') or (None, reason), reason naming the first layer nothing can serve
    ("missing layer 17").
  """
  if local.start != 0:
    return None, f"coordinator range {local} does not start at layer 0"
  last = n_layers - 1
  if local.has_output:
    return ([], "") if local.end == last else (None, f"coordinator range {local} is invalid")
  pinned = set(pin)
  cands = sorted((h for h in hops if not pinned or str(h.layers) in pinned),
                 key=lambda h: h.wid)
  by_start: dict[int, list[HopInfo]] = {}
  for h in cands:
    by_start.setdefault(h.layers.start, []).append(h)
  furthest = [local.end + 1]

  def search(need: int, used: frozenset) -> list[HopInfo] | None:
    furthest[0] = max(furthest[0], need)
    for h in by_start.get(need, []):
      if h.wid in used:
        continue
      if h.layers.has_output:
        return [h]
      if h.layers.end >= last:  # reaches the end without the head: useless as a last hop
        furthest[0] = max(furthest[0], last + 1)
        continue
      rest = search(h.layers.end + 1, used | {h.wid})
      if rest is not None:
        return [h, *rest]
    return None

  route = search(local.end + 1, frozenset())
  if route is not None:
    return route, ""
  need = furthest[0]
  if need > last:
    return None, f"missing the output head (no worker serving layer {last} owns it)"
  return None, f"missing layer {need}"


def describe(local: LayerRange, route: Sequence[HopInfo]) -> str:
  return " -> ".join([f"local {local.describe()}"] +
                     [f"{h.peer} {h.layers.describe()}" for h in route])


def missing_layers(n_layers: int, local: LayerRange, ranges: Sequence[LayerRange]) -> list[int]:
  """The layer indices that neither the local range nor any of `ranges` (ready workers)
  covers."""
  covered = set(range(local.start, local.end + 1))
  for r in ranges:
    covered.update(range(r.start, r.end + 1))
  return [i for i in range(n_layers) if i not in covered]
