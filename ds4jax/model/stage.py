"""A pipeline stage: an inclusive layer range, plus the embedding (start 0) and the head.

Between stages only the HC state [T, C, D], the token ids and the absolute start position
cross (ds4-architecture.md §3.4).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.model import ops
from ds4jax.model.block import Block
from ds4jax.model.decode_state import StageState
from ds4jax.model.hyper_connections import Head


class Embed(nnx.Module):
  """Token embedding `embedding` [V, D]; every HC stream starts as a copy of the row."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.n_hc = cfg.n_hc
    self.embedding = ops.param(rngs, (cfg.vocab_size, cfg.d_model), dtype, std=1.0)

  def __call__(self, tokens_T):
    """tokens: int32 [T] -> f32 [T, C, D]."""
    e_TD = ops.rows(self.embedding[...], tokens_T)
    return jnp.broadcast_to(e_TD[:, None, :], (e_TD.shape[0], self.n_hc, e_TD.shape[1]))


class Stage(nnx.Module):
  """`embed` iff layers.start == 0, `blocks` (local index il - start), `head` iff has_output."""

  def __init__(self, cfg: ModelConfig, layers: LayerRange, *, rngs: nnx.Rngs, dtype=jnp.float32):
    layers = layers.resolve(cfg.n_layers)
    self.cfg, self.layers = cfg, layers
    self.embed = Embed(cfg, rngs=rngs, dtype=dtype) if layers.embeds else None
    self.blocks = nnx.List([Block(cfg, layer_idx=il, rngs=rngs, dtype=dtype)
                            for il in layers.layers()])
    self.head = Head(cfg, rngs=rngs, dtype=dtype) if layers.has_output else None

  def __call__(self, state: StageState, tokens_T, hc_TCD, n_valid):
    """Runs one chunk at pos0 = state.pos.

    Args:
      state: StageState; tokens_T: int32 [T] (needed by hash layers in every stage);
      hc_TCD: f32 [T, C, D] from the previous stage, or None iff this stage embeds;
      n_valid: int32 [] number of real rows (the rest is bucket padding).

    Returns:
      (logits f32 [T, V] if the stage has the head else hc f32 [T, C, D], new state with
      pos = pos0 + n_valid).
    """
    pos0 = state.pos
    x_TCD = self.embed(tokens_T) if hc_TCD is None else hc_TCD.astype(jnp.float32)
    new_layers = []
    for block, st in zip(self.blocks, state.layers):
      x_TCD, st = block(x_TCD, tokens_T, pos0, st)
      new_layers.append(st)
    out = self.head(x_TCD) if self.head is not None else x_TCD
    return out, StageState(pos=pos0 + n_valid.astype(jnp.int32), layers=tuple(new_layers))

  def batched(self, pool: StageState, slots_B, tokens_BT, hc_BTCD, n_valid_B, taps=None):
    """One chunk for each of B sessions held in a pool (docs/design.md §11).

    Args:
      pool: a pooled StageState (leaves [S, ...]); row b runs at pos0 = pool.pos[slots_B[b]].
      slots_B: int32 [B] pool slots (distinct; padding rows use the scratch slot S - 1).
      tokens_BT: int32 [B, T]; hc_BTCD: f32 [B, T, C, D] or None iff this stage embeds.
      n_valid_B: int32 [B] real rows of each session (the rest is padding).
      taps: a `model.taps.Taps` whose `saved` collects the wanted points as [B*T, ...]
        arrays (None: the plain step).

    Returns:
      (logits f32 [B, T, V] if the stage has the head else hc f32 [B, T, C, D], the pool
      with each row's slot advanced by n_valid_B[b]).
    """
    b, t = tokens_BT.shape
    x_NCD, tokens_N, pos0_B = batch_begin(self.embed, pool.pos, slots_B, tokens_BT, hc_BTCD)
    new_layers = []
    for block, lp in zip(self.blocks, pool.layers):
      x_NCD, lp = block.batched(x_NCD, tokens_N, pos0_B, slots_B, lp, t, taps)
      new_layers.append(lp)
    out, pos_S = batch_end(self.head, x_NCD, pool.pos, slots_B, pos0_B, n_valid_B, b, t)
    return out, StageState(pos=pos_S, layers=tuple(new_layers))


def batch_begin(embed: Embed | None, pos_S, slots_B, tokens_BT, hc_BTCD):
  """`Stage.batched` before its blocks: (x_NCD f32 [B*T, C, D] (the embedding, or hc_BTCD's
  rows), tokens_N int32 [B*T], pos0_B int32 [B] = pos_S[slots_B]). `runtime.layer_programs`
  runs it as a program of its own."""
  b, t = tokens_BT.shape
  pos0_B = pos_S[slots_B]
  tokens_N = tokens_BT.reshape(-1)
  if hc_BTCD is None:
    x_NCD = embed(tokens_N)
  else:
    x_NCD = hc_BTCD.astype(jnp.float32).reshape((b * t,) + hc_BTCD.shape[2:])
  return x_NCD, tokens_N, pos0_B


def batch_end(head: Head | None, x_NCD, pos_S, slots_B, pos0_B, n_valid_B, b: int, t: int):
  """`Stage.batched` after its blocks: (logits f32 [B, T, V] with the head, else hc f32
  [B, T, C, D]; pos_S int32 [S] with each row's slot advanced by n_valid_B[b])."""
  out = head(x_NCD) if head is not None else x_NCD
  pos_S = pos_S.at[slots_B].set(pos0_B + n_valid_B.astype(jnp.int32))
  return out.reshape((b, t) + out.shape[1:]), pos_S
