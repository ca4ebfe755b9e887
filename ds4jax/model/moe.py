"""Mixture of experts (ds4-architecture.md §2.4).

Scores `p = sqrt(softplus(W_r x))`. Hash layers take the expert set from `tid2eid[token]`;
the others take the top-k of `p + bias` (the bias only selects). Weights are the unbiased
p of the chosen experts, normalised, times `routed_scale` (1.5). Every expert, the shared
one included, is a SwiGLU with the gate clamped from above and up clamped on both sides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ds4jax.config import ModelConfig
from ds4jax.model import ops, sharding
from ds4jax.quant import matmul as quant_matmul
from ds4jax.quant.packed import Packed


# Rows per block of the grouped (sorted) expert path: at most GROUP_BLOCK, at least MIN_BLOCK.
GROUP_BLOCK = 64
MIN_BLOCK = 16


def group_block(n_pairs: int, n_experts: int) -> int:
  """Block rows of the grouped path: the mean pairs per expert as a power of two, clamped to
  [MIN_BLOCK, GROUP_BLOCK] (per-layer CPU time on bench, 64 / 128 tokens: 16-row blocks 8.7 /
  12.1 ms, 64-row blocks 13.5 / 13.7 ms; 512 tokens: 64 rows)."""
  b = MIN_BLOCK
  while 2 * b <= min(n_pairs // n_experts, GROUP_BLOCK):
    b *= 2
  return b


def swiglu(g, u, limit: float):
  """silu(min(g, limit)) * clip(u, -limit, limit), in f32."""
  return jax.nn.silu(jnp.minimum(g, limit)) * jnp.clip(u, -limit, limit)


class MoE(nnx.Module):
  """Params: gate [E, D], bias [E], tid2eid int32 [V, k] (hash layers only),
  gate_exps/up_exps [E, F, D], down_exps [E, D, F], shared_gate/shared_up [F, D],
  shared_down [D, F]."""

  def __init__(self, cfg: ModelConfig, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32):
    e, f, d, k = cfg.n_experts, cfg.expert_ff, cfg.d_model, cfg.n_experts_used
    self.n_experts, self.k, self.layer_idx = e, k, layer_idx
    self.is_hash = cfg.is_hash_layer(layer_idx)
    self.limit = float(cfg.swiglu_clamp[layer_idx])
    self.routed_scale = float(cfg.routed_scale)
    self.norm_topk = bool(cfg.norm_topk_prob)
    self.gate = ops.param(rngs, (e, d), dtype)
    self.bias = ops.const_param((e,), jnp.float32, 0.0)
    if self.is_hash:
      eid_VK = jax.random.randint(rngs.params(), (cfg.vocab_size, k), 0, e, jnp.int32)
      self.tid2eid = nnx.Param(eid_VK)
    self.gate_exps = ops.param(rngs, (e, f, d), dtype)
    self.up_exps = ops.param(rngs, (e, f, d), dtype)
    self.down_exps = ops.param(rngs, (e, d, f), dtype)
    self.shared_gate = ops.param(rngs, (f, d), dtype)
    self.shared_up = ops.param(rngs, (f, d), dtype)
    self.shared_down = ops.param(rngs, (d, f), dtype)
    # A jax Mesh: the routed experts run expert-parallel on it (`sharding.attach`); static.
    self.expert_mesh = None
    # Expert streaming (`gguf.streaming.ExpertCache`, static): the module holds no routed
    # expert arrays; `gather` brings the chosen ones into the step (docs/design.md §15).
    self.expert_source = None

  def route(self, x_TD, tokens_T, tap=None):
    """Returns (experts int32 [T, k], weights f32 [T, k]). `tap(point, value) -> value` sees
    router_scores [T, E], the selection scores `router_select` [T, E] (scores + bias: an
    edit point only, for expert steering), router_ids and router_weights (model/taps.py);
    None: no points."""
    p_TE = jnp.sqrt(jax.nn.softplus(ops.einsum("TD,ED->TE", x_TD, self.gate[...])))
    if tap is not None:
      p_TE = tap("router_scores", p_TE)
    steer = tap is not None and tap.edits("router_steer")
    if steer:  # ds4's expert steering: per-row, per-expert actions (0: none; model/taps.py)
      a_TE = tap("router_steer", jnp.zeros_like(p_TE))
      p_TE = _steer(p_TE, a_TE, low=False)
    if self.is_hash:
      idx_TK = self.tid2eid[...][tokens_T]
    else:
      sel_TE = p_TE + self.bias[...][None, :]
      if tap is not None:
        sel_TE = tap("router_select", sel_TE)
      if steer:
        sel_TE = _steer(sel_TE, a_TE, low=True)
      _, idx_TK = jax.lax.top_k(sel_TE, self.k)
    w_TK = jnp.take_along_axis(p_TE, idx_TK, axis=-1)
    if self.norm_topk:
      w_TK = w_TK / (jnp.sum(w_TK, axis=-1, keepdims=True) + 1e-20)
    idx_TK, w_TK = idx_TK.astype(jnp.int32), w_TK * self.routed_scale
    if tap is not None:
      idx_TK, w_TK = tap("router_ids", idx_TK), tap("router_weights", w_TK)
    return idx_TK, w_TK

  def __call__(self, x_TD, tokens_T, tap=None):
    """x: [T, D] normalised input, tokens: int32 [T] -> [T, D] f32 (tap: see `route`)."""
    idx_TK, w_TK = self.route(x_TD, tokens_T, tap)
    if self.expert_source is not None:  # streamed: the cache brings the chosen experts in
      routed_TD = self.expert_source.routed(self, x_TD, idx_TK, w_TK)
    elif self.expert_mesh is None:
      routed_TD = self.routed(x_TD, idx_TK, w_TK)
    else:  # experts sharded over the stage's devices (docs/design.md §12)
      routed_TD = sharding.routed_experts(self, x_TD, idx_TK, w_TK)
    sg_TF = ops.einsum("TD,FD->TF", x_TD, self.shared_gate[...])
    su_TF = ops.einsum("TD,FD->TF", x_TD, self.shared_up[...])
    shared_TD = ops.einsum("TF,DF->TD", swiglu(sg_TF, su_TF, self.limit), self.shared_down[...])
    return routed_TD + shared_TD

  def routed(self, x_TD, idx_TK, w_TK, experts=None):
    """The routed experts' weighted sum, f32 [T, D], for x [T, D], chosen ids int32 [T, k]
    and weights f32 [T, k].

    experts: (gate [E', F, D], up [E', F, D], down [E', D, F]) instead of the module's own:
    a device's local slice under expert parallelism (`sharding.routed_experts`), where an id
    E' marks a pair of another device's expert (weight 0), or the chosen experts of a
    streamed layer (`gguf.streaming.ExpertCache.gather`); or an object whose
    `expert(e) -> (gate [F, D], up [F, D], down [D, F])` reads one expert (traced id) and
    whose `n_experts` is E: the grouped path then reads each chosen expert as its loop
    reaches it (a streamed layer's prefill, `gguf.streaming.StreamedLayer`).
    """
    t = x_TD.shape[0]
    if hasattr(experts, "expert"):  # one expert at a time: the grouped loop, whatever T
      return self._grouped(x_TD, idx_TK, w_TK, group_block(t * self.k, experts.n_experts),
                           experts)
    gate_EFD, up_EFD, down_EDF = experts or (self.gate_exps[...], self.up_exps[...],
                                             self.down_exps[...])
    n_experts = gate_EFD.shape[0]
    block = group_block(t * self.k, n_experts)
    packed = isinstance(gate_EFD, Packed)
    if quant_matmul.pairs_path(t, gate_EFD):
      # Decode rows with packed experts: every (row, expert) pair through the kernel
      # interface, which reads (and unpacks) each chosen expert's bytes once per call, in
      # place, whatever the rows that chose it. Longer chunks (prefill) go grouped below,
      # dequantising each chosen expert once: bit-identical to the dequantised path.
      routed_TD = self._pairs(x_TD, idx_TK, w_TK, (gate_EFD, up_EFD, down_EDF))
    elif t == 1:
      # One decode row, dense experts: one dynamic slice per chosen expert, which XLA reads
      # in place (a batched gather copies the chosen experts' weights first: 4x slower on
      # CPU). Several rows (a batch of sessions, a short chunk) take the paths below, which
      # read each chosen expert once per call.
      routed = []
      for i in range(t):
        acc_D = jnp.zeros((x_TD.shape[1],), jnp.float32)
        for j in range(self.k):
          e = idx_TK[i, j]
          g_F = ops.einsum("D,FD->F", x_TD[i], _expert(gate_EFD, e))
          u_F = ops.einsum("D,FD->F", x_TD[i], _expert(up_EFD, e))
          h_F = swiglu(g_F, u_F, self.limit) * w_TK[i, j]
          acc_D = acc_D + ops.einsum("F,DF->D", h_F, _expert(down_EDF, e))
        routed.append(acc_D)
      routed_TD = jnp.stack(routed)
    elif packed or t * self.k <= 64 or t * self.k + n_experts * block < t * n_experts:
      # The grouped rows (the pairs, plus under a block of padding per expert) are fewer; packed
      # experts always go this way (the dense path below would dequantise every expert).
      routed_TD = self._grouped(x_TD, idx_TK, w_TK, block, (gate_EFD, up_EFD, down_EDF))
    else:
      # Few tokens per expert: every expert on every token, unchosen ones weighted 0.
      comb_TE = jnp.sum(jax.nn.one_hot(idx_TK, n_experts, dtype=jnp.float32)
                        * w_TK[:, :, None], axis=1)
      g_TEF = ops.einsum("TD,EFD->TEF", x_TD, gate_EFD)
      u_TEF = ops.einsum("TD,EFD->TEF", x_TD, up_EFD)
      h_TEF = swiglu(g_TEF, u_TEF, self.limit) * comb_TE[:, :, None]
      routed_TD = ops.einsum("TEF,EDF->TD", h_TEF, down_EDF)
    return routed_TD

  def _pairs(self, x_TD, idx_TK, w_TK, experts):
    """Routed experts of a few rows with packed experts: the P = T*k (row, expert) pairs
    through `quant.expert_matmul` (gate, up: [P, D] -> [P, F]; down: [P, F] -> [P, D]),
    each weight with its own activation mode; each row sums its k pairs."""
    t, d = x_TD.shape
    gate_EFD, up_EFD, down_EDF = experts
    e_P = idx_TK.reshape(-1).astype(jnp.int32)
    x_PD = jnp.repeat(x_TD.astype(jnp.float32), self.k, axis=0)
    g_PF = quant_matmul.expert_matmul(x_PD, gate_EFD, e_P, act=gate_EFD.act)
    u_PF = quant_matmul.expert_matmul(x_PD, up_EFD, e_P, act=up_EFD.act)
    h_PF = swiglu(g_PF, u_PF, self.limit) * w_TK.reshape(-1)[:, None]
    y_PD = quant_matmul.expert_matmul(h_PF, down_EDF, e_P, act=down_EDF.act)
    return jnp.sum(y_PD.reshape(t, self.k, d), axis=1)

  def _grouped(self, x_TD, idx_TK, w_TK, block: int, experts):
    """Routed experts for many tokens: the (token, expert) pairs sorted by expert, then a
    rolled loop over the experts that have pairs (ascending; a dynamic trip count) that slices
    (packed: dequantises) each one's weights once and runs its pairs
    in blocks of `block` rows, only as many blocks as it has pairs (a dynamic trip count, so
    no work on padding blocks: a static bound costs ~20% more expert FLOPs on bench prefill).

    Pipeline:
      1. P = T*k pairs, stably sorted by expert: token, weight and input row per sorted slot
         (plus `block` zero rows, so the last block never reads or writes out of range);
      2. per expert e with pairs (ascending): blocks at slots first_e + b*block, b < ceil(count_e/block):
         SwiGLU expert, rows weighted, written at their slots. A block running past e's last
         pair writes slots of later experts, which rewrite them on their turn;
      3. each token sums its k rows (gathered from their slots).
    """
    t, d = x_TD.shape
    e_n, k = _n_experts(experts), self.k
    n_pairs = t * k
    e_P = idx_TK.reshape(-1)
    order_S = jnp.argsort(e_P, stable=True).astype(jnp.int32)  # sorted slot -> pair
    count_E = jnp.zeros((e_n,), jnp.int32).at[e_P].add(1)
    first_E = jnp.cumsum(count_E) - count_E  # first slot of each expert
    x_SD = jnp.concatenate([x_TD.astype(jnp.float32)[order_S // k],
                            jnp.zeros((block, d), jnp.float32)])
    w_S = jnp.concatenate([w_TK.reshape(-1)[order_S], jnp.zeros((block,), jnp.float32)])
    # Experts with pairs, ascending, then padding: only the first n_active are visited.
    active_E = count_E > 0
    n_active = jnp.sum(active_E.astype(jnp.int32))
    ids_A = jnp.nonzero(active_E, size=e_n, fill_value=0)[0].astype(jnp.int32)

    def one_expert(a, y_SD):
      # Loop-invariant for the block loop: sliced or read (dequantised) once per expert.
      gate, up, down = _chosen(experts, ids_A[a])
      g_FD, u_FD, d_DF = ops.dense(gate), ops.dense(up), ops.dense(down)
      e = ids_A[a]

      def one_block(b, y_SD):
        s = first_E[e] + b * block
        xb_BD = jax.lax.dynamic_slice_in_dim(x_SD, s, block)
        wb_B = jax.lax.dynamic_slice_in_dim(w_S, s, block)
        # q8 experts: the rows rounded as the kernels round them (identity in exact mode).
        h_BF = swiglu(ops.einsum("BD,FD->BF", quant_matmul.activations(xb_BD, gate), g_FD),
                      ops.einsum("BD,FD->BF", quant_matmul.activations(xb_BD, up), u_FD),
                      self.limit) * wb_B[:, None]
        y_BD = ops.einsum("BF,DF->BD", quant_matmul.activations(h_BF, down), d_DF)
        return jax.lax.dynamic_update_slice_in_dim(y_SD, y_BD, s, 0)

      return jax.lax.fori_loop(0, (count_E[e] + block - 1) // block, one_block, y_SD)

    # The carry's zeros are made to depend on x (`quant.matmul.never`): a zero buffer that
    # depends on nothing is built at the top of the step, every layer's at once
    # (docs/benchmarks.md, "Memory that does not grow with the layer count"). A pair of an
    # expert outside this list (another device's, `sharding.routed_experts`) reads its zero.
    y_SD = jax.lax.fori_loop(0, n_active, one_expert,
                             jnp.where(quant_matmul.never(x_TD), x_SD, 0.0))
    slot_P = jnp.zeros((n_pairs,), jnp.int32).at[order_S].set(
        jnp.arange(n_pairs, dtype=jnp.int32))
    return jnp.sum(y_SD[slot_P].reshape(t, k, d), axis=1)


def _steer(s_TE, a_TE, *, low):
  """ds4's expert-steering margin rule (the expert-steering PR's `expert_steering_apply_*`):
  where the action a > 0 the score becomes the row's max + a; where a < 0 it becomes 0 (the
  router scores: that expert's weight) or, with `low`, the row's min - |a| (the selection
  key: never chosen); a = 0 leaves it."""
  top = jnp.max(s_TE, axis=-1, keepdims=True) + jnp.abs(a_TE)
  down = (jnp.min(s_TE, axis=-1, keepdims=True) - jnp.abs(a_TE)) if low else jnp.zeros_like(s_TE)
  return jnp.where(a_TE > 0, top, jnp.where(a_TE < 0, down, s_TE))


def _n_experts(experts) -> int:
  return experts.n_experts if hasattr(experts, "expert") else experts[0].shape[0]


def _chosen(experts, e):
  """Expert `e`'s (gate, up, down): read by a one-at-a-time source, or sliced out of the
  stacked weights."""
  if hasattr(experts, "expert"):
    return experts.expert(e)
  return tuple(_expert(w, e) for w in experts)


def _expert(w_E__, e):
  """Expert `e` (traced) of a stacked `[E, ...]` weight: a dynamic slice, or the packed slab."""
  if isinstance(w_E__, Packed):
    return w_E__.index(e)
  return jax.lax.dynamic_index_in_dim(w_E__, e, 0, keepdims=False)
