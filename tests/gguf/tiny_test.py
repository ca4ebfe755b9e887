"""Tiny fixtures: determinism, layout, quant mix, metadata types, vocab, writer policies."""

import hashlib

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, GGUFValueType as VT

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf import load, names, reader, writer
from ds4jax.gguf.errors import GGUFError
from ds4jax.testing import tiny, tiny_vocab


def _sha(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_deterministic_and_seeded(tmp_path):
  a = tiny.make_tiny_gguf(tmp_path / "a.gguf", seed=3)
  b = tiny.make_tiny_gguf(tmp_path / "b.gguf", seed=3)
  c = tiny.make_tiny_gguf(tmp_path / "c.gguf", seed=4)
  assert _sha(a) == _sha(b)
  assert _sha(a) != _sha(c)


def test_cache_builds_once(tmp_path):
  p1 = tiny.tiny_gguf_path("tiny", tmp_path)
  mtime = __import__("os").path.getmtime(p1)
  p2 = tiny.tiny_gguf_path("tiny", tmp_path)
  assert p1 == p2 and __import__("os").path.getmtime(p2) == mtime
  assert tiny.code_version() in p1


def test_layout_and_quant_mix(tiny_gguf):
  f = reader.open_gguf(tiny_gguf)
  assert f.cfg == ModelConfig.tiny()
  cfg = f.cfg
  assert sorted(f.tensors) == sorted(names.ds4_tensor_names(cfg, LayerRange(0, 3, True)))
  f.validate("all")
  want = {
      "token_embd.weight": Q.F16, "output.weight": Q.Q8_0, "output_norm.weight": Q.F32,
      "output_hc_fn.weight": Q.F16, "output_hc_base.weight": Q.F32,
      "blk.0.attn_q_b.weight": Q.Q8_0, "blk.0.hc_attn_fn.weight": Q.F16,
      "blk.0.hc_attn_scale.weight": Q.F32, "blk.0.attn_sinks.weight": Q.F32,
      "blk.2.attn_compressor_kv.weight": Q.F16, "blk.2.indexer.proj.weight": Q.F16,
      "blk.1.ffn_gate_inp.weight": Q.F16, "blk.1.exp_probs_b.bias": Q.F32,
      "blk.0.ffn_gate_tid2eid.weight": Q.I32, "blk.3.ffn_gate_exps.weight": Q.IQ2_XXS,
      "blk.3.ffn_up_exps.weight": Q.IQ2_XXS, "blk.3.ffn_down_exps.weight": Q.Q2_K,
      "blk.3.ffn_down_shexp.weight": Q.Q8_0,
  }
  for name, q in want.items():
    assert f.tensor(name).tensor_type == q, name
  # The ds4 recipe: no router bias on hash layers.
  assert "blk.0.exp_probs_b.bias" not in f


def test_metadata_types_are_exact(tiny_gguf):
  r = gguf.GGUFReader(tiny_gguf)
  t = lambda k: list(r.fields[k].types)
  assert t("deepseek4.block_count") == [VT.UINT32]
  assert t("deepseek4.rope.scaling.original_context_length") == [VT.UINT64]
  assert t("deepseek4.context_length") == [VT.UINT64]
  assert t("deepseek4.expert_weights_norm") == [VT.BOOL]
  assert t("deepseek4.rope.freq_base") == [VT.FLOAT32]
  assert t("deepseek4.attention.compress_ratios") == [VT.ARRAY, VT.UINT32]
  assert t("deepseek4.swiglu_clamp_exp") == [VT.ARRAY, VT.FLOAT32]
  assert t("tokenizer.ggml.tokens") == [VT.ARRAY, VT.STRING]
  assert t("tokenizer.ggml.merges") == [VT.ARRAY, VT.STRING]
  assert t("tokenizer.ggml.token_type") == [VT.ARRAY, VT.INT32]
  assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
  assert r.fields["tokenizer.ggml.bos_token_id"].contents() == 0
  assert r.fields["tokenizer.ggml.eos_token_id"].contents() == 1
  tokens = r.fields["tokenizer.ggml.tokens"].contents()
  assert len(tokens) == 512
  for s in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
            "<think>", "</think>", "｜DSML｜"):
    assert s in tokens


