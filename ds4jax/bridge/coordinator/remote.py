"""The remote hops of a coordinator's route: the `Downstream` of `runtime.step.run_step`.

For each session the coordinator knows how many positions of its timeline every worker holds
(`sess.held`, by worker id) and caches the activations that entered each hop (its inputs, from
position 0). So a step can:

  - `reach`: lower p to what every hop can be brought to: what it holds, or what its cached
    inputs cover (a rewind is cheap everywhere: the worker truncates on the next WORK);
  - `catch_up`: rebuild a hop that holds less (a replacement, or a worker that lost the
    session) by replaying its cached inputs through that stage only;
  - `begin`: stream the step's chunks through the hops, pipelined (`pipeline.Pass`); the final
    hop samples the last position and returns the token.

A session's interventions (`sess.edits`) reach each hop whose layers they name in its WORK
frames: in full until the hop has answered one (`sess.hop_edits`), then by key only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from ds4jax.bridge.coordinator.pipeline import Pass
from ds4jax.wire import protocol, tensors
from ds4jax.wire.errors import LinkLost, ProtocolError
from ds4jax.runtime.capture import CaptureError
from ds4jax.runtime.edits import EditError
from ds4jax.runtime.session import RouteSession
from ds4jax.runtime.step import Chunk
from ds4jax.runtime.types import HopTelemetry


class RemoteHops:
  """The worker links after the coordinator's stage, for one step (see the module docstring).

  Args:
    hops: the route's worker links, in layer order.
    vocab_size: to check the final hop's token.
    window: most chunks in flight.
    event: a sink for what a user should see (rebuilds).
  """

  def __init__(self, hops: Sequence[Any], *, vocab_size: int, window: int,
               event: Callable[[str], None]):
    self.hops = list(hops)
    self.vocab_size = vocab_size
    self.window = window
    self.event = event

  def _dtype(self, sess: RouteSession) -> str:
    return sess.dtype if all(sess.dtype in h.dtypes for h in self.hops) else "f32"

  def reach(self, sess: RouteSession, p: int) -> int:
    changed = True
    while changed:  # lower p until every lagging hop can be caught up from cached inputs
      changed = False
      for hop in self.hops:
        h = min(sess.held.get(hop.wid, 0), p)
        if h < p:
          c = sess.cache_len(hop.layers.start)
          if c < p and max(h, c) < p:
            p, changed = max(h, c), True
    return p

  def catch_up(self, sess: RouteSession, p: int) -> None:
    for hop in self.hops:
      h = min(sess.held.get(hop.wid, 0), p)
      if h < p:
        self._rebuild(sess, hop, h, p)

  def check_capture(self, capture) -> None:
    """A capture needs every hop to know the WORK `cap` field (HELLO caps "capture")."""
    old = [hop for hop in self.hops if "capture" not in hop.hello.get("caps", ())]
    if old:
      raise CaptureError(f"{old[0]!r} cannot capture (its worker predates capture)")

  def check_edits(self, edits) -> None:
    """Edits of a hop's layers need its worker to know the WORK `ed` field (HELLO caps
    "edits"): an older worker would ignore them."""
    old = [hop for hop in self.hops if edits.touches(hop.layers)
           and "edits" not in hop.hello.get("caps", ())]
    if old:
      raise EditError(f"{old[0]!r} cannot take interventions (its worker predates them)")

  def begin(self, sess: RouteSession, params, step: int, top_logprobs: int,
            return_logits: bool, n_chunks: int, capture=None) -> "_Stream":
    extra = _sampling_fields(params, step, top_logprobs, return_logits)
    return _Stream(self, sess, extra, return_logits, direct=n_chunks == 1, capture=capture)

  def _done(self, sess: RouteSession, hops, i: int, c: Chunk, f: protocol.Frame) -> None:
    sess.held[hops[i].wid] = c.pos0 + len(c.tokens)
    if sess.edits is not None and sess.edits.touches(hops[i].layers):
      sess.hop_edits[hops[i].wid] = sess.edits.key  # its worker holds them: send the key only
    if i + 1 < len(hops) and f.header.get("kind") == "hidden":
      sess.cache_add(hops[i + 1].layers.start, c.pos0, f.header["x"], f.payload)

  def _rebuild(self, sess: RouteSession, hop, lo: int, hi: int) -> None:
    """Replays positions [lo, hi) of the session through `hop` only, from cached inputs."""
    ps = Pass(sess.sid, [hop], window=self.window, extra={}, out_dtype=self._dtype(sess),
              on_done=lambda i, c, f: self._done(sess, [hop], i, c, f),
              edits=lambda h: edits_field(sess, h))
    for pos0, desc, data in sess.cache_span(hop.layers.start, lo, hi):
      n = desc["shape"][0]
      c = Chunk(pos0, sess.tokens[pos0:pos0 + n], sess.hashes[pos0], sess.hashes[pos0 + n], "ack")
      if not ps.acquire():
        break
      ps.submit(c, desc, data)
    ps.wait()
    self.event(f"session {sess.sid}: rebuilt the KV of {hop!r} by replaying positions "
               f"{lo}..{hi} through that stage only")


@dataclasses.dataclass
class _Stream:
  """One step's chunks through the hops (runtime.step.Stream)."""

  remote: RemoteHops
  sess: RouteSession
  extra: dict[str, Any]
  return_logits: bool
  direct: bool
  capture: Any = None

  def __post_init__(self):
    r, sess = self.remote, self.sess
    self.dtype = r._dtype(sess)
    self.last: Chunk | None = None
    self.ps = Pass(sess.sid, r.hops, window=r.window, extra=self.extra, out_dtype=self.dtype,
                   on_done=lambda i, c, f: r._done(sess, r.hops, i, c, f), direct=self.direct,
                   capture=self.capture, edits=lambda hop: edits_field(sess, hop))

  def acquire(self) -> bool:
    return self.ps.acquire()

  def submit(self, chunk: Chunk, out_TCD: np.ndarray) -> None:
    desc, x = tensors.encode(out_TCD, self.dtype)
    self.sess.cache_add(self.remote.hops[0].layers.start, chunk.pos0, desc, x)
    self.last = chunk
    self.ps.submit(chunk, desc, x)

  def fail(self, err: BaseException) -> None:
    self.ps._settle(err)
    self.ps.wait()

  def finish(self):
    self.ps.wait()
    hops = self.remote.hops
    f = self.last.result
    try:
      token, logprobs, logits_V = _final_reply(f, self.remote.vocab_size, self.return_logits)
    except ProtocolError as e:  # a peer that breaks the protocol is dropped; recover
      err = LinkLost(f"{hops[-1]}: {e}")
      hops[-1].fail(err)
      raise err from None
    tel = [HopTelemetry(str(hop.layers), hop.peer, st.compute_s, st.queue_s, st.bytes_in,
                        st.bytes_out, st.n_tokens) for hop, st in zip(hops, self.ps.stats)]
    return token, logprobs, logits_V, tel


