"""HELLO validation: accept a worker, or refuse it with the exact reason both sides show."""

from __future__ import annotations

from ds4jax.bridge.wire import protocol
from ds4jax.bridge.wire.protocol import field
from ds4jax.config import LayerRange


def check_hello(f: protocol.Frame, *, fingerprint: str, n_layers: int, local: LayerRange,
                ctx: int) -> tuple[str, LayerRange | None]:
  """('', range) to accept, or (reason, None). Field types are checked (ProtocolError)."""
  h = f.header
  version = h.get("protocol", f.version)
  if version != protocol.PROTOCOL_VERSION or f.version != protocol.PROTOCOL_VERSION:
    return (f"protocol version {version} is not supported (this coordinator speaks "
            f"{protocol.PROTOCOL_VERSION})"), None
  fp = field(h, "fingerprint", str)
  if fp != fingerprint:
    return (f"model mismatch: worker fingerprint {fp[:16]} != coordinator "
            f"{str(fingerprint)[:16]} (a different GGUF)"), None
  n = field(h, "n_layers", int)
  if n != n_layers:
    return f"model mismatch: worker has {n} layers, coordinator {n_layers}", None
  start, end = field(h, "start", int, lo=0), field(h, "end", int)
  has_output = field(h, "has_output", bool)
  last = n_layers - 1
  desc = f"{start}:{'output' if has_output else end}"
  if start > last:
    return f"layer range {desc} starts past the final model layer {last}", None
  if end > last:
    return f"layer range {desc} ends past the final model layer {last}", None
  if end < start:
    return f"layer range {desc} ends before it starts", None
  if has_output and end != last:
    return f"layer range {desc} owns the output head but not the last layer {last}", None
  if start <= local.end:
    return f"layer range {desc} overlaps the coordinator's layers {local}", None
  wctx = field(h, "ctx", int, lo=0)
  if wctx < ctx:
    return f"worker context too small: worker={wctx} coordinator={ctx}", None
  field(h, "max_sessions", int, default=0, lo=0)  # the worker's session slots (residency)
  dtypes = field(h, "dtypes", list)
  if "f32" not in dtypes:
    return "worker does not support f32 activations", None
  return "", LayerRange(start, end, has_output)
