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
from ds4jax.model import decode_state, ops, qat
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

  def project(self, x_TD, pos_T):
    """The row-wise part: x [T, D] at positions pos_T [T] -> (a_TX, g_TX) f32 [T, c*H'],
    the projections and the biased gates (`a_t = W_kv x_t`, `g_t = W_gate x_t + ape[t % m]`)."""
    a_TX = ops.einsum("TD,XD->TX", x_TD, self.kv[...])
    g_TX = (ops.einsum("TD,XD->TX", x_TD, self.gate[...])
            + ops.dense(self.ape[...])[pos_T % self.ratio])
    return a_TX, g_TX

  def pool(self, a_TX, g_TX, pos0, a_SX, g_SX, call_pos0_B=None):
    """Pools the windows a chunk can complete; reads the state, writes nothing.

    Args:
      a_TX, g_TX: `project` of the chunk's rows, positions pos0 .. pos0+T-1.
      pos0: traced int32 scalar, absolute position of row 0.
      a_SX, g_SX: [rows, c*H'] position-indexed projections and biased gates (row m + p),
        arrays or pool slot views (`decode_state.read_rows`).
      call_pos0_B: for a one-token chunk, pos0 of every row of the call (not batched under
        `vmap`): the pooling runs only when one of them completes a window, else the
        (invisible) entry is zeros. A decode token completes a window once in m tokens, so
        the softmax over m rows (m = 128: most of an HCA layer's decode work that grows
        with the rows) is skipped the other m - 1 times. None: always pooled.

    Returns:
      (e_NH, a_TX, g_TX): entries of windows w0 .. w0+n-1 (w0 = pos0 // m, n = T//m + 1), to
      be stored at w0 (`patch_entries` shows them to readers first), and the chunk's rows in
      the state dtype, to be stored at row m + pos0. Entries of still-incomplete windows are
      garbage but stay invisible (w >= floor((t+1)/m)) and are rewritten once their window
      completes.

    Pipeline:
      1. read the rows of windows w0-1 (ratio 4 only) .. w0+n-1 from the buffers, with the
         chunk's own rows substituted;
      2. gather the candidates [n, K, H'], softmax over them per channel, pool;
      3. RMSNorm, RoPE at w*m, optional QAT rounding.
    """
    m, hw = self.ratio, self.width
    t = a_TX.shape[0]
    a_TX, g_TX = a_TX.astype(a_SX.dtype), g_TX.astype(g_SX.dtype)

    n_win = t // m + 1
    w0 = pos0 // m
    first = w0 - 1 if self.overlap else w0
    rows = (n_win + (1 if self.overlap else 0)) * m
    row_pos_S = first * m + jnp.arange(rows, dtype=jnp.int32)
    in_chunk_S = (row_pos_S >= pos0) & (row_pos_S < pos0 + t)
    src_S = jnp.clip(row_pos_S - pos0, 0, t - 1)

    def window_rows(buf_SX, new_TX):
      old_SX = decode_state.read_rows(buf_SX, m + first * m, rows)
      return jnp.where(in_chunk_S[:, None], new_TX[src_S], old_SX).astype(jnp.float32)

    def entries():
      a_RX, g_RX = window_rows(a_SX, a_TX), window_rows(g_SX, g_TX)
      if self.overlap:
        a_NMX = a_RX.reshape(n_win + 1, m, 2 * hw)
        g_NMX = g_RX.reshape(n_win + 1, m, 2 * hw)
        a_NKH = jnp.concatenate([a_NMX[:-1, :, :hw], a_NMX[1:, :, hw:]], axis=1)
        g_NKH = jnp.concatenate([g_NMX[:-1, :, :hw], g_NMX[1:, :, hw:]], axis=1)
      else:
        a_NKH, g_NKH = a_RX.reshape(n_win, m, hw), g_RX.reshape(n_win, m, hw)
      probs_NKH = jax.nn.softmax(g_NKH, axis=1)
      pooled_NH = jnp.sum(probs_NKH * a_NKH, axis=1)
      win_pos_N = (w0 + jnp.arange(n_win, dtype=jnp.int32)) * m
      e_NH = self.rope(self.norm(pooled_NH), win_pos_N)
      if self.rounding == "fp8":
        e_NH = qat.fp8_kv_roundtrip(e_NH, self.rope_dim)
      elif self.rounding == "fp4":
        e_NH = qat.fp4_indexer_roundtrip(e_NH)
      return e_NH

    if call_pos0_B is None or t != 1:
      return entries(), a_TX, g_TX
    # Entries of incomplete windows are invisible and rewritten once complete (above), so
    # zeros do for them; the predicate is the call's, so under vmap this stays a cond.
    shape = jax.eval_shape(entries)
    due = jnp.any((call_pos0_B + 1) % m == 0)
    e_NH = jax.lax.cond(due, entries, lambda: jnp.zeros(shape.shape, shape.dtype))
    return e_NH, a_TX, g_TX


def patch_entries(e_WH, e_NH, w0):
  """The entries buffer as it reads after storing e_NH at w0, without writing it: f32 [W, H]."""
  k_W = jnp.arange(e_WH.shape[0], dtype=jnp.int32) - w0
  new_W = (k_W >= 0) & (k_W < e_NH.shape[0])
  return jnp.where(new_W[:, None], e_NH[jnp.clip(k_W, 0, e_NH.shape[0] - 1)],
                   e_WH.astype(jnp.float32))


def gather_entries(e_WH, e_NH, w0, sel_TK):
  """Entries sel_TK of the patched buffer (see patch_entries): f32 [T, K, H]."""
  k_TK = sel_TK - w0
  new_TK = (k_TK >= 0) & (k_TK < e_NH.shape[0])
  return jnp.where(new_TK[..., None], e_NH[jnp.clip(k_TK, 0, e_NH.shape[0] - 1)],
                   e_WH[sel_TK].astype(jnp.float32))
