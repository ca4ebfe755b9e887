"""The training forward: the inference modules, called on a fresh decode state per sequence.

`batch_logits(stage, tokens_BT)` runs B sequences, each from position 0, through the very
`Stage` that `StageRunner` serves (`Embed`, each `Block`'s hyper-connections, norms,
`Attention` with its compressor and indexer, the `MoE` router, the `Head`). Attention runs
per sequence (vmapped) on a decode state made fresh for it and thrown away after it; the
per-token parts run on all B*T tokens at once. It differs from `Block.__call__` in one place
only: the routed experts (`grouped_experts`) use fixed-shape blocks of one expert each,
because the grouped branch that inference takes for long chunks loops over a data-dependent
number of blocks, which reverse-mode autodiff cannot go through, and the dense branch
computes every expert on every token (4x the FLOPs at k = 2 of 8). All three compute the same
function; `tests/train/` checks the logits against `StageRunner.forward`.

What trains, and what does not (`param_filters`):
- every float parameter of every module gets gradients, except the indexer's;
- `moe.tid2eid` (hash layers) is a fixed int table: token id -> k experts, no gradient;
- `moe.bias` only selects experts (top-k of p + bias) and so has no gradient either; it is
  updated by DeepSeek's auxiliary-loss-free balancing rule instead (`balance_bias`): after
  each step, experts that took more than their share of the batch's tokens lose `rate`,
  the others gain it. The router's `gate` trains through the weights of the chosen experts;
- the indexer (`attn.indexer.*`) is frozen at its initialisation: it only picks which
  compressed windows a CSA query reads (a top-k), so the next-token loss gives it no
  gradient. DeepSeek trains it with a separate KL loss against the main attention; this
  trainer does not (the CSA layer still trains everything else, and its attention over the
  windows the frozen indexer picks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ds4jax.model import decode_state, ops
from ds4jax.model.hyper_connections import HyperConnection
from ds4jax.model.moe import MoE, swiglu
from ds4jax.model.stage import Stage

# Parameters outside the optimizer: fixed (tid2eid, the indexer) or rule-updated (bias).
FIXED = nnx.Any(nnx.PathContains("tid2eid"), nnx.PathContains("indexer"))
BIAS = nnx.PathContains("bias")


def param_filters():
  """(trained, bias, fixed) nnx filters that partition a Stage's parameters."""
  trained = nnx.All(nnx.Param, nnx.Not(FIXED), nnx.Not(BIAS))
  return trained, nnx.All(nnx.Param, BIAS), nnx.All(nnx.Param, FIXED)


def grouped_experts(moe: MoE, x_ND, idx_NK, w_NK, block: int):
  """The routed experts of N tokens, as fixed-shape blocks of one expert each.

  Exactly `MoE.__call__`'s routed sum (no token is dropped), in a form reverse-mode autodiff
  goes through: every expert's (token, expert) pairs are padded to a multiple of `block`
  rows, so G = N*k // block + E blocks always hold them all; each block multiplies by its
  expert's weights (picked by a one-hot matmul, whose gradient is a matmul too).

  Args:
    x_ND: [N, D] normalised input; idx_NK: int32 [N, k]; w_NK: f32 [N, k]; block: rows.

  Returns:
    [N, D] f32.

  Pipeline:
    1. pairs sorted by expert (stable); pair -> slot: its expert's padded start + its rank;
    2. rows scattered to slots [G*block, D]; block g belongs to the expert whose padded
       range holds row g*block (blocks past the last are zero rows of the last expert);
    3. SwiGLU per block with that expert's weights, rows weighted; each token sums its k slots.
  """
  n, d = x_ND.shape
  e_n, k = moe.n_experts, moe.k
  n_pairs = n * k
  n_blocks = n_pairs // block + e_n
  e_P = idx_NK.reshape(-1)
  order_P = jnp.argsort(e_P, stable=True)                    # sorted rank -> pair
  count_E = jnp.zeros((e_n,), jnp.int32).at[e_P].add(1)
  padded_E = (count_E + block - 1) // block * block
  start_E = jnp.cumsum(padded_E) - padded_E                 # padded first row of each expert
  first_E = jnp.cumsum(count_E) - count_E                   # first sorted rank of each expert
  e_sorted_P = e_P[order_P]
  slot_sorted_P = start_E[e_sorted_P] + jnp.arange(n_pairs) - first_E[e_sorted_P]
  slot_P = jnp.zeros((n_pairs,), jnp.int32).at[order_P].set(slot_sorted_P.astype(jnp.int32))
  rows = n_blocks * block
  x_SD = jnp.zeros((rows, d), jnp.float32).at[slot_P].set(
      jnp.repeat(x_ND.astype(jnp.float32), k, axis=0))
  w_S = jnp.zeros((rows,), jnp.float32).at[slot_P].set(w_NK.reshape(-1))
  end_E = start_E + padded_E
  blk_G = jnp.searchsorted(end_E, jnp.arange(n_blocks) * block, side="right")
  onehot_GE = jax.nn.one_hot(jnp.minimum(blk_G, e_n - 1), e_n, dtype=jnp.float32)
  gate_GFD = jnp.einsum("GE,EFD->GFD", onehot_GE, moe.gate_exps[...].astype(jnp.float32))
  up_GFD = jnp.einsum("GE,EFD->GFD", onehot_GE, moe.up_exps[...].astype(jnp.float32))
  down_GDF = jnp.einsum("GE,EDF->GDF", onehot_GE, moe.down_exps[...].astype(jnp.float32))
  x_GBD = x_SD.reshape(n_blocks, block, d)
  h_GBF = swiglu(ops.einsum("GBD,GFD->GBF", x_GBD, gate_GFD),
                 ops.einsum("GBD,GFD->GBF", x_GBD, up_GFD), moe.limit)
  h_GBF = h_GBF * w_S.reshape(n_blocks, block)[:, :, None]
  y_SD = ops.einsum("GBF,GDF->GBD", h_GBF, down_GDF).reshape(rows, d)
  return jnp.sum(y_SD[slot_P].reshape(n, k, d), axis=1)


