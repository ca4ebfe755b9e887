"""Slice loading: ownership, exactly-once coverage, output override, split files."""

import itertools

import numpy as np
import pytest

from ds4jax.config import LayerRange, LayerRangeError, ModelConfig
from ds4jax.gguf import load, names, reader, split
from ds4jax.gguf.errors import MissingTensorError


def _partitions(n):
  """Every way to cut layers 0..n-1 into contiguous slices."""
  for cuts in itertools.product([False, True], repeat=n - 1):
    ranges, start = [], 0
    for il, cut in enumerate(cuts):
      if cut:
        ranges.append((start, il))
        start = il + 1
    ranges.append((start, n - 1))
    yield ranges


def test_every_tensor_consumed_exactly_once(tiny_gguf):
  f = reader.open_gguf(tiny_gguf)
  n = f.cfg.n_layers
  loaded = {}
  for a, b in itertools.combinations_with_replacement(range(n), 2):
    out = b == n - 1  # the slice that ends the model owns the head
    _, ts = load.load_tensors(f, LayerRange(a, b, out), progress=False, fill_optional=False)
    loaded[a, b] = ts
  n_parts = 0
  for parts in _partitions(n):
    seen = []
    for k, (a, b) in enumerate(parts):
      seen += list(loaded[a, b])
    assert len(seen) == len(set(seen)), parts
    assert set(seen) == set(f.tensors), parts
    n_parts += 1
  assert n_parts == 2 ** (n - 1)


def test_slice_contents(tiny_gguf):
  cfg, ts = load.load_tensors(tiny_gguf, "1:2", progress=False)
  assert "token_embd.weight" not in ts and "output.weight" not in ts
  assert all(names.lookup(k)[1] in (1, 2) for k in ts)
  assert set(ts) == set(names.tensor_names(cfg, LayerRange(1, 2), optional=True))
  for k, a in ts.items():
    assert a.shape == names.lookup(k)[0].numpy_shape(cfg, names.lookup(k)[1]), k
  _, first = load.load_tensors(tiny_gguf, "0:0", progress=False)
  assert first["token_embd.weight"].shape == (cfg.vocab_size, cfg.d_model)
  assert "output.weight" not in first
  # The head only with output, or when asked for.
  _, last = load.load_tensors(tiny_gguf, "3:output", progress=False)
  assert last["output.weight"].shape == (cfg.vocab_size, cfg.d_model)
  _, no_head = load.load_tensors(tiny_gguf, "3:output", output=False, progress=False)
  assert "output.weight" not in no_head
  _, head = load.load_tensors(tiny_gguf, "1:1", output=True, progress=False)
  assert "output_hc_fn.weight" in head


def test_absent_bias_filled_with_zeros(tiny_gguf):
  _, ts = load.load_tensors(tiny_gguf, "0:1", progress=False)
  np.testing.assert_array_equal(ts["blk.0.exp_probs_b.bias"], 0)   # hash layer: absent
  assert np.any(ts["blk.1.exp_probs_b.bias"] != 0)                  # present in the file
  _, ts = load.load_tensors(tiny_gguf, "0:1", progress=False, fill_optional=False)
  assert "blk.0.exp_probs_b.bias" not in ts


@pytest.mark.parametrize("spec", ["0:1", "2:output", "1:2", "all"])
def test_split_file_loads_identically(tiny_gguf, tmp_path, spec):
  out, rng = split.split_gguf(tiny_gguf, spec, tmp_path / "s.gguf")
  full = load.load_tensors(tiny_gguf, spec, progress=False)
  part = load.load_tensors(out, spec, progress=False)
  assert full[0] == part[0]
  assert full[1].keys() == part[1].keys()
  for k in full[1]:
    np.testing.assert_array_equal(full[1][k], part[1][k])
  sf = reader.open_gguf(out)
  assert sf.held == rng
  assert load.load_tensors(out, progress=False)[1].keys() == full[1].keys()  # default: held
  assert reader.fingerprint(out) == reader.fingerprint(tiny_gguf)
  # Only the slice's tensors are in the split file.
  assert set(sf.tensors) == set(load.load_tensors(tiny_gguf, spec, progress=False,
                                                  fill_optional=False)[1])
  # A split of a split keeps the model's fingerprint.
  if spec == "all":
    out2, _ = split.split_gguf(out, "1:1", tmp_path / "s2.gguf")
    assert reader.fingerprint(out2) == reader.fingerprint(tiny_gguf)


def test_split_file_refuses_other_layers(tiny_gguf, tmp_path):
  out, _ = split.split_gguf(tiny_gguf, "2:output", tmp_path / "s.gguf")
  with pytest.raises(MissingTensorError,
                     match=r"missing tensor 'blk.1.hc_attn_fn.weight' \(split file holds layers 2:3\+output\)"):
    load.load_tensors(out, "1:2", progress=False)


def test_fingerprint_depends_on_model(tiny_gguf, tmp_path):
  from ds4jax.testing import tiny
  other = tiny.make_tiny_gguf(tmp_path / "o.gguf", window=16)
  same_other_seed = tiny.make_tiny_gguf(tmp_path / "s.gguf", seed=7)
  fp = reader.fingerprint(tiny_gguf)
  assert len(fp) == 64 and reader.fingerprint(other) != fp
  # Weights are not hashed (that would read the file); config and tensor table are.
  assert reader.fingerprint(same_other_seed) == fp


@pytest.mark.parametrize("spec,msg", [
    ("5:2", "end 2 is before start 5"),
    ("0:99", "ends past the final model layer 3"),
    ("a:b", "start 'a' is not a non-negative integer"),
    ("4:output", "starts past the final model layer 3"),
    ("1", "expected A:B, A:output or all"),
])
def test_bad_ranges(tiny_gguf, spec, msg):
  with pytest.raises(LayerRangeError, match=msg):
    load.load_tensors(tiny_gguf, spec, progress=False)


def test_pro_like_schedule_from_metadata(tmp_path):
  """The schedule comes from the file, never from Flash constants."""
  from ds4jax.testing import tiny
  p = tiny.make_tiny_gguf(tmp_path / "pro.gguf", compress_ratios=(16, 16, 4, 0), n_hash_layers=2)
  cfg, ts = load.load_tensors(p, "all", progress=False)
  assert cfg.compress_ratios == (16, 16, 4, 0) and cfg.n_hash_layers == 2
  assert ts["blk.0.attn_compressor_ape.weight"].shape == (16, cfg.head_dim)
  assert "blk.3.attn_compressor_kv.weight" not in ts
  assert "blk.1.ffn_gate_tid2eid.weight" in ts
  assert cfg == ModelConfig.tiny(compress_ratios=(16, 16, 4, 0), n_hash_layers=2)


def test_open_cache_sees_rewritten_files(tmp_path):
  from ds4jax.testing import tiny
  p = tiny.make_tiny_gguf(tmp_path / "c.gguf", seed=1)
  f1 = reader.open_gguf(p)
  assert reader.open_gguf(p) is f1 and reader.open_gguf(p, cache=False) is not f1
  a = load.load_tensors(p, "0:0", progress=False)[1]["blk.0.attn_q_a.weight"]
  tiny.make_tiny_gguf(p, seed=2)  # same size, new bytes
  assert reader.open_gguf(p) is not f1
  b = load.load_tensors(p, "0:0", progress=False)[1]["blk.0.attn_q_a.weight"]
  assert not np.array_equal(a, b)