def test_weights_are_sane(tiny_gguf):
  cfg, w = load.load_tensors(tiny_gguf, "all", progress=False)
  for name, arr in w.items():
    assert np.all(np.isfinite(arr)), name
  q_a = w["blk.1.attn_q_a.weight"]
  assert abs(q_a.std() - 1 / np.sqrt(cfg.d_model)) < 0.2 / np.sqrt(cfg.d_model)
  for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"):
    a = w[name]
    assert abs(a.std() - 1 / np.sqrt(a.shape[-1])) < 0.25 / np.sqrt(a.shape[-1]), name
    assert abs(a.mean()) < 0.1 * a.std(), name
  assert abs(w["blk.2.attn_norm.weight"].mean() - 1) < 0.05
  tid = w["blk.0.ffn_gate_tid2eid.weight"]
  assert tid.dtype == np.int32 and tid.shape == (cfg.vocab_size, cfg.n_experts_used)
  assert tid.min() >= 0 and tid.max() < cfg.n_experts
  assert all(len(set(row)) == cfg.n_experts_used for row in tid.tolist())


def test_bench_preset_dims():
  cfg = tiny.preset_config("bench")
  n = sum(int(np.prod(e.numpy_shape(cfg))) for e in names.entries(cfg, LayerRange(0, 7, True)))
  assert 10e6 < n < 100e6
  assert cfg.window == 128 and set(cfg.compress_ratios) == {0, 4, 128}
  for e in names.entries(cfg, LayerRange(0, 7, True)):
    if e.spec.is_expert:
      assert e.ggml_dims(cfg)[0] % 256 == 0


def test_vocab():
  v = tiny_vocab.build_vocab(512)
  assert v is tiny_vocab.build_vocab(512)
  tiny_vocab.build_vocab.cache_clear()
  v2 = tiny_vocab.build_vocab(512)
  assert v == v2
  assert len(v.tokens) == len(set(v.tokens)) == 512
  assert v.tokens[:8] == tiny_vocab.SPECIAL_TOKENS and v.tokens[0] == "<｜begin▁of▁sentence｜>"
  assert v.tokens[1] == "<｜end▁of▁sentence｜>"
  b2u = tiny_vocab.bytes_to_unicode()
  assert v.tokens[8 + ord(" ")] == "Ġ" and v.tokens[8 + ord("a")] == "a"
  assert len(v.merges) == 512 - 264
  for r, m in enumerate(v.merges):
    a, b = m.split(" ")
    assert v.tokens.index(a) < 264 + r and v.tokens.index(b) < 264 + r
    assert v.tokens[264 + r] == a + b
  assert v.token_type[:8] == (3,) * 8 and set(v.token_type[8:]) == {1}
  assert len(b2u) == 256 and len(set(b2u)) == 256
  assert len(tiny_vocab.build_vocab(4096).tokens) == 4096
  with pytest.raises(ValueError, match="too small"):
    tiny_vocab.build_vocab(100)


