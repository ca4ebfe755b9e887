"""DeepSeek V4 attention (ds4-architecture.md §2.3): sliding window, CSA (ratio 4 + indexer)
and HCA (other ratios), with q-LoRA, one shared K = V head, per-head sinks and the grouped
output LoRA.

A chunk of T queries at positions pos0 .. pos0+T-1 attends to
- the raw rows s with t - W < s <= t (sliced from the position-indexed kv buffer),
- the compressed entries w < floor((t+1)/m): all of them for HCA, the indexer's top-k for CSA,
- the sink, which only adds e^{z_h} to the softmax denominator.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ds4jax.config import ModelConfig
from ds4jax.model import decode_state, ops, qat
from ds4jax.model.compressor import Compressor, gather_entries, patch_entries
from ds4jax.model.decode_state import LayerState
from ds4jax.model.indexer import Indexer
from ds4jax.model.norms import RMSNorm
from ds4jax.model.rope import RoPE


class Attention(nnx.Module):
  """Params: q_a [Rq, D], q_a_norm, q_b [N*H, Rq], kv [H, D], kv_norm, sinks [N],
  o_a [G*Ro, (N/G)*H], o_b [D, G*Ro], compressor (m > 0), indexer (m == 4)."""

  def __init__(self, cfg: ModelConfig, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.n_heads, self.head_dim, self.window = cfg.n_heads, cfg.head_dim, cfg.window
    self.o_groups, self.rope_dim, self.rms_eps = cfg.o_groups, cfg.rope_dim, float(cfg.rms_eps)
    self.ratio = cfg.ratio(layer_idx)
    self.qat = cfg.qat
    n, h, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    self.q_a = ops.param(rngs, (cfg.q_lora_rank, d), dtype)
    self.q_a_norm = RMSNorm(cfg, dim=cfg.q_lora_rank)
    self.q_b = ops.param(rngs, (n * h, cfg.q_lora_rank), dtype)
    self.kv = ops.param(rngs, (h, d), dtype)
    self.kv_norm = RMSNorm(cfg, dim=h)
    self.sinks = ops.const_param((n,), jnp.float32, 0.0)
    self.o_a = ops.param(rngs, (cfg.o_groups * cfg.o_lora_rank, (n // cfg.o_groups) * h), dtype)
    self.o_b = ops.param(rngs, (d, cfg.o_groups * cfg.o_lora_rank), dtype)
    self.rope = RoPE(cfg, layer_idx=layer_idx)
    self.compressor = (Compressor(cfg, layer_idx=layer_idx, rngs=rngs, dtype=dtype, rounding="fp8")
                       if self.ratio > 0 else None)
    self.indexer = (Indexer(cfg, layer_idx=layer_idx, rngs=rngs, dtype=dtype)
                    if cfg.has_indexer(layer_idx) else None)

  def __call__(self, x_TD, pos0, st: LayerState):
    """x: [T, D] normalised input at positions pos0 + [0, T) -> ([T, D] f32, new LayerState)."""
    pos_T = pos0 + jnp.arange(x_TD.shape[0], dtype=jnp.int32)
    o_TNH, writes = self.core(self.project(x_TD, pos_T), pos0, st, jnp.reshape(pos0, (1,)))
    return self.output(o_TNH), _store(st, writes, o_TNH)

  def batched(self, x_ND, pos0_B, slots_B, pool: LayerState, t: int):
    """The rows of B sessions at once (docs/design.md §11).

    Args:
      x_ND: [B*T, D] normalised input, row b*T + i at position pos0_B[b] + i.
      pos0_B: int32 [B] start positions; slots_B: int32 [B] pool slots (distinct, except
        the scratch slot of padding rows).
      pool: this layer's pooled state, every buffer [S, rows, X].
      t: T, the rows per session.

    Returns:
      ([B*T, D] f32, the pool with the rows written): the projections run on all B*T rows,
      only `core` is vmapped per session, and each buffer takes one scatter.
    """
    b = pos0_B.shape[0]
    pos_BT = pos0_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    proj = self.project(x_ND, pos_BT.reshape(-1))
    proj_B = jax.tree.map(lambda a: a.reshape((b, t) + a.shape[1:]), proj)

    def one(proj_T, pos0, slot, call_pos0_B):
      return self.core(proj_T, pos0, decode_state.slot_view(pool, slot), call_pos0_B)

    o_BTNH, writes = jax.vmap(one, in_axes=(0, 0, 0, None))(proj_B, pos0_B, slots_B, pos0_B)
    pool = decode_state.scatter_writes(pool, writes, slots_B, o_BTNH[:, 0, 0, 0])
    return self.output(o_BTNH.reshape((b * t,) + o_BTNH.shape[2:])), pool

  def project(self, x_TD, pos_T) -> dict:
    """The row-wise part: every projection of the chunk's rows (no state), as a dict of
    arrays with leading axis T: qr [T, Rq], q [T, N, H], kv [T, H], and the compressor's
    and indexer's projections (`Compressor.project`, `Indexer.project`)."""
    t = x_TD.shape[0]
    n, h = self.n_heads, self.head_dim
    qr_TR = self.q_a_norm(ops.einsum("TD,RD->TR", x_TD, self.q_a[...]))
    q_TNH = ops.einsum("TR,XR->TX", qr_TR, self.q_b[...]).reshape(t, n, h)
    q_TNH = self.rope(ops.rms(q_TNH, self.rms_eps), pos_T)
    kv_TH = self.rope(self.kv_norm(ops.einsum("TD,HD->TH", x_TD, self.kv[...])), pos_T)
    if self.qat:
      kv_TH = qat.fp8_kv_roundtrip(kv_TH, self.rope_dim)
    proj = {"q": q_TNH, "kv": kv_TH}
    if self.compressor is not None:
      proj["comp"] = self.compressor.project(x_TD, pos_T)
      if self.indexer is not None:
        proj["index"] = self.indexer.project(x_TD, qr_TR, pos_T)
    return proj

  def core(self, proj: dict, pos0, st: LayerState, call_pos0_B=None):
    """The state part, for one session's T rows at pos0: reads `st` (arrays, or the slot
    views of a pool), writes nothing. `call_pos0_B`: pos0 of every session of the call (not
    batched under vmap), for the compressors' decode skip (`Compressor.pool`).

    Returns:
      (o_TNH f32 [T, N, H] before the output LoRA, writes {buffer name: (rows, start row)}).
    """
    q_TNH, kv_TH = proj["q"], proj["kv"]
    t = q_TNH.shape[0]
    n, h, w = self.n_heads, self.head_dim, self.window
    pos_T = pos0 + jnp.arange(t, dtype=jnp.int32)

    # Everything below reads the old buffers; the writes come last (see _store).
    # Raw rows: positions pos0-W+1 .. pos0-1 from the buffer (row W + p), then the chunk.
    kv_TH = kv_TH.astype(st.kv.dtype)
    past_SH = decode_state.read_rows(st.kv, pos0 + 1, w - 1)
    win_SH = jnp.concatenate([past_SH, kv_TH], axis=0).astype(jnp.float32)
    parts = [_window_part(q_TNH, win_SH, pos0, w)]
    writes = {"kv": (kv_TH, w + pos0)}

    if self.compressor is not None:
      m = self.ratio
      e_NH, a_TX, g_TX = self.compressor.pool(*proj["comp"], pos0, st.comp_a, st.comp_g,
                                              call_pos0_B)
      writes.update(comp=(e_NH, pos0 // m), comp_a=(a_TX, m + pos0), comp_g=(g_TX, m + pos0))
      comp_WH = decode_state.read_all(st.comp)
      if self.indexer is not None:
        sel_TK, valid_TK, (k_NI, ia_TX, ig_TX) = self.indexer.select(
            proj["index"], pos0, st.idx_a, st.idx_g, decode_state.read_all(st.idx_keys),
            call_pos0_B)
        writes.update(idx_keys=(k_NI, pos0 // 4), idx_a=(ia_TX, 4 + pos0),
                      idx_g=(ig_TX, 4 + pos0))
        ent_TKH = gather_entries(comp_WH, e_NH, pos0 // m, sel_TK)
        logits_TNK = jnp.einsum("TNH,TKH->TNK", q_TNH, ent_TKH, precision=ops.HIGHEST)
        logits_TNK = jnp.where(valid_TK[:, None, :], logits_TNK, -jnp.inf)
        parts.append((logits_TNK, functools.partial(_weighted, "TNK,TKH->TNH", vals=ent_TKH)))
      else:
        ent_WH = patch_entries(comp_WH, e_NH, pos0 // m)
        vis_TW = jnp.arange(ent_WH.shape[0])[None, :] < ((pos_T + 1) // m)[:, None]
        logits_TNW = jnp.einsum("TNH,WH->TNW", q_TNH, ent_WH, precision=ops.HIGHEST)
        logits_TNW = jnp.where(vis_TW[:, None, :], logits_TNW, -jnp.inf)
        parts.append((logits_TNW, functools.partial(_weighted, "TNW,WH->TNH", vals=ent_WH)))

    # Softmax over [all rows, sink]; the sink has no value row.
    scale = h ** -0.5
    sink_TN1 = jnp.broadcast_to(self.sinks[...][None, :, None], (t, n, 1))
    logits_TNA = jnp.concatenate([p[0] * scale for p in parts] + [sink_TN1], axis=-1)
    probs_TNA = jax.nn.softmax(logits_TNA, axis=-1)
    o_TNH = jnp.zeros((t, n, h), jnp.float32)
    start = 0
    for logits, combine in parts:
      size = logits.shape[-1]
      o_TNH = o_TNH + combine(probs_TNA[..., start:start + size])
      start += size
    return self.rope(o_TNH, pos_T, inverse=True), writes

  def output(self, o_TNH):
    """Grouped output LoRA: heads split into G groups of N/G consecutive heads.
    o [T, N, H] -> [T, D] f32."""
    t, n, h = o_TNH.shape
    g = self.o_groups
    o_TGI = o_TNH.reshape(t, g, (n // g) * h)
    z_TGR = ops.einsum("TGI,GRI->TGR", o_TGI, ops.groups(self.o_a[...], g))
    return ops.einsum("TX,DX->TD", z_TGR.reshape(t, -1), self.o_b[...])


def _store(st: LayerState, writes, o_TNH) -> LayerState:
  """Writes the chunk's rows and entries into the state buffers.

  XLA updates a donated buffer in place only if every read of the old buffer is ordered
  before the write; otherwise it copies the whole buffer (every step, the full context).
  All reads of this layer's state feed the attention output, so each written value is made
  to depend on it through `d - d` (zero for finite d; XLA keeps float x - x).
  """
  d = jnp.tanh(o_TNH[0, 0, 0])
  zero = d - d
  new = {}
  for name, (rows, start) in writes.items():
    buf = getattr(st, name)
    new[name] = jax.lax.dynamic_update_slice(buf, (rows + zero).astype(buf.dtype), (start, 0))
  return st.replace(**new)


def _weighted(spec: str, probs, *, vals):
  return jnp.einsum(spec, probs, vals, precision=ops.HIGHEST)


def _window_part(q_TNH, win_SH, pos0, w: int):
  """Sliding-window logits [T, N, X] (masked to t-W < s <= t) and their value combiner.

  win_SH holds positions pos0-W+1 .. pos0+T-1. Long chunks are cut into query blocks of
  bq >= W rows, each scoring only its bq+W-1 rows instead of all W-1+T (4x less work for a
  512-row chunk with W = 128). The logits of a block are laid out as [T, N, bq+W-1].
  """
  t, n, h = q_TNH.shape
  bq = 1
  while bq < w:
    bq *= 2
  nb = t // bq if (t > bq and t % bq == 0) else 1
  bq = t // nb
  span = bq + w - 1
  blocks_BSH = (win_SH[None] if nb == 1
                else jnp.stack([win_SH[i * bq:i * bq + span] for i in range(nb)]))
  q_BQNH = q_TNH.reshape(nb, bq, n, h)
  q_pos_BQ = pos0 + jnp.arange(t, dtype=jnp.int32).reshape(nb, bq)
  s_pos_BS = (pos0 - (w - 1) + bq * jnp.arange(nb, dtype=jnp.int32)[:, None]
              + jnp.arange(span, dtype=jnp.int32)[None, :])
  s_BQS, t_BQS = s_pos_BS[:, None, :], q_pos_BQ[:, :, None]
  ok_BQS = (s_BQS >= 0) & (s_BQS <= t_BQS) & (s_BQS > t_BQS - w)
  logits_BQNS = ops.scores(q_BQNH, blocks_BSH)
  logits_BQNS = jnp.where(ok_BQS[:, :, None, :], logits_BQNS, -jnp.inf)

  def combine(probs_TNS):
    probs_BQNS = probs_TNS.reshape(nb, bq, n, span)
    o_BQNH = jnp.einsum("BQNS,BSH->BQNH", probs_BQNS, blocks_BSH, precision=ops.HIGHEST)
    return o_BQNH.reshape(t, n, h)

  return logits_BQNS.reshape(t, n, span), combine
