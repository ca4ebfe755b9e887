"""ds4 expert-steering maps from paired prompts (ds4's
`dir-steering/tools/build_expert_steering.py`; ../shared/docs/ds4-research-and-capacity.md
§2), on any backend a `research.Lab` wraps.

    lab = research.Lab(backend, tokenizer)
    m = expert_map.build_expert_map(lab, ["Write a poem"], ["Write a tax form"])
    m.save("out/poem.json")                  # out/poem.f32: L x E float32, + the sidecar
    Interventions.ds4_expert_steering("out/poem.f32", lab.cfg, scale=1.0)

Method (ds4's): every prompt is rendered and run once, capturing the routed expert ids
(`router_ids`, k per position) of every prompt position (or of the last
`focus_last_tokens`). Per (layer, expert), the rate is the expert's count over the rows
counted, and the risk difference `rd = rate_target - rate_contrast`. Per steered layer the
`activate` experts of largest positive rd get +1 and the `deactivate` of most negative rd get
-1 (ties: the larger expert id first for +1, the smaller for -1, as ds4 sorts), each only if
|rd| >= `min_rd`; everything else is 0. Hash-routed layers are never steered: their rows stay
zero.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ds4jax.config import point_name
from ds4jax.research import prompt_sets

FORMAT = "ds4-expert-steering-v1"
_log = logging.getLogger("ds4jax")


def routed_layers(cfg, layers: str | Sequence[int] = "all") -> tuple[int, ...]:
  """The layers a map steers: "all" (every routed layer), or a comma list of layers and
  inclusive ranges ("3-42" as ds4 writes it, or "3:42"); a layer outside the model or a
  hash-routed one is a one-line error."""
  if isinstance(layers, str):
    if layers.strip() == "all":
      return tuple(il for il in range(cfg.n_layers) if not cfg.is_hash_layer(il))
    got = set()
    for part in (p.strip() for p in layers.split(",") if p.strip()):
      a, _, b = part.replace(":", "-").partition("-")
      try:
        lo, hi = int(a), int(b or a)
      except ValueError:
        raise ValueError(f"bad layer list {layers!r} (expected all, or e.g. 3-42 or 1,3)") \
            from None
      got.update(range(min(lo, hi), max(lo, hi) + 1))
  else:
    got = {int(il) for il in layers}
  if not got:
    raise ValueError(f"the layer list {layers!r} names no layer")
  bad = [il for il in sorted(got) if not 0 <= il < cfg.n_layers]
  if bad:
    raise ValueError(f"layer {bad[0]} is out of range: the model has layers 0..{cfg.n_layers - 1}")
  hashed = [il for il in sorted(got) if cfg.is_hash_layer(il)]
  if hashed:
    raise ValueError(f"layer {hashed[0]} routes by token hash: expert steering does not apply "
                     f"(routed layers: {cfg.n_hash_layers}..{cfg.n_layers - 1})")
  return tuple(sorted(got))


def expert_counts(lab, prompt: str | Sequence[int], layers: Sequence[int], *,
                  focus_last_tokens: int = 0, chat: bool | None = None,
                  system: str | None = prompt_sets.DS4_SYSTEM,
                  thinking: bool = False) -> tuple[np.ndarray, int]:
  """How often each expert is routed to over a prompt's positions: (counts int64 [L, E],
  zero outside `layers`; the rows R counted).

  `prompt` is text (rendered by `prompt_sets.prompt_ids`) or token ids (as given). Every
  position is counted, or the last `focus_last_tokens` if that is > 0; only the router_ids
  of `layers` are captured."""
  ids = (prompt_sets.prompt_ids(lab, prompt, chat=chat, system=system, thinking=thinking)
         if isinstance(prompt, str) else [int(t) for t in prompt])
  n = len(ids)
  positions = tuple(range(max(0, n - focus_last_tokens), n)) if focus_last_tokens > 0 else "all"
  cfg = lab.cfg
  counts_LE = np.zeros((cfg.n_layers, cfg.n_experts), np.int64)
  if not layers:
    return counts_LE, 0
  cap = lab.capture(ids, "router_ids", layers=tuple(layers), positions=positions)
  for il in layers:
    ids_RK = cap[point_name("router_ids", il)]
    counts_LE[il] = np.bincount(ids_RK.ravel(), minlength=cfg.n_experts)[:cfg.n_experts]
  return counts_LE, len(cap.positions)


def risk_difference(counts_target_LE: np.ndarray, rows_target: int,
                    counts_contrast_LE: np.ndarray, rows_contrast: int) -> np.ndarray:
  """rd float64 [L, E]: each expert's routing rate (count / rows) on the target prompts
  minus its rate on the contrast prompts."""
  if rows_target <= 0 or rows_contrast <= 0:
    raise ValueError("no router rows were captured")
  return (np.asarray(counts_target_LE, np.float64) / rows_target
          - np.asarray(counts_contrast_LE, np.float64) / rows_contrast)


def mark_experts(rd_LE: np.ndarray, layers: Sequence[int], *, activate: int = 2,
                 deactivate: int = 2, min_rd: float = 0.0) -> tuple[np.ndarray, list[dict]]:
  """ds4's map from the risk differences: (map float32 [L, E] of +1 / -1 / 0, a report per
  layer {layer, enabled, activate, deactivate: [{expert, rd}]}). Only rows in `layers` are
  marked (see the module doc for the rule and its ties)."""
  L, E = rd_LE.shape
  map_LE = np.zeros((L, E), np.float32)
  experts = np.arange(E)
  report = []
  for il in range(L):
    rd = rd_LE[il]
    marked = {1.0: [], -1.0: []}
    if il in layers:
      for sign, count, order in ((1.0, activate, np.lexsort((-experts, -rd))),
                                 (-1.0, deactivate, np.lexsort((experts, rd)))):
        for e in order:
          if len(marked[sign]) >= count:
            break
          if sign * rd[e] > 0.0 and abs(rd[e]) >= min_rd:
            map_LE[il, e] = sign
            marked[sign].append({"expert": int(e), "rd": float(rd[e])})
    report.append({"layer": il, "enabled": il in layers, "activate": marked[1.0],
                   "deactivate": marked[-1.0]})
  return map_LE, report


class ExpertMap(prompt_sets.Ds4File):
  """A built map: `map_LE` float32 [L, E] (ds4's file) and `meta` (its sidecar)."""

  @property
  def map_LE(self) -> np.ndarray:
    return self.values


def build_expert_map(lab, target: Sequence[str], contrast: Sequence[str], *,
                     layers: str | Sequence[int] = "all", activate: int = 2,
                     deactivate: int = 2, min_rd: float = 0.0, focus_last_tokens: int = 0,
                     max_pairs: int = 0, chat: bool | None = None,
                     system: str | None = prompt_sets.DS4_SYSTEM,
                     thinking: bool = False) -> ExpertMap:
  """ds4's expert map from target and contrast prompts (paired by index, cut to the shorter
  set and to `max_pairs` if > 0); see the module doc for the method. `layers`: which routed
  layers to steer (`routed_layers`)."""
  cfg = lab.cfg
  steer = routed_layers(cfg, layers)
  if activate < 0 or deactivate < 0:
    raise ValueError("activate and deactivate count experts: give numbers >= 0")
  target, contrast = prompt_sets.paired(target, contrast, max_pairs)
  n = len(target)
  counts = [np.zeros((cfg.n_layers, cfg.n_experts), np.int64) for _ in range(2)]
  rows = [0, 0]
  for i, pair in enumerate(zip(target, contrast), 1):
    _log.info("pair %d/%d", i, n)
    for side, prompt in enumerate(pair):
      c, r = expert_counts(lab, prompt, steer, focus_last_tokens=focus_last_tokens, chat=chat,
                           system=system, thinking=thinking)
      counts[side] += c
      rows[side] += r
  rd_LE = risk_difference(counts[0], rows[0], counts[1], rows[1])
  map_LE, report = mark_experts(rd_LE, steer, activate=activate, deactivate=deactivate,
                                min_rd=min_rd)
  if chat is None:
    chat = bool(lab.tokenizer.chat_model)
  meta = {
      "format": FORMAT, "shape": [cfg.n_layers, cfg.n_experts],
      "method": "risk_difference_topk_router_activation",
      "runtime": "positive scale promotes +1 entries and suppresses -1 entries; negative "
                 "scale reverses",
      "default_runtime_scale": 0.01, "thinking": bool(thinking), "chat": bool(chat),
      "system": (system or None) if chat else None, "pairs": n, "target_rows": rows[0],
      "contrast_rows": rows[1], "layers": list(steer), "hash_layers": cfg.n_hash_layers,
      "activate_per_layer": activate, "deactivate_per_layer": deactivate, "min_rd": min_rd,
      "focus_last_tokens": focus_last_tokens, "layer_report": report,
  }
  return ExpertMap(map_LE, meta)


__all__ = ["ExpertMap", "FORMAT", "build_expert_map", "expert_counts", "mark_experts",
           "risk_difference", "routed_layers"]
