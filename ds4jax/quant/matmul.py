"""The kernel interface of packed products (docs/design.md §8.1, issue 21):

    matmul(x_MK: f32[M, K], w: Packed[N, K], *, act="exact") -> f32[M, N]
    expert_matmul(x_PK: f32[P, K], w: Packed[E, N, K], e_P: int32[P], *, act="exact")
        -> f32[P, N]      # row p times expert e_P[p]; an id outside [0, E) gives a zero row

Every packed product of the model goes through these two (via `model.ops` and
`model.moe`). A call reads each weight byte once and unpacks it once, whatever its rows.

Implementations, chosen when the step is lowered (`lax.platform_dependent`):
- CPU: the C++ kernels of `quant.cpu_ffi` (an XLA FFI custom call; csrc/ds4_cpu.cc) for up to
  `KERNEL_ROWS` rows (per expert), f32 compute dtype. `DS4JAX_CPU_KERNELS` = `auto`
  (default: the C++ kernels when they build, else the jax.numpy ones with a one-line warning),
  `ffi` (the C++ kernels or a one-line error) or `xla` (the jax.numpy kernels).
- cuda / tpu: the Pallas kernels of `quant.pallas_gpu` (Triton) and `quant.pallas_tpu`
  (Mosaic) for up to `KERNEL_ROWS` rows of a matmul (an expert_matmul's rows up to their
  MAX_ROWS), f32 or bf16 compute dtype, where their tiles fit the weight (`plan`).
  `DS4JAX_ACCEL_KERNELS` = `pallas` (default) or `xla` (the jax.numpy kernels).
- everywhere else, and the reference: jax.numpy (`kernels.dequant_*`): a fused
  dequantise-multiply-reduce over the weight's blocks for a few rows, dequantise-then-dot
  (in row tiles for a big weight) for more.
Longer x (prefill chunks) always dequantise once and then dot, bit-identical to the
dequantised (`weights="dequantized"`) path.

`act` (a load option, carried by each `Packed` as `w.act`):
- "exact": the products are the exact f32 products of x and gguf-py's dequantised weights;
  only the summation order differs between implementations (tests/quant/matmul_test.py
  bounds it).
- "q8": each 32-element block of x (for block-type weights; F16/BF16 stay exact) is first
  rounded to int8 times amax / 127 (`quantize_act`), as ggml quantises activations before its
  integer dot products; the error this adds is at most
  `sum_b amax_b / 254 * sum_{k in b} |w_nk|` per output (`q8_error_bound`, tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q

from ds4jax.quant import cpu_ffi, pallas_gpu, pallas_tpu
from ds4jax.quant.packed import FLOAT16_TYPES, Packed

HIGHEST = jax.lax.Precision.HIGHEST
ACTS = ("exact", "q8")
# Rows (per expert) up to which the CPU kernel runs; longer x: dequantise, then dot.
KERNEL_ROWS = 16
# Rows of x up to which the jax.numpy path runs a fused dequantise-and-reduce.
MATVEC_ROWS = 8
# A packed 2-D weight whose f32 form is larger than this is dequantised in row tiles.
TILE_BYTES = 256 << 20
# A packed weight this big or bigger as f32 is dequantised only once its product's input
# exists (`after`). 16 MiB left each Flash layer's 1-8 MiB weights (about 25 MiB a layer)
# to be dequantised at the top of a prefill step, every layer's at once; the tiny model's
# weights are all under 1 MiB (docs/benchmarks.md, "Memory that does not grow with the
# layer count").
TIE_BYTES = 1 << 20
IMPLS = ("auto", "ffi", "xla")
ACCEL_IMPLS = ("pallas", "xla")
# lax.platform_dependent platform -> the Pallas kernel module lowered for it.
PALLAS = {"cuda": pallas_gpu, "tpu": pallas_tpu}
# jax.default_backend() -> its lax.platform_dependent platform.
_PLATFORM = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "tpu": "tpu"}


def check_act(act: str) -> str:
  if act not in ACTS:
    raise ValueError(f"unsupported activations {act!r}: expected 'exact' or 'q8'")
  return act


def cpu_impl() -> str:
  """`DS4JAX_CPU_KERNELS` (auto | ffi | xla)."""
  impl = os.environ.get("DS4JAX_CPU_KERNELS", "auto")
  if impl not in IMPLS:
    raise ValueError(f"DS4JAX_CPU_KERNELS={impl!r}: expected auto, ffi or xla")
  return impl


def accel_impl() -> str:
  """`DS4JAX_ACCEL_KERNELS` (pallas | xla): GPU and TPU products through the Pallas kernels
  (default) or the jax.numpy reference."""
  impl = os.environ.get("DS4JAX_ACCEL_KERNELS", "pallas")
  if impl not in ACCEL_IMPLS:
    raise ValueError(f"DS4JAX_ACCEL_KERNELS={impl!r}: expected pallas or xla")
  return impl


def uses_kernel(w: Packed) -> bool:
  """Whether products with `w` run a kernel on the default backend (at trace time): on the
  CPU the C++ kernels (enabled and built, f32 compute), on a GPU or a TPU the Pallas ones
  (enabled, and their tiles fit w)."""
  if jax.default_backend() != "cpu":
    return _PLATFORM.get(jax.default_backend()) in pallas_platforms(w, 1)
  return uses_cpu_kernel(w)


def uses_cpu_kernel(w: Packed) -> bool:
  """Whether products with `w` run the C++ kernels (at trace time: the default backend is the
  CPU, the kernels are enabled and built, f32 compute)."""
  if jax.default_backend() != "cpu" or jnp.dtype(w.dtype) != jnp.float32:
    return False
  impl = cpu_impl()
  if impl == "xla":
    return False
  if impl == "ffi":
    cpu_ffi.ensure()
    return True
  return cpu_ffi.available()


_LOWERING_FOR: tuple[str, ...] | None = None


@contextlib.contextmanager
def lowering_for(*platforms: str):
  """Steps traced inside carry every branch behind `lax.platform_dependent`: this backend's
  kernel, the Pallas kernels of `platforms` (cuda, tpu) and the jax.numpy reference for any
  other platform, e.g. to `jax.export` a step for a GPU or a TPU from a CPU-only host:

      with quant.matmul.lowering_for("cuda", "tpu"):
        exp = jax.export.export(jax.jit(step), platforms=["cuda", "tpu"])(*args)

  Outside it, a step carries only the default backend's kernel, or the reference (tracing
  every platform's branch on every host doubled the trace time of a CPU step). Trace the
  step inside it: a jitted function traced before, outside, keeps that trace in its cache."""
  global _LOWERING_FOR
  bad = set(platforms) - set(PALLAS)
  if bad:
    raise ValueError(f"lowering_for: unknown platforms {sorted(bad)}: expected cuda or tpu")
  before, _LOWERING_FOR = _LOWERING_FOR, tuple(platforms)
  try:
    yield
  finally:
    _LOWERING_FOR = before


def _targets() -> tuple[str, ...]:
  if _LOWERING_FOR is not None:
    return _LOWERING_FOR
  here = _PLATFORM.get(jax.default_backend())
  return (here,) if here in PALLAS else ()


def pallas_platforms(w: Packed, p: int) -> tuple[str, ...]:
  """The platforms (cuda, tpu) a step traced now carries a Pallas branch for (the default
  backend's, or those of `lowering_for`) whose kernel tiles w ([N, K] or [E, N, K]) for p
  rows (none with DS4JAX_ACCEL_KERNELS=xla)."""
  if accel_impl() == "xla":
    return ()
  return tuple(plat for plat in _targets()
               if PALLAS[plat].plan(w, row_bucket(p)) is not None)


def row_bucket(p: int) -> int:
  """The rows a Pallas call of p rows runs with: a power of two >= 16."""
  return max(16, 1 << max(0, (p - 1).bit_length()))


def pallas_expert_matmul(x_PK, w3: Packed, e_P, *, act: str, platform: str,
                         interpret: bool = False):
  """The Pallas branch of `matmul` / `expert_matmul` for `platform` (cuda | tpu): x rounded
  as `act` asks (`quantize_act` in q8 mode), then that platform's kernel on w3 [E, N, K].
  interpret: the kernel in Pallas interpret mode (on any backend; what the tests run).

  The branch is traced where the step is (for the default backend's platform, or under
  `lowering_for` on any host), once per weight shape and row bucket: rows are padded to a
  power of two >= 16 (zero rows, expert -1) outside a jit."""
  p = x_PK.shape[0]
  rows = row_bucket(p)
  x = jnp.pad(x_PK, ((0, rows - p), (0, 0)))
  e = jnp.pad(e_P.astype(jnp.int32), (0, rows - p), constant_values=-1)
  return _pallas_call(x, w3, e, act=act, platform=platform, interpret=interpret)[:p]


@functools.partial(jax.jit, static_argnames=("act", "platform", "interpret"))
def _pallas_call(x_PK, w3: Packed, e_P, *, act: str, platform: str, interpret: bool):
  x = quantize_act(x_PK) if quantizes(w3, act) else x_PK
  return PALLAS[platform].expert_matmul(x, w3, e_P, interpret=interpret)


def quantizes(w: Packed, act: str) -> bool:
  """Whether products with `w` in mode `act` round x to int8 blocks (q8 and a block type)."""
  return check_act(act) == "q8" and Q(w.qtype) not in FLOAT16_TYPES


def pairs_path(t: int, w) -> bool:
  """Whether `MoE.routed` runs T rows with stacked experts `w` [E, N, K] pair by pair through
  `expert_matmul` (packed experts: one decode row, or up to KERNEL_ROWS where the C++
  kernels serve them); else grouped, each chosen expert dequantised once."""
  return isinstance(w, Packed) and (t == 1 or (t <= KERNEL_ROWS and uses_kernel(w)))


def activations(x_MK, w):
  """x as products with `w` see it: `quantize_act(x)` for a Packed block-type weight loaded
  with act="q8", else x itself (for paths that dequantise w and then dot)."""
  return quantize_act(x_MK) if isinstance(w, Packed) and quantizes(w, w.act) else x_MK


# ------------------------------------------------------------------------- the interface
def matmul(x_MK, w: Packed, *, act: str = "exact", tile_bytes: int | None = None):
  """x f32[M, K] times a packed weight [N, K] -> f32[M, N] (see the module docstring).
  tile_bytes: the row-tile budget of the dequantise-then-dot path (default TILE_BYTES)."""
  if w.ndim != 2 or x_MK.ndim != 2 or x_MK.shape[1] != w.shape[1]:
    raise ValueError(f"matmul: x [M, K] and w [N, K] expected, got {x_MK.shape} and "
                     f"{w.shape}")
  check_act(act)
  m = x_MK.shape[0]
  branches = {}
  if m <= KERNEL_ROWS:
    if uses_cpu_kernel(w):
      act_k = act if quantizes(w, act) else "exact"
      branches["cpu"] = lambda x, planes: cpu_ffi.matmul(x, planes, w.qtype, w.shape[0], act_k)
    for plat in pallas_platforms(w, m):
      branches[plat] = lambda x, planes, plat=plat: pallas_expert_matmul(
          x, w.reshape_lead((1, w.shape[0])), jnp.zeros((m,), jnp.int32), act=act,
          platform=plat)
  return _dispatch((x_MK, w.planes), branches,
                   lambda x, planes: reference_matmul(x, w, act=act, tile_bytes=tile_bytes))


def expert_matmul(x_PK, w: Packed, e_P, *, act: str = "exact"):
  """Row p of x f32[P, K] times expert e_P[p] of a packed weight [E, N, K] -> f32[P, N]
  (see the module docstring)."""
  if w.ndim != 3 or x_PK.ndim != 2 or x_PK.shape[1] != w.shape[2] \
      or e_P.shape != (x_PK.shape[0],):
    raise ValueError(f"expert_matmul: x [P, K], w [E, N, K], e [P] expected, got "
                     f"{x_PK.shape}, {w.shape}, {e_P.shape}")
  check_act(act)
  e_P = e_P.astype(jnp.int32)
  branches = {}
  if uses_cpu_kernel(w):
    act_k = act if quantizes(w, act) else "exact"
    branches["cpu"] = lambda x, e, planes: cpu_ffi.expert_matmul(
        x, e, planes, w.qtype, w.shape[0], w.shape[1], act_k)
  for plat in pallas_platforms(w, x_PK.shape[0]):
    branches[plat] = lambda x, e, planes, plat=plat: pallas_expert_matmul(
        x, w, e, act=act, platform=plat)
  return _dispatch((x_PK, e_P, w.planes), branches,
                   lambda x, e, planes: reference_expert_matmul(x, w, e, act=act))


def _dispatch(args, branches: dict, reference):
  """The product through `branches` (platform -> kernel) with the jax.numpy `reference` as
  the fallback. Only the default backend's kernel is traced when that is all a step needs
  (outside `lowering_for`): staging every branch behind `lax.platform_dependent` traces the
  reference too, for nothing, in every process."""
  here = _PLATFORM.get(jax.default_backend())
  if _LOWERING_FOR is None:
    if here in branches:
      return branches[here](*args)
    return reference(*args)
  if not branches:
    return reference(*args)
  return jax.lax.platform_dependent(*args, **branches, default=reference)


# --------------------------------------------------------------- q8 activations (reference)
def quantize_act(x_MK):
  """Each 32-element block of x (f32 [..., K], K a multiple of 32) rounded to int8 levels:
  `round_half_even(x * (127 / amax)) * (amax / 127)` (0 for an all-zero block), what the
  q8 kernels multiply. -> f32 [..., K]"""
  k = x_MK.shape[-1]
  if k % 32:
    raise ValueError(f"q8 activations need K a multiple of 32, got {k}")
  x_B32 = x_MK.astype(jnp.float32).reshape(x_MK.shape[:-1] + (k // 32, 32))
  amax_B1 = jnp.max(jnp.abs(x_B32), axis=-1, keepdims=True)
  d_B1 = amax_B1 / np.float32(127.0)
  inv_B1 = jnp.where(amax_B1 > 0, np.float32(127.0) / jnp.where(amax_B1 > 0, amax_B1, 1), 0)
  q_B32 = jnp.round(x_B32 * inv_B1)
  return (q_B32 * d_B1).reshape(x_MK.shape)


def q8_error_bound(x_MK, w_NK) -> np.ndarray:
  """Largest |y_q8 - y_exact| the q8 rounding can add (numpy, f64): per output,
  `sum_b amax_b / 254 * sum_{k in b} |w_nk|` (half a level per element). [M, N]"""
  x = np.asarray(x_MK, np.float64)
  w = np.abs(np.asarray(w_NK, np.float64))
  m, k = x.shape
  half_B = np.abs(x.reshape(m, k // 32, 32)).max(-1) / 254.0
  return np.einsum("mb,nb->mn", half_B, w.reshape(w.shape[0], k // 32, 32).sum(-1))


# ------------------------------------------------------------------ jax.numpy reference
def reference_matmul(x_MK, w: Packed, *, act: str = "exact", tile_bytes: int | None = None):
  """The jax.numpy implementation of `matmul`: up to MATVEC_ROWS rows a fused
  dequantise-multiply-reduce where that is the faster one (`fuses`), else dequantise then
  dot (in row tiles for a weight bigger than tile_bytes as f32)."""
  if quantizes(w, act):
    x_MK = quantize_act(x_MK)
  if x_MK.shape[0] <= MATVEC_ROWS and fuses(w):
    return matvec(x_MK, w)
  n_tiles = tile_count(w, TILE_BYTES if tile_bytes is None else tile_bytes)
  if n_tiles == 1:
    return dot("MK,NK->MN", x_MK, after(x_MK, w).dense())
  tiles = w.tiles(n_tiles)
  y_TMn = jax.lax.map(
      lambda planes: dot("MK,NK->MN", x_MK, after(
          x_MK, Packed(tuple(planes), w.qtype, tiles.shape[1:], w.dtype)).dense()),
      tiles.planes)
  return jnp.moveaxis(y_TMn, 0, 1).reshape(x_MK.shape[0], w.shape[0])


def after(x, w: Packed) -> Packed:
  """w, made to depend on x: for a path that dequantises w (whole, or a tile) to multiply it
  with x, so the dequantisation cannot run before x exists. Without it, XLA starts every
  layer's dequantisation (it depends on the weights alone) at the top of the step and their
  f32 copies are all live at once: a prefill's temporaries grew with the layer count
  (docs/benchmarks.md). Each plane passes a select on a flag computed from x's first element
  that is always false (a sign bit after clearing it), so the bytes, and the numbers, are
  the same; the select fuses into the dequantisation. Only weights of TIE_BYTES or more as
  f32 are tied: the new reader of x can change how XLA fuses x's producer, and with it x's
  last bits (1e-6 on the tiny model), so small weights, which cost little memory, keep the
  products bit-identical to the dequantised model's."""
  if 4 * int(np.prod(w.shape)) < TIE_BYTES:
    return w
  flag = never(x)
  return dataclasses.replace(w, planes=tuple(jnp.where(flag, jnp.zeros_like(p), p)
                                             for p in w.planes))


def never(x):
  """A bool scalar computed from x's first element that is always false (its sign bit after
  clearing it): `jnp.where(never(x), a, b)` is b, made to depend on x (see `after`)."""
  bits = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.int32)
  return (bits & 0x7FFFFFFF) < 0


