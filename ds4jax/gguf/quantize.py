"""Numpy quantisers for the 2-bit GGML types that gguf-py can only dequantise: Q2_K and IQ2_XXS.

Each returns the GGUF bytes (`uint8 [..., row_bytes]`, `gguf.quants.quant_shape_to_byte_shape`)
of a float array whose last axis is a multiple of 256; `gguf.quants.dequantize` reads them
back. They search per sub-block scales by least squares, without an importance matrix
(llama.cpp's imatrix), so they are a little worse than llama.cpp's quantisers on real models.

Q2_K (84 bytes per 256 values): 16 sub-blocks of 16, x = d*sc*q - dmin*m, q in 0..3, sc and
m 4-bit, d and dmin f16. Bytes: scales[16] (sc | m << 4), qs[64], d, dmin; value
128*h + 32*s + i is bits 2s of qs[32*h + i].

IQ2_XXS (66 bytes per 256 values): f16 d, then 8 sub-blocks of 32 as two uint32: four grid
indices (one byte per 8 values, a row of the 256 x 8 grid of magnitudes {8, 25, 43}), and
four 7-bit sign indices plus a 4-bit scale s in the top bits: x = d*(0.5+s)/4 * grid * sign.
An 8-value sign pattern must have an even number of minus signs (the 8th sign is parity): if
it has an odd number, the smallest value gets the wrong sign, and the grid search sees it as
negative (llama.cpp's rule).
"""

from __future__ import annotations

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

QK = 256


def _blocks(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x, np.float32)
  if x.shape[-1] % QK:
    raise ValueError(f"the last axis ({x.shape[-1]}) must be a multiple of {QK}")
  return x.reshape(-1, QK)


def _f16(v: np.ndarray) -> np.ndarray:
  return v.astype(np.float16).astype(np.float32)


# --------------------------------------------------------------------------------- Q2_K
def _fit_scale_min(x_SN: np.ndarray, nmax: int, iters: int = 4):
  """Per row of x, the (a >= 0, m >= 0) minimising ||x - (a q - m)||^2, q = round((x+m)/a)
  clipped to [0, nmax]: a few starting scales, each refined by least squares."""
  lo = np.minimum(x_SN.min(axis=1), 0.0)
  hi = x_SN.max(axis=1)
  span = np.maximum(hi - lo, 1e-30)
  best_err = np.full(len(x_SN), np.inf)
  best_a, best_m = span / nmax, -lo
  for f in np.linspace(0.85, 1.25, 9):
    a, m = span / nmax * f, -lo
    for _ in range(iters):
      q = np.clip(np.rint((x_SN + m[:, None]) / np.maximum(a, 1e-30)[:, None]), 0, nmax)
      # Least squares for x = a q - m: [q, -1] [a, m]^T.
      n = x_SN.shape[1]
      sq, sqq, sx, sqx = q.sum(1), (q * q).sum(1), x_SN.sum(1), (q * x_SN).sum(1)
      det = n * sqq - sq * sq
      ok = det > 0
      a_new = np.where(ok, (n * sqx - sq * sx) / np.where(ok, det, 1), a)
      m_new = np.where(ok, (sq * sqx - sqq * sx) / np.where(ok, det, 1), m)
      neg = m_new < 0  # the min must not be positive: refit a with m = 0
      a_new = np.where(neg, sqx / np.maximum(sqq, 1e-30), a_new)
      m_new = np.where(neg, 0.0, m_new)
      a, m = np.maximum(a_new, 0.0), m_new
    q = np.clip(np.rint((x_SN + m[:, None]) / np.maximum(a, 1e-30)[:, None]), 0, nmax)
    err = ((a[:, None] * q - m[:, None] - x_SN) ** 2).sum(1)
    better = err < best_err
    best_err = np.where(better, err, best_err)
    best_a, best_m = np.where(better, a, best_a), np.where(better, m, best_m)
  return best_a, best_m


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
  """float [..., n] (n % 256 == 0) -> Q2_K bytes uint8 [..., n // 256 * 84]."""
  xb = _blocks(x)
  nb = len(xb)
  x_SN = xb.reshape(nb * 16, 16)
  a_S, m_S = _fit_scale_min(x_SN, 3)
  a_BS, m_BS = a_S.reshape(nb, 16), m_S.reshape(nb, 16)
  d = _f16(a_BS.max(1) / 15.0)
  dmin = _f16(m_BS.max(1) / 15.0)
  sc = np.clip(np.rint(a_BS / np.where(d > 0, d, 1)[:, None]), 0, 15).astype(np.uint8)
  mi = np.clip(np.rint(m_BS / np.where(dmin > 0, dmin, 1)[:, None]), 0, 15).astype(np.uint8)
  step_BS = d[:, None] * sc
  off_BS = dmin[:, None] * mi
  x_BSN = xb.reshape(nb, 16, 16)
  q = np.rint((x_BSN + off_BS[:, :, None]) / np.where(step_BS > 0, step_BS, 1)[:, :, None])
  q = np.where(step_BS[:, :, None] > 0, np.clip(q, 0, 3), 0).astype(np.uint8)
  q_BHSI = q.reshape(nb, 2, 4, 32)
  qs = np.zeros((nb, 2, 32), np.uint8)
  for s in range(4):
    qs |= q_BHSI[:, :, s, :] << np.uint8(2 * s)
  out = np.concatenate([sc | (mi << np.uint8(4)), qs.reshape(nb, 64),
                        d.astype(np.float16).view(np.uint8).reshape(nb, 2),
                        dmin.astype(np.float16).view(np.uint8).reshape(nb, 2)], axis=1)
  return out.reshape(gguf.quants.quant_shape_to_byte_shape(np.shape(x), Q.Q2_K))