def edits_field(sess: RouteSession, hop) -> tuple[dict[str, Any], bytes] | None:
  """The WORK `ed` field for `hop` (docs/protocol.md §12) and its payload tail: None when the
  session's edits name none of its layers; the key alone once its worker holds them; else
  the key, the edits and their values."""
  edits = sess.edits
  if edits is None or not edits.touches(hop.layers):
    return None
  if sess.hop_edits.get(hop.wid) == edits.key:
    return {"k": edits.key}, b""
  items, values = edits.to_wire(hop.layers)
  descs, data = tensors.encode_named(values)
  return {"k": edits.key, "e": items, "v": descs}, data


def _sampling_fields(sampling, step: int, top_logprobs: int, return_logits: bool,
                     ) -> dict[str, Any]:
  """The final hop's sampling fields, each omitted when equal to its default (the worker
  fills defaults back): greedy decoding adds no bytes to a decode token's WORK."""
  out: dict[str, Any] = {}
  s = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling)
       if getattr(sampling, f.name) != f.default}
  if s:
    out["s"] = s
  if step:
    out["st"] = int(step)
  if top_logprobs:
    out["k"] = int(top_logprobs)
  if return_logits:
    out["rl"] = True
  return out


def _final_reply(f, vocab_size: int, return_logits: bool):
  """(token, logprobs, logits_V | None) of the final hop's reply, every field checked."""
  h = f.header
  if h.get("kind", "token") != "token":  # absent: a token (protocol v2 default)
    raise ProtocolError(f"the final hop returned {h.get('kind')!r}, not a token")
  token = protocol.field(h, "token", int, lo=0, hi=vocab_size - 1)
  raw = protocol.field(h, "logprobs", list, default=[])
  if not all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int  # noqa: E721
             and 0 <= p[0] < vocab_size and isinstance(p[1], (int, float))
             and not isinstance(p[1], bool) for p in raw):
    raise ProtocolError("the final hop returned malformed logprobs")
  logits_V = tensors.decode(h.get("logits"), f.payload) if return_logits else None
  return token, [(p[0], float(p[1])) for p in raw], logits_V


__all__ = ["RemoteHops"]
