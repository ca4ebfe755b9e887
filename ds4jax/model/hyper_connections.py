"""Manifold-constrained hyper-connections (ds4-architecture.md §2.2) and the head reduction (§2.5).

The residual is C parallel streams `[T, C, D]`. Each sublayer reads one mixed row
`y = sum_i pre_i X_i` and writes back `X'_j = post_j f + sum_i comb_ij X_i`, where comb is
projected towards a doubly stochastic matrix by Sinkhorn iterations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ds4jax.config import ModelConfig
from ds4jax.model import ops
from ds4jax.model.norms import RMSNorm


def _mix(x_TCD, fn_MX, eps: float):
  """mu = fn . RMS(vec(X)), all in f32: [T, C, D] -> [T, M]."""
  x_TX = ops.rms(x_TCD.reshape(x_TCD.shape[0], -1), eps)
  return jnp.einsum("TX,MX->TM", x_TX, fn_MX.astype(jnp.float32), precision=ops.HIGHEST)


def sinkhorn(logits_TCC, iters: int, eps: float):
  """Row softmax, then alternating column/row normalisation (column first, `iters` columns)."""
  comb_TCC = jax.nn.softmax(logits_TCC, axis=-1) + eps
  comb_TCC = comb_TCC / (jnp.sum(comb_TCC, axis=-2, keepdims=True) + eps)

  def body(_, c_TCC):
    c_TCC = c_TCC / (jnp.sum(c_TCC, axis=-1, keepdims=True) + eps)
    return c_TCC / (jnp.sum(c_TCC, axis=-2, keepdims=True) + eps)

  # A rolled loop keeps the compiled program small (40 normalisations per layer otherwise).
  return jax.lax.fori_loop(0, iters - 1, body, comb_TCC)


class HyperConnection(nnx.Module):
  """One HC set ('attn' or 'ffn'): params fn [(2+C)C, C*D], base [(2+C)C], scale [3]."""

  def __init__(self, cfg: ModelConfig, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32):
    del layer_idx
    c, d = cfg.n_hc, cfg.d_model
    self.n_hc, self.iters = c, cfg.sinkhorn_iters
    self.hc_eps, self.rms_eps = float(cfg.hc_eps), float(cfg.rms_eps)
    self.fn = ops.param(rngs, (cfg.hc_mix, c * d), jnp.float32)
    self.base = ops.const_param((cfg.hc_mix,), jnp.float32, 0.0)
    self.scale = ops.const_param((3,), jnp.float32, 1.0)

  def pre(self, x_TCD):
    """Returns (y_TD f32, post_TC, comb_TCC) for the sublayer input and the write-back."""
    c = self.n_hc
    mu_TM = _mix(x_TCD, ops.dense(self.fn[...]), self.rms_eps)
    base_M, scale_3 = self.base[...], self.scale[...]
    pre_TC = jax.nn.sigmoid(mu_TM[:, :c] * scale_3[0] + base_M[None, :c]) + self.hc_eps
    post_TC = 2.0 * jax.nn.sigmoid(mu_TM[:, c:2 * c] * scale_3[1] + base_M[None, c:2 * c])
    logits_TCC = (mu_TM[:, 2 * c:] * scale_3[2] + base_M[None, 2 * c:]).reshape(-1, c, c)
    comb_TCC = sinkhorn(logits_TCC, self.iters, self.hc_eps)
    y_TD = jnp.einsum("TC,TCD->TD", pre_TC, x_TCD.astype(jnp.float32), precision=ops.HIGHEST)
    return y_TD, post_TC, comb_TCC

  @staticmethod
  def post(x_TCD, f_TD, post_TC, comb_TCC):
    """X'_j = post_j f + sum_i comb_ij X_i: [T, C, D]."""
    mixed_TCD = jnp.einsum("TIJ,TID->TJD", comb_TCC, x_TCD.astype(jnp.float32),
                           precision=ops.HIGHEST)
    return post_TC[:, :, None] * f_TD.astype(jnp.float32)[:, None, :] + mixed_TCD


class Head(nnx.Module):
  """HC reduction (no Sinkhorn), final RMSNorm and the output projection to logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, layer_idx: int = -1):
    del layer_idx
    c, d = cfg.n_hc, cfg.d_model
    self.hc_eps, self.rms_eps = float(cfg.hc_eps), float(cfg.rms_eps)
    self.hc_fn = ops.param(rngs, (c, c * d), jnp.float32)
    self.hc_base = ops.const_param((c,), jnp.float32, 0.0)
    self.hc_scale = ops.const_param((1,), jnp.float32, 1.0)
    self.norm = RMSNorm(cfg, dim=d)
    self.out = ops.param(rngs, (cfg.vocab_size, d), dtype)

  def __call__(self, x_TCD):
    """x: [T, C, D] -> logits f32 [T, V]."""
    mu_TC = _mix(x_TCD, ops.dense(self.hc_fn[...]), self.rms_eps)
    pre_TC = jax.nn.sigmoid(mu_TC * self.hc_scale[...][0] + self.hc_base[...][None, :]) + self.hc_eps
    h_TD = jnp.einsum("TC,TCD->TD", pre_TC, x_TCD.astype(jnp.float32), precision=ops.HIGHEST)
    return ops.einsum("TD,VD->TV", self.norm(h_TD), self.out[...])
