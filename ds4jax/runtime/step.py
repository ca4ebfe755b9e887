"""The one step algorithm: bring a session's route to a transcript, then sample (design.md §0).

A route is a chain of hops over contiguous layer ranges: first the **local hops** (stages in
this process, each a `StageBatcher` in which the session holds a slot), then optionally the
**remote hops** (workers behind a `Downstream`, bridge/coordinator/remote.py). One process is
a route of local hops only; a coordinator's route is its local hop and then remote hops.

    res = run_step(sess, batchers, transcript, params, step, prefill_chunk=256)

A step:

  1. p = the longest common prefix of the session's timeline and the transcript, at most
     len - 1 (the last token is always computed, so its logits exist), and at most what
     every local slot holds (a pool rebuilt after a failed call holds 0);
  2. the downstream lowers p to what its hops can be brought to (held positions, or cached
     inputs to replay), every hop rewinds to p, and lagging remote hops are rebuilt;
  3. the transcript suffix from p runs in chunks: through the local hops in order on this
     thread (their batchers batch it with other sessions' rows), then into the downstream,
     which pipelines the chunks through the workers;
  4. the stage that owns the head samples: here (`sampling.sample_token`), or on the last
     worker, whose reply the downstream reads.

A failure inside a local hop resets the session (its state may have been donated half-way),
so the next step starts over cleanly; the owner decides what to retry.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Protocol, Sequence

import numpy as np

from ds4jax.wire import protocol
from ds4jax.runtime import sampling as sampling_lib
from ds4jax.runtime.capture import StepCapture
from ds4jax.runtime.edits import Interventions
from ds4jax.runtime.session import RouteSession
from ds4jax.runtime.types import HopTelemetry, StepResult

log = logging.getLogger("ds4jax.step")


@dataclasses.dataclass
class Chunk:
  """Transcript positions pos0 .. pos0+len(tokens)-1 of one step, with their prefix hashes."""

  pos0: int
  tokens: list[int]
  hash_before: int
  hash_after: int
  want: str  # what the final remote hop returns: 'ack' or 'out' (the last chunk)
  result: Any = None  # the final remote hop's reply frame, for the last chunk
  hashes: list[int] | None = None  # the rolling hash after each token


def chunks_of(tokens: Sequence[int], pos0: int, hash0: int, size: int,
              final_want: str = "out") -> list[Chunk]:
  """Splits tokens (starting at pos0, prefix hash hash0) into chunks of at most size."""
  out, h = [], hash0
  for s in range(0, len(tokens), size):
    part = [int(t) for t in tokens[s:s + size]]
    steps = protocol.fnv1a64_steps(part, h)
    out.append(Chunk(pos0 + s, part, h, steps[-1], "ack", hashes=steps))
    h = steps[-1]
  if out:
    out[-1].want = final_want
  return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  """Length of the longest common prefix of two id sequences."""
  n = min(len(a), len(b))
  if n and len(b) >= len(a) and list(b[:n]) == list(a):  # a decode step: one C-level compare
    return n
  if n == 0:
    return 0
  diff = np.nonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))[0]
  return int(diff[0]) if diff.size else n


@dataclasses.dataclass(frozen=True)
class StepRequest:
  """One session's `step`, for `Backend.step_many`."""

  sid: str
  transcript: Sequence[int]
  sampling: Any
  step: int
  top_logprobs: int = 0
  return_logits: bool = False
  capture: Any = None  # a runtime.capture.CaptureSpec
  edits: Any = None  # runtime.edits.Interventions


class Stream(Protocol):
  """One step's chunks on their way through the remote hops."""

  def acquire(self) -> bool:
    """Waits for a window slot; False once a chunk failed (stop submitting)."""

  def submit(self, chunk: Chunk, out_TCD: np.ndarray) -> None:
    """Sends a chunk's activations (the local hops' output [T, C, D]) to the first hop."""

  def fail(self, err: BaseException) -> None:
    """Settles an acquired slot with a local failure and waits for the chunks in flight;
    raises the first error."""

  def finish(self) -> tuple[int, list[tuple[int, float]], np.ndarray | None,
                            list[HopTelemetry]]:
    """Waits for every chunk; (token, logprobs, logits_V | None, telemetry per hop)."""


class Downstream(Protocol):
  """The remote hops of a route, after its local hops."""

  def reach(self, sess: RouteSession, p: int) -> int:
    """The largest p' <= p that every remote hop can be brought to (what it holds, or
    inputs cached for a replay)."""

  def catch_up(self, sess: RouteSession, p: int) -> None:
    """Replays cached inputs through the hops that hold fewer than p positions."""

  def check_capture(self, capture: StepCapture) -> None:
    """Raises CaptureError when a remote hop cannot capture (before any compute)."""

  def check_edits(self, edits: Interventions) -> None:
    """Raises EditError when a remote hop whose layers `edits` name cannot take them."""

  def begin(self, sess: RouteSession, params, step: int, top_logprobs: int,
            return_logits: bool, n_chunks: int, capture: StepCapture | None = None) -> Stream:
    """Starts a pass of n_chunks chunks, the last one sampled by the final hop; with a
    capture, each hop's WORK names what it returns (runtime/capture.py)."""


