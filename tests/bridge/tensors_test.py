"""Wire codecs for activations (bridge/tensors.py)."""

import ml_dtypes
import numpy as np
import pytest

from ds4jax.wire import tensors
from ds4jax.wire.errors import ProtocolError


def _x(shape=(5, 3, 7), seed=0):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3
  x[0, 0, :2] = [1e30, -1e-30]  # outliers keep the f32 exponent range in bf16
  return x


def test_f32_exact_and_little_endian():
  x = _x()
  desc, buf = tensors.encode(x, "f32")
  assert desc == {"dtype": "f32", "shape": [5, 3, 7]}
  assert buf == x.astype("<f4").tobytes()
  np.testing.assert_array_equal(tensors.decode(desc, buf), x)


def test_bf16_matches_round_to_nearest_even():
  x = _x()
  desc, buf = tensors.encode(x, "bf16")
  assert len(buf) == 2 * x.size
  ref = x.astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(tensors.decode(desc, buf), ref)


def test_int8_per_row_error_bound():
  x = _x()
  x[1, 2] = 0.0  # an all-zero row has scale 0 and decodes to zeros
  desc, buf = tensors.encode(x, "int8")
  rows = 5 * 3
  assert len(buf) == 4 * rows + x.size
  y = tensors.decode(desc, buf)
  scale = np.abs(x).max(axis=-1, keepdims=True) / 127
  assert np.all(np.abs(y - x) <= scale / 2 * (1 + 1e-6))
  np.testing.assert_array_equal(y[1, 2], 0.0)


@pytest.mark.parametrize("dtype", tensors.WIRE_DTYPES)
def test_slice_tokens_equals_encoding_the_slice(dtype):
  x = _x()
  desc, buf = tensors.encode(x, dtype)
  d2, b2 = tensors.slice_tokens(desc, buf, 1, 4)
  ref_d, ref_b = tensors.encode(x[1:4], dtype)
  assert d2 == ref_d and b2 == ref_b


def test_decode_rejects_inconsistent_descriptors():
  desc, buf = tensors.encode(_x(), "f32")
  with pytest.raises(ProtocolError, match="needs"):
    tensors.decode(desc, buf[:-1])
  for bad in ({"dtype": "f64", "shape": [1]}, {"dtype": "f32", "shape": []},
              {"dtype": "f32", "shape": [-1]}, {"dtype": "f32", "shape": [True]},
              {"dtype": "f32", "shape": [2**20, 2**20]}, "x"):
    with pytest.raises(ProtocolError):
      tensors.decode(bad, b"")
