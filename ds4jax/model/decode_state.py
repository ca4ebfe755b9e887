"""Decode state: explicit pytrees with static shapes (capacity = ctx_size for everything).

Every buffer is indexed by absolute position (or window index), so one-shot prefill, chunked
prefill, single-token decode and rewind all share one layout: a chunk at `pos0` writes its
rows at `pos0..pos0+T-1`, and `truncate(pos)` only moves the counter. Rows at or past `pos`
are masked by the counter and rewritten before they are read as valid.

Buffers carry slack so that a padded chunk of up to `max_chunk` rows never makes
`dynamic_update_slice` clamp its start index (clamping would silently overwrite valid rows).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from ds4jax.config import LayerRange, ModelConfig


@struct.dataclass
class LayerState:
  """Per-layer caches. Row/entry layouts (P = max_chunk slack, m = ratio, c = 2 iff m == 4):

  kv:       [W + S + P, H]        raw K=V rows; row W + p holds position p (rows < W: none).
  comp_a:   [3m + S + P, c*H]     compressor projections a_t; row m + p holds position p.
  comp_g:   [3m + S + P, c*H]     biased gates g_t; rows < m are -inf (no window before 0).
  comp:     [S//m + P//m + 2, H]  compressed entries, entry w at row w.
  idx_a/g:  [12 + S + P, 2*dI]    indexer compressor rows (ratio 4), same layout as comp_a/g.
  idx_keys: [S//4 + P//4 + 2, dI] indexer keys.
  Fields a layer does not use are None.
  """

  kv: jax.Array
  comp_a: jax.Array | None = None
  comp_g: jax.Array | None = None
  comp: jax.Array | None = None
  idx_a: jax.Array | None = None
  idx_g: jax.Array | None = None
  idx_keys: jax.Array | None = None


@struct.dataclass
class StageState:
  """pos: int32 [] tokens processed so far (the next chunk starts here); layers: one per block."""

  pos: jax.Array
  layers: tuple[LayerState, ...]


@dataclasses.dataclass(frozen=True)
class Capacity:
  """Static buffer sizes for a context of `ctx_size` tokens and chunks of <= `max_chunk` rows."""

  ctx_size: int
  max_chunk: int

  def kv_rows(self, cfg: ModelConfig) -> int:
    return cfg.window + self.ctx_size + self.max_chunk

  def comp_rows(self, m: int) -> int:
    return 3 * m + self.ctx_size + self.max_chunk

  def entries(self, m: int) -> int:
    return self.ctx_size // m + self.max_chunk // m + 2


def _compressor_rows(m: int, width: int, cap: Capacity, dtype):
  c = 2 if m == 4 else 1
  a = jnp.zeros((cap.comp_rows(m), c * width), dtype)
  g = jnp.zeros((cap.comp_rows(m), c * width), dtype).at[:m].set(-jnp.inf)
  e = jnp.zeros((cap.entries(m), width), dtype)
  return a, g, e


def init_layer_state(cfg: ModelConfig, il: int, cap: Capacity, dtype=jnp.float32) -> LayerState:
  kv = jnp.zeros((cap.kv_rows(cfg), cfg.head_dim), dtype)
  m = cfg.ratio(il)
  if m == 0:
    return LayerState(kv=kv)
  a, g, e = _compressor_rows(m, cfg.head_dim, cap, dtype)
  if not cfg.has_indexer(il):
    return LayerState(kv=kv, comp_a=a, comp_g=g, comp=e)
  ia, ig, ik = _compressor_rows(4, cfg.index_head_dim, cap, dtype)
  return LayerState(kv=kv, comp_a=a, comp_g=g, comp=e, idx_a=ia, idx_g=ig, idx_keys=ik)


def init_stage_state(cfg: ModelConfig, layers: LayerRange, cap: Capacity,
                     dtype=jnp.float32) -> StageState:
  return StageState(
      pos=jnp.zeros((), jnp.int32),
      layers=tuple(init_layer_state(cfg, il, cap, dtype) for il in layers.layers()))


def truncate(state: StageState, pos: int) -> StageState:
  """Rewinds to `pos` tokens: only the counter moves (see the module docstring)."""
  return state.replace(pos=jnp.asarray(pos, jnp.int32))
