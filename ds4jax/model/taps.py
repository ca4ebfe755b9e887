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
afterwards (`StageRunner.head_rows`), wherever that layer ran.

Interventions edit `attn_out`, `ffn_out` and `hc_out` where `Taps.__call__` sees them (the
return value flows on; a capture of the same point sees the edited value). Each edit is an
`EDIT_OPS` op with per-row values, inputs of the program (so sessions with different values
share one call), applied in this order when several hit one point (N = B*T rows, `row` the
point's per-row shape, [D] or [C, D]):

  set      v [N, *row], m [N]   y <- v where m (activation patching at chosen positions)
  scale    s [N]                y <- s * y (zero-ablation: s = 0)
  add      v [N, *row]          y <- y + v
  project  d [N, D], s [N]      y <- y - s * d (d . y) over the last axis (ds4's directional
                                steering: d unit-norm, s = 1 projects d out, s < 0 amplifies)

`router_select` [N, E] is the top-k key of a routed layer (scores + bias; the weights still
gather the unbiased scores): `add` there forces an expert in (a large value) or bans it (a
large negative one). `router_steer` [N, E] holds ds4's expert-steering actions (map x scale,
0 by default), which the router applies by ds4's margin rule (`model.moe._steer`): to the
scores (weights) on every layer and to the selection key on routed layers.

A row an edit does not touch carries the neutral value (m False, s 1, v 0, d 0).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from ds4jax.config import STEP_POINTS, point_name

EDIT_OPS = ("set", "scale", "add", "project")  # in the order they apply at one point
EDIT_POINTS = ("attn_out", "ffn_out", "hc_out", "router_select", "router_steer")


class Taps:
  """The points one traced step keeps and edits.

  want: (point, absolute layer) pairs of STEP_POINTS to keep: calling the taps at a point
    keeps the (edited) value under "{point}.{layer}" in `saved`.
  edits: {(op, point, layer): values} with op in EDIT_OPS and point in EDIT_POINTS; the
    values are traced arrays with N rows, as the module doc describes (`set`: (v, m),
    `project`: (d, s), `scale`: s, `add`: v).
  """

  def __init__(self, want: Iterable[tuple[str, int]], edits: Mapping[tuple, Any] | None = None):
    self.want = frozenset(want)
    bad = sorted({p for p, _ in self.want} - set(STEP_POINTS))
    if bad:
      raise ValueError(f"{bad[0]!r} is not a point of the step")
    self.edits = dict(edits or {})
    for op, point, _ in self.edits:
      if op not in EDIT_OPS or point not in EDIT_POINTS:
        raise ValueError(f"cannot {op} {point!r}")
    self.saved: dict = {}

  def wants_layer(self, layer: int) -> bool:
    return (any(il == layer for _, il in self.want)
            or any(il == layer for _, _, il in self.edits))

  def __call__(self, point: str, layer: int, x):
    for op in EDIT_OPS:
      v = self.edits.get((op, point, layer))
      if v is not None:
        x = _apply(op, x, v)
    if (point, layer) in self.want:
      self.saved[point_name(point, layer)] = x
    return x

  def at(self, layer: int) -> "LayerTaps":
    """The taps of one layer: f(point, x) -> x (what the block and the MoE's router call)."""
    return LayerTaps(self, layer)


class LayerTaps:
  """One layer's taps: `tap(point, x) -> x`; `tap.edits(point)`: whether an edit of this
  layer names `point` (static: code for an unedited point is not traced at all)."""

  def __init__(self, taps: Taps, layer: int):
    self.taps, self.layer = taps, layer

  def __call__(self, point: str, x):
    return self.taps(point, self.layer, x)

  def edits(self, point: str) -> bool:
    return any((op, point, self.layer) in self.taps.edits for op in EDIT_OPS)


_NEUTRAL = {"scale": 1.0, "add": 0.0, "project": 0.0, "set": 0.0}


def pad_edit(op: str, v, bb: int, tb: int):
  """One edit's host values for B rows -> [bb, ...] ([bb, tb, ...] for `set`), padding rows
  neutral (a padding row's output is dropped anyway)."""
  def pad(a, fill, rows_only=True):
    a = np.asarray(a)
    b = a.shape[0]
    if rows_only:
      out = np.full((bb,) + a.shape[1:], fill, a.dtype)
      out[:b] = a
    else:  # [B, T, ...] -> [bb, tb, ...]
      out = np.full((bb, tb) + a.shape[2:], fill, a.dtype)
      out[:b, :a.shape[1]] = a
    return out

  if op == "set":
    val, m = v
    return pad(np.asarray(val, np.float32), 0.0, False), pad(np.asarray(m, bool), False, False)
  if op == "project":
    d, s = v
    return pad(np.asarray(d, np.float32), 0.0), pad(np.asarray(s, np.float32), 0.0)
  return pad(np.asarray(v, np.float32), _NEUTRAL[op])


def edit_rows(edits, t: int):
  """Traced per-session edit values [B, ...] -> per-row [N = B*T, ...] (model/taps.py)."""
  def rows(a):
    return jnp.repeat(a, t, axis=0)

  def flat(a):  # [B, T, ...] -> [N, ...]
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])

  out = {}
  for (op, point, il), v in edits.items():
    if op == "set":
      out[(op, point, il)] = (flat(v[0]), flat(v[1]))
    elif op == "project":
      out[(op, point, il)] = (rows(v[0]), rows(v[1]))
    else:
      out[(op, point, il)] = rows(v)
  return out


def _rows(v, x):
  """A per-row [N] value broadcast against x [N, ...]."""
  return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _apply(op: str, x, v):
  if op == "set":
    val, m = v
    return jnp.where(_rows(m, x), val.astype(x.dtype), x)
  if op == "scale":
    return x * _rows(v, x).astype(x.dtype)
  if op == "add":
    return x + v.astype(x.dtype)
  d, s = v  # project: d [N, D] against the last axis of x ([N, D] or [N, C, D])
  d = d.reshape((d.shape[0],) + (1,) * (x.ndim - 2) + d.shape[-1:]).astype(x.dtype)
  dot = jnp.sum(x * d, axis=-1, keepdims=True)
  return x - _rows(s, x).astype(x.dtype) * d * dot


__all__ = ["EDIT_OPS", "EDIT_POINTS", "LayerTaps", "Taps", "edit_rows", "pad_edit"]
