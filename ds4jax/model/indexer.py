"""Lightning indexer for ratio-4 layers (ds4-architecture.md §2.3, "Indexer").

Scores every visible compressed window w for each query t with
`sum_h omega_h relu(q^I_h . k^I_w)`, `omega = (W_proj x) dI^-1/2 HI^-1/2`, and keeps the top
`min(K_I, n_t)` windows, n_t = floor((t+1)/4). `jax.lax.top_k` breaks ties towards the lower
index, as ds4 does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ds4jax.config import ModelConfig
from ds4jax.model import ops, qat
from ds4jax.model.compressor import Compressor, patch_entries
from ds4jax.model.rope import RoPE


class Indexer(nnx.Module):
  """Params: q_b [HI*dI, Rq], proj [HI, D], compressor (ratio 4, width dI)."""

  def __init__(self, cfg: ModelConfig, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.n_heads, self.head_dim = cfg.index_heads, cfg.index_head_dim
    self.topk = cfg.index_topk
    self.qat = cfg.qat
    self.q_b = ops.param(rngs, (self.n_heads * self.head_dim, cfg.q_lora_rank), dtype)
    self.proj = ops.param(rngs, (self.n_heads, cfg.d_model), dtype)
    self.compressor = Compressor(cfg, layer_idx=layer_idx, rngs=rngs, dtype=dtype, ratio=4,
                                 width=self.head_dim, rounding="fp4")
    self.rope = RoPE(cfg, layer_idx=layer_idx, kind="compress")

  def project(self, x_TD, qr_TR, pos_T) -> dict:
    """The row-wise part: x [T, D], the normalised q-LoRA latent qr [T, Rq], positions
    [T] -> {comp: the compressor's (a, g) [T, 2*dI], q: [T, HI, dI], omega: [T, HI]}."""
    t = x_TD.shape[0]
    q_TNI = ops.einsum("TR,XR->TX", qr_TR, self.q_b[...]).reshape(t, self.n_heads, self.head_dim)
    q_TNI = self.rope(q_TNI, pos_T)
    if self.qat:
      q_TNI = qat.fp4_indexer_roundtrip(q_TNI)
    omega_TN = ops.einsum("TD,ND->TN", x_TD, self.proj[...])
    omega_TN = omega_TN * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
    return {"comp": self.compressor.project(x_TD, pos_T), "q": q_TNI, "omega": omega_TN}

  def select(self, proj: dict, pos0, ia_SX, ig_SX, keys_WI, call_pos0_B=None):
    """Selects compressed windows per query; reads the state, writes nothing.

    Args:
      proj: `project` of the chunk's rows (positions pos0 .. pos0+T-1).
      pos0: traced int32 scalar; ia_SX, ig_SX: the indexer's compressor rows (arrays or pool
        slot views); keys_WI: f32 [W, dI] its keys; call_pos0_B: see `Compressor.pool`.

    Returns:
      (sel_TK int32 [T, K] window indices, valid_TK bool [T, K], (k_NI, ia_TX, ig_TX)) with
      K = min(K_I, number of key slots); the last triple is what the caller stores (new keys
      at window pos0 // 4, rows at 4 + pos0).
    """
    q_TNI, omega_TN = proj["q"], proj["omega"]
    t = q_TNI.shape[0]
    pos_T = pos0 + jnp.arange(t, dtype=jnp.int32)
    k_NI, ia_TX, ig_TX = self.compressor.pool(*proj["comp"], pos0, ia_SX, ig_SX, call_pos0_B)
    keys_WI = patch_entries(keys_WI, k_NI, pos0 // 4)
    dots_TNW = ops.scores(q_TNI, keys_WI)
    score_TW = jnp.einsum("TN,TNW->TW", omega_TN, jax.nn.relu(dots_TNW), precision=ops.HIGHEST)
    n_slots = keys_WI.shape[0]
    visible_TW = jnp.arange(n_slots)[None, :] < ((pos_T + 1) // 4)[:, None]
    score_TW = jnp.where(visible_TW, score_TW, -jnp.inf)
    k = min(self.topk, n_slots)
    top_TK, sel_TK = jax.lax.top_k(score_TW, k)
    return sel_TK.astype(jnp.int32), top_TK > -jnp.inf, (k_NI, ia_TX, ig_TX)
