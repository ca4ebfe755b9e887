"""Named points inside a stage's step, for capture (issue 22; docs/design.md §14).

A `Taps` object is handed to `Stage.batched` at trace time. Each named point of a layer calls
it with its value; the point is kept when the request names it, and the value flows on
unchanged. With no `Taps` (None) the step is traced exactly as without this module, so a
step that captures nothing compiles to today's program.

Points (per layer unless noted; T rows, D = d_model, C = n_hc, k = experts per token,
E = experts, V = vocab; the table is `config.POINTS` / `config.point_shape`):

  attn_out       f32 [T, D]     attention output after its output projection, before HC post
  ffn_out        f32 [T, D]     routed + shared experts, before HC post
  hc_out         f32 [T, C, D]  the layer's output HC streams
  router_ids     i32 [T, k]     chosen experts (hash layers: the token's tid2eid row),
                                in selection order (descending score + bias on top-k layers)
  router_weights f32 [T, k]     their weights after normalisation and routed scaling
  router_scores  f32 [T, E]     sqrt(softplus(W_r x)) before top-k (the selection adds the
                                bias; the weights gather these unbiased scores)
  lens           f32 [T, V]     the model's head (HC collapse, final norm, output) on hc_out
  logits         f32 [T, V]     the model's output (no layer)

`lens` is not a point of the step: the stage that owns the head applies it to `hc_out`
afterwards (`StageRunner.head_rows`), wherever that layer ran. Interventions (issue 22,
later) edit a value where `Taps.__call__` sees it: the return value replaces it.
"""

from __future__ import annotations

from typing import Iterable

from ds4jax.config import STEP_POINTS, point_name


class Taps:
  """The points one traced step keeps: `want` holds (point, absolute layer) pairs of
  STEP_POINTS. Calling it at a point returns the value (unchanged for capture) and keeps it
  under "{point}.{layer}" in `saved` when wanted."""

  def __init__(self, want: Iterable[tuple[str, int]]):
    self.want = frozenset(want)
    bad = sorted({p for p, _ in self.want} - set(STEP_POINTS))
    if bad:
      raise ValueError(f"{bad[0]!r} is not a point of the step")
    self.saved: dict = {}

  def wants_layer(self, layer: int) -> bool:
    return any(il == layer for _, il in self.want)

  def __call__(self, point: str, layer: int, x):
    if (point, layer) in self.want:
      self.saved[point_name(point, layer)] = x
    return x

  def at(self, layer: int):
    """The taps of one layer: f(point, x) -> x (what the MoE's router calls)."""
    return lambda point, x: self(point, layer, x)


__all__ = ["Taps"]
