"""model.ops.einsum on Packed weights: the row-tiled prefill path equals the untiled one.

Only the Flash head crossed `ops.TILE_BYTES` before, so the tiled path is forced here with a
small tile budget, on a jitted step (the tiles are traced, as in the runner).
"""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from ds4jax.model import ops
from ds4jax.quant.packed import Packed


@pytest.mark.parametrize("q", [Q.Q8_0, Q.F16])
def test_tiled_einsum_equals_untiled(q, monkeypatch):
  rng = np.random.default_rng(0)
  n, k = 64, 256
  w_np = rng.standard_normal((n, k)).astype(np.float32)
  w = Packed.from_gguf_data(gguf.quants.quantize(w_np, q), q, (n, k), jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 12, k)).astype(np.float32))  # 24 rows: no matvec
  step = lambda x, w: ops.einsum("BTK,NK->BTN", x, w)
  want = np.asarray(jax.jit(step)(x, w))
  monkeypatch.setattr(ops, "TILE_BYTES", 16 * k * 4)  # 16 rows a tile: 4 tiles
  assert ops._tile_count(w) == 4
  got = np.asarray(jax.jit(step)(x, w))
  assert got.shape == (2, 12, n)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("q_shape,k_shape,spec", [
    ((1, 8, 128), (128, 128), "TNH,SH->TNS"),  # a decode row against an indexer's keys
    ((3, 5, 8, 64), (3, 71, 64), "BQNH,BSH->BQNS"),  # query blocks, each with its window
])
def test_scores_equal_einsum(q_shape, k_shape, spec):
  """ops.scores (the keys as the dot's left operand) is the einsum it replaces, up to the
  order of the dot's sum over H, under jit and vmap (how the attention core runs it)."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal(q_shape).astype(np.float32))
  k = jnp.asarray(rng.standard_normal(k_shape).astype(np.float32))
  want = np.einsum(spec, np.asarray(q, np.float64), np.asarray(k, np.float64))
  got = np.asarray(jax.jit(ops.scores)(q, k))
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  got_B = np.asarray(jax.vmap(ops.scores)(q[None].repeat(2, 0), k[None].repeat(2, 0)))
  np.testing.assert_array_equal(got_B[0], got_B[1])
  np.testing.assert_allclose(got_B[0], want, rtol=1e-5, atol=1e-4)
