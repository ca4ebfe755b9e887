"""quant.matmul / quant.expert_matmul (design §8.1): the CPU kernels against gguf-py.

- Exact mode: the weights a kernel multiplies are gguf-py's dequantised values bit for bit
  (one-hot activations read them back), and products are summed in f32 within the
  order-free bound |y - y_exact| <= (K + 2) u sum_k |w_nk x_mk| (u = 2**-24).
- A row's result does not depend on the other rows of the call (batching changes nothing).
- q8 mode: the kernel equals the jax.numpy q8 reference (the same quantised x) within the
  summation bound, and the exact result within `q8_error_bound` plus that bound.
"""

import shutil

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from ds4jax.quant import cpu_ffi
from ds4jax.quant import matmul as qm
from ds4jax.quant.packed import Packed

TYPES = (Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.IQ2_XXS, Q.MXFP4, Q.F16, Q.BF16)
BLOCK_TYPES = TYPES[:5]
SCALES = {Q.Q8_0: (0,), Q.Q2_K: (80, 82), Q.Q4_K: (0, 2), Q.IQ2_XXS: (0,)}
# Finite f16 scale patterns: +-65504, +-2**-24, the largest subnormal, -0, the smallest normal.
EXTREME_F16 = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x8000, 0x0400], np.uint16)
U = 2.0 ** -24
# Odd shapes: N not a multiple of any tile, K a few blocks (F16/BF16: not a multiple of 16).
K_OF = {Q.Q8_0: 96, Q.MXFP4: 96, Q.Q2_K: 512, Q.Q4_K: 512, Q.IQ2_XXS: 512, Q.F16: 517,
        Q.BF16: 517}
N = 37


