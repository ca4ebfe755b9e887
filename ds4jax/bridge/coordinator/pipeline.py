"""One pipelined pass of token chunks through a chain of worker links.

The coordinator relays: hop i's RESULT (activations, still encoded) is forwarded as hop i+1's
WORK from hop i's reader thread, so while hop 2 computes chunk c, hop 1 computes chunk c+1 and
the coordinator computes c+2. At most `window` chunks are in flight. The final hop answers
intermediate chunks with an ACK; the last chunk returns the sampled token (or activations).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Sequence

from ds4jax.bridge.coordinator import links
from ds4jax.wire import protocol, tensors
from ds4jax.wire.errors import BridgeError, LinkLost, ProtocolError
from ds4jax.bridge.coordinator.links import WorkerLink
from ds4jax.runtime.step import Chunk


@dataclasses.dataclass
class HopStats:
  compute_s: float = 0.0
  queue_s: float = 0.0
  bytes_in: int = 0  # bytes the coordinator sent to the hop
  bytes_out: int = 0  # bytes the hop sent back
  n_tokens: int = 0


class Pass:
  """Runs chunks through `hops` in order. Not reusable.

  Args:
    sid: session id.
    hops: the chain (a suffix of the route, or a single hop for a KV rebuild).
    window: max chunks in flight.
    extra: header fields for the final hop's 'out' request (sampling, step, ...).
    out_dtype: wire dtype for activations between hops.
    on_done(i, chunk, frame): called when hop i finished a chunk (before relaying).
    direct: the pass is one chunk (a decode token): `wait` reads the replies on the calling
      thread (links.claim_all), relaying between hops there too, instead of waking up for
      each reader thread's callback. Falls back to the reader threads when another stepper
      reads one of the links.
    capture: the step's `runtime.capture.StepCapture`: each hop's WORK names what it
      returns (`cap`), and the arrays after a reply's tensor go to it, not to the next hop.
    edits(hop) -> (the WORK `ed` field, its payload tail) | None: the session's
      interventions for that hop (remote.edits_field), docs/protocol.md §12.
  """

  def __init__(self, sid: str, hops: Sequence[WorkerLink], *, window: int,
               extra: dict[str, Any], out_dtype: str,
               on_done: Callable[[int, Chunk, protocol.Frame], None], direct: bool = False,
               capture=None, edits: Callable[[WorkerLink], Any] | None = None):
    self.capture = capture
    self.edits = edits
    self.sid = sid
    self.hops = list(hops)
    self.window = max(1, window)
    self.extra = extra
    self.out_dtype = out_dtype
    self.on_done = on_done
    self.stats = [HopStats() for _ in self.hops]
    self.error: BaseException | None = None
    self._cv = threading.Condition()
    self._in_flight = 0
    self._direct = direct
    self._claimed: list[WorkerLink] | None = None

  # ------------------------------------------------------------------------------ driving
  def acquire(self) -> bool:
    """Waits for a window slot; False once any chunk has failed (stop submitting)."""
    with self._cv:
      while self._in_flight >= self.window and self.error is None:
        self._cv.wait()
      if self.error is not None:
        return False
      self._in_flight += 1
      return True

  def submit(self, chunk: Chunk, desc: dict[str, Any] | None, x: bytes) -> None:
    """Sends an acquired chunk to the first hop (desc None: the hop embeds tokens itself)."""
    if self._direct and self._claimed is None:
      # Claimed before the first send: a reply must not wake a reader thread.
      self._claimed = links.claim_all(self.hops) or []
    try:
      self._send(0, chunk, desc, x)
    except BaseException:
      claimed, self._claimed = self._claimed, None
      links.unclaim_all(claimed or [])  # nobody would read these links otherwise
      raise

  def wait(self) -> None:
    """Waits until every submitted chunk settled; raises the first error."""
    claimed, self._claimed = self._claimed, None
    if claimed:
      try:
        links.read_until(claimed, lambda: not self._in_flight)
      finally:
        links.unclaim_all(claimed)
    with self._cv:
      while self._in_flight:
        self._cv.wait()
    if self.error is not None:
      raise self.error

  # ------------------------------------------------------------------------------ internals
  def _settle(self, err: BaseException | None) -> None:
    with self._cv:
      self._in_flight -= 1
      if err is not None and self.error is None:
        self.error = err
      self._cv.notify_all()

  def _send(self, i: int, chunk: Chunk, desc, x) -> None:
    hop = self.hops[i]
    last = i == len(self.hops) - 1
    # Short keys (protocol.py documents them): this header rides on every decode token.
    h: dict[str, Any] = {
        "sid": self.sid, "p": chunk.pos0, "n": len(chunk.tokens),
        "hb": protocol.hash_hex(chunk.hash_before), "ha": protocol.hash_hex(chunk.hash_after),
        "L": str(hop.layers),
    }
    if last and chunk.want != "out":
      h["w"] = chunk.want  # absent: "out"
    if self.out_dtype != "f32":
      h["od"] = self.out_dtype
    if desc is not None:
      h["x"] = desc["dtype"]  # the shape is implied: [n, n_hc, d_model] (the worker checks)
    if last and chunk.want == "out":
      h.update(self.extra)
    payload = protocol.tokens_to_bytes(chunk.tokens) + bytes(x)
    if self.capture is not None:
      cap, lens_in = self.capture.remote_request(hop.layers, chunk.pos0, len(chunk.tokens))
      if cap is not None:
        h["cap"] = cap
        payload += lens_in
    ed = None if self.edits is None else self.edits(hop)
    if ed is not None:  # its values end the payload
      h["ed"] = ed[0]
      payload += ed[1]
    try:
      self.stats[i].bytes_in += hop.request(h, payload,
                                            lambda f, e: self._on_reply(i, chunk, f, e))
    except BridgeError as e:
      self._settle(e)

  def _on_reply(self, i: int, chunk: Chunk, f: protocol.Frame | None, err) -> None:
    if err is not None:
      self._settle(err)
      return
    hop = self.hops[i]
    h = f.header
    try:
      if h.get("ha") != protocol.hash_hex(chunk.hash_after):
        raise ProtocolError(f"{hop} returned prefix hash {h.get('ha')!r}, expected "
                            f"{protocol.hash_hex(chunk.hash_after)}")
      last = i == len(self.hops) - 1
      if not last:  # checked before on_done caches the activations
        if h.get("kind") != "hidden":
          raise ProtocolError(f"{hop} returned {h.get('kind')!r} where activations were "
                              "expected")
        desc = h.get("x")
        tensors.check_desc(desc)
      st = self.stats[i]
      st.bytes_out += f.nbytes
      st.n_tokens += len(chunk.tokens)
      compute_s, queue_s = _telemetry(h)
      st.compute_s += compute_s
      st.queue_s += queue_s
      if "cap" in h:
        f = self._captured(chunk, f)
      self.on_done(i, chunk, f)
      if last:
        chunk.result = f
        self._settle(None)
        return
    except ProtocolError as e:
      err = LinkLost(f"{hop}: {e}")  # a peer that breaks the protocol is dropped; recover
      hop.fail(err)
      self._settle(err)
      return
    except Exception as e:
      self._settle(e)
      return
    self._send(i + 1, chunk, desc, f.payload)


  def _captured(self, chunk: Chunk, f: protocol.Frame) -> protocol.Frame:
    """Hands a reply's captured arrays (after its tensor) to the capture; -> the frame with
    the tensor only (what is relayed and cached)."""
    h = f.header
    if self.capture is None:
      raise ProtocolError("the hop returned captured arrays nobody asked for")
    main = 0
    if h.get("kind") == "hidden":
      main = tensors.check_desc(h.get("x"))[2]
    elif "logits" in h:
      main = tensors.check_desc(h.get("logits"))[2]
    buf = memoryview(f.payload)
    if main > len(buf):
      raise ProtocolError("the reply's payload is shorter than its tensor")
    try:
      self.capture.store(chunk.pos0, len(chunk.tokens), tensors.decode_named(h["cap"], buf[main:]))
    except ValueError as e:  # a bad name or shape
      raise ProtocolError(str(e)) from None
    return dataclasses.replace(f, payload=buf[:main])


def _telemetry(h: dict[str, Any]) -> tuple[float, float]:
  """(compute_s, queue_s) from a reply's "t": [compute_us, queue_us]; ProtocolError if
  malformed (absent: zeros)."""
  tel = h.get("t", [0, 0])
  if (not isinstance(tel, list) or len(tel) != 2
      or not all(type(v) is int and 0 <= v < 1 << 48 for v in tel)):  # noqa: E721
    raise ProtocolError("malformed telemetry")
  return tel[0] * 1e-6, tel[1] * 1e-6
