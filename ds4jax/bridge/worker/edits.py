"""A WORK frame's interventions (docs/protocol.md §12): the session's edits of this stage's
layers, sent in full once and then named by key, checked before any compute.

    ed, rest = parse(worker, header, rest)   # (None, rest) when the frame carries none
    bind(worker, session, ed)                # the session computes under them from now on
"""

from __future__ import annotations

import dataclasses

from ds4jax.runtime.edits import EditError, Interventions
from ds4jax.wire import tensors
from ds4jax.wire.errors import PrefixMismatch, ProtocolError
from ds4jax.wire.protocol import field


@dataclasses.dataclass(frozen=True)
class WorkEdits:
  key: str  # the coordinator's key for the session's edits
  edits: Interventions | None  # resolved; None: the frame names them by key only


def parse(worker, h: dict, rest) -> tuple[WorkEdits | None, memoryview]:
  """The frame's `ed` field and the payload without its values (they end the payload):
  edits of this stage's layers only, resolved against the model (ProtocolError else)."""
  rest = memoryview(rest)
  ed = field(h, "ed", dict, default=None)
  if ed is None:
    return None, rest
  key = field(ed, "k", str)
  if not 0 < len(key) <= 64:
    raise ProtocolError("an edits key must be 1..64 characters")
  if "e" not in ed:
    if "v" in ed:
      raise ProtocolError("edit values without edits")
    return WorkEdits(key, None), rest
  descs = field(ed, "v", list)
  size = sum(tensors.check_desc({"dtype": "f32", "shape": d[1]})[2] for d in descs
             if isinstance(d, list) and len(d) == 2)
  if size > len(rest):
    raise ProtocolError(f"edit values need {size} bytes, the payload has {len(rest)}")
  values = tensors.decode_named(descs, rest[len(rest) - size:])
  try:
    iv = Interventions.from_wire(field(ed, "e", list), values).resolve(worker.runner.cfg)
  except EditError as e:
    raise ProtocolError(f"bad edits: {e}") from None
  if not all(worker.layers.start <= il <= worker.layers.end for il in iv.layers):
    raise ProtocolError(f"edits name layers outside this stage's range {worker.layers}")
  return WorkEdits(key, iv), rest[:len(rest) - size]


def bind(worker, s, ed: WorkEdits | None) -> None:
  """Sets the edits session `s` computes under (prepared, busy): the frame's, none without
  `ed`, or the ones it holds under `ed.key`; a key it does not hold (evicted, restarted) is a
  PrefixMismatch, and the coordinator sends them again."""
  if ed is None or ed.edits is not None:
    s.edits, s.edits_key = (None, None) if ed is None else (ed.edits, ed.key)
  elif s.edits_key != ed.key:
    worker.sessions.drop(s.sid)
    raise PrefixMismatch(f"session {s.sid} does not hold the edits {ed.key[:8]} here "
                         "(evicted, or this worker restarted)")


__all__ = ["WorkEdits", "bind", "parse"]
