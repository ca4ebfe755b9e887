"""ds4 steering directions from paired prompts (ds4's `dir-steering/tools/build_direction.py`;
../shared/docs/ds4-research-and-capacity.md §1), on any backend a `research.Lab` wraps: one
process, an in-process split or a coordinator with workers.

    lab = research.Lab(backend, tokenizer)
    d = directions.build_direction(lab, ["Tell me about cats"], ["Tell me about tax law"])
    d.save("out/cats.json")                  # out/cats.f32: L x D float32, + the sidecar
    Interventions.ds4_steering("out/cats.f32", lab.cfg, ffn=1.0)

Method (ds4's): every prompt is rendered (the chat format, or plain text for a model that is
not a chat model) and run once; for every layer the component's row at the last prompt
position is kept. With mean_t / mean_c the layer's mean target / contrast rows,
`d = normalize(mean_t - mean_c)`, or with `pair_normalize` the normalised mean of the
normalised per-pair differences. With `orthogonalize` (the default) d then loses its part
along `normalize(mean_c)` and is renormalised. `normalize` leaves a zero vector as it is.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ds4jax.config import point_name
from ds4jax.research import prompt_sets

FORMAT = "ds4-directional-steering-v1"
# The D-wide sublayer outputs ds4's runtime steers (`--dir-steering-ffn`, `-attn`).
COMPONENTS = ("ffn_out", "attn_out")
_log = logging.getLogger("ds4jax")


def normalize(v_LD: np.ndarray) -> np.ndarray:
  """Each row of `v_LD` [..., D] over its norm; a zero row stays zero (as ds4)."""
  n = np.linalg.norm(v_LD, axis=-1, keepdims=True)
  return np.where(n > 0, v_LD / np.where(n > 0, n, 1), v_LD)


def check_component(component: str) -> str:
  if component not in COMPONENTS:
    raise ValueError(f"unknown component {component!r} (ds4 steers {', '.join(COMPONENTS)})")
  return component


def last_rows(lab, prompt: str | Sequence[int], component: str = "ffn_out", *,
              chat: bool | None = None, system: str | None = prompt_sets.DS4_SYSTEM,
              thinking: bool = False) -> np.ndarray:
  """The component's row at the prompt's last position, every layer: float32 [L, D].

  `prompt` is text (rendered by `prompt_sets.prompt_ids`) or token ids (as given). Only the
  last position of each layer is captured, so L x D floats travel back from the stages."""
  check_component(component)
  ids = (prompt_sets.prompt_ids(lab, prompt, chat=chat, system=system, thinking=thinking)
         if isinstance(prompt, str) else [int(t) for t in prompt])
  cap = lab.capture(ids, component, layers="all", positions="last")
  return np.stack([cap[point_name(component, il)][-1] for il in range(lab.cfg.n_layers)])


def direction(mean_target_LD: np.ndarray, mean_contrast_LD: np.ndarray, *,
              pair_mean_LD: np.ndarray | None = None, orthogonalize: bool = True) -> np.ndarray:
  """ds4's direction per layer from the mean rows: float32 [L, D], unit rows (zero where the
  sets do not differ).

  mean_target_LD, mean_contrast_LD: [L, D] the mean last-position rows of each set.
  pair_mean_LD: [L, D] the mean of the normalised per-pair differences (`pair_normalize`):
    used instead of the difference of the means.
  orthogonalize: remove the part along normalize(mean_contrast_LD), then renormalise.
  """
  t, c = np.asarray(mean_target_LD, np.float64), np.asarray(mean_contrast_LD, np.float64)
  d = normalize(t - c if pair_mean_LD is None else np.asarray(pair_mean_LD, np.float64))
  if orthogonalize:
    base = normalize(c)
    d = normalize(d - np.sum(d * base, axis=-1, keepdims=True) * base)
  return d.astype(np.float32)


class Direction(prompt_sets.Ds4File):
  """A built direction: `dirs_LD` float32 [L, D] (ds4's file) and `meta` (its sidecar)."""

  @property
  def dirs_LD(self) -> np.ndarray:
    return self.values


def build_direction(lab, target: Sequence[str], contrast: Sequence[str], *,
                    component: str = "ffn_out", pair_normalize: bool = False,
                    orthogonalize: bool = True, chat: bool | None = None,
                    system: str | None = prompt_sets.DS4_SYSTEM,
                    thinking: bool = False) -> Direction:
  """ds4's direction from target and contrast prompts (paired by index; the longer set is
  cut to the shorter's length, as ds4 does); see the module doc for the method.

  chat: the chat format (None: the model's default); system, thinking: as ds4's builder's
  --system and --think. Rows are summed in float64, one pair at a time.
  """
  check_component(component)
  target, contrast = prompt_sets.paired(target, contrast)
  n = len(target)
  L, D = lab.cfg.n_layers, lab.cfg.d_model
  sum_t, sum_c, sum_pair = (np.zeros((L, D), np.float64) for _ in range(3))
  for i, (good, bad) in enumerate(zip(target, contrast), 1):
    _log.info("pair %d/%d", i, n)
    rows = [last_rows(lab, p, component, chat=chat, system=system,
                      thinking=thinking).astype(np.float64) for p in (good, bad)]
    sum_t += rows[0]
    sum_c += rows[1]
    if pair_normalize:
      sum_pair += normalize(rows[0] - rows[1])
  dirs_LD = direction(sum_t / n, sum_c / n, pair_mean_LD=sum_pair / n if pair_normalize else None,
                      orthogonalize=orthogonalize)
  if chat is None:
    chat = bool(lab.tokenizer.chat_model)
  meta = {
      "format": FORMAT, "shape": [L, D], "component": component, "thinking": bool(thinking),
      "pair_normalize": bool(pair_normalize), "orthogonalize_control_mean": bool(orthogonalize),
      "chat": bool(chat), "system": (system or None) if chat else None, "pairs": n,
      "zero_layers": [il for il in range(L) if not np.any(dirs_LD[il])],
      "note": "runtime positive scale suppresses this direction; negative scale amplifies it",
  }
  return Direction(dirs_LD, meta)


__all__ = ["COMPONENTS", "Direction", "FORMAT", "build_direction", "check_component",
           "direction", "last_rows", "normalize"]
