"""The metadata-only tensor table (types, dims, bytes) and the streamed Flash-dims writer.

No multi-GB file is written here: the Flash table is checked without data, and the streamed
writer runs on the tiny dims.
"""

import hashlib

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from ds4jax.config import ModelConfig
from ds4jax.gguf import names, reader, table, writer
from ds4jax.gguf.errors import GGUFError
from ds4jax.testing import tiny


def _file_table(path):
  f = reader.open_gguf(path, cache=False)
  return [(n, t.tensor_type, tuple(int(d) for d in t.shape), int(t.n_bytes))
          for n, t in f.tensors.items()]


def _table(cfg, **kw):
  return [(t.name, t.qtype, t.ggml_dims, t.nbytes) for t in table.tensor_table(cfg, **kw)]


@pytest.mark.parametrize("experts,types", [("iq2", "ds4"), ("q4", "ds4"), ("q8", "ds4"),
                                           ("iq2", "f32")])
def test_table_is_what_the_fixture_writer_writes(tmp_path, experts, types):
  p = tiny.make_tiny_gguf(tmp_path / "t.gguf", experts=experts, types=types)
  assert _file_table(p) == _table(ModelConfig.tiny(), experts=experts, types=types)


# The real Flash layer, GGUF dims and types (ds4-architecture.md §4.2), D=4096, F=2048, E=256.
_COMMON = {
    "hc_attn_fn.weight": (Q.F16, (16384, 24)), "hc_attn_base.weight": (Q.F32, (24,)),
    "hc_attn_scale.weight": (Q.F32, (3,)), "attn_norm.weight": (Q.F32, (4096,)),
    "attn_q_a.weight": (Q.Q8_0, (4096, 1024)), "attn_q_a_norm.weight": (Q.F32, (1024,)),
    "attn_q_b.weight": (Q.Q8_0, (1024, 32768)), "attn_kv.weight": (Q.Q8_0, (4096, 512)),
    "attn_kv_a_norm.weight": (Q.F32, (512,)), "attn_sinks.weight": (Q.F32, (64,)),
    "attn_output_a.weight": (Q.Q8_0, (4096, 8192)), "attn_output_b.weight": (Q.Q8_0, (8192, 4096)),
    "hc_ffn_fn.weight": (Q.F16, (16384, 24)), "hc_ffn_base.weight": (Q.F32, (24,)),
    "hc_ffn_scale.weight": (Q.F32, (3,)), "ffn_norm.weight": (Q.F32, (4096,)),
    "ffn_gate_inp.weight": (Q.F16, (4096, 256)),
    "ffn_gate_exps.weight": (Q.IQ2_XXS, (4096, 2048, 256)),
    "ffn_up_exps.weight": (Q.IQ2_XXS, (4096, 2048, 256)),
    "ffn_down_exps.weight": (Q.Q2_K, (2048, 4096, 256)),
    "ffn_gate_shexp.weight": (Q.Q8_0, (4096, 2048)), "ffn_up_shexp.weight": (Q.Q8_0, (4096, 2048)),
    "ffn_down_shexp.weight": (Q.Q8_0, (2048, 4096)),
}
_HASH = {"ffn_gate_tid2eid.weight": (Q.I32, (6, 129280))}
_BIAS = {"exp_probs_b.bias": (Q.F32, (256,))}


def _compressor(c, m):
  return {"attn_compressor_ape.weight": (Q.F16, (c * 512, m)),
          "attn_compressor_kv.weight": (Q.F16, (4096, c * 512)),
          "attn_compressor_gate.weight": (Q.F16, (4096, c * 512)),
          "attn_compressor_norm.weight": (Q.F32, (512,))}


_INDEXER = {
    "indexer.attn_q_b.weight": (Q.F16, (1024, 8192)), "indexer.proj.weight": (Q.F16, (4096, 64)),
    "indexer_compressor_ape.weight": (Q.F16, (256, 4)),
    "indexer_compressor_kv.weight": (Q.F16, (4096, 256)),
    "indexer_compressor_gate.weight": (Q.F16, (4096, 256)),
    "indexer_compressor_norm.weight": (Q.F32, (128,)),
}
_GLOBALS = {
    "token_embd.weight": (Q.F16, (4096, 129280)), "output_hc_fn.weight": (Q.F16, (16384, 4)),
    "output_hc_base.weight": (Q.F32, (4,)), "output_hc_scale.weight": (Q.F32, (1,)),
    "output_norm.weight": (Q.F32, (4096,)), "output.weight": (Q.Q8_0, (4096, 129280)),
}


