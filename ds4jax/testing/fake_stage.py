"""A tiny deterministic numpy stage with the `StageRunner` API, for bridge tests.

Each layer keeps a running per-position state, so a layer's output at position p depends on
every earlier token: a missed rewind, a stale KV or a wrong prefix shows up as different
logits. Tokens are processed one at a time in float32, so the output is bit-identical however
a sequence is chunked or split across stages. Its dims (`FakeConfig`), the pool API and the
zero-compute `EchoRunner` come from `ds4jax.bench.echo`, where the bridge benchmark uses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import numpy as np

from ds4jax.bench.echo import EchoConfig as FakeConfig, EchoRunner, EchoState, PoolAPI
from ds4jax.config import LayerRange


@dataclasses.dataclass
class FakeState:
  pos: int
  mem_LSCD: np.ndarray  # per local layer, per position, the running state


def _weights(cfg: FakeConfig, tag: str, shape) -> np.ndarray:
  seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}/{tag}".encode()).digest()[:8], "little")
  return (np.random.default_rng(seed).standard_normal(shape) * 0.5).astype(np.float32)


class FakeRunner(PoolAPI):
  """forward(state, tokens_T, hc_TCD | None, pos0) -> (hc_TCD or logits_TV, state), plus the
  pool API (`PoolAPI`)."""

  def __init__(self, cfg: FakeConfig, layers: LayerRange, ctx_size: int = 64,
               delay_s: float = 0.0):
    self.cfg = cfg
    self.layers = layers.resolve(cfg.n_layers) if layers.end < 0 else layers
    self.ctx_size = ctx_size
    self.fingerprint = cfg.fingerprint()
    self.delay_s = delay_s  # per forward call: makes pipelining measurable in tests
    self.embeds = self.layers.embeds
    self.batch_calls: list[int] = []
    C, D = cfg.n_hc, cfg.d_model
    self.embed_VCD = _weights(cfg, "embed", (cfg.vocab_size, C, D))
    self.w = {il: _weights(cfg, f"blk{il}", (D, D)) for il in self.layers.layers()}
    self.head_VF = _weights(cfg, "head", (cfg.vocab_size, C * D))

  def init_state(self) -> FakeState:
    n = self.layers.n_layers
    return FakeState(0, np.zeros((n, self.ctx_size, self.cfg.n_hc, self.cfg.d_model), np.float32))

  def truncate(self, state: FakeState, pos: int) -> FakeState:
    if not 0 <= pos <= state.pos:
      raise ValueError(f"cannot truncate a state at {state.pos} to {pos}")
    return FakeState(pos, state.mem_LSCD)

  def forward(self, state: FakeState, tokens_T, hc_TCD, pos0: int):
    if self.delay_s:
      time.sleep(self.delay_s)
    return self._row(state, tokens_T, hc_TCD, pos0)

  def _row(self, state: FakeState, tokens_T, hc_TCD, pos0: int):
    tokens_T = np.asarray(tokens_T, np.int32)
    T = tokens_T.shape[0]
    if pos0 != state.pos:
      raise ValueError(f"pos0={pos0} != state.pos={state.pos}")
    if pos0 + T > self.ctx_size:
      raise ValueError(f"positions {pos0}..{pos0 + T} exceed ctx {self.ctx_size}")
    if (hc_TCD is None) != self.layers.embeds:
      raise ValueError("hc_TCD must be None exactly when the stage embeds")
    mem = state.mem_LSCD.copy()
    outs = []
    for t in range(T):
      p = pos0 + t
      x_CD = self.embed_VCD[tokens_T[t]] if hc_TCD is None else np.asarray(hc_TCD[t], np.float32)
      for j, il in enumerate(self.layers.layers()):
        prev_CD = mem[j, p - 1] if p > 0 else np.zeros_like(x_CD)
        m_CD = (np.float32(0.5) * prev_CD + x_CD).astype(np.float32)
        mem[j, p] = m_CD
        x_CD = np.tanh(m_CD @ self.w[il]).astype(np.float32)
      if self.layers.has_output:
        outs.append((self.head_VF @ x_CD.reshape(-1)).astype(np.float32))
      else:
        outs.append(x_CD)
    return np.stack(outs), FakeState(pos0 + T, mem)


def full_logits(cfg: FakeConfig, tokens) -> np.ndarray:
  """One-process reference: logits [T, V] for every position of `tokens`."""
  r = FakeRunner(cfg, LayerRange(0, cfg.n_layers - 1, True), ctx_size=max(len(tokens), 1))
  out, _ = r.forward(r.init_state(), tokens, None, 0)
  return out


__all__ = ["EchoRunner", "EchoState", "FakeConfig", "FakeRunner", "FakeState", "full_logits"]