def moe_forward(moe: MoE, x_ND, tokens_N, block: int):
  """`MoE.__call__` for training: x [N, D], tokens int32 [N] -> ([N, D] f32, experts
  int32 [N, k]). The router is the module's own `route`."""
  idx_NK, w_NK = moe.route(x_ND, tokens_N)
  routed_ND = grouped_experts(moe, x_ND, idx_NK, w_NK, block)
  sg_NF = ops.einsum("ND,FD->NF", x_ND, moe.shared_gate[...])
  su_NF = ops.einsum("ND,FD->NF", x_ND, moe.shared_up[...])
  shared_ND = ops.einsum("NF,DF->ND", swiglu(sg_NF, su_NF, moe.limit), moe.shared_down[...])
  return routed_ND + shared_ND, idx_NK


def batch_logits(stage: Stage, tokens_BT, *, block: int = 128):
  """B sequences, each from position 0, through a whole-model stage.

  Attention runs per sequence (vmapped) on a decode state made fresh for it; everything
  else is per token and runs on the B*T tokens at once.

  Args:
    stage: a Stage with the embedding and the head (layers 'all').
    tokens_BT: int32 [B, T].
    block: rows per expert block of the routed experts (see `grouped_experts`).

  Returns:
    (logits f32 [B, T, V], experts: tuple of int32 [B*T, k], one per block).
  """
  b, t = tokens_BT.shape
  cap = decode_state.Capacity(ctx_size=t, max_chunk=t)
  state = decode_state.init_stage_state(stage.cfg, stage.layers, cap)
  pos0 = jnp.zeros((), jnp.int32)
  tokens_N = tokens_BT.reshape(-1)
  x_NCD = stage.embed(tokens_N)
  experts = []
  for blk, st in zip(stage.blocks, state.layers):
    # Block.__call__: attention per sequence, the rest per token.
    y_ND, post_NC, comb_NCC = blk.hc_attn.pre(x_NCD)
    attend = lambda y_TD, blk=blk, st=st: blk.attn(blk.attn_norm(y_TD), pos0, st)[0]
    a_ND = jax.vmap(attend)(y_ND.reshape(b, t, -1)).reshape(b * t, -1)
    x_NCD = HyperConnection.post(x_NCD, a_ND, post_NC, comb_NCC)
    y_ND, post_NC, comb_NCC = blk.hc_ffn.pre(x_NCD)
    f_ND, idx_NK = moe_forward(blk.moe, blk.ffn_norm(y_ND), tokens_N, block)
    x_NCD = HyperConnection.post(x_NCD, f_ND, post_NC, comb_NCC)
    experts.append(idx_NK)
  return stage.head(x_NCD).reshape(b, t, -1), tuple(experts)


def batch_loss(stage: Stage, inputs_BT, targets_BT, weights_BT, *, block: int = 128):
  """Mean next-token cross-entropy over the weighted positions of a batch.

  Args:
    inputs_BT, targets_BT: int32 [B, T]; weights_BT: f32 [B, T] (0 = ignore).

  Returns:
    (loss f32 [], (sum of token losses f32 [], sum of weights f32 [],
    per-block expert loads: tuple of f32 [E] counts of (token, expert) pairs)).
  """
  logits_BTV, experts = batch_logits(stage, inputs_BT, block=block)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  total, count = jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)
  n_exp = stage.cfg.n_experts
  loads = tuple(jnp.sum(jax.nn.one_hot(idx_NK, n_exp, dtype=jnp.float32), axis=(0, 1))
                for idx_NK in experts)
  return total / jnp.maximum(count, 1.0), (total, count, loads)


def balance_bias(bias_state: nnx.State, loads, stage_cfg, rate: float) -> nnx.State:
  """Auxiliary-loss-free load balancing (DeepSeek V3): bias_e += rate * sign(mean - load_e)
  on the non-hash layers, whose top-k the bias steers; hash layers keep theirs (unused)."""
  flat = dict(nnx.to_flat_state(bias_state))
  out = {}
  for path, var in flat.items():
    il = int(path[1])  # ('blocks', il, 'moe', 'bias'); the stage holds every layer
    b_E = var[...]
    if not stage_cfg.is_hash_layer(il):
      load_E = loads[il]
      b_E = b_E + rate * jnp.sign(jnp.mean(load_E) - load_E)
    out[path] = var.replace(b_E)
  return nnx.from_flat_state(out)
