"""Gated KV compressor (ds4-architecture.md §2.3, "Compressor").

For every token t: `a_t = W_kv x_t`, `g_t = W_gate x_t + ape[t mod m]`. Window w covers the
absolute positions [w*m, (w+1)*m) and emits `c_w = RoPE_{w*m}(RMSNorm(sum softmax(g) * a))`
once it completes. Ratio 4 overlaps windows (c = 2): entry w pools the first half (Ca) of
window w-1's rows and the second half (Cb) of window w's rows; for w = 0 the missing rows
have gate -inf.

The rows a_t, g_t live in position-indexed buffers (decode_state.LayerState), so a chunk of
any length at any start position recomputes the entries of every window that can complete
inside it and writes them at their window index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ds4jax.config import ModelConfig
from ds4jax.model import ops, qat
from ds4jax.model.norms import RMSNorm
from ds4jax.model.rope import RoPE


class Compressor(nnx.Module):
  """Params: ape [m, c*H'], kv [c*H', D], gate [c*H', D], norm.scale [H'] (H' = `width`)."""

  def __init__(self, cfg: ModelConfig, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32,
               ratio: int | None = None, width: int | None = None, rounding: str | None = None):
    self.ratio = int(ratio if ratio is not None else cfg.ratio(layer_idx))
    self.width = int(width if width is not None else cfg.head_dim)
    self.overlap = self.ratio == 4
    c = 2 if self.overlap else 1
    # 'fp8' (main KV) or 'fp4' (indexer keys) when the QAT simulation is on.
    self.rounding = rounding if cfg.qat else None
    self.rope_dim = cfg.rope_dim
    self.ape = ops.const_param((self.ratio, c * self.width), jnp.float32, 0.0)
    self.kv = ops.param(rngs, (c * self.width, cfg.d_model), dtype)
    self.gate = ops.param(rngs, (c * self.width, cfg.d_model), dtype)
    self.norm = RMSNorm(cfg, dim=self.width)
    self.rope = RoPE(cfg, layer_idx=layer_idx, kind="compress")

  def __call__(self, x_TD, pos0, a_SX, g_SX, e_WH):
    """Consumes a chunk and returns the updated (a_SX, g_SX, e_WH) buffers.

    Args:
      x_TD: [T, D] normalised attention input of positions pos0 .. pos0+T-1.
      pos0: traced int32 scalar, absolute position of row 0.
      a_SX, g_SX: [rows, c*H'] position-indexed projections and biased gates (row m + p).
      e_WH: [entries, H'] compressed entries.

    Pipeline:
      1. project the chunk and write its rows at m + pos0;
      2. slice the rows of the T//m + 1 windows starting at w0 = pos0 // m (plus, for ratio 4,
         the window before) and reshape to [n_win, m, c*H'];
      3. gather the candidates, softmax over them per channel, pool;
      4. RMSNorm, RoPE at w*m, optional QAT rounding; write entries w0 .. w0+n_win-1.
    Entries of windows that are still incomplete are written too; they stay invisible
    (w >= floor((t+1)/m)) and are rewritten once the window completes.
    """
    m, hw = self.ratio, self.width
    t = x_TD.shape[0]
    pos_T = pos0 + jnp.arange(t, dtype=jnp.int32)
    a_TX = ops.einsum("TD,XD->TX", x_TD, self.kv[...])
    g_TX = ops.einsum("TD,XD->TX", x_TD, self.gate[...]) + self.ape[...][pos_T % m]
    a_SX = jax.lax.dynamic_update_slice(a_SX, a_TX.astype(a_SX.dtype), (m + pos0, 0))
    g_SX = jax.lax.dynamic_update_slice(g_SX, g_TX.astype(g_SX.dtype), (m + pos0, 0))

    n_win = t // m + 1
    w0 = pos0 // m
    if self.overlap:
      rows = (n_win + 1) * m  # starts at window w0 - 1 (buffer row w0*m)
      a_NMX = jax.lax.dynamic_slice(a_SX, (w0 * m, 0), (rows, 2 * hw)).reshape(n_win + 1, m, -1)
      g_NMX = jax.lax.dynamic_slice(g_SX, (w0 * m, 0), (rows, 2 * hw)).reshape(n_win + 1, m, -1)
      a_NKH = jnp.concatenate([a_NMX[:-1, :, :hw], a_NMX[1:, :, hw:]], axis=1)
      g_NKH = jnp.concatenate([g_NMX[:-1, :, :hw], g_NMX[1:, :, hw:]], axis=1)
    else:
      rows = n_win * m
      a_NKH = jax.lax.dynamic_slice(a_SX, ((w0 + 1) * m, 0), (rows, hw)).reshape(n_win, m, hw)
      g_NKH = jax.lax.dynamic_slice(g_SX, ((w0 + 1) * m, 0), (rows, hw)).reshape(n_win, m, hw)
    probs_NKH = jax.nn.softmax(g_NKH.astype(jnp.float32), axis=1)
    pooled_NH = jnp.sum(probs_NKH * a_NKH.astype(jnp.float32), axis=1)
    win_pos_N = (w0 + jnp.arange(n_win, dtype=jnp.int32)) * m
    e_NH = self.rope(self.norm(pooled_NH), win_pos_N)
    if self.rounding == "fp8":
      e_NH = qat.fp8_kv_roundtrip(e_NH, self.rope_dim)
    elif self.rounding == "fp4":
      e_NH = qat.fp4_indexer_roundtrip(e_NH)
    e_WH = jax.lax.dynamic_update_slice(e_WH, e_NH.astype(e_WH.dtype), (w0, 0))
    return a_SX, g_SX, e_WH
