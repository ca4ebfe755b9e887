"""Test doubles for generation: a numpy stage runner whose logits depend on the whole prefix,
and a backend that replays a fixed token script."""

from __future__ import annotations

import dataclasses
import types

import numpy as np

from ds4jax.config import LayerRange
from ds4jax.runtime.types import HopTelemetry, StepResult


@dataclasses.dataclass(frozen=True)
class PrefixState:
  tokens: tuple[int, ...]
  pos: int


class PrefixRunner:
  """`StageRunner` API; the output at position t is a function of tokens[:t+1] only.

  The embedding stage writes (prefix hash, layers done) into hc; every later stage checks both
  against its own KV, so a stale or misaligned state raises instead of silently passing.
  """

  def __init__(self, layers: LayerRange, *, n_layers: int = 4, vocab_size: int = 512,
               ctx_size: int = 64):
    self.layers = layers.resolve(n_layers)
    self.cfg = types.SimpleNamespace(n_layers=n_layers, vocab_size=vocab_size)
    self.ctx_size = ctx_size
    self.fingerprint = None  # no model file behind it
    self.max_chunk, self.max_batch = 256, 16
    self.embeds = self.layers.embeds
    self.calls: list[int] = []
    self.batch_calls: list[int] = []  # rows per forward_batch call

  # The pool API (docs/design.md §11): a pool is a list of states, slot -> PrefixState.
  def init_pool(self, n_slots):
    return [self.init_state() for _ in range(n_slots + 1)]

  def pool_get(self, pool, slot):
    return pool[slot]

  def pool_put(self, pool, slot, state):
    pool[slot] = state
    return pool

  def pool_truncate(self, pool, slot, pos):
    pool[slot] = PrefixState(pool[slot].tokens[:pos], pos)
    return pool

  def forward_batch(self, pool, slots_B, tokens_BT, hc_BTCD, n_valid_B):
    self.batch_calls.append(len(slots_B))
    outs = []
    for b, slot in enumerate(slots_B):
      n = int(n_valid_B[b])
      hc = None if hc_BTCD is None else np.asarray(hc_BTCD)[b, :n]
      out, pool[slot] = self.forward(pool[slot], np.asarray(tokens_BT)[b, :n], hc,
                                     pool[slot].pos)
      pad = np.zeros((np.shape(tokens_BT)[1],) + out.shape[1:], np.float32)
      pad[:n] = out
      outs.append(pad)
    return np.stack(outs), pool

  def init_state(self):
    return PrefixState((), 0)

  def truncate(self, state, pos):
    assert 0 <= pos <= state.pos
    return PrefixState(state.tokens[:pos], pos)

  @staticmethod
  def prefix_hash(tokens) -> float:
    h = 1469598103
    for t in tokens:
      h = ((h ^ int(t)) * 16777619) % (1 << 22)
    return float(h)

  def forward(self, state, tokens_T, hc_TCD, pos0):
    assert pos0 == state.pos, (pos0, state.pos)
    assert (hc_TCD is None) == self.layers.embeds
    tokens_T = [int(t) for t in np.asarray(tokens_T)]
    assert pos0 + len(tokens_T) <= self.ctx_size
    self.calls.append(len(tokens_T))
    toks = state.tokens + tuple(tokens_T)
    out = []
    for t in range(len(tokens_T)):
      h = self.prefix_hash(toks[:pos0 + t + 1])
      if hc_TCD is not None:
        assert hc_TCD[t, 0, 0] == h and hc_TCD[t, 0, 1] == self.layers.start
      if self.layers.has_output:
        out.append(logits_for(h, self.cfg.vocab_size))
      else:
        out.append(np.array([[h, self.layers.end + 1]], np.float32))
    return np.stack(out), PrefixState(toks, pos0 + len(tokens_T))


def logits_for(h: float, vocab_size: int) -> np.ndarray:
  return (np.random.default_rng(int(h)).standard_normal(vocab_size) * 3).astype(np.float32)


def reference_logits(tokens, vocab_size: int = 512) -> np.ndarray:
  """The logits row that follows `tokens`."""
  return logits_for(PrefixRunner.prefix_hash(tokens), vocab_size)


class ScriptBackend:
  """Returns `script[step]` whatever the transcript (records the transcripts it saw)."""

  reports_prefill_progress = False  # the Generator logs prefill progress itself

  def __init__(self, script, ctx_size: int = 1 << 20):
    self.script = list(script)
    self.ctx_size = ctx_size
    self.seen: list[list[int]] = []
    self.open: set[str] = set()
    self._n = 0

  def new_session(self):
    self._n += 1
    self.open.add(f"s{self._n}")
    return f"s{self._n}"

  def close_session(self, sid):
    self.open.discard(sid)

  def step(self, sid, transcript, sampling, step, *, top_logprobs=0, return_logits=False):
    assert sid in self.open
    self.seen.append(list(transcript))
    hop = HopTelemetry(stage="0:output", host="script", compute_s=0.001, n_tokens=1)
    return StepResult(self.script[step], [], None, [hop], 1)

  def route_info(self):
    return {"mode": "script", "complete": True, "stages": []}
