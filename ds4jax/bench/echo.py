"""A zero-compute stage with the `StageRunner` API, for timing the bridge alone
(`ds4jax.bench.probe`), and the pooled-session API that numpy stages share.

`EchoRunner`'s activations are a constant array and its logits walk the vocabulary, so every
microsecond of a decode step through echo workers is the bridge's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import numpy as np

from ds4jax.config import LayerRange


@dataclasses.dataclass(frozen=True)
class EchoConfig:
  """The dims of a numpy stage (echo or fake): the model a worker says it holds."""

  n_layers: int = 4
  d_model: int = 8
  n_hc: int = 2
  vocab_size: int = 40
  seed: int = 0

  def fingerprint(self) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


class PoolAPI:
  """The pooled-session API of `StageRunner` (docs/design.md §11) over per-slot states: a
  pool is a list of n_slots + 1 states (the last is scratch), and `forward_batch` runs each
  row as `forward` would, paying `delay_s` once per call (so a batch of B rows costs what one
  row does, as a decode step does on the real model). `batch_calls` records the rows of
  every call."""

  max_chunk = 256
  max_batch = 16

  def init_pool(self, n_slots: int) -> list:
    return [self.init_state() for _ in range(int(n_slots) + 1)]

  def pool_get(self, pool: list, slot: int):
    return pool[slot]

  def pool_put(self, pool: list, slot: int, state) -> list:
    pool[slot] = state
    return pool

  def pool_truncate(self, pool: list, slot: int, pos: int) -> list:
    pool[slot] = dataclasses.replace(pool[slot], pos=int(pos))  # only the counter moves
    return pool

  def forward_batch(self, pool: list, slots_B, tokens_BT, hc_BTCD, n_valid_B):
    """tokens_BT: int [B, T]; hc_BTCD: f32 [B, T, C, D] or None; n_valid_B: int [B].
    Returns (out [B, T, V] or [B, T, C, D] (rows past n_valid are zeros), pool)."""
    tokens_BT = np.asarray(tokens_BT, np.int32)
    b, t = tokens_BT.shape
    if b > self.max_batch or len(set(int(s) for s in slots_B)) != b:
      raise ValueError(f"bad batch: {b} rows, slots {list(slots_B)}")
    self.batch_calls.append(b)
    if self.delay_s:
      time.sleep(self.delay_s)
    outs = []
    for r, slot in enumerate(slots_B):
      n = int(n_valid_B[r])
      hc = None if hc_BTCD is None else np.asarray(hc_BTCD, np.float32)[r, :n]
      out, pool[slot] = self._row(pool[slot], tokens_BT[r, :n], hc, pool[slot].pos)
      pad = np.zeros((t,) + out.shape[1:], np.float32)
      pad[:n] = out
      outs.append(pad)
    return np.stack(outs), pool


@dataclasses.dataclass
class EchoState:
  pos: int


class EchoRunner(PoolAPI):
  """A zero-compute stage with the `StageRunner` API, for timing the bridge alone.

  Activations are a constant [T, C, D] array; the head's logits row puts its maximum on
  token `(pos0 + t + 1) % V`, so greedy decoding walks the vocabulary deterministically and
  a split run can be checked against `EchoRunner.greedy_next`.
  """

  def __init__(self, cfg: EchoConfig, layers: LayerRange, ctx_size: int = 4096):
    self.cfg = cfg
    self.layers = layers.resolve(cfg.n_layers) if layers.end < 0 else layers
    self.ctx_size = ctx_size
    self.fingerprint = cfg.fingerprint()
    self._hc_CD = np.zeros((cfg.n_hc, cfg.d_model), np.float32)
    self.embeds = self.layers.embeds
    self.delay_s = 0.0
    self.batch_calls: list[int] = []

  def init_state(self) -> EchoState:
    return EchoState(0)

  def truncate(self, state: EchoState, pos: int) -> EchoState:
    if not 0 <= pos <= state.pos:
      raise ValueError(f"cannot truncate a state at {state.pos} to {pos}")
    return EchoState(pos)

  @staticmethod
  def greedy_next(cfg: EchoConfig, n_tokens: int) -> int:
    return n_tokens % cfg.vocab_size

  def forward(self, state: EchoState, tokens_T, hc_TCD, pos0: int):
    return self._row(state, tokens_T, hc_TCD, pos0)

  def _row(self, state: EchoState, tokens_T, hc_TCD, pos0: int):
    T = len(tokens_T)
    if pos0 != state.pos:
      raise ValueError(f"pos0={pos0} != state.pos={state.pos}")
    if (hc_TCD is None) != self.layers.embeds:
      raise ValueError("hc_TCD must be None exactly when the stage embeds")
    if self.layers.has_output:
      logits_TV = np.zeros((T, self.cfg.vocab_size), np.float32)
      logits_TV[np.arange(T), (pos0 + np.arange(T) + 1) % self.cfg.vocab_size] = 1.0
      return logits_TV, EchoState(pos0 + T)
    return np.broadcast_to(self._hc_CD, (T, *self._hc_CD.shape)), EchoState(pos0 + T)
