"""Candidates for the packed products of `quant.matmul` / `quant.expert_matmul` on the real
per-type DeepSeek V4 Flash shapes, timed in alternating rounds (used by
`scripts/bench_kernels.py`; docs/benchmarks.md "Packed kernels on the CPU").

Candidates (each jitted, weights passed as arguments, x f32 [M, K]):
  xla-fused   the jax.numpy fused dequantise-multiply-reduce (the decode path before)
  xla-dot     dequantise to f32 in the step, then a dot
  xla-int8    (Q8_0) x rounded to int8 blocks, an int8 x int8 -> int32 dot per block
              (`lax.dot_general`, blocks as a batch axis), block scales after the sum
  ffi         the C++ kernel (csrc/ds4_cpu.cc) through the XLA FFI, act="exact"
  ffi-q8      the same with act="q8"
"""

from __future__ import annotations

import os
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q

from ds4jax.bench.measure import median_call_s
from ds4jax.quant import cpu_ffi, kernels
from ds4jax.quant import matmul as qm
from ds4jax.quant.packed import FLOAT16_TYPES, Packed

# (type, N, K, what): numpy orientation [N, K], K contracted.
SHAPES = [
    (Q.Q8_0, 4096, 8192, "attn_output_b"),
    (Q.Q8_0, 32768, 1024, "attn_q_b"),
    (Q.Q8_0, 2048, 4096, "shared gate/up"),
    (Q.Q8_0, 129280, 4096, "output (head)"),
    (Q.F16, 1024, 4096, "compressor kv"),
    (Q.F16, 8192, 1024, "indexer q_b"),
    (Q.F16, 256, 4096, "router"),
    (Q.IQ2_XXS, 2048, 4096, "expert gate/up"),
    (Q.Q2_K, 4096, 2048, "expert down"),
    (Q.Q4_K, 2048, 4096, "expert (q4 file)"),
    (Q.MXFP4, 2048, 4096, "expert (mxfp4)"),
]
_SCALE_OFFSETS = {Q.Q8_0: (0,), Q.Q2_K: (80, 82), Q.Q4_K: (0, 2), Q.IQ2_XXS: (0,)}


