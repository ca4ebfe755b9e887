"""Interventions: edits of named points, applied in the step on the stage that owns the layer
(issue 22; docs/design.md §14). A request carries them, like a capture: sessions with
different edits share one batched call, and no process needs a restart.

    steer = Interventions.ds4_steering("dir.f32", cfg, ffn=1.0)        # ds4's --dir-steering
    ablate = Interventions([Edit("scale", "attn_out", 2, scale=0.0)])   # zero-ablation
    res = backend.step(sid, transcript, sampling, 0, edits=steer)

Ops (`model.taps.EDIT_OPS`, applied in this order at one point) on `attn_out` / `ffn_out`
([D] per row) or `hc_out` ([C, D]):

  set      y <- value[i] at the absolute positions `positions[i]` (activation patching: the
           rows of a captured run); other positions untouched
  scale    y <- scale * y (scale 0: zero-ablation)
  add      y <- y + scale * value
  project  y <- y - scale * d (d . y), d = value / |value| over the last axis (scale 1:
           project d out; negative: amplify it; ds4's directional steering)

Experts: `Interventions.experts` forces or bans experts of a routed layer by adding +-FORCE
to `router_select` [E], its top-k key (scores + bias; the chosen experts' weights stay their
unbiased scores); hash-routed layers choose by token and are refused.
`Interventions.ds4_expert_steering` reads ds4's L x E map into `router_steer` [E] actions
(map x scale), which the router applies by the margin rule of ds4's expert-steering code
(`model.moe._steer`): a promoted expert's score becomes the row's max + |a| and its selection
key the key's max + |a| (always chosen); a suppressed one's score becomes 0 and its key the
key's min - |a| (never chosen, and weight 0 where a hash layer's table still picks it).

Bad requests (unknown point or op, a layer outside the model, a value of the wrong shape, a
steering file that is not L x D float32) are one-line `EditError`s before any compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ds4jax.config import LayerRange, ModelConfig

OPS = ("set", "scale", "add", "project")
POINTS = ("attn_out", "ffn_out", "hc_out", "router_select", "router_steer")
# Forcing or banning an expert adds this to its selection score (far above any score).
FORCE = 1e6
# ds4's steering options (its flag names in absl spelling), as scripts and the server take them.
DS4_STEERING_OPTIONS = ("dir_steering_file", "dir_steering_ffn", "dir_steering_attn",
                        "expert_steering_file", "expert_steering_scale")


class EditError(ValueError):
  """An intervention this model cannot take (one line, before any compute)."""


@dataclasses.dataclass(frozen=True)
class Edit:
  """One edit of `point` at absolute `layer` (see the module doc for each op).

  value: add: the vector [D] ([C, D] for hc_out); project: the direction [D]; set: the rows
    [P, D] (or [P, C, D]) for `positions`; unused by scale.
  scale: scale's factor; add's and project's multiplier.
  positions: set only: the P absolute positions the rows of `value` replace.
  """
  op: str
  point: str
  layer: int
  value: np.ndarray | None = None
  scale: float = 1.0
  positions: tuple[int, ...] | None = None


def _row_shape(point: str, cfg: ModelConfig) -> tuple[int, ...]:
  if point in ("router_select", "router_steer"):
    return (cfg.n_experts,)
  return (cfg.n_hc, cfg.d_model) if point == "hc_out" else (cfg.d_model,)


class Interventions:
  """A request's edits, checked against a model (`resolve`); cut per stage and chunk by
  `for_chunk` into the per-row values `StageBatcher.run_capture` takes."""

  def __init__(self, edits: Sequence[Edit]):
    self.edits = tuple(edits)
    if not self.edits:
      raise EditError("an intervention names at least one edit")
    self._resolved: ModelConfig | None = None

  def resolve(self, cfg: ModelConfig) -> "Interventions":
    """Checks every edit against `cfg` (one-line EditError) and merges them: adds sum,
    scales multiply, sets of one point merge by position; two projects of one point are
    refused. Returns self."""
    merged: dict[tuple, list] = {}
    for e in self.edits:
      if e.op not in OPS:
        raise EditError(f"unknown edit {e.op!r} (known: {', '.join(OPS)})")
      if e.point not in POINTS:
        raise EditError(f"cannot edit {e.point!r} (editable points: {', '.join(POINTS)})")
      if not 0 <= int(e.layer) < cfg.n_layers:
        raise EditError(f"edit layer {e.layer} is outside the model's 0..{cfg.n_layers - 1}")
      if not np.isfinite(e.scale):
        raise EditError(f"{e.op} {e.point}.{e.layer}: the scale must be finite")
      if e.point in ("router_select", "router_steer") and e.op != "add":
        raise EditError(f"{e.point} takes add only (expert steering), not {e.op}")
      if e.point == "router_select":
        if cfg.is_hash_layer(int(e.layer)):
          raise EditError(f"layer {e.layer} routes by token hash: expert steering does not "
                          "apply (as in ds4)")
      row = _row_shape(e.point, cfg)
      key = (e.op, e.point, int(e.layer))
      if e.op == "scale":
        merged[key] = [float(merged.get(key, [1.0])[0]) * float(e.scale)]
        continue
      v = None if e.value is None else np.asarray(e.value, np.float32)
      if e.op == "set":
        pos = tuple(int(p) for p in (e.positions or ()))
        if v is None or v.shape != (len(pos),) + row or not pos:
          raise EditError(f"set {e.point}.{e.layer}: {len(pos)} positions need a value of shape "
                          f"{(len(pos),) + row}, got {None if v is None else v.shape}")
        if min(pos) < 0:
          raise EditError(f"set {e.point}.{e.layer}: positions must be >= 0")
        rows = merged.setdefault(key, [{}])[0]
        rows.update(zip(pos, v))
        continue
      want = (cfg.d_model,) if e.op == "project" else row
      if v is None or v.shape != want or not np.all(np.isfinite(v)):
        raise EditError(f"{e.op} {e.point}.{e.layer}: the value must be finite float32 "
                        f"{want}, got {None if v is None else v.shape}")
      if e.op == "add":
        prev = merged.get(key, [np.zeros(row, np.float32)])[0]
        merged[key] = [prev + np.float32(e.scale) * v]
      else:  # project
        if key in merged:
          raise EditError(f"two projections of {e.point}.{e.layer}: give one direction")
        n = float(np.linalg.norm(v))
        if n == 0.0:
          raise EditError(f"project {e.point}.{e.layer}: the direction is zero")
        merged[key] = [v / np.float32(n), float(e.scale)]
    self._merged, self._resolved = merged, cfg
    h = hashlib.sha256()  # once here: every step (and every hop's WORK) reads the key
    for k in sorted(merged):
      h.update(repr(k).encode())
      for v in merged[k]:
        if isinstance(v, dict):
          for p in sorted(v):
            h.update(str(p).encode() + np.asarray(v[p], np.float32).tobytes())
        else:
          h.update(np.asarray(v, np.float32).tobytes())
    self._key = h.hexdigest()[:32]
    return self

  @property
  def key(self) -> str:
    """A digest of the resolved edits: equal edits, equal keys (a session's state is valid
    only under the edits it was computed with)."""
    if self._resolved is None:
      raise EditError("resolve() the interventions against the model first")
    return self._key

  @property
  def layers(self) -> frozenset[int]:
    return frozenset(int(e.layer) for e in self.edits)

  def touches(self, layers: LayerRange) -> bool:
    """Whether any edit names a layer of `layers` (a stage's range)."""
    return any(layers.start <= il <= layers.end for il in self.layers)

  def to_wire(self, layers: LayerRange) -> tuple[list, list[tuple[str, np.ndarray]]]:
    """The edits of `layers` as plain data for a worker (docs/protocol.md §12):
    ([[op, point, layer, scale, positions | None, value index | None], ...],
    [(str(index), value f32 array), ...]). `from_wire` inverts it."""
    items, values = [], []
    for e in self.edits:
      if not layers.start <= int(e.layer) <= layers.end:
        continue
      vi = None
      if e.value is not None:
        vi = len(values)
        values.append((str(vi), np.asarray(e.value, np.float32)))
      items.append([e.op, e.point, int(e.layer), float(e.scale),
                    None if e.positions is None else [int(q) for q in e.positions], vi])
    return items, values

  @classmethod
  def from_wire(cls, items, values: dict[str, np.ndarray]) -> "Interventions":
    """Inverse of `to_wire` (unresolved); EditError for anything malformed."""
    if not isinstance(items, list) or not items:
      raise EditError("edits must be a non-empty list")
    edits = []
    for it in items:
      if (not isinstance(it, list) or len(it) != 6 or not isinstance(it[0], str)
          or not isinstance(it[1], str) or type(it[2]) is not int
          or not isinstance(it[3], (int, float)) or isinstance(it[3], bool)):
        raise EditError(f"malformed edit {str(it)[:80]}")
      pos, vi = it[4], it[5]
      if pos is not None and not (isinstance(pos, list)
                                  and all(type(q) is int for q in pos)):  # noqa: E721
        raise EditError("edit positions must be a list of integers")
      if vi is not None and str(vi) not in values:
        raise EditError(f"edit value {vi!r} is missing")
      edits.append(Edit(it[0], it[1], it[2], None if vi is None else values[str(vi)],
                        float(it[3]), None if pos is None else tuple(pos)))
    return cls(edits)

  def for_chunk(self, layers: LayerRange, pos0: int, n: int) -> dict:
    """The per-row values of one session's chunk of `n` tokens at `pos0` on a stage owning
    `layers`: {(op, point, layer): scale s | add v [*row] | project (d [D], s) | set (v [n,
    *row], m [n])}; a set that touches none of the chunk's positions is left out."""
    if self._resolved is None:
      raise EditError("resolve() the interventions against the model first")
    out = {}
    for (op, point, il), vals in self._merged.items():
      if not layers.start <= il <= layers.end:
        continue
      if op == "set":
        rows = {p - pos0: v for p, v in vals[0].items() if pos0 <= p < pos0 + n}
        if not rows:
          continue
        row = _row_shape(point, self._resolved)
        v, m = np.zeros((n,) + row, np.float32), np.zeros((n,), bool)
        for i, r in rows.items():
          v[i], m[i] = r, True
        out[(op, point, il)] = (v, m)
      elif op == "project":
        out[(op, point, il)] = (vals[0], np.float32(vals[1]))
      else:
        out[(op, point, il)] = np.float32(vals[0]) if op == "scale" else vals[0]
    return out

  @classmethod
  def experts(cls, layer: int, cfg: ModelConfig, *, force: Sequence[int] = (),
              ban: Sequence[int] = ()) -> "Interventions":
    """Force experts into, or ban them from, the top-k of a routed layer (their weights stay
    their own scores)."""
    v = np.zeros((cfg.n_experts,), np.float32)
    for e, s in [(e, 1.0) for e in force] + [(e, -1.0) for e in ban]:
      if not 0 <= int(e) < cfg.n_experts:
        raise EditError(f"expert {e} is outside 0..{cfg.n_experts - 1}")
      v[int(e)] = s
    return cls([Edit("add", "router_select", layer, v, FORCE)]).resolve(cfg)

  @classmethod
  def ds4_expert_steering(cls, path: str | os.PathLike, cfg: ModelConfig, *,
                          scale: float = 0.01) -> "Interventions":
    """ds4's expert steering (`--expert-steering-file/-scale`): a flat little-endian float32
    file of L x E values (+1 promotes an expert, -1 suppresses it, 0 leaves it); each layer's
    row times `scale` becomes its `router_steer` actions, applied by ds4's margin rule (the
    module doc). Returns the resolved interventions."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"expert steering file not found: {path}")
    want = cfg.n_layers * cfg.n_experts * 4
    if os.path.getsize(path) != want:
      raise EditError(f"expert steering file {path} has {os.path.getsize(path)} bytes; this "
                      f"model needs L x E = {cfg.n_layers} x {cfg.n_experts} float32 = {want}")
    m = np.fromfile(path, dtype="<f4").reshape(cfg.n_layers, cfg.n_experts)
    if not np.all(np.isfinite(m)):
      raise EditError(f"expert steering file {path} holds non-finite values")
    edits = [Edit("add", "router_steer", il, m[il], float(scale))
             for il in range(cfg.n_layers) if np.any(m[il])]
    if not edits or not scale:
      raise EditError(f"expert steering file {path} with scale {scale} changes nothing")
    return cls(edits).resolve(cfg)

  @classmethod
  def ds4_steering(cls, path: str | os.PathLike, cfg: ModelConfig, *, ffn: float = 1.0,
                   attn: float = 0.0) -> "Interventions":
    """ds4's directional steering (`--dir-steering-file/-ffn/-attn`): a flat little-endian
    float32 file of L x D unit directions, one per layer, projected out of each layer's
    ffn_out with scale `ffn` and its attn_out with scale `attn` (0: that side untouched);
    y <- y - s * d (d . y). Returns the resolved interventions."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"steering file not found: {path}")
    want = cfg.n_layers * cfg.d_model * 4
    size = os.path.getsize(path)
    if size != want:
      raise EditError(f"steering file {path} has {size} bytes; this model needs L x D = "
                      f"{cfg.n_layers} x {cfg.d_model} float32 = {want}")
    dirs = np.fromfile(path, dtype="<f4").reshape(cfg.n_layers, cfg.d_model)
    if not np.all(np.isfinite(dirs)):
      raise EditError(f"steering file {path} holds non-finite values")
    edits = []
    for point, s in (("ffn_out", ffn), ("attn_out", attn)):
      if s:
        edits += [Edit("project", point, il, dirs[il], float(s))
                  for il in range(cfg.n_layers) if np.any(dirs[il])]
    if not edits:
      raise EditError(f"steering file {path} with ffn={ffn}, attn={attn} changes nothing")
    return cls(edits).resolve(cfg)


def ds4_steering_options(cfg: ModelConfig, options: Mapping[str, Any], *,
                         prefix: str = "--") -> Interventions | None:
  """ds4's steering from its options (`DS4_STEERING_OPTIONS`: a directional file with its
  FFN / attention scales, defaults 1 and 0; an expert map with its scale, default 0.01),
  both summed, resolved against `cfg`; None without a file. A scale without its file is a
  one-line EditError naming the options with `prefix` ("--" for flags)."""
  unknown = sorted(set(options) - set(DS4_STEERING_OPTIONS))
  if unknown:
    raise EditError(f"unknown steering option {prefix}{unknown[0]} (known: "
                    f"{', '.join(prefix + k for k in DS4_STEERING_OPTIONS)})")
  get = lambda k, default=None: default if options.get(k) is None else options[k]  # noqa: E731
  parts = []
  if get("dir_steering_file"):
    parts.append(Interventions.ds4_steering(
        get("dir_steering_file"), cfg, ffn=float(get("dir_steering_ffn", 1.0)),
        attn=float(get("dir_steering_attn", 0.0))))
  elif get("dir_steering_ffn") is not None or get("dir_steering_attn") is not None:
    raise EditError(f"{prefix}dir_steering_ffn/{prefix}dir_steering_attn need "
                    f"{prefix}dir_steering_file")
  if get("expert_steering_file"):
    parts.append(Interventions.ds4_expert_steering(
        get("expert_steering_file"), cfg, scale=float(get("expert_steering_scale", 0.01))))
  elif get("expert_steering_scale") is not None:
    raise EditError(f"{prefix}expert_steering_scale needs {prefix}expert_steering_file")
  if not parts:
    return None
  return Interventions([e for p in parts for e in p.edits]).resolve(cfg)


__all__ = ["DS4_STEERING_OPTIONS", "Edit", "EditError", "FORCE", "Interventions", "OPS",
           "POINTS", "ds4_steering_options"]
