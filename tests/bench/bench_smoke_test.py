"""scripts/bench.py at its smallest: one real worker process, the tiny model, two decode steps.

No timing assertions (the machine is shared): the JSON must have every section, every number
must be positive and finite, the split must decode the same greedy tokens as one process, and
the wire bytes must hold at least the activation row the hop carries.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ds4jax.bench import report

REPO = pathlib.Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench.py"


def _bench(*args, timeout=600):
  return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                        cwd=str(REPO), timeout=timeout, stdin=subprocess.DEVNULL)


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_split_ranges_cover_the_model_evenly():
  assert report.split_ranges(8, 2) == ["0:3", "4:output"]
  assert report.split_ranges(8, 3) == ["0:2", "3:5", "6:output"]
  assert report.split_ranges(8, 4) == ["0:1", "2:3", "4:5", "6:output"]
  assert report.split_ranges(4, 1) == ["0:output"]
  with pytest.raises(ValueError):
    report.split_ranges(4, 5)


@pytest.fixture(scope="module")
def smoke(tiny_gguf, tiny_cache_dir, tmp_path_factory):
  d = tmp_path_factory.mktemp("bench")
  out_json, out_md = d / "b.json", d / "b.md"
  proc = _bench("--preset=tiny", "--prompt_lens=8,16", "--decode_tokens=2", "--workers=1",
                "--chunk=8", "--skip_hf", "--floor_rounds=20", f"--cache_dir={tiny_cache_dir}",
                f"--out_json={out_json}", f"--out_md={out_md}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out_json.read_text()), out_md.read_text(), proc.stdout


@pytest.mark.e2e
def test_json_has_every_section_with_sane_numbers(smoke):
  res, _, _ = smoke
  row = res["model"]["activation_row_bytes"]
  assert row == 4 * res["model"]["n_hc"] * res["model"]["d_model"]
  for cfg in (res["single"], res["split"]["1"]):
    for n in ("8", "16"):
      assert _positive(cfg["prefill"][n]["tok_s"])
    assert cfg["decode"]["tokens"] == 2 and _positive(cfg["decode"]["tok_s"])
    assert cfg["warmup"]["compile_s"] >= 0
  assert _positive(res["single"]["memory"]["process_peak_rss_mb"])
  sp = res["split"]["1"]
  assert sp["stages"] == ["0:1", "2:output"]
  assert _positive(sp["memory"]["coordinator_peak_rss_mb"])
  assert [w["layers"] for w in sp["memory"]["workers"]] == ["2:output"]
  assert _positive(sp["memory"]["workers"][0]["peak_rss_mb"])
  (hop,) = sp["hops"]
  assert hop["layers"] == "2:output" and hop["requests"] == 2  # one WORK per decode token
  for key in ("rtt_s", "compute_s", "tcp_floor_rtt_s", "added_s"):
    assert _positive(hop[key]), key
  assert hop["rtt_s"] >= hop["compute_s"]
  assert row < hop["bytes_in"] < row + 4096  # the activation row plus control bytes
  assert 0 < hop["bytes_out"] < row  # the final hop returns a token, not logits
  assert _positive(sp["ratio_decode"]) and _positive(sp["ratio_prefill"]["8"])
  assert res["hf"] == {"skipped": "--skip_hf"}
  names = [t["name"] for t in res["targets"]]
  assert any("1 worker" in n for n in names) and any("RSS" in n for n in names)
  assert all(t["met"] in (True, False) for t in res["targets"])


@pytest.mark.e2e
def test_split_decodes_the_same_tokens_as_one_process(smoke):
  res, _, _ = smoke
  assert res["split"]["1"]["decode"]["tokens_out"] == res["single"]["decode"]["tokens_out"]
  assert all(v is True for k, v in res["parity"].items() if "identical" in k)
  paired = res["split"]["1"]["paired"]  # the in-process one-process reference, alternating
  assert paired["same_tokens"] is True
  assert _positive(paired["split_ms_per_token"]) and _positive(paired["single_ms_per_token"])


@pytest.mark.e2e
def test_markdown_has_the_tables(smoke):
  _, md, stdout = smoke
  for title in ("### Throughput", "### Per decode token, per hop", "### Peak memory",
                "### Targets"):
    assert title in md
  assert "| split, 1 worker(s) |" in md
  assert md in stdout


@pytest.mark.parametrize("args,msg", [
    (["--prompt_lens=8,x"], "--prompt_lens must be comma-separated integers"),
    (["--preset=tiny", "--prompt_lens=8", "--workers=4"], "needs 5 stages"),
    (["--chunk=12"], "power of two"),
])
@pytest.mark.e2e
def test_bad_input_is_one_line(args, msg, tiny_cache_dir):
  proc = _bench(*args, f"--cache_dir={tiny_cache_dir}", "--skip_hf", timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and msg in lines[0], proc.stderr


def test_hf_model_from_gguf_holds_the_same_weights(tiny_gguf):
  """The HF side of the benchmark runs the GGUF's own (dequantised) numbers."""
  from ds4jax.bench import hf
  if not hf.hf_available():
    pytest.skip("transformers without DeepseekV4ForCausalLM")
  import torch
  import ds4jax
  ids = np.random.default_rng(0).integers(2, 512, 12).astype(np.int32)
  from ds4jax.gguf.hf import hf_model_from_gguf
  model = hf_model_from_gguf(tiny_gguf)
  with torch.no_grad():
    want = model(torch.as_tensor(ids[None]).long()).logits[0].numpy()
  got = ds4jax.load_model(tiny_gguf, ctx_size=32, max_chunk=16).logits(ids)
  assert np.abs(got - want).max() <= 1e-3
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
