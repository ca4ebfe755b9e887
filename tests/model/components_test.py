"""Unit checks of single components: RoPE/YaRN, Sinkhorn, the compressor's absolute window
alignment, the runner's input validation and the bf16 path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf.load import load_tensors
from ds4jax.model.hyper_connections import sinkhorn
from ds4jax.runtime.load import stage_from_tensors
from ds4jax.model.rope import RoPE, rope_freqs, yarn_ramp_range
from ds4jax.runtime.runner import StageRunner, bucket


def test_yarn_ramp_of_flash():
  assert yarn_ramp_range(ModelConfig.flash()) == (15, 25)


@pytest.mark.parametrize("kind", ["main", "compress"])
def test_rope_freqs_match_hf(kind):
  import transformers
  from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m
  hcfg = transformers.DeepseekV4Config(rope_parameters={
      "rope_type": "yarn", "factor": 16.0, "beta_fast": 32.0, "beta_slow": 1.0,
      "original_max_position_embeddings": 65536}, num_hidden_layers=4)
  want = getattr(m.DeepseekV4RotaryEmbedding(hcfg), f"{kind}_inv_freq").numpy()
  np.testing.assert_allclose(rope_freqs(ModelConfig.flash(), kind), want, rtol=1e-6)


def test_rope_inverse_and_relative_positions():
  cfg = ModelConfig.tiny()
  rope = RoPE(cfg, layer_idx=2)
  x = jax.random.normal(jax.random.key(0), (5, 3, cfg.head_dim))
  pos = jnp.array([0, 7, 100, 4095, 70000])
  y = rope(x, pos)
  np.testing.assert_allclose(rope(y, pos, inverse=True), x, atol=2e-5)
  np.testing.assert_array_equal(y[..., :-cfg.rope_dim], x[..., :-cfg.rope_dim])
  # q.k depends only on the distance once both are rotated.
  q, k = x[0, 0], x[1, 0]
  d1 = rope(q[None], jnp.array([10])) @ rope(k[None], jnp.array([3])).T
  d2 = rope(q[None], jnp.array([1010])) @ rope(k[None], jnp.array([1003])).T
  np.testing.assert_allclose(d1, d2, rtol=1e-4)


def test_sinkhorn_is_doubly_stochastic():
  logits = jax.random.normal(jax.random.key(1), (6, 4, 4))
  c = np.asarray(sinkhorn(logits, 20, 1e-6))
  # Reference: row softmax + eps, column normalisation, then 19 x (row, column).
  ref = np.exp(np.asarray(logits, np.float64) - np.asarray(logits).max(-1, keepdims=True))
  ref = ref / ref.sum(-1, keepdims=True) + 1e-6
  ref = ref / (ref.sum(-2, keepdims=True) + 1e-6)
  for _ in range(19):
    ref = ref / (ref.sum(-1, keepdims=True) + 1e-6)
    ref = ref / (ref.sum(-2, keepdims=True) + 1e-6)
  np.testing.assert_allclose(c, ref, atol=1e-5)
  np.testing.assert_allclose(c.sum(-2), 1.0, atol=1e-5)
  np.testing.assert_allclose(c.sum(-1), 1.0, atol=1e-2)
  assert not np.allclose(c, np.swapaxes(c, -1, -2))


def test_bucket():
  assert [bucket(t, 64) for t in (1, 2, 3, 5, 33, 64, 65)] == [1, 2, 4, 8, 64, 64, 64]


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
  return load_tensors(tiny_gguf, "all")


@pytest.fixture(scope="module")
def runner_0_1(tiny):
  cfg, tensors = tiny
  return StageRunner(stage_from_tensors(cfg, LayerRange(0, 1), tensors), ctx_size=16,
                     max_chunk=8)


def test_runner_rejects_bad_input(runner_0_1):
  r = runner_0_1
  s = r.init_state()
  with pytest.raises(ValueError, match="pos0=3 does not match state.pos=0"):
    r.forward(s, np.array([1, 2]), None, 3)
  with pytest.raises(ValueError, match="exceeds ctx_size=16"):
    r.forward(s, np.arange(17), None, 0)
  with pytest.raises(ValueError, match="hc must be None"):
    r.forward(s, np.array([1]), np.zeros((1, r.cfg.n_hc, r.cfg.d_model), np.float32), 0)
  with pytest.raises(ValueError, match="token ids"):
    r.forward(s, np.array([r.cfg.vocab_size]), None, 0)
  with pytest.raises(ValueError, match="cannot truncate"):
    r.truncate(s, 1)


def test_hash_routing_uses_the_token_ids(tiny):
  """Two tokens with the same embedding row differ only through tid2eid (layer 0)."""
  cfg, tensors = tiny
  tensors = dict(tensors)
  emb = tensors["token_embd.weight"].copy()
  emb[9] = emb[5]
  tensors["token_embd.weight"] = emb
  eid = tensors["blk.0.ffn_gate_tid2eid.weight"]
  assert set(eid[5]) != set(eid[9])
  r = StageRunner(stage_from_tensors(cfg, LayerRange(0, 0), tensors), ctx_size=4, max_chunk=1)
  hc5, _ = r.forward(r.init_state(), np.array([5]), None, 0)
  hc9, _ = r.forward(r.init_state(), np.array([9]), None, 0)
  assert hc5.shape == (1, cfg.n_hc, cfg.d_model) and hc5.dtype == np.float32
  assert np.abs(hc5 - hc9).max() > 1e-3
  tensors["blk.0.ffn_gate_tid2eid.weight"] = np.where(np.arange(len(eid))[:, None] == 9,
                                                      eid[5], eid)
  r = StageRunner(stage_from_tensors(cfg, LayerRange(0, 0), tensors), ctx_size=4, max_chunk=1)
  hc9b, _ = r.forward(r.init_state(), np.array([9]), None, 0)
  np.testing.assert_allclose(hc9b, hc5, atol=1e-6)


def test_bf16_tracks_f32(tiny):
  cfg, tensors = tiny
  ids = np.arange(3, 23)
  outs = {}
  for dt in ("float32", "bfloat16"):
    r = StageRunner(stage_from_tensors(cfg, "all", tensors, dtype=dt), ctx_size=32,
                    max_chunk=32)
    outs[dt], state = r.forward(r.init_state(), ids, None, 0)
    assert state.layers[0].kv.dtype == jnp.dtype(dt)
  f32, b16 = outs["float32"], outs["bfloat16"]
  assert np.isfinite(b16).all()
  # bf16 noise is ~1% of the logit scale; a few positions jump further where a top-k
  # (router or indexer) flips, so the typical position is checked.
  rel_T = np.abs(b16 - f32).max(-1) / np.abs(f32).max()
  assert 0 < np.median(rel_T) < 0.03
  assert (b16.argmax(-1) == f32.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("t", [1, 3, 8, 64, 200])
@pytest.mark.parametrize("il", [0, 3])
def test_moe_paths_match_dense_reference(t, il):
  """Per-token expert slices (T*k <= 32), dense (few tokens) and grouped-by-expert (many
  tokens: 16-row blocks at T=64, 32-row at T=200) all equal a float64 numpy MoE, hash-routed
  (layer 0) or biased top-k (layer 3)."""
  from ds4jax.model.moe import MoE
  cfg = ModelConfig.bench()
  moe = MoE(cfg, layer_idx=il, rngs=nnx.Rngs(il))
  moe.bias[...] = 0.3 * jax.random.normal(jax.random.key(5), (cfg.n_experts,))
  x = np.asarray(jax.random.normal(jax.random.key(t), (t, cfg.d_model)))
  tok = np.arange(t) * 7 % cfg.vocab_size
  got = np.asarray(jax.jit(lambda x, tok: moe(x, tok))(x, tok))
  p = lambda n: np.asarray(getattr(moe, n)[...], np.float64)  # noqa: E731
  score = np.sqrt(np.log1p(np.exp(x @ p("gate").T)))
  if il < cfg.n_hash_layers:
    idx = np.asarray(moe.tid2eid[...])[tok]
  else:
    idx = np.argsort(-(score + p("bias")), axis=-1, kind="stable")[:, :cfg.n_experts_used]
  w = np.take_along_axis(score, idx, -1)
  w = 1.5 * w / w.sum(-1, keepdims=True)
  silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
  want = np.zeros((t, cfg.d_model))
  for i in range(t):
    for j, e in enumerate(idx[i]):
      g = np.minimum(p("gate_exps")[e] @ x[i], 10.0)
      u = np.clip(p("up_exps")[e] @ x[i], -10.0, 10.0)
      want[i] += w[i, j] * (p("down_exps")[e] @ (silu(g) * u))
    g = np.minimum(p("shared_gate") @ x[i], 10.0)
    want[i] += p("shared_down") @ (silu(g) * np.clip(p("shared_up") @ x[i], -10.0, 10.0))
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