def test_flash_table_first_layers_are_the_real_ones():
  """4 layers keep the real schedule: SWA, SWA (hash), CSA + indexer (hash), HCA128 (bias)."""
  cfg = tiny.preset_config("flash", n_layers=4)
  assert cfg == ModelConfig.flash(n_layers=4)
  assert cfg.compress_ratios == (0, 0, 4, 128) and cfg.n_hash_layers == 3
  want = dict(_GLOBALS)
  layers = {0: {**_COMMON, **_HASH}, 1: {**_COMMON, **_HASH},
            2: {**_COMMON, **_HASH, **_compressor(2, 4), **_INDEXER},
            3: {**_COMMON, **_BIAS, **_compressor(1, 128)}}
  for il, ts in layers.items():
    want.update({f"blk.{il}.{k}": v for k, v in ts.items()})
  got = {t.name: (t.qtype, t.ggml_dims) for t in table.tensor_table(cfg)}
  assert got == want
  names_in_order = [t.name for t in table.tensor_table(cfg)]
  assert names_in_order[0] == "token_embd.weight" and names_in_order[-1] == "output.weight"
  assert names_in_order == sorted(names_in_order, key=writer._order_key)


def test_flash_one_layer():
  cfg = ModelConfig.flash(n_layers=1)
  got = {t.name: (t.qtype, t.ggml_dims) for t in table.tensor_table(cfg)}
  assert got == {**_GLOBALS, **{f"blk.0.{k}": v for k, v in {**_COMMON, **_HASH}.items()}}


def test_flash_full_table_bytes():
  """43 layers: ds4's 1328 tensors (ds4-architecture.md §4.2), 86.7 GB of which 77.9 GB are
  routed experts (packed-quant.md §5)."""
  cfg = ModelConfig.flash()
  t = table.tensor_table(cfg)
  assert len(t) == 1328
  total = sum(x.nbytes for x in t)
  assert abs(total - 86.7e9) / 86.7e9 < 0.002
  experts = sum(x.nbytes for x in t if x.spec.is_expert)
  assert experts == 43 * (2 * 553_648_128 + 704_643_072)
  assert round(experts / 1e9, 1) == 77.9
  # One routed expert, as read per token: 2 x IQ2_XXS(4096 x 2048) + Q2_K(2048 x 4096).
  assert table.tensor_nbytes(Q.IQ2_XXS, (4096, 2048)) == 2_162_688
  assert table.tensor_nbytes(Q.Q2_K, (2048, 4096)) == 2_752_512
  embed, per_layer, head = table.layer_bytes(t, cfg.n_layers)
  assert embed + sum(per_layer) + head == total
  assert embed == 4096 * 129280 * 2 and head == sum(
      x.nbytes for x in t if x.spec.scope == names.HEAD)


def test_table_errors():
  with pytest.raises(ValueError, match="unknown expert recipe 'q3'"):
    table.tensor_table(ModelConfig.tiny(), experts="q3")
  with pytest.raises(ValueError, match="not a multiple of the Q8_0 block size 32"):
    table.tensor_nbytes(Q.Q8_0, (48, 2))


