"""Traces: name points inside a `with` block, run once on exit, read the saved values.

    lab = Lab(backend, tokenizer)              # a LocalBackend (one process or a split) or
                                               # a Coordinator with workers: the same code
    with lab.trace("The cat sat") as t:
      h = t.layers[3].ffn_out.save()           # float32 [T, D] after the block
      ids = t.layers[0].router_ids.save()      # int32 [T, k]
      lens = t.layers.all.lens.save()          # float32 [L, T, V] (stacked over layers)
      out = t.logits.save()                    # float32 [T, V]
    h.value, t.tokens, t.next_token, t.captured

    with lab.generate("The cat", max_new_tokens=8) as g:
      r = g.layers[1:3].router_ids.save()      # [2, R, k], R = prompt + fed-back tokens
    g.result.text, r.value

Only the saved arrays are captured and travel back (`CaptureSpec.of_keys`). A trace runs in
a fresh backend session, so its rows are every position of the prompt (`positions` filters
them: "all", "last", or absolute indices).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ds4jax.config import LAYER_POINTS, point_name
from ds4jax.runtime.capture import Captured, CaptureError, CaptureSpec
from ds4jax.runtime.edits import Edit, Interventions
from ds4jax.runtime.sampling import SamplingParams

# nnsight's spelling: a layer's output is its HC streams.
ALIASES = {"output": "hc_out"}


class Saved:
  """A value saved in a trace; `value` is set when the trace has run: float32 / int32
  [R, ...] for one layer, [L, R, ...] stacked for several, R = captured positions."""

  def __init__(self, keys: list[str], stacked: bool):
    self.keys, self.stacked = keys, stacked
    self._value = None

  @property
  def value(self) -> np.ndarray:
    if self._value is None:
      raise RuntimeError("the trace has not run yet: read saved values after its with block")
    return self._value

  def _fill(self, captured: Captured) -> None:
    arrays = [captured[k] for k in self.keys]
    self._value = np.stack(arrays) if self.stacked else arrays[0]

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self.value, dtype=dtype)

  def __repr__(self):
    state = "pending" if self._value is None else f"shape {list(self._value.shape)}"
    return f"Saved({', '.join(self.keys)}: {state})"


class Point:
  """One named point at one or several layers of a trace (`save()` marks it)."""

  def __init__(self, trace: "Trace", point: str, layers: Sequence[int] | None, stacked: bool):
    self._trace, self._point, self._layers, self._stacked = trace, point, layers, stacked

  # Interventions (runtime/edits.py), applied in the traced run on every layer of this view.
  def _edit(self, op: str, value=None, scale: float = 1.0, positions=None) -> None:
    if self._layers is None:
      raise ValueError(f"{self._point} cannot be edited (editable: attn_out, ffn_out, hc_out)")
    self._trace._edit([Edit(op, ALIASES.get(self._point, self._point), il, value, scale,
                            positions) for il in self._layers])

  def set(self, values, positions: Sequence[int]) -> None:
    """Patch: the rows `values` [P, ...] replace this point at absolute `positions`."""
    self._edit("set", values, positions=tuple(positions))

  def scale(self, s: float) -> None:
    self._edit("scale", scale=s)

  def zero(self) -> None:
    """Zero-ablation."""
    self._edit("scale", scale=0.0)

  def add(self, v, scale: float = 1.0) -> None:
    self._edit("add", v, scale)

  def project(self, d, scale: float = 1.0) -> None:
    """y <- y - scale * d (d . y) (ds4's directional steering: 1 removes d, < 0 amplifies)."""
    self._edit("project", d, scale)

  def save(self) -> Saved:
    keys = ([point_name(self._point, None)] if self._layers is None
            else [point_name(self._point, il) for il in self._layers])
    return self._trace._save(keys, self._stacked)


class Layer:
  """The points of one layer, or of several stacked (`layers.all`, `layers[a:b]`)."""

  def __init__(self, trace: "Trace", layers: Sequence[int], stacked: bool):
    self._trace, self._layers, self._stacked = trace, list(layers), stacked

  def __getattr__(self, point: str) -> Point:
    point = ALIASES.get(point, point)
    if point not in LAYER_POINTS:
      raise AttributeError(f"no point {point!r} on a layer (points: {', '.join(LAYER_POINTS)})")
    return Point(self._trace, point, self._layers, self._stacked)


class Layers:
  """`trace.layers[i]`, `trace.layers[a:b]`, `trace.layers.all`."""

  def __init__(self, trace: "Trace", n_layers: int):
    self._trace, self._n = trace, n_layers

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i) -> Layer:
    if isinstance(i, slice):
      return Layer(self._trace, range(self._n)[i], True)
    i = int(i)
    if not -self._n <= i < self._n:
      raise IndexError(f"layer {i} is out of range: the model has layers 0..{self._n - 1}")
    return Layer(self._trace, [i % self._n], False)

  @property
  def all(self) -> Layer:
    return self[:]


class Trace:
  """One traced run (`Lab.trace`: the prompt's prefill; `Lab.generate`: a generation).
  Marks saves inside its `with` block and runs on a clean exit.

  After the run: `tokens` (the prompt ids), `captured` (every saved array, a `Captured`),
  `next_token` (the greedy token after the prompt; trace), `result` (the
  `GenerationResult`; generate)."""

  def __init__(self, lab, tokens: list[int], *, positions, max_bytes: int,
               generate: dict[str, Any] | None = None):
    self.lab, self.tokens = lab, tokens
    self.positions, self.max_bytes = positions, max_bytes
    self.layers = Layers(self, lab.cfg.n_layers)
    self.captured: Captured | None = None
    self.next_token: int | None = None
    self.result = None
    self._generate = generate
    self._saves: list[Saved] = []
    self._keys: list[str] = []
    self._edits: list = []  # runtime.edits.Edit, from the points' set/scale/add/project

  @property
  def logits(self) -> Point:
    return Point(self, "logits", None, False)

  def _save(self, keys: list[str], stacked: bool) -> Saved:
    if self.captured is not None:
      raise RuntimeError("this trace has run: save points inside its with block")
    s = Saved(keys, stacked)
    self._saves.append(s)
    self._keys += [k for k in keys if k not in self._keys]
    return s

  def _edit(self, edits: list) -> None:
    if self.captured is not None or self.result is not None:
      raise RuntimeError("this trace has run: edit points inside its with block")
    self._edits += edits

  def __enter__(self) -> "Trace":
    return self

  def __exit__(self, etype, exc, tb) -> None:
    if etype is None:
      self.run()

  def spec(self) -> CaptureSpec | None:
    """The capture this trace asks for: exactly the saved arrays (None: edits only)."""
    if not self._keys:
      if self._edits:
        return None
      raise CaptureError("nothing is saved or edited in this trace: call .save() on a point")
    return CaptureSpec.of_keys(self._keys, self.positions, self.max_bytes)

  def run(self) -> None:
    spec = self.spec()
    edits = Interventions(self._edits) if self._edits else None
    backend = self.lab.backend
    if self._generate is None:
      sid = backend.new_session()
      try:
        res = backend.step(sid, self.tokens, SamplingParams(), 0, capture=spec, edits=edits)
      finally:
        backend.close_session(sid)
      self.next_token, self.captured = res.token, res.captured
    else:
      self.result = self.lab.generator().generate(prompt_tokens=self.tokens, capture=spec,
                                                  edits=edits, **self._generate)
      self.captured = self.result.captured
    for s in self._saves:
      s._fill(self.captured)


__all__ = ["ALIASES", "Layer", "Layers", "Point", "Saved", "Trace"]
