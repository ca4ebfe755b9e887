"""Malformed inputs give precise one-line errors, from the library and from the scripts."""

import os
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, GGUFValueType as VT

from ds4jax.gguf import errors, load, reader
from ds4jax.testing import tiny


def _one_line(e):
  msg = str(e.value)
  assert "\n" not in msg and msg
  return msg


def test_not_gguf(tmp_path):
  p = tmp_path / "x.gguf"
  p.write_bytes(b"GGML" + b"\0" * 100)
  with pytest.raises(errors.NotGGUFError, match=r"not a GGUF file \(magic b'GGML', expected b'GGUF'\)") as e:
    reader.open_gguf(p)
  _one_line(e)
  p.write_bytes(b"")
  with pytest.raises(errors.NotGGUFError, match=r"not a GGUF file \(empty file\)"):
    reader.open_gguf(p)
  with pytest.raises(errors.GGUFError, match="cannot open"):
    reader.open_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [6, 40, 3000, -1000], ids=["magic", "counts", "kv", "data"])
def test_truncated(tiny_gguf, tmp_path, keep):
  data = open(tiny_gguf, "rb").read()
  p = tmp_path / "t.gguf"
  p.write_bytes(data[:keep] if keep > 0 else data[:keep])
  with pytest.raises(errors.TruncatedError, match="truncated GGUF file") as e:
    load.load_tensors(p, "all", progress=False)
  _one_line(e)


def test_wrong_architecture(tiny_gguf, tmp_path, rewrite):
  p = rewrite(tiny_gguf, tmp_path / "a.gguf", arch="llama")
  with pytest.raises(errors.ArchitectureError, match="general.architecture is 'llama', expected 'deepseek4'"):
    reader.open_gguf(p)


@pytest.mark.parametrize("key", ["deepseek4.block_count", "deepseek4.attention.compress_ratios",
                                 "deepseek4.rope.scaling.original_context_length"])
def test_missing_key(tiny_gguf, tmp_path, rewrite, key):
  p = rewrite(tiny_gguf, tmp_path / "m.gguf", drop_meta=[key])
  with pytest.raises(errors.MetadataError, match=f"missing GGUF metadata key '{key}'") as e:
    reader.read_config(p)
  _one_line(e)


@pytest.mark.parametrize("key,value,msg", [
    ("deepseek4.block_count", (4, VT.INT32), "has type INT32, expected UINT32"),
    ("deepseek4.block_count", (4, VT.UINT64), "has type UINT64, expected UINT32"),
    ("deepseek4.expert_weights_norm", (1, VT.UINT8), "has type UINT8, expected BOOL"),
    ("deepseek4.rope.freq_base", (1e4, VT.FLOAT64), "has type FLOAT64, expected FLOAT32"),
    ("deepseek4.attention.compress_ratios", ([0.0, 0.0, 4.0, 16.0], VT.ARRAY, VT.FLOAT32),
     r"has type ARRAY\[FLOAT32\], expected ARRAY\[UINT32\] or ARRAY\[INT32\]"),
    ("deepseek4.swiglu_clamp_exp", (10.0, VT.FLOAT32), r"has type FLOAT32, expected ARRAY\[FLOAT32\]"),
    ("deepseek4.attention.compress_ratios", ([0, 0, 4], VT.ARRAY, VT.UINT32), "has 3 entries, need >= 4"),
    ("deepseek4.attention.value_length", (64, VT.UINT32), "differs from"),
    ("deepseek4.expert_group_count", (2, VT.UINT32), "expert_group_count=2 is not supported"),
    ("general.architecture", (3, VT.UINT32), "'general.architecture' has type UINT32, expected STRING"),
])
def test_bad_metadata(tiny_gguf, tmp_path, rewrite, key, value, msg):
  p = rewrite(tiny_gguf, tmp_path / "b.gguf", meta={key: value})
  with pytest.raises(errors.GGUFError, match=msg) as e:
    reader.open_gguf(p)
  assert key in _one_line(e) or key.split(".")[-1] in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("deepseek4.rope.scaling.original_context_length", (65536, VT.UINT32)),   # u32 accepted
    ("deepseek4.attention.compress_ratios", ([0, 0, 4, 16], VT.ARRAY, VT.INT32)),
    ("deepseek4.attention.compress_ratios", ([0, 0, 4, 16, 0], VT.ARRAY, VT.UINT32)),  # len >= L
])
def test_accepted_metadata_variants(tiny_gguf, tmp_path, rewrite, key, value):
  p = rewrite(tiny_gguf, tmp_path / "v.gguf", meta={key: value})
  assert reader.read_config(p) == reader.read_config(tiny_gguf)


def test_missing_tensor_only_matters_in_its_slice(tiny_gguf, tmp_path, rewrite):
  p = rewrite(tiny_gguf, tmp_path / "m.gguf", drop=["blk.2.indexer.proj.weight"])
  with pytest.raises(errors.MissingTensorError, match="missing tensor 'blk.2.indexer.proj.weight'") as e:
    load.load_tensors(p, "all", progress=False)
  _one_line(e)
  load.load_tensors(p, "0:1", progress=False)
  load.load_tensors(p, "3:output", progress=False)


def test_wrong_shape(tiny_gguf, tmp_path, rewrite):
  p = rewrite(tiny_gguf, tmp_path / "s.gguf",
              retype={"blk.1.attn_q_a.weight": (np.zeros((64, 128), np.float32), None)})
  with pytest.raises(errors.ShapeError,
                     match=r"tensor 'blk.1.attn_q_a.weight' has GGUF dims \[128, 64\], expected \[256, 64\]"):
    load.load_tensors(p, "1:1", progress=False)