def _sha(p):
  return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_streamed_file_is_valid_and_deterministic(tmp_path):
  cfg = ModelConfig.tiny()
  a = tiny.make_streamed_gguf(tmp_path / "a.gguf", cfg, seed=1)
  b = tiny.make_streamed_gguf(tmp_path / "b.gguf", cfg, seed=1)
  c = tiny.make_streamed_gguf(tmp_path / "c.gguf", cfg, seed=2)
  assert _sha(a) == _sha(b) != _sha(c)
  f = reader.open_gguf(a, cache=False)
  assert f.cfg == cfg
  f.validate("all")
  assert _file_table(a) == _table(cfg)
  for name, t in f.tensors.items():
    if t.tensor_type == Q.I32:  # tid2eid: k distinct experts per token
      ids = np.asarray(t.data)
      assert ids.shape == (cfg.vocab_size, cfg.n_experts_used)
      assert ids.min() >= 0 and ids.max() < cfg.n_experts
      assert all(len(set(row)) == len(row) for row in ids)
      continue
    x = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.isfinite(x).all(), name
    spec, _ = names.lookup(name)
    if t.tensor_type in (Q.Q8_0, Q.IQ2_XXS, Q.Q2_K):  # projections: std 1/sqrt(fan_in)
      assert 0.8 < float(np.std(x)) * np.sqrt(x.shape[-1]) < 1.25, name
    if spec.path[-1] == "embedding":
      assert 0.9 < float(np.std(x)) < 1.1


def test_streamed_recipes(tmp_path):
  cfg = ModelConfig.tiny(n_layers=3)
  for experts, types in (("q4", "ds4"), ("q8", "f32")):
    p = tiny.make_streamed_gguf(tmp_path / f"{experts}.gguf", cfg, experts=experts, types=types)
    reader.open_gguf(p, cache=False).validate("all")
    assert _file_table(p) == _table(cfg, experts=experts, types=types)


def test_streamed_file_runs(tmp_path):
  import ds4jax
  p = tiny.make_streamed_gguf(tmp_path / "r.gguf", ModelConfig.tiny())
  logits = ds4jax.load_model(p, ctx_size=64, max_chunk=16).logits([0, 9, 17, 33, 5])
  assert logits.shape == (5, 512) and np.isfinite(logits).all()


def test_streamed_writer_checks_and_cleans_up(tmp_path):
  cfg = ModelConfig.tiny(n_layers=2)
  tensors = tiny.streamed_tensors(cfg)
  out = tmp_path / "x.gguf"
  with pytest.raises(GGUFError, match=r"missing tensor 'token_embd.weight' \(1 missing"):
    writer.write_gguf_streamed(out, cfg, tensors[1:])
  with pytest.raises(GGUFError, match="given twice"):
    writer.write_gguf_streamed(out, cfg, tensors + tensors[:1])
  bad = writer.StreamedTensor(tensors[0].name, Q.F16, (3, 4), tensors[0].chunks)
  with pytest.raises(GGUFError, match=r"'token_embd.weight' has shape \(3, 4\), expected"):
    writer.write_gguf_streamed(out, cfg, [bad] + tensors[1:])
  bad = writer.StreamedTensor(tensors[0].name, Q.Q2_K, tensors[0].numpy_shape, tensors[0].chunks)
  with pytest.raises(GGUFError, match="type Q2_K is not allowed"):
    writer.write_gguf_streamed(out, cfg, [bad] + tensors[1:])
  assert not out.exists()
  short = writer.StreamedTensor(tensors[5].name, tensors[5].qtype, tensors[5].numpy_shape,
                                lambda: [np.zeros(3, np.uint8)])
  with pytest.raises(GGUFError, match=f"'{tensors[5].name}': its chunks hold 3 bytes"):
    writer.write_gguf_streamed(out, cfg, tensors[:5] + [short] + tensors[6:])
  assert not out.exists()  # a failed write leaves no partial file


def test_chunks_stay_small():
  """A Flash expert tensor (0.7 GB) comes in chunks of about CHUNK_BYTES, never whole."""
  cfg = ModelConfig.flash(n_layers=1)
  t = next(t for t in tiny.streamed_tensors(cfg) if t.name == "blk.0.ffn_down_exps.weight")
  assert t.nbytes == 704_643_072
  first = next(iter(t.chunks()))
  assert first.dtype == np.uint8 and first.nbytes <= tiny.CHUNK_BYTES
  assert first.shape[1] == gguf.GGML_QUANT_SIZES[Q.Q2_K][1]


def test_flash_preset_is_not_cached(tmp_path):
  with pytest.raises(ValueError, match="not cached"):
    tiny.tiny_gguf_path("flash", tmp_path)
  assert not any(tmp_path.iterdir())