def _float_tensors(cfg, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for e in names.entries(cfg, LayerRange(0, cfg.n_layers - 1, True), optional=True):
    shape = e.numpy_shape(cfg)
    if e.spec.ds4_type == Q.I32:
      out[e.name] = rng.integers(0, cfg.n_experts, shape).astype(np.int32)
    else:
      out[e.name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
  return out


def test_write_gguf_f32_roundtrip_exact(tmp_path):
  cfg = ModelConfig.tiny(n_layers=2, compress_ratios=(4, 16))
  ts = _float_tensors(cfg)
  p = writer.write_gguf(tmp_path / "f32.gguf", cfg, ts, types="f32")
  got_cfg, got = load.load_tensors(p, "all", progress=False, fill_optional=False)
  assert got_cfg == cfg and got.keys() == ts.keys()
  for k in ts:
    np.testing.assert_array_equal(got[k], ts[k])
  assert reader.open_gguf(p).tensor("blk.0.ffn_gate_exps.weight").tensor_type == Q.F32


def test_write_gguf_ds4_policy(tmp_path):
  cfg = ModelConfig.tiny(n_layers=2, compress_ratios=(4, 16))
  ts = _float_tensors(cfg)
  p = writer.write_gguf(tmp_path / "ds4.gguf", cfg, ts, types="ds4")
  f = reader.open_gguf(p)
  assert f.tensor("blk.0.attn_q_a.weight").tensor_type == Q.Q8_0
  assert f.tensor("blk.0.ffn_gate_exps.weight").tensor_type == Q.Q8_0  # float experts -> Q8_0
  assert f.tensor("blk.0.indexer.proj.weight").tensor_type == Q.F16
  assert f.tensor("blk.1.attn_norm.weight").tensor_type == Q.F32
  _, got = load.load_tensors(f, "all", progress=False)
  for k in ts:
    np.testing.assert_allclose(got[k], ts[k], atol=0.05 * 0.05 * 4 / 127 * 4 + 1e-3)


def test_write_gguf_rejects_bad_tensors(tmp_path):
  cfg = ModelConfig.tiny(n_layers=2, compress_ratios=(4, 16))
  ts = _float_tensors(cfg)
  bad = dict(ts)
  del bad["blk.1.attn_q_b.weight"]
  with pytest.raises(GGUFError, match="missing tensor 'blk.1.attn_q_b.weight'"):
    writer.write_gguf(tmp_path / "x.gguf", cfg, bad)
  bad = dict(ts, **{"blk.1.attn_q_b.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(GGUFError, match=r"has shape \(3, 3\), expected \(512, 64\)"):
    writer.write_gguf(tmp_path / "x.gguf", cfg, bad)
  bad = dict(ts, **{"blk.1.attn_foo.weight": np.zeros((3,), np.float32)})
  with pytest.raises(GGUFError, match="not part of the ds4 layout"):
    writer.write_gguf(tmp_path / "x.gguf", cfg, bad)
  bad = dict(ts, **{"blk.2.attn_norm.weight": np.zeros((256,), np.float32)})
  with pytest.raises(GGUFError, match="outside the model's 2 layers"):
    writer.write_gguf(tmp_path / "x.gguf", cfg, bad)
  with pytest.raises(GGUFError, match="unknown type policy"):
    writer.write_gguf(tmp_path / "x.gguf", cfg, ts, types="int4")


@pytest.mark.parametrize("experts,gate_up,down", [("q4", Q.Q4_K, Q.Q4_K), ("q8", Q.Q8_0, Q.Q8_0)])
def test_expert_recipes(tmp_path, experts, gate_up, down):
  p = tiny.make_tiny_gguf(tmp_path / "e.gguf", experts=experts, n_layers=2,
                          compress_ratios=(0, 4))
  f = reader.open_gguf(p)
  assert f.tensor("blk.1.ffn_gate_exps.weight").tensor_type == gate_up
  assert f.tensor("blk.1.ffn_down_exps.weight").tensor_type == down
  _, ts = load.load_tensors(f, "1:1", progress=False)
  a = ts["blk.1.ffn_up_exps.weight"]
  assert a.shape == (8, 256, 256) and abs(a.std() - 1 / 16) < 0.25 / 16


@pytest.mark.e2e
def test_make_tiny_gguf_n_experts(tmp_path, run_script):
  """`make_tiny_gguf.py --n_experts=E`: E routed experts a layer, the rest of the preset as
  is (the 12-layer Flash-dims memory fixture uses --preset=flash --n_experts=16); fewer
  than the routing's k is a one-line error."""
  out = tmp_path / "e4.gguf"
  rc, so, se = run_script("make_tiny_gguf.py", "--preset=tiny", "--n_layers=2",
                          "--n_experts=4", f"--out={out}")
  assert rc == 0, se
  f = reader.open_gguf(out)
  assert (f.cfg.n_layers, f.cfg.n_experts, f.cfg.n_experts_used) == (2, 4, 2)
  assert f.cfg.d_model == ModelConfig.tiny().d_model
  assert f.tensor("blk.1.ffn_gate_exps.weight").shape[-1] == 4  # GGUF dims, innermost first
  tid2eid = np.asarray(f.tensor("blk.0.ffn_gate_tid2eid.weight").data)
  assert tid2eid.shape[-1] == 2 and tid2eid.min() >= 0 and tid2eid.max() < 4
  assert all(len(set(row)) == 2 for row in tid2eid.tolist())
  rc, so, se = run_script("make_tiny_gguf.py", "--preset=tiny", "--n_experts=1",
                          f"--out={tmp_path / 'e1.gguf'}")
  assert rc != 0 and "n_experts_used=2 > n_experts=1" in se and "Traceback" not in se, se
