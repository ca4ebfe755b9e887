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


# ------------------------------------------------------------------------------ state pools
# A pool (docs/design.md §11) is a StageState whose leaves carry a leading slot axis:
# pos int32 [S], every buffer [S, rows, X]. Slot S - 1 is scratch: the padding rows of a
# bucketed batch read and write there, so they never touch a session's slot.


def init_pool(cfg: ModelConfig, layers: LayerRange, cap: Capacity, n_slots: int,
              dtype=jnp.float32) -> StageState:
  """A pool of `n_slots` fresh states plus the scratch slot (all at pos 0)."""
  one = init_stage_state(cfg, layers, cap, dtype)
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n_slots + 1,) + x.shape), one)


def pool_get(pool: StageState, slot) -> StageState:
  """The StageState of one slot (a copy)."""
  return jax.tree.map(lambda x: x[slot], pool)


def pool_put(pool: StageState, slot, state: StageState) -> StageState:
  """The pool with `state` written into `slot`."""
  return jax.tree.map(lambda p, x: p.at[slot].set(x.astype(p.dtype)), pool, state)


@dataclasses.dataclass(frozen=True)
class SlotView:
  """One slot of a pooled buffer `pool [S, rows, X]`, read through gathers: under `vmap` over
  the slot, `read_rows` gathers only the rows asked for (the buffer is never copied)."""

  pool: jax.Array
  slot: jax.Array

  @property
  def dtype(self):
    return self.pool.dtype

  @property
  def shape(self):
    return self.pool.shape[1:]


def slot_view(pool: LayerState, slot) -> LayerState:
  """A LayerState whose buffers are the `SlotView`s of `slot` in a pooled LayerState."""
  return LayerState(**{f.name: None if getattr(pool, f.name) is None
                       else SlotView(getattr(pool, f.name), slot)
                       for f in dataclasses.fields(LayerState)})


def read_rows(buf, start, n: int):
  """Rows start .. start+n-1 of a buffer [rows, X] or of a `SlotView`: [n, X]."""
  if isinstance(buf, SlotView):
    x = buf.pool.shape[-1]
    return jax.lax.dynamic_slice(buf.pool, (buf.slot, start, 0), (1, n, x))[0]
  return jax.lax.dynamic_slice(buf, (start, 0), (n, buf.shape[1]))


def read_all(buf):
  """A whole buffer [rows, X] (a `SlotView`: its slot's rows)."""
  if isinstance(buf, SlotView):
    return jax.lax.dynamic_index_in_dim(buf.pool, buf.slot, 0, keepdims=False)
  return buf


def scatter_writes(pool: LayerState, writes: dict, slots_B, d_B) -> LayerState:
  """Applies a vmapped `Attention.core`'s writes to a pooled LayerState, one scatter per
  buffer (in place on a donated pool).

  Args:
    writes: {name: (rows [B, n, X], start int32 [B])}.
    slots_B: int32 [B]; d_B: f32 [B], one attention output value per row. Every written
      value is made to depend on it (`d - d`), so XLA orders every read of the old buffer
      before the scatter and keeps it in place (see attention._store).
  """
  d_B = jnp.tanh(d_B)
  zero_B = (d_B - d_B)[:, None, None]
  new = {}
  for name, (rows_BNX, start_B) in writes.items():
    buf = getattr(pool, name)
    n = rows_BNX.shape[1]
    row_BN = start_B[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    new[name] = buf.at[slots_B[:, None], row_BN].set((rows_BNX + zero_B).astype(buf.dtype),
                                                     mode="drop")
  return pool.replace(**new)
