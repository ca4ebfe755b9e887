"""The Pallas kernels of quant.matmul / quant.expert_matmul (design §8.1): quant.pallas_gpu
(Triton) and quant.pallas_tpu (Mosaic), on a CPU-only machine.

- The in-kernel dequantisation (`pallas_tiles.dequant_tile`) is its `kernels.dequant_*` twin
  bit for bit, extreme f16 scales included.
- Each kernel, run in Pallas interpret mode, against the jax.numpy reference and gguf-py:
  act="exact": one-hot rows read gguf-py's weights back bit for bit (+0 / -0 aside), and every
  row is within the order-free summation bound |y - x w^T| <= (K + 2) u sum_k |x_k w_nk|
  (u = 2**-24, the f64 product of gguf-py's values as the truth), the bound of the CPU
  kernels (tests/quant/matmul_test.py); ids outside [0, E) give zero rows. act="q8": the
  same bound around the q8-rounded x (`quantize_act`); a bf16 compute dtype: the bound around
  bf16-rounded operands, as the reference rounds them.
- Each kernel, through the public `quant.matmul` / `quant.expert_matmul`, and one whole
  decode step of the tiny model with packed weights lower for `tpu` and `cuda` via
  `jax.export`, and the modules hold the Pallas custom calls (`tpu_custom_call`,
  `__gpu$xla.gpu.triton`): one per packed product whose weight the kernel tiles (every one on
  TPU), none of the CPU kernels'.
"""

import re

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q

from ds4jax.gguf.source import GGUFSource
from ds4jax.model import ops
from ds4jax.quant import kernels
from ds4jax.quant import matmul as qm
from ds4jax.quant import pallas_gpu, pallas_tiles, pallas_tpu
from ds4jax.quant.packed import Packed
from ds4jax.runtime.load import abstract_stage
from ds4jax.runtime.runner import StageRunner

TYPES = (Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.IQ2_XXS, Q.MXFP4, Q.F16, Q.BF16)
PLATFORMS = ("cuda", "tpu")
CALL = {"cuda": pallas_gpu.TRITON_CALL, "tpu": "tpu_custom_call"}
SCALES = {Q.Q8_0: (0,), Q.Q2_K: (80, 82), Q.Q4_K: (0, 2), Q.IQ2_XXS: (0,)}
EXTREME_F16 = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x8000, 0x0400], np.uint16)
U = 2.0 ** -24
# Two K chunks of 256 elements: the GPU tiling, and the TPU one under `small_tiles`.
E, N, K = 3, 64, 512