def test_wrong_type(tiny_gguf, tmp_path, rewrite):
  q4 = tiny.raw_blocks(np.random.default_rng(0), (64, 256), Q.Q4_K, 0.05).data
  p = rewrite(tiny_gguf, tmp_path / "t.gguf", retype={
      "blk.1.attn_q_a.weight": (q4, Q.Q4_K),
      "blk.0.ffn_gate_tid2eid.weight": (np.zeros((512, 2), np.float32), None)})
  with pytest.raises(errors.TensorTypeError,
                     match=r"'blk.1.attn_q_a.weight' has unsupported type Q4_K \(accepted: BF16, F16, F32, Q8_0\)"):
    load.load_tensors(p, "1:1", progress=False)
  with pytest.raises(errors.TensorTypeError, match=r"'blk.0.ffn_gate_tid2eid.weight' has unsupported type F32 \(accepted: I32\)"):
    load.load_tensors(p, "0:0", progress=False)


def test_gate_up_experts_share_type(tiny_gguf, tmp_path, rewrite):
  shape = (8, 256, 256)
  q4 = tiny.raw_blocks(np.random.default_rng(0), shape, Q.Q4_K, 0.05).data
  p = rewrite(tiny_gguf, tmp_path / "g.gguf", retype={"blk.3.ffn_up_exps.weight": (q4, Q.Q4_K)})
  with pytest.raises(errors.TensorTypeError, match="must share one type"):
    load.load_tensors(p, "3:3", progress=False)
  # Both Q4_K (ds4's q4 recipe) is fine.
  p = rewrite(tiny_gguf, tmp_path / "g2.gguf", retype={
      "blk.3.ffn_up_exps.weight": (q4, Q.Q4_K), "blk.3.ffn_gate_exps.weight": (q4, Q.Q4_K)})
  _, ts = load.load_tensors(p, "3:3", progress=False)
  assert ts["blk.3.ffn_up_exps.weight"].shape == shape


# ------------------------------------------------------------------------------- the scripts
def _check_one_line_error(rc, out, err, *needles):
  assert rc != 0
  assert "Traceback" not in out + err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("error: ")
  for n in needles:
    assert n in lines[0], (n, lines[0])


@pytest.mark.e2e
def test_scripts_bad_input(tiny_gguf, tmp_path, run_script):
  notg = tmp_path / "n.gguf"
  notg.write_bytes(b"hello world, not a gguf")
  trunc = tmp_path / "t.gguf"
  trunc.write_bytes(open(tiny_gguf, "rb").read()[:-1000])
  out = str(tmp_path / "o.gguf")
  cases = [
      ("inspect_gguf.py", [f"--gguf={notg}"], "not a GGUF file"),
      ("inspect_gguf.py", [f"--gguf={trunc}"], "truncated GGUF file"),
      ("inspect_gguf.py", [f"--gguf={tmp_path / 'missing.gguf'}"], "cannot open"),
      ("inspect_gguf.py", [f"--gguf={tiny_gguf}", "--layers=5:2"], "end 2 is before start 5"),
      ("split_gguf.py", [f"--gguf={tiny_gguf}", "--layers=0:99", f"--out={out}"], "ends past the final"),
      ("split_gguf.py", [f"--gguf={tiny_gguf}", "--layers=a:b", f"--out={out}"], "'a' is not"),
      ("inspect_gguf.py", [f"--gguf={tiny_gguf}", "--split=9"], "cannot split 4 layers into 9"),
      ("inspect_gguf.py", [f"--gguf={tiny_gguf}", "--split=abc"], "flag --split=abc"),
      ("split_gguf.py", [f"--gguf={tiny_gguf}", "--layers=0:1"], "--out must have a value"),
  ]
  for script, args, needle in cases:
    _check_one_line_error(*run_script(script, *args), needle)
  assert not os.path.exists(out)


@pytest.mark.e2e
def test_scripts_missing_tensor(tiny_gguf, tmp_path, rewrite, run_script):
  p = rewrite(tiny_gguf, tmp_path / "m.gguf", drop=["blk.3.ffn_norm.weight"])
  _check_one_line_error(*run_script("split_gguf.py", f"--gguf={p}", "--layers=2:output",
                                    f"--out={tmp_path / 'o.gguf'}"),
                        "missing tensor 'blk.3.ffn_norm.weight'")


@pytest.mark.e2e
def test_scripts_work(tiny_gguf, tmp_path, run_script):
  out = tmp_path / "s.gguf"
  rc, so, se = run_script("split_gguf.py", f"--gguf={tiny_gguf}", "--layers=2:output", f"--out={out}")
  assert rc == 0, se
  assert "layers 2:3+output" in so
  rc, so, se = run_script("inspect_gguf.py", f"--gguf={out}", "--split=2")
  assert rc == 0, se
  assert "split file holding layers 2:3+output" in so
  assert "    2  CSA         4  no    yes      compress" in so
  assert "balanced split into 2" in so
  rc, so, se = run_script("make_tiny_gguf.py", "--preset=tiny", "--seed=1", f"--out={tmp_path / 'm.gguf'}")
  assert rc == 0, se
  assert open(tmp_path / "m.gguf", "rb").read() == open(
      tiny.make_tiny_gguf(tmp_path / "m2.gguf", seed=1), "rb").read()


def test_bad_split_layers_key(tiny_gguf, tmp_path, rewrite):
  p = rewrite(tiny_gguf, tmp_path / "l.gguf", meta={"ds4jax.layers": ("2:9", VT.STRING)})
  with pytest.raises(errors.MetadataError, match="'ds4jax.layers': layer range 2:9 ends past"):
    reader.open_gguf(p)