def reference_expert_matmul(x_PK, w: Packed, e_P, *, act: str = "exact"):
  """The jax.numpy implementation of `expert_matmul`: each row times its expert, read in
  place (a dynamic slice; a batched gather would copy the experts first); unrolled for a few
  rows, a `lax.map` for more."""
  n_experts = w.shape[0]
  valid_P = (e_P >= 0) & (e_P < n_experts)

  def one(x_K, e):
    return reference_matmul(x_K[None], w.index(e), act=act)[0]

  p = x_PK.shape[0]
  if p <= KERNEL_ROWS:
    y_PN = jnp.stack([one(x_PK[i], e_P[i]) for i in range(p)]) if p else \
        jnp.zeros((0, w.shape[1]), jnp.float32)
  else:
    y_PN = jax.lax.map(lambda a: one(*a), (x_PK, e_P))
  return jnp.where(valid_P[:, None], y_PN, 0.0)


def dot(spec: str, x, w):
  """`jnp.einsum` with x cast to w's dtype, full precision for f32, f32 result."""
  x = x.astype(w.dtype)
  prec = HIGHEST if w.dtype == jnp.float32 else None
  return jnp.einsum(spec, x, w, precision=prec, preferred_element_type=jnp.float32)


def fuses(w: Packed) -> bool:
  """Whether a fused dequantise-and-reduce beats dequantise-then-dot for a few rows of x,
  measured on XLA:CPU (T = 1, ms): Q8_0 256x512 0.10 vs 0.15, 4096x4096 16 vs 327; F16
  256x512 0.08 vs 0.04 but far less memory traffic at scale; IQ2_XXS 2048x4096 29 vs 126,
  yet 256x512 0.72 vs 0.44; Q2_K 512x256 0.74 vs 0.21, 4096x2048 42 vs 34."""
  q = int(w.qtype)
  if q in (int(Q.Q8_0), int(Q.F16), int(Q.BF16)):
    return True
  return q == int(Q.IQ2_XXS) and int(np.prod(w.shape)) >= (1 << 20)


