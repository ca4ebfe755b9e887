"""A WORK frame's capture (docs/protocol.md §11): what the coordinator asked this stage to
keep, checked before any compute, and the arrays its RESULT carries after its tensor.

    req = parse(worker, header, n, lens_bytes)      # None when the frame asks nothing
    out, kept = work.compute(worker, slot, tokens, x, pos0, req.want, edits)
    named = pick(worker, out, kept, req)

`cap` = {"n": names to return, "r": chunk rows (absent: all), "li": layers whose hc_out rows
(f32 [R, C, D] each) follow the activations, for the lens on the stage with the head}.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ds4jax.config import STEP_POINTS, point_name, point_shape, split_point_name
from ds4jax.wire.errors import ProtocolError
from ds4jax.wire.protocol import field


@dataclasses.dataclass
class WorkCapture:
  names: list[str]  # returned, in this order
  rows: np.ndarray  # chunk-relative row indices, int64 [R]
  want: frozenset  # (point, layer) pairs the step keeps
  lens_in: dict[int, np.ndarray]  # layer -> hc_out rows f32 [R, C, D] from earlier stages


def parse(worker, h: dict, n: int, lens_bytes) -> WorkCapture | None:
  """The frame's `cap` field, checked against this stage: names of its own layers (lens and
  logits only with the head), rows in [0, n) ascending, lens inputs matching `lens_bytes`
  (the payload after the activations) exactly. None (and no trailing bytes) without one."""
  cap = field(h, "cap", dict, default=None)
  if cap is None:
    if len(lens_bytes):
      raise ProtocolError(f"{len(lens_bytes)} payload bytes follow the activations")
    return None
  layers, cfg = worker.layers, worker.runner.cfg
  names = field(cap, "n", list)
  rows = field(cap, "r", list, default=list(range(n)))
  li = field(cap, "li", list, default=[])
  if not names or len(names) != len(set(map(str, names))):
    raise ProtocolError("capture names must be a non-empty list without repeats")
  if (not all(type(r) is int for r in rows) or not rows  # noqa: E721
      or rows != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= n):
    raise ProtocolError(f"capture rows must ascend within [0, {n})")
  if not all(type(il) is int for il in li) or len(set(li)) != len(li):  # noqa: E721
    raise ProtocolError("lens input layers must be distinct integers")
  want = set()
  for key in names:
    try:
      point, il = split_point_name(str(key))
    except ValueError as e:
      raise ProtocolError(str(e)) from None
    own = il is not None and layers.start <= il <= layers.end
    if point in ("lens", "logits") and not layers.has_output:
      raise ProtocolError(f"{key}: this stage ({layers}) has no output head")
    if point == "lens":
      if il not in li and not own:
        raise ProtocolError(f"{key}: layer {il} is neither this stage's nor a lens input")
      if own:
        want.add(("hc_out", il))
    elif point in STEP_POINTS:
      if not own:
        raise ProtocolError(f"{key}: layer {il} is not in this stage's range {layers}")
      want.add((point, il))
  if any(point_name("lens", il) not in names or layers.start <= il for il in li):
    raise ProtocolError("lens inputs must be earlier layers whose lens is asked")
  row = point_shape(cfg, "hc_out")
  size = len(rows) * int(np.prod(row)) * 4
  if len(lens_bytes) != size * len(li):
    raise ProtocolError(f"lens inputs need {size * len(li)} bytes, got {len(lens_bytes)}")
  buf = memoryview(lens_bytes)
  lens_in = {il: np.frombuffer(buf[k * size:(k + 1) * size], "<f4").astype(np.float32)
             .reshape((len(rows),) + row) for k, il in enumerate(li)}
  return WorkCapture([str(k) for k in names], np.asarray(rows, np.int64), frozenset(want),
                     lens_in)


def pick(worker, out, kept: dict[str, np.ndarray], req: WorkCapture):
  """The arrays `req` names from a computed chunk (`work.compute`'s out [T, ...] and kept
  points [T, ...]) -> [(name, f32 array [R, ...])] in the order of `req.names`."""
  kept = {k: v[req.rows] for k, v in kept.items()}
  named = []
  for key in req.names:
    point, il = split_point_name(key)
    if point == "logits":
      v = out[req.rows]
    elif point == "lens":
      hc = req.lens_in[il] if il in req.lens_in else kept[point_name("hc_out", il)]
      v = worker.runner.head_rows(hc)
    else:
      v = kept[key]
    named.append((key, np.asarray(v, np.float32)))
  return named


__all__ = ["WorkCapture", "parse", "pick"]