def _data(q, lead, k, mode="sane", seed=0) -> np.ndarray:
  rng = np.random.default_rng([int(q), seed, len(mode)])
  if q in (Q.F16, Q.BF16):
    vals = rng.standard_normal(lead + (k,)).astype(np.float32) * 0.1
    return vals.astype(np.float16 if q == Q.F16 else ml_dtypes.bfloat16)
  block, size = gguf.GGML_QUANT_SIZES[q]
  blocks = rng.integers(0, 256, lead + (k // block, size), dtype=np.uint8)
  if q == Q.MXFP4:
    blocks[..., 0] = rng.integers(2, 255, blocks.shape[:-1]) if mode == "extreme" else \
        rng.integers(110, 135, blocks.shape[:-1])
  for off in SCALES.get(q, ()):
    if mode == "sane":
      bits = (rng.standard_normal(blocks.shape[:-1]) * 0.05).astype(np.float16).view(np.uint16)
    else:
      bits = rng.choice(EXTREME_F16, blocks.shape[:-1])
    blocks[..., off:off + 2] = bits.astype("<u2")[..., None].view(np.uint8)
  return blocks.reshape(lead + (-1,))


def _weight(q, lead, k, mode="sane", dtype=jnp.float32):
  """(Packed, gguf-py's f32 values [*lead, k])."""
  data = _data(q, lead, k, mode)
  if q in (Q.F16, Q.BF16):
    ref = data.astype(np.float32)
  else:
    with np.errstate(all="ignore"):
      ref = gguf.quants.dequantize(data, q).astype(np.float32)
  return Packed.from_gguf_data(data, q, lead + (k,), dtype), ref


def _within_sum_bound(got, x, w_NK):
  """|got - x w^T| <= (K + 2) u sum|x||w| (f64 truth), row by row."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(w_NK, np.float64)
  bound = (x64.shape[-1] + 2) * U * (np.abs(x64) @ np.abs(w64).T)
  err = np.abs(np.asarray(got, np.float64) - x64 @ w64.T)
  worst = err.argmax()
  assert (err <= bound).all(), f"max err {err.flat[worst]:.3g}, bound {bound.flat[worst]:.3g}"


@pytest.mark.parametrize("q", TYPES, ids=lambda q: q.name)
def test_tiles_are_the_dequant_twins(q):
  """`dequant_tile` on plane chunks == `Packed.dense` (the `kernels.dequant_*` path), as
  uint32 views, sane and extreme scales, with the TPU lookup (a lane gather) on the codes."""
  codes = jnp.asarray(pallas_tiles.iq2_codes()).reshape(2, 128)

  def tile(w):
    def get(i, lo=None, size=None):
      return w.planes[i] if lo is None else w.planes[i][..., lo:lo + size]
    return pallas_tiles.dequant_tile(q, get, pallas_tpu._lookup(codes)), w.dense()

  for mode in ("sane", "extreme"):
    got, want = map(np.asarray, jax.jit(tile)(_weight(q, (16,), K, mode)[0]))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  table = kernels._iq2_xxs_grid()
  codes = pallas_tiles.iq2_codes()
  decoded = np.array([8, 25, 43])[(codes[:, None] >> (2 * np.arange(8))) & 3]
  np.testing.assert_array_equal(decoded, table)


@pytest.fixture
def small_tiles(monkeypatch):
  """Tiles small enough that the test shapes take several of them on each axis."""
  monkeypatch.setattr(pallas_gpu, "TILE_N", 16)
  monkeypatch.setattr(pallas_tpu, "TILE_K", 256)


def _rows(k, n_random, one_hot_at) -> np.ndarray:
  x = np.random.default_rng(1).standard_normal((n_random, k)).astype(np.float32)
  hot = np.zeros((len(one_hot_at), k), np.float32)
  hot[np.arange(len(one_hot_at)), one_hot_at] = 1.0
  return np.concatenate([x, hot])


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("q", TYPES, ids=lambda q: q.name)
def test_kernel_in_interpret_mode(q, platform, small_tiles):
  """expert_matmul with E = 3 (a repeated expert, an unused one, ids -1 and E; two one-hot
  rows) against gguf-py and the jax.numpy reference (`reference_matmul` per expert: the
  dequantise-then-dot path); a matmul is the same kernel on one expert."""
  k = K
  w, ref_ENK = _weight(q, (E, N), k)
  e_P = np.array([2, 0, 2, -1, 2, E, 0, 2, 0], np.int32)
  x_PK = _rows(k, 7, [0, k - 1])

  @jax.jit
  def run(x_PK, e_P, w):
    y_PN = qm.pallas_expert_matmul(x_PK, w, e_P, act="exact", platform=platform,
                                   interpret=True)
    return y_PN, [qm.reference_matmul(x_PK, w.index(e)) for e in range(E)]

  y_PN, ref_EPN = run(x_PK, e_P, w)
  y_PN, ref_EPN = np.asarray(y_PN), np.asarray(ref_EPN)
  assert y_PN.shape == (len(e_P), N)
  valid = (e_P >= 0) & (e_P < E)
  assert (y_PN[~valid] == 0).all()
  for p in np.flatnonzero(valid):
    _within_sum_bound(y_PN[p:p + 1], x_PK[p:p + 1], ref_ENK[e_P[p]])
    _within_sum_bound(ref_EPN[e_P[p], p:p + 1], x_PK[p:p + 1], ref_ENK[e_P[p]])
  hot = np.stack([ref_ENK[2][:, 0], ref_ENK[0][:, k - 1]])  # rows 7, 8: one-hot at 0, k - 1
  np.testing.assert_array_equal(y_PN[7:], hot)  # == (+0 and -0 compare equal)
  np.testing.assert_array_equal(y_PN[7:][hot != 0].view(np.uint32), hot[hot != 0].view(np.uint32))


@pytest.mark.parametrize("q,platform", [(Q.Q4_K, "cuda"), (Q.IQ2_XXS, "tpu")],
                         ids=["Q4_K-cuda", "IQ2_XXS-tpu"])
def test_q8_activations_in_interpret_mode(q, platform):
  """act="q8": x rounded to int8 blocks first (`quantize_act`), then the exact kernel."""
  k = K
  w, ref = _weight(q, (1, N), k)
  x = _rows(k, 4, [])
  y = np.asarray(jax.jit(lambda x, w: qm.pallas_expert_matmul(
      x, w, jnp.zeros((4,), jnp.int32), act="q8", platform=platform, interpret=True))(x, w))
  xq = np.asarray(qm.quantize_act(jnp.asarray(x)))
  _within_sum_bound(y, xq, ref[0])
  assert np.abs(y - x @ ref[0].T).max() > np.abs(y - xq @ ref[0].T).max()  # not vacuous


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bf16_compute_dtype_in_interpret_mode(platform):
  """A bf16 weight rounds w and x to bf16 (products and sums in f32), as the reference."""
  q, k = Q.Q8_0, 256
  w, ref = _weight(q, (1, N), k, dtype=jnp.bfloat16)
  x = _rows(k, 3, [5])
  y = np.asarray(jax.jit(lambda x, w: qm.pallas_expert_matmul(
      x, w, jnp.zeros((4,), jnp.int32), act="exact", platform=platform, interpret=True))(x, w))
  w_bf = ref[0].astype(ml_dtypes.bfloat16).astype(np.float32)
  x_bf = x.astype(ml_dtypes.bfloat16).astype(np.float32)
  _within_sum_bound(y, x_bf, w_bf)
  np.testing.assert_array_equal(y[3], w_bf[:, 5])


def _export(f, platform, *args) -> str:
  with qm.lowering_for(platform):
    return jax.export.export(jax.jit(f), platforms=[platform],
                             disabled_checks=pallas_gpu.EXPORT_CHECKS)(*args).mlir_module()


def _kernel_sites(text: str) -> int:
  """Call sites of the jitted Pallas branch (each holds one kernel custom call)."""
  return len(re.findall(r"call @_pallas_call(?:_\d+)?\(", text))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_kernel_lowers_through_the_interface(platform):
  """`quant.matmul` (M = 3) and `quant.expert_matmul` (P = 12 rows) of every type lower to
  the platform's Pallas kernel, one call site each, and no CPU kernel."""
  ws = {q: _weight(q, (E, N), K)[0] for q in TYPES}

  def f(x, e, ws):
    return [(qm.matmul(x[:3], w.index(0)), qm.expert_matmul(x, w, e)) for w in ws.values()]

  args = (jax.ShapeDtypeStruct((12, 512), jnp.float32), jax.ShapeDtypeStruct((12,), jnp.int32),
          ws)
  text = _export(f, platform, *args)
  assert CALL[platform] in text and "ds4_matmul" not in text
  assert _kernel_sites(text) == 2 * len(TYPES)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_flash_shapes_lower(platform):
  """Flash's largest products, from abstract weights: the head (Q8_0 [V, D]), the routed
  experts (IQ2_XXS [E, F, D] gate, Q2_K [E, D, F] down, 6 rows of a token) and an F16
  compressor, each one Pallas call site."""
  s = jax.ShapeDtypeStruct
  head = Packed.abstract(Q.Q8_0, (129280, 4096), jnp.float32)
  gate = Packed.abstract(Q.IQ2_XXS, (256, 2048, 4096), jnp.float32)
  down = Packed.abstract(Q.Q2_K, (256, 4096, 2048), jnp.float32)
  comp = Packed.abstract(Q.F16, (1024, 4096), jnp.float32)

  def f(x_D, x_PD, e_P, x_PF, head, gate, down, comp):
    return (qm.matmul(x_D, head), qm.expert_matmul(x_PD, gate, e_P),
            qm.expert_matmul(x_PF, down, e_P), qm.matmul(x_D, comp))

  text = _export(f, platform, s((1, 4096), jnp.float32), s((6, 4096), jnp.float32),
                 s((6,), jnp.int32), s((6, 2048), jnp.float32), head, gate, down, comp)
  assert _kernel_sites(text) == 4


def test_untileable_weights_and_the_switch_keep_the_reference(monkeypatch):
  """N = 37 has no Triton tile (16 | N): cuda lowers the jax.numpy path; TPU takes all N as
  one tile. DS4JAX_ACCEL_KERNELS=xla lowers the reference everywhere; a bad value is a
  one-line error."""
  w, _ = _weight(Q.Q8_0, (37,), 256)
  x = jax.ShapeDtypeStruct((2, 256), jnp.float32)
  f = lambda: lambda x, w: qm.matmul(x, w)  # a new function: the switch is read when traced
  assert _kernel_sites(_export(f(), "cuda", x, w)) == 0
  assert _kernel_sites(_export(f(), "tpu", x, w)) == 1
  monkeypatch.setenv("DS4JAX_ACCEL_KERNELS", "xla")
  assert _kernel_sites(_export(f(), "tpu", x, w)) == 0
  monkeypatch.setenv("DS4JAX_ACCEL_KERNELS", "fast")
  with pytest.raises(ValueError, match="DS4JAX_ACCEL_KERNELS='fast'") as err:
    qm.matmul(jnp.zeros((2, 256)), w)
  assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def tiny_step(tiny_gguf):
  """(jitted decode step, abstract args, [(w, rows)] of its packed products) of the tiny
  model's whole stage with packed weights, traced once (every platform's branches are in the
  one trace; each export lowers its own)."""
  src = GGUFSource(tiny_gguf)
  layers = src.resolve("all")
  graphdef, flat = abstract_stage(src.cfg, layers, "float32", src.abstract(layers))
  runner = StageRunner(nnx.merge(graphdef, nnx.from_flat_state(flat)), ctx_size=16)
  args = (runner._abstract_params(), jax.eval_shape(runner._init),
          jax.ShapeDtypeStruct((1,), jnp.int32), None, jax.ShapeDtypeStruct((), jnp.int32))
  products = []
  with pytest.MonkeyPatch.context() as mp:
    for name in ("matmul", "expert_matmul"):
      def record(x, w, *a, real=getattr(qm, name), **kw):
        products.append((w, x.shape[0]))
        return real(x, w, *a, **kw)
      mp.setattr(qm, name, record)
    with qm.lowering_for(*PLATFORMS):  # the cached trace carries both platforms' branches
      runner._step.trace(*args)
  return runner._step, args, products


@pytest.mark.parametrize("platform", PLATFORMS)
def test_tiny_decode_step_lowers_with_the_kernels(tiny_step, platform):
  """One decode step of the tiny model (Q8_0, F16, IQ2_XXS and Q2_K weights) exported for the
  platform: one Pallas call site per packed product the kernel tiles; on TPU that is every
  product, on cuda all but the router's (8 rows, under Triton's 16)."""
  step, args, products = tiny_step
  with qm.lowering_for(platform):
    tiled = [platform in qm.pallas_platforms(w, rows) for w, rows in products]
  text = _export(step, platform, *args)
  assert CALL[platform] in text and "ds4_matmul" not in text
  assert _kernel_sites(text) == sum(tiled) > 0.75 * len(tiled) > 0
  if platform == "tpu":
    assert all(tiled)
  assert ops.quant_matmul is qm  # the model reaches the kernels only through quant.matmul