def _data(q, lead, k, mode="sane", seed=0) -> np.ndarray:
  """GGUF data of a tensor [*lead, k]: random blocks with f16 scales per `mode` (sane, zero,
  extreme: the finite EXTREME_F16 patterns), or F16 / BF16 values."""
  rng = np.random.default_rng([int(q), seed, len(mode)])
  if q in (Q.F16, Q.BF16):
    if mode == "extreme":
      bits = rng.choice(EXTREME_F16, lead + (k,))
      return bits.view(np.float16) if q == Q.F16 else \
          (bits.astype(np.uint32) << 16).view(np.float32).astype(ml_dtypes.bfloat16)
    vals = rng.standard_normal(lead + (k,)).astype(np.float32) * (0 if mode == "zero" else 0.1)
    return vals.astype(np.float16 if q == Q.F16 else ml_dtypes.bfloat16)
  block, size = gguf.GGML_QUANT_SIZES[q]
  blocks = rng.integers(0, 256, lead + (k // block, size), dtype=np.uint8)
  if q == Q.MXFP4:
    blocks[..., 0] = rng.integers(2, 140, blocks.shape[:-1]) if mode == "extreme" else \
        rng.integers(110, 135, blocks.shape[:-1])
  for off in SCALES.get(q, ()):
    shape = blocks.shape[:-1]
    if mode == "sane":
      bits = (rng.standard_normal(shape) * 0.05).astype(np.float16).view(np.uint16)
    elif mode == "zero":
      bits = rng.choice(np.array([0, 0x8000], np.uint16), shape)
    else:
      bits = rng.choice(EXTREME_F16, shape)
    blocks[..., off:off + 2] = bits.astype("<u2")[..., None].view(np.uint8)
  return blocks.reshape(lead + (-1,))


def _weight(q, lead, k, mode="sane", seed=0):
  """(Packed f32, gguf-py's dequantised f32 [*lead, k])."""
  data = _data(q, lead, k, mode, seed)
  if q in (Q.F16, Q.BF16):
    ref = data.astype(np.float32)
  else:
    with np.errstate(all="ignore"):
      ref = gguf.quants.dequantize(data, q).astype(np.float32)
  return Packed.from_gguf_data(data, q, lead + (k,), jnp.float32), ref


def _x(m, k, seed=1):
  return np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)


def _assert_within_sum_bound(got, x, w, extra=0.0):
  """|got - x w^T| <= (K + 2) u sum|x||w| + extra (f64 reference)."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  ref = x64 @ w64.T
  bound = (x64.shape[1] + 2) * U * (np.abs(x64) @ np.abs(w64).T) + extra
  err = np.abs(np.asarray(got, np.float64) - ref)
  assert (err <= bound).all(), f"max err {err.max():.3g}, bound there {bound.flat[err.argmax()]:.3g}"


_ffi_matmul = jax.jit(cpu_ffi.matmul, static_argnums=(2, 3, 4))
_ffi_experts = jax.jit(cpu_ffi.expert_matmul, static_argnums=(3, 4, 5, 6))


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
  cpu_ffi.ensure()  # the C++ kernels build on this machine (a compiler is part of the setup)


@pytest.mark.parametrize("mode", ["sane", "zero", "extreme"])
@pytest.mark.parametrize("q", TYPES, ids=lambda q: q.name)
def test_kernel_weights_are_gguf_py_bit_for_bit(q, mode):
  """x = the identity: y = W^T, every weight value read back through the kernel."""
  k = K_OF[q]
  w, ref = _weight(q, (N,), k, mode)
  got = np.asarray(_ffi_matmul(jnp.eye(k, dtype=jnp.float32), w.planes, int(q), N, "exact"))
  if q == Q.BF16:  # f32-subnormal weights (BF16 exponent 0) flush to 0, as in any XLA:CPU product
    ref = np.where(np.abs(ref) < np.finfo(np.float32).tiny, np.float32(0), ref)
  np.testing.assert_array_equal(got, ref.T)  # == (+0 and -0 sums compare equal)
  nz = ref.T != 0
  np.testing.assert_array_equal(got[nz].view(np.uint32), ref.T[nz].view(np.uint32))
  if mode != "zero":
    assert (ref != 0).mean() > 0.3


@pytest.mark.parametrize("m", [1, 3, 8, 16, 17])
@pytest.mark.parametrize("q", TYPES, ids=lambda q: q.name)
def test_matmul_within_the_summation_bound(q, m):
  k = K_OF[q]
  w, ref = _weight(q, (N,), k)
  x = _x(m, k)
  got = jax.jit(qm.matmul)(jnp.asarray(x), w)
  assert got.shape == (m, N) and got.dtype == jnp.float32
  _assert_within_sum_bound(got, x, ref)
  _assert_within_sum_bound(jax.jit(qm.reference_matmul)(jnp.asarray(x), w), x, ref)


@pytest.mark.parametrize("act", qm.ACTS)
@pytest.mark.parametrize("q", TYPES, ids=lambda q: q.name)
def test_rows_do_not_depend_on_the_batch(q, act):
  """Row i of a call of M rows is bit-identical to row i alone, for M = 8 and 16 (the x rows
  go through the kernels in register groups and weight tiles that depend on M)."""
  k = K_OF[q] if act == "exact" or q in BLOCK_TYPES else 512
  w, _ = _weight(q, (N,), k)
  x = jnp.asarray(_x(16, k))
  f = jax.jit(lambda x, w: qm.matmul(x, w, act=act))
  alone = [np.asarray(f(x[i:i + 1], w))[0] for i in range(16)]
  for m in (8, 16):
    batch = np.asarray(f(x[:m], w))
    for i in range(m):
      np.testing.assert_array_equal(alone[i], batch[i])


@pytest.mark.parametrize("q", TYPES, ids=lambda q: q.name)
def test_expert_matmul(q):
  """Rows times their experts (duplicates, > 16 rows on one expert, ids outside [0, E) give
  zero rows), against gguf-py per row, and batch-independent."""
  e_n, k = 5, K_OF[q]
  w, ref = _weight(q, (e_n, N), k)
  rng = np.random.default_rng(3)
  e_P = np.concatenate([rng.integers(0, e_n, 12), np.full(18, 2), [-1, e_n, 4]]).astype(np.int32)
  x = _x(len(e_P), k)
  got = np.asarray(jax.jit(qm.expert_matmul)(jnp.asarray(x), w, jnp.asarray(e_P)))
  valid = (e_P >= 0) & (e_P < e_n)
  assert (got[~valid] == 0).all()
  for p in np.flatnonzero(valid):
    _assert_within_sum_bound(got[p:p + 1], x[p:p + 1], ref[e_P[p]])
  ref_jnp = jax.jit(qm.reference_expert_matmul)(jnp.asarray(x[:6]), w, jnp.asarray(e_P[:6]))
  for p in range(6):
    _assert_within_sum_bound(np.asarray(ref_jnp)[p:p + 1], x[p:p + 1], ref[e_P[p]])
  one = np.asarray(_ffi_experts(jnp.asarray(x[:1]), jnp.asarray(e_P[:1]), w.planes, int(q),
                                e_n, N, "exact"))
  np.testing.assert_array_equal(one[0], got[0])


@pytest.mark.parametrize("q", TYPES, ids=lambda q: q.name)
def test_q8_activations(q):
  k = K_OF[q] if q not in (Q.F16, Q.BF16) else 512
  w, ref = _weight(q, (N,), k)
  x = _x(5, k)
  got = np.asarray(jax.jit(lambda x, w: qm.matmul(x, w, act="q8"))(jnp.asarray(x), w))
  exact = np.asarray(jax.jit(qm.matmul)(jnp.asarray(x), w))
  if q in (Q.F16, Q.BF16):  # 16-bit weights keep exact activations
    np.testing.assert_array_equal(got, exact)
    return
  xq = np.asarray(qm.quantize_act(jnp.asarray(x)))
  _assert_within_sum_bound(got, xq, ref)  # the kernel multiplies the reference's q8 values
  _assert_within_sum_bound(got, x, ref, extra=qm.q8_error_bound(x, ref))
  assert np.abs(got - exact).max() > 0  # not vacuous
  ref_jnp = jax.jit(lambda x, w: qm.reference_matmul(x, w, act="q8"))(jnp.asarray(x), w)
  _assert_within_sum_bound(ref_jnp, xq, ref)


def test_quantize_act():
  x = np.concatenate([_x(3, 64), np.zeros((1, 64), np.float32)])
  x[0, :32] *= 1e-3
  xq = np.asarray(qm.quantize_act(jnp.asarray(x)))
  blocks = np.abs(x.reshape(4, 2, 32)).max(-1, keepdims=True)
  assert (np.abs(xq - x).reshape(4, 2, 32) <= blocks / 254 * (1 + 1e-6)).all()
  levels = xq.reshape(4, 2, 32) / np.where(blocks > 0, blocks / 127, 1)
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # 255 levels per block
  assert (xq[3] == 0).all()
  with pytest.raises(ValueError, match="multiple of 32"):
    qm.quantize_act(jnp.zeros((2, 40)))


def test_bad_arguments():
  w, _ = _weight(Q.Q8_0, (N,), 96)
  with pytest.raises(ValueError, match="unsupported activations 'int4'"):
    qm.matmul(jnp.zeros((1, 96)), w, act="int4")
  with pytest.raises(ValueError, match=r"x \[M, K\] and w \[N, K\]"):
    qm.matmul(jnp.zeros((1, 64)), w)
  with pytest.raises(ValueError, match=r"x \[P, K\], w \[E, N, K\], e \[P\]"):
    qm.expert_matmul(jnp.zeros((2, 96)), w, jnp.zeros((2,), jnp.int32))


def test_without_the_kernels(monkeypatch, caplog):
  """No C++ kernels: `auto` falls back to jax.numpy with a one-line warning, `ffi` is a
  one-line error, `xla` never builds them."""
  def broken():
    raise cpu_ffi.KernelUnavailable("ds4jax CPU kernels: no C++ compiler found (...)")
  monkeypatch.setattr(cpu_ffi, "_load", broken)
  w, ref = _weight(Q.Q8_0, (N,), 96)
  x = _x(2, 96)
  monkeypatch.setenv("DS4JAX_CPU_KERNELS", "auto")
  assert not qm.uses_kernel(w)
  _assert_within_sum_bound(qm.matmul(jnp.asarray(x), w), x, ref)
  monkeypatch.setenv("DS4JAX_CPU_KERNELS", "ffi")
  with pytest.raises(cpu_ffi.KernelUnavailable, match="no C\\+\\+ compiler"):
    qm.matmul(jnp.asarray(x), w)
  monkeypatch.setenv("DS4JAX_CPU_KERNELS", "xla")
  assert not qm.uses_kernel(w)
  monkeypatch.setenv("DS4JAX_CPU_KERNELS", "fast")
  with pytest.raises(ValueError, match="DS4JAX_CPU_KERNELS='fast'"):
    qm.uses_kernel(w)


def test_no_compiler_is_one_line(monkeypatch):
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setattr(cpu_ffi.shutil, "which", lambda name: None)
  with pytest.raises(cpu_ffi.KernelUnavailable) as e:
    cpu_ffi.library_path()
  assert "no C++ compiler found" in str(e.value) and "\n" not in str(e.value)


def test_library_is_cached(monkeypatch, tmp_path):
  """A cache that holds the library for these sources, compiler and CPU is used as it is
  (the suite's own first use built it into the default cache: a copy seeds the new one, so
  this test does not pay a second C++ build)."""
  built = cpu_ffi.library_path()
  monkeypatch.setenv("DS4JAX_KERNEL_CACHE", str(tmp_path))
  shutil.copy2(built, tmp_path / built.name)
  path = cpu_ffi.library_path()
  assert path == tmp_path / built.name
  mtime = path.stat().st_mtime_ns
  assert cpu_ffi.library_path() == path and path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_lowering_picks_the_kernel_per_platform(platform):
  """The CPU lowering calls the C++ kernels; cuda and tpu lower their own paths (no CPU
  custom call leaks into an accelerator program; tests/quant/pallas_test.py checks theirs)."""
  w, _ = _weight(Q.Q8_0, (N,), 96)
  we, _ = _weight(Q.IQ2_XXS, (3, N), 512)

  def f(x, w, xe, we, e):
    return qm.matmul(x, w), qm.expert_matmul(xe, we, e)

  args = (jax.ShapeDtypeStruct((2, 96), jnp.float32), w,
          jax.ShapeDtypeStruct((4, 512), jnp.float32), we, jax.ShapeDtypeStruct((4,), jnp.int32))
  if platform == "cpu":  # a CPU export would refuse the custom calls: lower instead
    text = jax.jit(f).lower(*args).as_text()
  else:
    with qm.lowering_for():  # the reference staged for the other platforms
      text = jax.export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()
  assert ("ds4_matmul" in text and "ds4_expert_matmul" in text) == (platform == "cpu")


@pytest.mark.parametrize("k", [320, 1024])
def test_q8_0_several_rows(k):
  """Q8_0 q8 with 2-8 rows (the AMX kernel where the CPU has it: K a multiple of 64, tiles of
  16 weight rows, so N spans several per task; the VNNI kernel otherwise and for the tails):
  every row bit-identical to the row alone (through matmul and expert_matmul), and within the
  summation bound of the reference's q8 values."""
  n = 4096 + 37
  w, ref = _weight(Q.Q8_0, (n,), k)
  x = _x(16, k)
  f = jax.jit(lambda x, w: qm.matmul(x, w, act="q8"))
  alone = [np.asarray(f(jnp.asarray(x[i:i + 1]), w))[0] for i in range(8)]
  for m in (2, 3, 8, 16):
    batch = np.asarray(f(jnp.asarray(x[:m]), w))
    for i in range(min(m, 8)):
      np.testing.assert_array_equal(alone[i], batch[i])
    _assert_within_sum_bound(batch, np.asarray(qm.quantize_act(jnp.asarray(x[:m]))), ref)
  e_n = 3  # out_a's shape: experts of a few rows each
  we, _ = _weight(Q.Q8_0, (e_n, n // 4), k, seed=5)
  e_P = np.array([0, 1, 0, 2, 0, 1, 0, 2], np.int32)
  g = jax.jit(lambda x, w, e: qm.expert_matmul(x, w, e, act="q8"))
  got = np.asarray(g(jnp.asarray(x[:8]), we, jnp.asarray(e_P)))
  for p in range(8):
    np.testing.assert_array_equal(np.asarray(g(jnp.asarray(x[p:p + 1]), we, jnp.asarray(e_P[p:p + 1])))[0], got[p])
