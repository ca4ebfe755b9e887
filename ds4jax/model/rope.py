"""Interleaved partial RoPE on the tail of each head (ds4-architecture.md §2.0).

A head vector `[nope (H-R) | rope (R)]` rotates only its last R channels, in adjacent pairs
(GPT-J style, not NeoX halves). SWA-only layers use the "main" frequencies (base 10000);
compressed layers use the "compress" base with YaRN (no magnitude factor). The inverse uses
the conjugate rotation and undoes the rope that V picked up (K = V in DeepSeek V4).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ds4jax.config import ModelConfig


def yarn_ramp_range(cfg: ModelConfig) -> tuple[int, int]:
  """(lo, hi) pair indices of the YaRN ramp; (15, 25) for Flash."""
  r, base = cfg.rope_dim, cfg.compress_rope_base

  def corr(rot: float) -> float:
    return r * math.log(cfg.yarn_orig_ctx / (rot * 2 * math.pi)) / (2 * math.log(base))

  lo = max(math.floor(corr(cfg.yarn_beta_fast)), 0)
  hi = min(math.ceil(corr(cfg.yarn_beta_slow)), r - 1)
  return lo, hi


def rope_freqs(cfg: ModelConfig, kind: str) -> np.ndarray:
  """Per-pair angular frequencies f_i, float32 [R/2], for kind 'main' or 'compress'."""
  r = cfg.rope_dim
  idx_R2 = np.arange(0, r, 2, dtype=np.float64) / r
  if kind == "main":
    return (1.0 / cfg.rope_base ** idx_R2).astype(np.float32)
  if kind != "compress":
    raise ValueError(f"unknown rope kind {kind!r}: expected 'main' or 'compress'")
  base_R2 = 1.0 / cfg.compress_rope_base ** idx_R2
  lo, hi = yarn_ramp_range(cfg)
  if lo == hi:
    hi += 0.001
  ramp_R2 = np.clip((np.arange(r // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
  extrap_R2 = 1.0 - ramp_R2  # pairs below lo keep the base frequency
  freqs_R2 = base_R2 / cfg.yarn_factor * (1.0 - extrap_R2) + base_R2 * extrap_R2
  return freqs_R2.astype(np.float32)


class RoPE(nnx.Module):
  """Rotates the last R channels of head vectors at absolute positions.

  The frequencies are a static tuple (no parameters), chosen by the layer's rope kind.
  """

  def __init__(self, cfg: ModelConfig, *, layer_idx: int, rngs: nnx.Rngs | None = None,
               dtype=jnp.float32, kind: str | None = None):
    del rngs, dtype
    self.kind = kind or cfg.rope_kind(layer_idx)
    self.freqs = tuple(float(f) for f in rope_freqs(cfg, self.kind))
    self.rope_dim = cfg.rope_dim

  def cos_sin(self, pos_T):
    """pos_T: int [T] -> (cos, sin), each f32 [T, R/2]."""
    ang_TR = pos_T.astype(jnp.float32)[:, None] * jnp.asarray(self.freqs, jnp.float32)[None, :]
    return jnp.cos(ang_TR), jnp.sin(ang_TR)

  def __call__(self, x_TXH, pos_T, *, inverse: bool = False):
    """Rotates x: [T, ..., H] (any middle axes) at positions pos_T: [T]; f32 result."""
    cos_TR, sin_TR = self.cos_sin(pos_T)
    if inverse:
      sin_TR = -sin_TR
    extra = x_TXH.ndim - 2
    cos_TR = cos_TR.reshape(cos_TR.shape[:1] + (1,) * extra + cos_TR.shape[1:])
    sin_TR = sin_TR.reshape(sin_TR.shape[:1] + (1,) * extra + sin_TR.shape[1:])
    x_TXH = x_TXH.astype(jnp.float32)
    r = self.rope_dim
    nope_TXH = x_TXH[..., : x_TXH.shape[-1] - r]
    pairs = x_TXH[..., x_TXH.shape[-1] - r :].reshape(x_TXH.shape[:-1] + (r // 2, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rot = jnp.stack([a * cos_TR - b * sin_TR, a * sin_TR + b * cos_TR], axis=-1)
    return jnp.concatenate([nope_TXH, rot.reshape(x_TXH.shape[:-1] + (r,))], axis=-1)