# ------------------------------------------------------------------------------ IQ2_XXS
def _iq2_grid() -> np.ndarray:
  """The 256 x 8 IQ2_XXS magnitude grid (values 8, 25, 43), float32."""
  cls = gguf.quants.IQ2_XXS
  if cls.grid is None:
    cls.init_grid()
  return np.asarray(cls.grid, np.float32).reshape(256, 8)


def _nearest(a_GE: np.ndarray, scale_G: np.ndarray, grid_KE, gnorm_K):
  """Per group: the grid row k minimising ||a - scale * grid_k||^2, and that error."""
  dots_GK = a_GE @ grid_KE.T
  err_GK = scale_G[:, None] ** 2 * gnorm_K[None, :] - 2 * scale_G[:, None] * dots_GK
  idx_G = np.argmin(err_GK, axis=1)
  err_G = np.take_along_axis(err_GK, idx_G[:, None], 1)[:, 0] + (a_GE ** 2).sum(1)
  return idx_G, err_G


def quantize_iq2_xxs(x: np.ndarray, *, chunk: int = 1024) -> np.ndarray:
  """float [..., n] (n % 256 == 0) -> IQ2_XXS bytes uint8 [..., n // 256 * 66].

  Pipeline (per chunk of blocks):
    1. signs: per 8 values, the minus signs (odd count: flip the smallest |x|); a = the
       magnitudes, the flipped one negated;
    2. per 32-value sub-block, the scale S of grid values: the best of 17 candidates around
       max(a) / 43, each with the nearest grid row per group, then refit by least squares;
    3. d = max S * 4 / 15.5 (f16); s = round(4 S / d - 0.5) in 0..15; grid rows again for the
       rounded scales; pack.
  """
  xb = _blocks(x)
  grid_KE = _iq2_grid()
  gnorm_K = (grid_KE ** 2).sum(1)
  out = np.zeros((len(xb), 66), np.uint8)
  for c0 in range(0, len(xb), chunk):
    xc = xb[c0:c0 + chunk]
    nb = len(xc)
    x_GE = xc.reshape(nb * 32, 8)  # groups of 8; 4 groups per sub-block, 32 per block
    neg_GE = x_GE < 0
    odd_G = neg_GE.sum(1) % 2 == 1
    imin_G = np.argmin(np.abs(x_GE), axis=1)
    flip_GE = np.zeros_like(neg_GE)
    flip_GE[np.arange(len(x_GE)), imin_G] = odd_G
    sign_GE = neg_GE ^ flip_GE
    a_GE = np.abs(x_GE) * np.where(flip_GE, -1.0, 1.0)
    n_sub = nb * 8
    amax_S = np.abs(x_GE).reshape(n_sub, 32).max(1)
    best_S, best_err = amax_S / 43.0, np.full(n_sub, np.inf)
    for f in np.linspace(0.6, 1.4, 17):
      s_S = amax_S / 43.0 * f
      _, err_G = _nearest(a_GE, np.repeat(s_S, 4), grid_KE, gnorm_K)
      err_S = err_G.reshape(n_sub, 4).sum(1)
      better = err_S < best_err
      best_err, best_S = np.where(better, err_S, best_err), np.where(better, s_S, best_S)
    idx_G, _ = _nearest(a_GE, np.repeat(best_S, 4), grid_KE, gnorm_K)
    g_GE = grid_KE[idx_G]
    num = (a_GE * g_GE).reshape(n_sub, 32).sum(1)
    den = (g_GE * g_GE).reshape(n_sub, 32).sum(1)
    s_S = np.maximum(num / den, 0.0)
    s_BS = s_S.reshape(nb, 8)
    d_B = _f16(s_BS.max(1) * 4.0 / 15.5)
    sc_BS = np.clip(np.rint(4.0 * s_BS / np.where(d_B > 0, d_B, 1)[:, None] - 0.5), 0, 15)
    eff_S = (d_B[:, None] * (0.5 + sc_BS) * 0.25).reshape(-1)
    idx_G, _ = _nearest(a_GE, np.repeat(eff_S, 4), grid_KE, gnorm_K)
    bits_GE = sign_GE.astype(np.uint32) << np.arange(8, dtype=np.uint32)
    signidx_G = (bits_GE.sum(1) & 0x7F).astype(np.uint32)
    sig_S4 = signidx_G.reshape(n_sub, 4)
    aux1_S = (sig_S4 << np.array([0, 7, 14, 21], np.uint32)).sum(1).astype(np.uint32)
    aux1_S |= sc_BS.reshape(-1).astype(np.uint32) << np.uint32(28)
    aux0_S4 = idx_G.astype(np.uint8).reshape(n_sub, 4)
    sub = np.concatenate([aux0_S4, aux1_S.astype("<u4").view(np.uint8).reshape(n_sub, 4)], 1)
    out[c0:c0 + nb, :2] = d_B.astype(np.float16).view(np.uint8).reshape(nb, 2)
    out[c0:c0 + nb, 2:] = sub.reshape(nb, 64)
  return out.reshape(gguf.quants.quant_shape_to_byte_shape(np.shape(x), Q.IQ2_XXS))


QUANTISERS = {Q.Q2_K: quantize_q2_k, Q.IQ2_XXS: quantize_iq2_xxs}


def quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
  """Bytes of `x` as `qtype`: Q2_K / IQ2_XXS here, the rest through gguf-py."""
  fn = QUANTISERS.get(qtype)
  return fn(x) if fn is not None else gguf.quants.quantize(np.asarray(x, np.float32), qtype)
