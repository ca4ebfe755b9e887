"""Dequantisation equals gguf-py bit for bit, for every supported type."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from ds4jax.gguf import dequant, load, reader
from ds4jax.gguf.errors import TensorTypeError
from ds4jax.testing import tiny

DIMS = (512, 3, 2)  # GGUF order: rows of 512 (two K-blocks, 16 Q8_0 blocks), numpy (2, 3, 512)


def _bits(a):
  """Compare bit patterns, so NaN/-0.0 differences are caught too."""
  return a.view(np.uint32) if a.dtype == np.float32 else a


def _raw(qtype, rng):
  """Random data for a tensor of DIMS as GGUFReader exposes it."""
  shape = tuple(reversed(DIMS))
  if qtype == Q.F32:
    return rng.standard_normal(shape).astype(np.float32)
  if qtype == Q.F16:
    return rng.standard_normal(shape).astype(np.float16)
  if qtype == Q.I32:
    return rng.integers(-2**31, 2**31 - 1, shape, dtype=np.int64).astype(np.int32)
  if qtype in tiny._SCALE_FIELDS:
    return tiny.raw_blocks(rng, shape, qtype, std=0.05).data
  if qtype == Q.BF16:
    # Every bit pattern, including NaNs and infinities, must decode like gguf-py.
    return rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
  return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)


@pytest.mark.parametrize("qtype", sorted(dequant.SUPPORTED, key=int), ids=lambda q: q.name)
def test_bit_exact_vs_gguf_py(qtype):
  rng = np.random.default_rng(int(qtype))
  data = _raw(qtype, rng)
  got = dequant.dequantize(data, qtype, DIMS)
  assert got.shape == (2, 3, 512)
  if qtype == Q.I32:
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, data)
    return
  assert got.dtype == np.float32
  want = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(2, 3, 512)
  np.testing.assert_array_equal(_bits(got), _bits(want))
  assert not np.shares_memory(got, data)


def test_random_raw_blocks_are_valid_for_every_byte():
  """The K/IQ types decode finitely from arbitrary bytes once the f16 scales are sane."""
  rng = np.random.default_rng(0)
  for qtype in (Q.IQ2_XXS, Q.Q2_K, Q.Q4_K):
    data = tiny.raw_blocks(rng, (4, 256), qtype, std=1.0).data
    out = dequant.dequantize(data, qtype, (256, 4))
    assert np.all(np.isfinite(out)) and 0.5 < out.std() < 2.0, qtype.name


def test_q8_0_against_independent_decode():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 64)).astype(np.float32)
  q = gguf.quants.quantize(x, Q.Q8_0)
  blocks = q.reshape(-1, 34)
  d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
  qs = blocks[:, 2:].view(np.int8).astype(np.float32)
  want = (d * qs).reshape(4, 64)
  np.testing.assert_array_equal(dequant.dequantize(q, Q.Q8_0, (64, 4)), want)
  assert np.abs(want - x).max() < np.abs(x).max() / 100


def test_unsupported_and_mismatched():
  with pytest.raises(TensorTypeError, match="unsupported GGML type Q5_K"):
    dequant.dequantize(np.zeros(176, np.uint8), Q.Q5_K, (256,), "t")
  with pytest.raises(TensorTypeError, match="do not hold Q8_0"):
    dequant.dequantize(np.zeros(33, np.uint8), Q.Q8_0, (32,), "t")


def test_fixture_tensors_match_gguf_py(tiny_gguf):
  """Every tensor of the fixture, as loaded, equals gguf-py's decode of the raw data."""
  _, got = load.load_tensors(tiny_gguf, "all", progress=False, fill_optional=False)
  r = gguf.GGUFReader(tiny_gguf)
  assert len(r.tensors) == len(got)
  for t in r.tensors:
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type == Q.I32:
      want = np.asarray(t.data).reshape(shape)
      np.testing.assert_array_equal(got[t.name], want)
    else:
      want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
      np.testing.assert_array_equal(_bits(got[t.name]), _bits(want), err_msg=t.name)