def matvec(x_MK, w: Packed):
  """x [..., K] times a packed [N, K] weight -> f32 [..., N], as one fused reduction over the
  weight's blocks (`Packed.blocks`): x is reshaped to the block layout instead of the weight
  to rows, so XLA emits a single loop that reads the packed planes. Products are the exact
  f32 products of the (dtype-rounded) operands; only the summation order differs from a
  dot."""
  lead, k = x_MK.shape[:-1], x_MK.shape[-1]
  blocks_N_ = w.blocks()  # f32 [N, B, *block] (or [N, K] for F16 / BF16)
  x = x_MK.reshape(-1, k)
  if w.dtype != jnp.float32:  # bf16 compute: bf16 operands, f32 products and sums
    blocks_N_ = blocks_N_.astype(w.dtype).astype(jnp.float32)
    x = x.astype(w.dtype)
  x_M1_ = x.astype(jnp.float32).reshape((x.shape[0], 1) + blocks_N_.shape[1:])
  y_MN = jnp.sum(blocks_N_[None] * x_M1_, axis=tuple(range(2, x_M1_.ndim)))
  return y_MN.reshape(lead + (w.shape[0],))


def tile_count(w: Packed, tile_bytes: int) -> int:
  """Smallest divisor n of w's rows with rows/n * cols * 4 <= tile_bytes (1 if small)."""
  rows, per_row = w.shape[0], 4 * int(np.prod(w.shape[1:]))
  if rows * per_row <= tile_bytes or w.ndim != 2:
    return 1
  for n in range(2, rows + 1):
    if rows % n == 0 and (rows // n) * per_row <= tile_bytes:
      return n
  return rows
