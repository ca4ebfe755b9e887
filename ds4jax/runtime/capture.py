"""Capture: named points of a step, taken wherever their layers run (issue 22; design.md §14).

A request names points, layers and positions (`CaptureSpec`). `RouteBackend.step(...,
capture=spec)` checks it against the model (one-line `CaptureError` before any compute) and
hands the one step algorithm a `StepCapture`, which plans what each hop keeps and collects
what comes back:

  - a local hop runs its chunk through `StageBatcher.run_capture` with the points of its own
    layers (`want`), and keeps the rows of the asked positions (`keep`);
  - a remote hop gets a `cap` field in its WORK naming exactly the arrays it returns
    (`remote_request`), and its RESULT carries them after its usual tensor (`store`);
  - the stage that owns the head adds `logits` and the logit lens: the head applied to
    `hc_out` of each asked layer (`head`). A layer that ran on a stage without the head sends
    its hc_out rows on to the head's stage (through the coordinator), not to the user.

Rows cover the positions the step computes, in order, filtered by `positions`; a retried
attempt recomputes from the first attempt's start, so the rows of a step are the same
however often it was retried.

    spec = CaptureSpec.parse("ffn_out,router_ids", layers="1:3")
    res = backend.step(sid, transcript, sampling, 0, capture=spec)
    res.captured["ffn_out.2"]        # float32 [R, D]; res.captured.positions: int64 [R]
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Sequence

import numpy as np

from ds4jax.config import (LAYER_POINTS, POINTS, STEP_POINTS, LayerRange, point_name,
                           point_shape, split_point_name)

# What one step may capture unless the request states another limit.
DEFAULT_MAX_BYTES = 256 << 20


class CaptureError(ValueError):
  """A capture request this model or route cannot serve (one line, before any compute)."""


def parse_points(points: str | Sequence[str]) -> tuple[str, ...]:
  """"attn_out,lens" or a sequence -> the point names, checked, without repeats."""
  items = points.split(",") if isinstance(points, str) else list(points)
  out = []
  for p in (str(p).strip() for p in items):
    if p not in POINTS:
      raise CaptureError(f"unknown capture point {p!r} (known: {', '.join(POINTS)})")
    if p not in out:
      out.append(p)
  if not out:
    raise CaptureError("a capture names at least one point")
  return tuple(out)


def _ints(spec: str, what: str) -> tuple[int, ...]:
  """"A:B" (inclusive) or "i,j,..." -> sorted distinct ints."""
  try:
    if ":" in spec:
      a, b = (int(v) for v in spec.split(":"))
      vals = range(a, b + 1)
    else:
      vals = [int(v) for v in spec.split(",")]
  except ValueError:
    raise CaptureError(f"bad {what} list {spec!r} (expected all, A:B or i,j,...)") from None
  if not vals:
    raise CaptureError(f"{what} range {spec!r} is empty")
  return tuple(sorted(set(vals)))


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
  """What a step captures: every point of `points` at every layer of `layers`, or exactly
  the arrays named by `keys`.

  points: names from `config.POINTS`.
  layers: "all", or absolute layer indices (`parse`: "A:B" inclusive, "i,j,...").
  positions: "all" (every position the step computes), "last" (the step's last position),
    or absolute positions (those of them the step computes).
  max_bytes: the most bytes of captured arrays one step may return.
  keys: "{point}.{layer}" / "logits" names (`of_keys`); then points and layers are theirs.
  """

  points: tuple[str, ...]
  layers: str | tuple[int, ...] = "all"
  positions: str | tuple[int, ...] = "all"
  max_bytes: int = DEFAULT_MAX_BYTES
  keys: tuple[str, ...] | None = None

  @classmethod
  def of_keys(cls, keys: Sequence[str], positions: str | Sequence[int] = "all",
              max_bytes: int = DEFAULT_MAX_BYTES) -> "CaptureSpec":
    """Exactly the named arrays, e.g. ("ffn_out.3", "router_ids.0", "logits")."""
    pairs = []
    for k in keys:
      try:
        pairs.append(split_point_name(str(k)))
      except ValueError as e:
        raise CaptureError(str(e)) from None
    if not pairs:
      raise CaptureError("a capture names at least one array")
    names = tuple(dict.fromkeys(point_name(p, il) for p, il in pairs))
    spec = cls.parse([p for p, _ in pairs], sorted({il for _, il in pairs if il is not None}),
                     positions, max_bytes)
    return dataclasses.replace(spec, keys=names)

  @classmethod
  def parse(cls, points: str | Sequence[str], layers: str | Sequence[int] = "all",
            positions: str | Sequence[int] = "all",
            max_bytes: int = DEFAULT_MAX_BYTES) -> "CaptureSpec":
    """The request from flag-style strings or sequences (checked, not yet against a model)."""
    if isinstance(layers, str):
      layers = "all" if layers.strip() == "all" else _ints(layers.strip(), "layer")
    else:
      layers = tuple(sorted({int(v) for v in layers}))
    if isinstance(positions, str):
      p = positions.strip()
      positions = p if p in ("all", "last") else _ints(p, "position")
    else:
      positions = tuple(sorted({int(v) for v in positions}))
    if int(max_bytes) < 1:
      raise CaptureError(f"max_bytes must be >= 1, got {max_bytes}")
    return cls(parse_points(points), layers, positions, int(max_bytes), None)

  def resolve(self, cfg) -> "CaptureSpec":
    """This spec with its layers as a tuple, checked against the model: unknown points,
    layers out of range and negative positions are a one-line CaptureError."""
    spec = CaptureSpec.parse(self.points, self.layers, self.positions, self.max_bytes)
    if self.keys is not None:
      spec = CaptureSpec.of_keys(self.keys, self.positions, self.max_bytes)
    n = cfg.n_layers
    layers = tuple(range(n)) if spec.layers == "all" else spec.layers
    bad = [il for il in layers if not 0 <= il < n]
    if bad:
      raise CaptureError(f"capture layer {bad[0]} is out of range: the model has layers 0..{n - 1}")
    if not layers and any(p in LAYER_POINTS for p in spec.points):
      raise CaptureError("a capture of layer points names at least one layer")
    if isinstance(spec.positions, tuple) and any(p < 0 for p in spec.positions):
      raise CaptureError("capture positions are absolute (>= 0)")
    return dataclasses.replace(spec, layers=layers)

  def pairs(self) -> list[tuple[str, int | None]]:
    """(point, layer | None) of every captured array (resolved spec), in point then layer
    order, or in the order of `keys`."""
    if self.keys is not None:
      return [split_point_name(k) for k in self.keys]
    return [(p, None if p == "logits" else il)
            for p in self.points for il in ((None,) if p == "logits" else self.layers)]

  def names(self) -> list[str]:
    """The keys of the captured arrays (resolved spec)."""
    return [point_name(p, il) for p, il in self.pairs()]

  def row_bytes(self, cfg) -> int:
    """Bytes of one captured position (resolved spec)."""
    return sum(4 * int(np.prod(point_shape(cfg, p))) for p, _ in self.pairs())


@dataclasses.dataclass
class Captured:
  """Captured arrays of one or more steps: `positions` int64 [R] (absolute, in the order the
  model processed them) and `arrays` {"{point}.{layer}" | "logits": [R, ...]}."""

  positions: np.ndarray
  arrays: dict[str, np.ndarray]

  def __getitem__(self, key: str) -> np.ndarray:
    return self.arrays[key]

  def __contains__(self, key: str) -> bool:
    return key in self.arrays

  def keys(self):
    return self.arrays.keys()

  @staticmethod
  def concat(parts: Sequence["Captured"]) -> "Captured":
    """Rows of several steps, in order (every part has the same keys)."""
    parts = [p for p in parts if p is not None]
    if not parts:
      return Captured(np.zeros((0,), np.int64), {})
    return Captured(np.concatenate([p.positions for p in parts]),
                    {k: np.concatenate([p.arrays[k] for p in parts]) for k in parts[0].arrays})

  def save_npz(self, path) -> None:
    """Writes the arrays under their keys, plus "positions"."""
    np.savez(path, positions=self.positions, **self.arrays)


class StepCapture:
  """One step's capture: the plan per hop and the rows collected, across the attempts of the
  step (see the module docstring). Replies land on link reader threads: stores are locked."""

  def __init__(self, spec: CaptureSpec, cfg):
    self.spec = spec.resolve(cfg)
    self.cfg = cfg
    pairs = self.spec.pairs()
    self.step_pairs = [(p, il) for p, il in pairs if p in STEP_POINTS]
    self.lens_layers = [il for p, il in pairs if p == "lens"]
    self.logits = ("logits", None) in pairs
    self.start: int | None = None  # the first attempt's first computed position
    self.end = 0
    self._lock = threading.Lock()
    self._parts: dict[str, dict[int, np.ndarray]] = {}
    self._pos: dict[int, np.ndarray] = {}

  # ---------------------------------------------------------------------------- planning
  def begin(self, p: int, n_tokens: int) -> int:
    """Starts an attempt that would compute positions p..n_tokens-1: -> the position to
    compute from (the first attempt's, on a retry). CaptureError past max_bytes."""
    if self.start is None:
      self.start = p
    self.end = n_tokens
    with self._lock:
      self._parts, self._pos = {}, {}
    rows = len(self._positions(self.start, n_tokens - self.start))
    need = rows * self.spec.row_bytes(self.cfg)
    if need > self.spec.max_bytes:
      raise CaptureError(f"capture of {rows} positions x {len(self.spec.names())} arrays needs "
                         f"{need} bytes, over the limit of {self.spec.max_bytes}")
    return min(p, self.start)

  def _positions(self, pos0: int, n: int) -> np.ndarray:
    """The absolute positions in [pos0, pos0 + n) this step captures."""
    lo, hi = max(pos0, self.start), min(pos0 + n, self.end)
    pos = np.arange(lo, max(lo, hi), dtype=np.int64)
    if self.spec.positions == "last":
      return pos[pos == self.end - 1]
    if isinstance(self.spec.positions, tuple):
      return pos[np.isin(pos, np.asarray(self.spec.positions, np.int64))]
    return pos

  def rows(self, pos0: int, n: int) -> np.ndarray:
    """Chunk-relative indices of the captured rows of positions pos0..pos0+n-1."""
    return self._positions(pos0, n) - pos0

  def want(self, layers: LayerRange) -> frozenset:
    """The in-step points a stage of `layers` keeps: the asked step points of its layers,
    plus hc_out of its layers whose lens is asked."""
    own = lambda il: layers.start <= il <= layers.end  # noqa: E731
    return frozenset([(p, il) for p, il in self.step_pairs if own(il)]
                     + [("hc_out", il) for il in self.lens_layers if own(il)])

  # ---------------------------------------------------------------------------- storing
  def _put(self, pos0: int, arrays: dict[str, np.ndarray], positions: np.ndarray) -> None:
    with self._lock:
      self._pos[pos0] = positions
      for k, v in arrays.items():
        self._parts.setdefault(k, {})[pos0] = v

  def keep(self, pos0: int, arrays: dict[str, np.ndarray]) -> None:
    """A local stage's arrays of chunk pos0, all its rows [n, ...]: keeps the asked rows."""
    n = next(iter(arrays.values())).shape[0] if arrays else 0
    r = self.rows(pos0, n)
    self._put(pos0, {k: np.asarray(v)[r] for k, v in arrays.items()}, r + pos0)

  def head(self, pos0: int, logits_TV: np.ndarray, runner) -> None:
    """On the stage with the head, after chunk pos0: the logits rows and every asked lens
    (the head on the hc_out rows of each layer, from whichever stage ran it)."""
    r = self.rows(pos0, logits_TV.shape[0])
    if not len(r):
      return
    out = {}
    if self.logits:
      out["logits"] = np.asarray(logits_TV, np.float32)[r]
    for il in self.lens_layers:
      out[point_name("lens", il)] = runner.head_rows(self._hc(il, pos0))
    self._put(pos0, out, r + pos0)

  def _hc(self, il: int, pos0: int) -> np.ndarray:
    with self._lock:
      return self._parts[point_name("hc_out", il)][pos0]

  def remote_request(self, layers: LayerRange, pos0: int, n: int):
    """The WORK `cap` field for a remote hop of `layers` and chunk pos0 (n tokens), and the
    bytes that follow the activations (lens inputs, head hop only): (None, b"") when the
    hop returns nothing for this chunk."""
    rows = self.rows(pos0, n)
    own = lambda il: layers.start <= il <= layers.end  # noqa: E731
    names = [point_name(p, il) for p, il in self.step_pairs if own(il)]
    lens_in: list[int] = []
    if layers.has_output:
      names += [point_name("lens", il) for il in self.lens_layers]
      lens_in = [il for il in self.lens_layers if il < layers.start]
      if self.logits:
        names.append("logits")
    else:  # the hc_out rows of lens layers go on to the head's hop
      names += [k for k in (point_name("hc_out", il) for il in self.lens_layers if own(il))
                if k not in names]
    if not names or not len(rows):
      return None, b""
    cap: dict = {"n": names}
    if len(rows) != n:
      cap["r"] = [int(v) for v in rows]
    extra = b""
    if lens_in:
      cap["li"] = lens_in
      extra = b"".join(np.ascontiguousarray(self._hc(il, pos0), "<f4").tobytes()
                       for il in lens_in)
    return cap, extra

  def store(self, pos0: int, n: int, arrays: dict[str, np.ndarray]) -> None:
    """A remote hop's arrays of chunk pos0 (rows already selected; router_ids as float)."""
    rows = self.rows(pos0, n)
    out = {}
    for k, v in arrays.items():
      point, _ = split_point_name(k)
      want = (len(rows),) + point_shape(self.cfg, point)
      if tuple(v.shape) != want:
        raise ValueError(f"captured {k} has shape {list(v.shape)}, expected {list(want)}")
      out[k] = v.astype(np.int32) if point == "router_ids" else v
    self._put(pos0, out, rows + pos0)

  # ---------------------------------------------------------------------------- result
  def result(self) -> Captured:
    """The asked arrays of every chunk of the attempt, in position order."""
    with self._lock:
      starts = sorted(self._pos)
      positions = (np.concatenate([self._pos[s] for s in starts]) if starts
                   else np.zeros((0,), np.int64))
      arrays = {}
      for k in self.spec.names():
        point, _ = split_point_name(k)
        parts = self._parts.get(k, {})
        missing = [s for s in starts if len(self._pos[s]) and s not in parts]
        if missing:
          raise CaptureError(f"no {k} rows came back for positions from {missing[0]}")
        shape = point_shape(self.cfg, point)
        dtype = np.int32 if point == "router_ids" else np.float32
        arrays[k] = (np.concatenate([parts[s] for s in starts if s in parts]).astype(dtype)
                     if parts else np.zeros((0,) + shape, dtype))
    return Captured(positions, arrays)


__all__ = ["CaptureError", "CaptureSpec", "Captured", "DEFAULT_MAX_BYTES", "StepCapture",
           "parse_points"]
