"""The interleaved ds4jax-vs-HF benchmark (scripts/bench_model.py) on the tiny HF oracle."""

import numpy as np
import pytest

from ds4jax.bench.model import bench_interleaved


def test_bench_interleaved_rows_and_parity(hf_tiny):
  res = bench_interleaved(hf_tiny[1], n_prompt=8, n_decode=2, hf_threads=(1,), rounds=2)
  ours, hf = res["rows"]
  assert (ours["impl"], hf["impl"]) == ("ds4jax", "hf/1thr")
  for row in (ours, hf):
    for key in ("prefill_tok_s", "prefill_best", "decode_tok_s", "decode_best"):
      assert np.isfinite(row[key]) and row[key] > 0
    assert row["prefill_best"] >= row["prefill_tok_s"]
  assert ours["paired_prefill"] == ours["paired_decode"] == 1.0
  assert ours["compile_s"] > 0
  # Same weights, same ids: the last prefill logits rows agree (HF parity tolerance).
  assert res["max_abs_dlogit"] < 1e-4
  assert len(res["load"]) == 2


def test_bench_interleaved_rejects_bad_sizes(hf_tiny):
  with pytest.raises(ValueError, match="must be >= 1"):
    bench_interleaved(hf_tiny[1], n_prompt=8, n_decode=0, hf_threads=())
