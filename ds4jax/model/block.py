"""One decoder block: HC pre -> attn_norm -> attention -> HC post, then the same with the MoE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ds4jax.config import ModelConfig
from ds4jax.model.attention import Attention
from ds4jax.model.decode_state import LayerState
from ds4jax.model.hyper_connections import HyperConnection
from ds4jax.model.moe import MoE
from ds4jax.model.norms import RMSNorm


class Block(nnx.Module):
  """Layer `layer_idx` (absolute): hc_attn, attn_norm, attn, hc_ffn, ffn_norm, moe."""

  def __init__(self, cfg: ModelConfig, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.layer_idx = layer_idx
    kw = dict(layer_idx=layer_idx, rngs=rngs, dtype=dtype)
    self.hc_attn = HyperConnection(cfg, **kw)
    self.attn_norm = RMSNorm(cfg, dim=cfg.d_model)
    self.attn = Attention(cfg, **kw)
    self.hc_ffn = HyperConnection(cfg, **kw)
    self.ffn_norm = RMSNorm(cfg, dim=cfg.d_model)
    self.moe = MoE(cfg, **kw)

  def __call__(self, x_TCD, tokens_T, pos0, st: LayerState):
    """x: [T, C, D] f32 HC state -> ([T, C, D] f32, new LayerState)."""
    with jax.named_scope(f"blk.{self.layer_idx}"):
      y_TD, post_TC, comb_TCC = self.hc_attn.pre(x_TCD)
      a_TD, st = self.attn(self.attn_norm(y_TD), pos0, st)
      x_TCD = HyperConnection.post(x_TCD, a_TD, post_TC, comb_TCC)
      y_TD, post_TC, comb_TCC = self.hc_ffn.pre(x_TCD)
      f_TD = self.moe(self.ffn_norm(y_TD), tokens_T)
      x_TCD = HyperConnection.post(x_TCD, f_TD, post_TC, comb_TCC)
    return x_TCD, st

  def batched(self, x_NCD, tokens_N, pos0_B, slots_B, pool: LayerState, t: int, taps=None):
    """The rows of B sessions (N = B*T, row b*T + i at pos0_B[b] + i; docs/design.md §11):
    -> ([N, C, D] f32, the pooled LayerState with the rows written). Only the attention core
    runs per session; HC, norms and the MoE take all N rows at once. `taps` (model/taps.py)
    sees attn_out [N, D], the router's points, ffn_out [N, D] and hc_out [N, C, D]; None
    traces exactly the plain step."""
    il = self.layer_idx
    tap = None if taps is None or not taps.wants_layer(il) else taps.at(il)
    with jax.named_scope(f"blk.{il}"):
      y_ND, post_NC, comb_NCC = self.hc_attn.pre(x_NCD)
      a_ND, pool = self.attn.batched(self.attn_norm(y_ND), pos0_B, slots_B, pool, t)
      if tap is not None:
        a_ND = tap("attn_out", a_ND)
      x_NCD = HyperConnection.post(x_NCD, a_ND, post_NC, comb_NCC)
      y_ND, post_NC, comb_NCC = self.hc_ffn.pre(x_NCD)
      f_ND = self.moe(self.ffn_norm(y_ND), tokens_N, tap)
      if tap is not None:
        f_ND = tap("ffn_out", f_ND)
      x_NCD = HyperConnection.post(x_NCD, f_ND, post_NC, comb_NCC)
      if tap is not None:
        x_NCD = tap("hc_out", x_NCD)
    return x_NCD, pool
