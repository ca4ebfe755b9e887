"""The name table: counts, presence rules, paths, and agreement with docs/design.md §2."""

import os
import re

import pytest
from gguf import GGMLQuantizationType as Q

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf import names

DESIGN = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "design.md")


def _design_rows():
  """(gguf name template, path, numpy shape text) rows of the design.md §2 table, expanded."""
  text = open(DESIGN, encoding="utf-8").read()
  section = text.split("## 2.")[1].split("## 3.")[0]
  rows = []
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 3 or not cells[0].startswith("`"):
      continue
    gg = re.findall(r"`([^`]+)`", cells[0])
    pp = re.findall(r"`([^`]+)`", cells[1])
    if len(gg) == 3:  # `blk.i.hc_attn_fn.weight` / `_base` / `_scale`
      stem = gg[0].replace("_fn.weight", "")
      gg = [gg[0]] + [f"{stem}{s}.weight" for s in gg[1:]]
      base = pp[0].rsplit(".", 1)[0]
      pp = [pp[0]] + [base + p for p in pp[1:]]
    rows += [(g.replace("blk.i.", "blk.{i}."), p.replace("blocks.i.", "blocks.{i}.")) for g, p in zip(gg, pp)]
  return rows


def test_table_matches_design_doc():
  rows = _design_rows()
  ours = {s.template: ".".join(s.path) for s in names.SPECS}
  # hc_ffn is given in the doc as "as hc_attn"; expand it the same way.
  assert len(rows) >= 35
  for g, p in rows:
    assert ours.get(g) == p, (g, p, ours.get(g))
  assert set(ours) == {g for g, _ in rows}


def test_flash_tensor_count_matches_ds4():
  cfg = ModelConfig.flash()
  rng = LayerRange.parse("all", cfg.n_layers)
  # 6 + 43*23 + 40 (bias) + 3 (tid2eid) + 41*4 (compressor) + 21*6 (indexer), ds4-architecture §4.2.
  assert len(names.ds4_tensor_names(cfg, rng)) == 1328
  assert len(names.tensor_names(cfg, rng)) == 1328 - 40
  assert len(names.tensor_names(cfg, rng, optional=True)) == 1328 + 3


def test_flash_dims_match_ds4_table():
  cfg = ModelConfig.flash()
  dims = {e.name: e.ggml_dims(cfg) for e in names.entries(cfg, LayerRange(0, 42, True))}
  assert dims["token_embd.weight"] == (4096, 129280)
  assert dims["output_hc_fn.weight"] == (16384, 4)
  assert dims["blk.2.attn_compressor_ape.weight"] == (1024, 4)
  assert dims["blk.3.attn_compressor_ape.weight"] == (512, 128)
  assert dims["blk.2.attn_output_a.weight"] == (4096, 8192)
  assert dims["blk.0.ffn_gate_tid2eid.weight"] == (6, 129280)
  assert dims["blk.5.ffn_down_exps.weight"] == (2048, 4096, 256)
  assert dims["blk.4.indexer.attn_q_b.weight"] == (1024, 8192)
  assert dims["blk.4.indexer_compressor_ape.weight"] == (256, 4)
  assert dims["blk.7.hc_ffn_fn.weight"] == (16384, 24)


def test_presence_follows_schedule_from_config():
  cfg = ModelConfig.tiny(compress_ratios=(128, 4, 0, 8), n_hash_layers=2)  # a Pro-like mix
  got = set(names.tensor_names(cfg, LayerRange(0, 3, True)))
  assert "blk.0.attn_compressor_kv.weight" in got and "blk.0.indexer.proj.weight" not in got
  assert "blk.1.indexer.proj.weight" in got
  assert "blk.2.attn_compressor_kv.weight" not in got
  assert {"blk.0.ffn_gate_tid2eid.weight", "blk.1.ffn_gate_tid2eid.weight"} <= got
  assert "blk.2.ffn_gate_tid2eid.weight" not in got
  assert not any(n.endswith("exp_probs_b.bias") for n in got)  # optional


def test_slice_ownership():
  cfg = ModelConfig.tiny()
  mid = names.tensor_names(cfg, LayerRange(1, 2, False))
  assert "token_embd.weight" not in mid and "output.weight" not in mid
  assert all(n.startswith(("blk.1.", "blk.2.")) for n in mid)
  first = names.tensor_names(cfg, LayerRange(0, 0, False))
  assert first[0] == "token_embd.weight"
  last = names.tensor_names(cfg, LayerRange.parse("3:output", 4))
  assert last[-1] == "output.weight" and "token_embd.weight" not in last


def test_paths():
  assert names.param_path("blk.12.attn_q_a.weight") == ("blocks", 12, "attn", "q_a")
  assert names.param_path("output_norm.weight") == ("head", "norm", "scale")
  assert names.param_path("blk.2.indexer_compressor_norm.weight") == (
      "blocks", 2, "attn", "indexer", "compressor", "norm", "scale")
  rng = LayerRange(10, 20, False)
  assert names.local_path("blk.12.exp_probs_b.bias", rng) == ("blocks", 2, "moe", "bias")
  assert names.local_path("token_embd.weight", rng) == ("embed", "embedding")
  with pytest.raises(names.UnknownTensorError, match="outside layer range"):
    names.local_path("blk.9.attn_q_a.weight", rng)


@pytest.mark.parametrize("bad", ["blk.1.attn_q.weight", "blk.01.attn_q_a.weight", "output",
                                 "blk.x.attn_q_a.weight", "mtp.0.e_proj.weight"])
def test_unknown_names(bad):
  with pytest.raises(names.UnknownTensorError, match="not part of the ds4 layout"):
    names.lookup(bad)


def test_paths_unique_and_types():
  cfg = ModelConfig.tiny()
  es = list(names.entries(cfg, LayerRange(0, 3, True)))
  paths = [names.param_path(e.name) for e in es]
  assert len(set(paths)) == len(paths)
  for e in es:
    assert e.spec.ds4_type in e.spec.types
    if e.spec.ds4_type == Q.I32:
      assert e.spec.types == {Q.I32}
    else:
      assert {Q.F32, Q.F16, Q.BF16} <= e.spec.types
  gate = names.lookup("blk.0.ffn_gate_exps.weight")[0]
  assert gate.types == {Q.IQ2_XXS, Q.Q2_K, Q.Q4_K, Q.Q8_0, Q.MXFP4, Q.F16, Q.BF16, Q.F32}
  assert names.lookup("blk.0.attn_q_a.weight")[0].types == {Q.Q8_0, Q.F16, Q.BF16, Q.F32}