def run_step(sess: RouteSession, local: Sequence[Any], transcript: list[int], params,
             step: int, *, prefill_chunk: int, top_logprobs: int = 0,
             return_logits: bool = False, downstream: Downstream | None = None,
             progress_every_s: float = 2.0, capture: StepCapture | None = None,
             edits: Interventions | None = None) -> StepResult:
  """One step of `sess` over the route `local` (StageBatchers, in layer order, in whose pools
  `sess.slots` are) + `downstream`; see the module docstring. The caller holds sess.lock and
  has given the session its slots; `transcript` is a checked list of ids. `capture` (one
  per step, kept across its attempts) makes every hop keep the named points of its layers
  for the positions the step computes; None runs exactly the plain step. `edits` (resolved
  interventions) edit the points of the layers they name on the hop that runs them (a remote
  hop gets them once per session, docs/protocol.md §12); a session's state computed under
  other edits is recomputed from position 0."""
  if edits is not None and downstream is not None:
    downstream.check_edits(edits)  # before any compute: the session keeps its state
  p = min(common_prefix(sess.tokens, transcript), len(transcript) - 1)
  p = min([p] + [b.pos(s) for b, s in zip(local, sess.slots)])
  key = None if edits is None else edits.key
  if key != sess.edits_key:  # the cached state was computed under other edits
    p = 0
  sess.edits = edits  # the remote hops read theirs from the session (rebuilds too)
  if downstream is not None:
    p = downstream.reach(sess, p)
  if capture is not None:  # its refusals come before any compute (a rewind computes nothing)
    if downstream is not None:
      downstream.check_capture(capture)
    p = capture.begin(p, len(transcript))
  if p < len(sess.tokens):
    for b, s in zip(local, sess.slots):
      if b.pos(s) > p:
        b.truncate(s, p)
    sess.rewind(p)
  if downstream is not None:
    downstream.catch_up(sess, p)

  suffix = transcript[p:]
  chunks = chunks_of(suffix, p, sess.hashes[p], prefill_chunk)
  stream = None
  if downstream is not None:
    more = {} if capture is None else {"capture": capture}
    stream = downstream.begin(sess, params, step, top_logprobs, return_logits, len(chunks),
                              **more)
  compute_s = [0.0] * len(local)
  t_start = t_log = time.perf_counter()
  out = None
  for c in chunks:
    if stream is not None and not stream.acquire():
      break
    try:
      out = _through_local(local, sess.slots, c, compute_s, capture, edits)
    except BaseException as e:
      sess.reset()  # the local state may have been donated half-way: start over cleanly
      if stream is not None:
        stream.fail(e)
      raise
    sess.append(c.tokens, c.hashes)
    if stream is not None:
      stream.submit(c, out)
    now = time.perf_counter()
    done = c.pos0 + len(c.tokens) - p
    if len(chunks) > 1 and (now - t_log >= progress_every_s or done == len(suffix)):
      log.info("prefill %d/%d tokens (%.0f tok/s)", done, len(suffix),
               done / max(now - t_start, 1e-9))
      t_log = now

  tel = [HopTelemetry(stage=str(b.runner.layers), host="local", compute_s=compute_s[k],
                      n_tokens=len(suffix)) for k, b in enumerate(local)]
  if stream is not None:
    token, logprobs, logits_V, remote_tel = stream.finish()
    return StepResult(token, logprobs, logits_V, tel + remote_tel, len(suffix),
                      None if capture is None else capture.result())
  logits_V = np.asarray(out[-1], np.float32)
  token = sampling_lib.sample_token(logits_V, params, step)
  logprobs = sampling_lib.top_logprobs(logits_V, top_logprobs) if top_logprobs > 0 else []
  return StepResult(token, logprobs, logits_V if return_logits else None, tel, len(suffix),
                    None if capture is None else capture.result())


def _through_local(local, slots, c: Chunk, compute_s: list[float],
                   capture: StepCapture | None = None,
                   edits: Interventions | None = None) -> np.ndarray:
  """Runs a chunk through the local hops in order (each in pieces of at most its runner's
  max_chunk); -> the last hop's output, float32 [T, C, D] or logits [T, V]. With a capture,
  a hop that owns asked layers keeps their points, and the hop with the head adds the logits
  and the lens (runtime/capture.py)."""
  tokens_T = np.asarray(c.tokens, np.int32)
  n = tokens_T.shape[0]
  x = None
  for k, (b, slot) in enumerate(zip(local, slots)):
    t0 = time.perf_counter()
    size = b.runner.max_chunk
    want = None
    if capture is not None and len(capture.rows(c.pos0, n)):
      want = capture.want(b.runner.layers) or None
    pieces = [(tokens_T[a:a + size], None if x is None else x[a:a + size], c.pos0 + a)
              for a in range(0, n, size)]
    cuts = [None] * len(pieces)
    if edits is not None:
      cuts = [edits.for_chunk(b.runner.layers, pos, len(toks)) or None
              for toks, _, pos in pieces]
    if want is None and not any(cuts):
      outs = [b.run(slot, *piece) for piece in pieces]
    else:
      got = [b.run_capture(slot, *piece, want or (), cut) for piece, cut in zip(pieces, cuts)]
      outs = [o for o, _ in got]
      if want is not None:
        capture.keep(c.pos0, {key: np.concatenate([caps[key] for _, caps in got])
                              for key in got[0][1]})
    x = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)
    if capture is not None and b.runner.has_output:
      capture.head(c.pos0, x, b.runner)
    compute_s[k] += time.perf_counter() - t0
  return x


__all__ = ["Chunk", "Downstream", "StepRequest", "Stream", "chunks_of", "common_prefix",
           "run_step"]
