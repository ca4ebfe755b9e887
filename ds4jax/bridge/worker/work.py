"""A worker's WORK frame: validate it, check the session's prefix, compute through the stage's
`StageBatcher`, and build the RESULT (a sampled token at the head, else activations).

    header, payload = run_work(worker, frame, t_recv)

Everything a frame names is checked before any compute (a malformed or hostile frame is a
`ProtocolError`, sent back as ERROR); a session whose state was lost or whose prefix does not
match is a `PrefixMismatch`, which makes the coordinator replay the transcript.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np

from ds4jax.bridge.worker import capture, edits
from ds4jax.wire import protocol, tensors
from ds4jax.wire.errors import PrefixMismatch, ProtocolError
from ds4jax.wire.protocol import field
from ds4jax.runtime.batching import StateLost

log = logging.getLogger("ds4jax.bridge.worker")


def run_work(worker, f: protocol.Frame, t_recv: float) -> tuple[dict[str, Any], bytes]:
  """One WORK frame on `worker` (its runner, batcher, sessions, layers and options) -> the
  RESULT header and payload."""
  t0 = time.monotonic()
  h = f.header
  opt = worker.opt
  req, sid = request_ids(h)
  pos0 = field(h, "p", int, lo=0)
  n = field(h, "n", int, lo=1, hi=opt.ctx)
  if pos0 + n > opt.ctx:
    raise ProtocolError(f"positions {pos0}..{pos0 + n} exceed this worker's ctx {opt.ctx}")
  want = field(h, "w", str, default="out")
  if want not in ("ack", "out"):
    raise ProtocolError(f"unknown want {want!r}")
  layers = field(h, "L", str)
  if layers != str(worker.layers):
    raise ProtocolError(f"this worker serves {worker.layers} but work asks for {layers}")
  hb_ = protocol.parse_hash(h.get("hb"), "hb")
  ha = protocol.parse_hash(h.get("ha"), "ha")
  tokens = protocol.tokens_from_bytes(f.payload, n)
  toks = tokens.tolist()
  if not 0 <= min(toks) <= max(toks) < worker.vocab_size:  # ids >= 2**31 read as negative
    bad = max(toks) if max(toks) >= worker.vocab_size else min(toks) & 0xFFFFFFFF
    raise ProtocolError(f"token id {bad} is outside the vocab [0, {worker.vocab_size})")
  hashes = protocol.fnv1a64_steps(toks, hb_)  # kept for the session: hashed once
  if hashes[-1] != ha:
    raise ProtocolError("work token prefix hash metadata mismatch")
  x = None
  # Interventions (docs/protocol.md §12): their values end the payload.
  ed, rest = edits.parse(worker, h, memoryview(f.payload)[4 * n:])
  if not worker.layers.embeds:
    # WORK names only the wire dtype; the shape is this stage's input shape for n tokens
    # (check_desc checks the dtype, decode the payload length).
    desc = {"dtype": field(h, "x", str),
            "shape": [n, worker.runner.cfg.n_hc, worker.runner.cfg.d_model]}
    nbytes = tensors.check_desc(desc)[2]
    x = tensors.decode(desc, rest[:nbytes] if "cap" in h else rest)
    rest = rest[nbytes:]
  elif "cap" not in h and len(rest):
    raise ProtocolError("an embedding stage takes token ids only")
  # A capture (docs/protocol.md §11) is checked here too; lens inputs follow the activations.
  cap = capture.parse(worker, h, n, rest) if "cap" in h else None
  # The prefix check (and any rewind) happens before computing.
  s, evicted = worker.sessions.prepare(sid, pos0, hb_)
  for old in evicted:
    log.info("evicted session %s (limit %d)", old, worker.sessions.limit)
  edits.bind(worker, s, ed)
  t1 = time.monotonic()
  named = None
  try:
    out, kept = compute(worker, s.slot, tokens, x, pos0, frozenset() if cap is None
                        else cap.want, s.edits)
    if cap is not None:
      named = capture.pick(worker, out, kept, cap)
  except StateLost as e:  # the pool was rebuilt after another call failed
    worker.sessions.drop(sid)
    raise PrefixMismatch(f"session {sid} lost its state on this worker ({e})") from None
  except BaseException:
    worker.sessions.drop(sid)  # the state may be half-updated
    raise
  worker.sessions.commit(s, toks, hashes)
  t2 = time.monotonic()
  res: dict[str, Any] = {"req": req, "sid": sid, "ha": protocol.hash_hex(ha)}
  payload = b""
  if want == "ack":
    res["kind"] = "ack"
  elif worker.layers.has_output:
    res.update(sample_result(out[-1], h))
    if field(h, "rl", bool, default=False):
      res["logits"], payload = tensors.encode(out[-1], "f32")
  else:
    res["kind"] = "hidden"
    res["x"], payload = tensors.encode(out, field(h, "od", str, default="f32"))
  if named is not None:  # the captured arrays follow the reply's tensor
    res["cap"], data = tensors.encode_named(named)
    payload = bytes(payload) + data
  # [compute_us, queue_us]: the coordinator knows the hop, bytes and positions already.
  res["t"] = [round((t2 - t1) * 1e6), max(0, round((t0 - t_recv) * 1e6))]
  return res, payload


def request_ids(h: dict[str, Any]) -> tuple[int, str]:
  """(request id, session id) of a WORK or snapshot frame's header, checked."""
  req = field(h, "req", int, lo=0)
  sid = field(h, "sid", str)
  if not 0 < len(sid) <= 64:
    raise ProtocolError("session id must be 1..64 characters")
  return req, sid