def random_packed(qtype, shape, seed: int = 0) -> Packed:
  """A Packed f32 weight of random valid blocks (f16 scales ~ N(0, 0.02), MXFP4 exponents
  near 2**-5), or random F16 / BF16 values."""
  rng = np.random.default_rng(seed)
  q = Q(int(qtype))
  if q in FLOAT16_TYPES:
    vals = (rng.standard_normal(shape, np.float32) * 0.05)
    data = vals.astype(np.float16) if q == Q.F16 else vals.astype(jnp.bfloat16)
    return Packed.from_gguf_data(data, q, shape, jnp.float32)
  block, type_size = gguf.GGML_QUANT_SIZES[q]
  blocks = rng.integers(0, 256, tuple(shape[:-1]) + (shape[-1] // block, type_size), np.uint8)
  if q == Q.MXFP4:
    blocks[..., 0] = rng.integers(118, 128, blocks.shape[:-1])
  for off in _SCALE_OFFSETS.get(q, ()):
    d = (rng.standard_normal(blocks.shape[:-1], np.float32) * 0.02).astype(np.float16)
    blocks[..., off:off + 2] = d.view(np.uint8).reshape(blocks.shape[:-1] + (2,))
  return Packed.from_gguf_data(blocks.reshape(tuple(shape[:-1]) + (-1,)), q, shape, jnp.float32)


def read_gbs(n_bytes: int = 2 << 30, reps: int = 7) -> float:
  """GB/s at which XLA reads an f32 array of `n_bytes` (a sum; the floor's bandwidth)."""
  x = jnp.ones((n_bytes // 4,), jnp.float32)
  s = median_call_s(jax.jit(jnp.sum), x, reps=reps)
  del x
  return n_bytes / s / 1e9


def _xla_int8(x_MK, w: Packed):
  d_NB, qs_NB32 = w.planes
  m, k = x_MK.shape
  x_MB32 = x_MK.reshape(m, k // 32, 32)
  amax_MB = jnp.max(jnp.abs(x_MB32), -1)
  inv = jnp.where(amax_MB > 0, 127.0 / jnp.where(amax_MB > 0, amax_MB, 1), 0)
  q_MB32 = jnp.round(x_MB32 * inv[..., None]).astype(jnp.int8)
  isum_BMN = jax.lax.dot_general(q_MB32, qs_NB32, (((2,), (2,)), ((1,), (1,))),
                                 preferred_element_type=jnp.int32)
  scale_BMN = (amax_MB / 127.0).T[:, :, None] * kernels.f16_to_f32(d_NB).T[:, None, :]
  return jnp.sum(isum_BMN.astype(jnp.float32) * scale_BMN, axis=0)


def candidates(qtype) -> dict:
  """{name: f(x_MK, w) -> y_MN} for a weight of `qtype` (the C++ ones when they build)."""
  out = {"xla-fused": qm.matvec,
         "xla-dot": lambda x, w: qm.dot("MK,NK->MN", x, w.dense())}
  if Q(int(qtype)) == Q.Q8_0:
    out["xla-int8"] = _xla_int8
  if cpu_ffi.available():
    out["ffi"] = lambda x, w: cpu_ffi.matmul(x, w.planes, w.qtype, w.shape[0], "exact")
    if Q(int(qtype)) not in FLOAT16_TYPES:
      out["ffi-q8"] = lambda x, w: cpu_ffi.matmul(x, w.planes, w.qtype, w.shape[0], "q8")
  return out


def _time(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps


def bench_matmul(shapes=SHAPES, rows=(1, 8), rounds: int = 3, budget_s: float = 0.3,
                 skip=()) -> list[dict]:
  """Per (shape, M, candidate): median ms per call over `rounds` alternating rounds (each a
  batch of calls lasting about `budget_s`), and the packed GB/s that is."""
  res = []
  for q, n, k, what in shapes:
    w = random_packed(q, (n, k))
    fns = {name: jax.jit(f) for name, f in candidates(q).items() if name not in skip}
    if n * k * 4 > (1 << 30):  # the f32 weight would be > 1 GiB: no dequantise-then-dot
      fns.pop("xla-dot", None)
    for m in rows:
      x = jnp.asarray(np.random.default_rng(1).standard_normal((m, k), np.float32))
      reps = {}
      for name, f in fns.items():
        t = _time(f, (x, w), 1)
        reps[name] = max(1, int(budget_s / max(t, 1e-5)))
      times = {name: [] for name in fns}
      for r in range(rounds):
        names = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for name in names:
          times[name].append(_time(fns[name], (x, w), reps[name]))
      for name, ts in times.items():
        s = float(np.median(ts))
        res.append(dict(qtype=Q(q).name, n=n, k=k, what=what, m=m, impl=name, ms=1e3 * s,
                        gbs=w.nbytes / s / 1e9))
    del w
  return res


def bench_experts(qtype=Q.IQ2_XXS, shape=(256, 2048, 4096), batches=(1, 8), k: int = 6,
                  rounds: int = 3, budget_s: float = 0.3, skip=()) -> list[dict]:
  """expert_matmul of B rows x k chosen experts each (random, distinct per row) on a stacked
  [E, N, K] weight: the jax.numpy per-pair reference against the C++ kernel (exact and q8).
  GB/s counts the distinct experts' bytes."""
  w = random_packed(qtype, shape)
  e_n = shape[0]
  fns = {"xla-pairs": jax.jit(lambda x, w, e: qm.reference_expert_matmul(x, w, e))}
  if cpu_ffi.available():
    for name, act in (("ffi", "exact"), ("ffi-q8", "q8")):
      fns[name] = jax.jit(lambda x, w, e, act=act: cpu_ffi.expert_matmul(
          x, e, w.planes, w.qtype, e_n, shape[1], act))
  fns = {name: f for name, f in fns.items() if name not in skip}
  res = []
  rng = np.random.default_rng(2)
  for b in batches:
    e_P = jnp.asarray(np.concatenate([rng.choice(e_n, k, replace=False) for _ in range(b)])
                      .astype(np.int32))
    x = jnp.asarray(rng.standard_normal((b * k, shape[2]), np.float32))
    read = len(np.unique(np.asarray(e_P))) * w.nbytes / e_n
    times = {name: [] for name in fns}
    reps = {name: max(1, int(budget_s / max(_time(f, (x, w, e_P), 1), 1e-5)))
            for name, f in fns.items()}
    for r in range(rounds):
      for name in list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]:
        times[name].append(_time(fns[name], (x, w, e_P), reps[name]))
    for name, ts in times.items():
      s = float(np.median(ts))
      res.append(dict(qtype=Q(qtype).name, shape=shape, b=b, impl=name, ms=1e3 * s,
                      gbs=read / s / 1e9))
  return res


def load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())