def compute(worker, slot: int, tokens_T: np.ndarray, x_TCD, pos0: int, want=frozenset(),
            edits=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """tokens [T] (+ activations [T, C, D]) through the worker's batcher, in pieces of at most
  the runner's max_chunk, keeping the points `want` ((point, layer) pairs) and applying the
  session's `edits` (runtime.edits.Interventions); -> (float32 [T, V] logits (head) or
  [T, C, D], {"{point}.{layer}": [T, ...]})."""
  step = worker.runner.max_chunk
  outs, kept = [], []
  for a in range(0, tokens_T.shape[0], step):
    toks, xa = tokens_T[a:a + step], None if x_TCD is None else x_TCD[a:a + step]
    cut = None if edits is None else edits.for_chunk(worker.layers, pos0 + a, len(toks))
    if want or cut:
      o, caps = worker.batcher.run_capture(slot, toks, xa, pos0 + a, want, cut or None)
    else:
      o, caps = worker.batcher.run(slot, toks, xa, pos0 + a), {}
    outs.append(o)
    kept.append(caps)
  out = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)
  return out, {k: np.concatenate([caps[k] for caps in kept]) for k in kept[0]}


@functools.cache
def _greedy():
  from ds4jax.runtime import sampling
  return sampling.SamplingParams()


def sample_result(logits_V: np.ndarray, h: dict[str, Any]) -> dict[str, Any]:
  """Samples the head stage's last logits row with the coordinator's parameters."""
  from ds4jax.runtime import sampling  # numpy only; imported lazily to keep bridge light
  s = field(h, "s", dict, default=None)
  try:  # absent: greedy, the default parameters (built once)
    params = _greedy() if s is None else sampling.SamplingParams.from_dict(s)
  except (TypeError, ValueError) as e:  # wrong types from the wire, not a compute error
    raise ProtocolError(f"bad sampling parameters: {e}") from None
  step = field(h, "st", int, default=0, lo=0)
  k = field(h, "k", int, default=0, lo=0, hi=64)
  # "kind" is omitted for a token (its default): a decode reply's common case.
  res: dict[str, Any] = {"token": sampling.sample_token(logits_V, params, step)}
  if k:
    res["logprobs"] = [[i, lp] for i, lp in sampling.top_logprobs(logits_V, k)]
  return res


def pong_stats(batcher) -> list[int]:
  """[forward_batch calls, decode calls, decode rows, largest decode batch] for PONG."""
  if batcher is None:
    return [0, 0, 0, 0]
  st = batcher.stats
  return [st.calls, st.decode_calls, st.decode_rows, st.max_batch_seen]
