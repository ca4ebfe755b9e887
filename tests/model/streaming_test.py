"""Expert streaming (ds4's --ssd_streaming, docs/design.md §15): the routed experts stay in the
GGUF and come through a bounded host cache; greedy tokens equal the resident run's, in one
process and an in-process split, with a cache smaller than the experts (misses, evictions)
and with a whole-slice one; bad budgets, modes and files are one-line errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from flax import nnx

from ds4jax import build
from ds4jax.config import expert_cache_option
from ds4jax.errors import one_line
from ds4jax.generate.loop import Generator
from ds4jax.gguf import streaming
from ds4jax.gguf.reader import open_gguf
from ds4jax.gguf.streaming import ExpertCache, StreamingError, StreamingOptions
from ds4jax.runtime import checkpoint
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.suite import CHUNK, CTX
from ds4jax.tokenizer import Tokenizer

PROMPT = list(range(3, 23))  # 20 tokens: two prefill chunks of CHUNK
# The tiny model: 4 layers of 8 experts, k = 2; one expert (gate, up, down) is 55296 bytes.
ENTRY = 55296


def _caches(backend) -> list[ExpertCache]:
  out = []
  for r in backend.runners:
    stage = nnx.merge(r.graphdef, r.params)
    out.append(stage.blocks[0].moe.expert_source)
    assert not any(str(p[-1]).endswith("_exps") for p, _ in nnx.to_flat_state(r.params))
  return out


@pytest.mark.parametrize("ranges,cache,preload", [
    (("all",), "300KB", 0),  # 5 experts of 32: misses and evictions every token
    (("0:1", "2:output"), "3", 0),  # 3 slots for both stages
    (("all",), "1GB", 8),  # the whole slice: every expert read once
])
def test_greedy_tokens_equal_the_resident_run(tiny_gguf, tiny_reference, ranges, cache,
                                              preload):
  want = tiny_reference(prompt_tokens=PROMPT, max_new_tokens=8)
  opts = StreamingOptions.parse(cache, preload=preload)
  be = build.local_backend(tiny_gguf, ranges=ranges, ctx_size=CTX, prefill_chunk=CHUNK,
                           max_sessions=1, streaming=opts)  # one session: one decode shape
  try:
    got = Generator(be, Tokenizer.from_gguf(tiny_gguf)).generate(
        None, prompt_tokens=PROMPT, max_new_tokens=8)
    caches = _caches(be)
  finally:
    be.close()
  assert got.tokens == want.tokens
  assert len({id(c) for c in caches}) == 1  # the stages of a process share one cache
  for c in caches:
    s = c.stats()
    assert s["hits"] + s["misses"] > 0 and s["bytes"] == c.nbytes
    if opts.budget is not None:
      assert c.nbytes <= opts.budget  # the anonymous memory the cache holds stays bounded
    if opts.slots is not None:
      assert s["entries"] <= opts.slots
    if cache == "1GB":
      assert s["evictions"] == 0 and s["hits"] > 0 and s["entries"] == s["misses"] + preload
      assert s["bytes_read"] == s["entries"] * ENTRY
    else:
      assert s["evictions"] > 0 and s["misses"] > s["entries"]


def test_bounded_gathers_equal_the_resident_logits(tiny_gguf, monkeypatch):
  """A 32-token chunk takes the grouped path, which reads one expert at a time; an 8-token
  chunk and the decode rows gather one row's experts per group (GATHER_BYTES below two rows'):
  the top log-probabilities equal the resident run's bit for bit."""
  prompt = list(range(3, 43))  # 40 tokens: chunks of 32 and 8
  monkeypatch.setattr(streaming, "GATHER_BYTES", 3 * ENTRY)
  logits = []
  for opts in (None, StreamingOptions.parse("4")):
    be = build.local_backend(tiny_gguf, ctx_size=CTX, prefill_chunk=32, max_sessions=1,
                             streaming=opts)
    try:
      got = Generator(be, Tokenizer.from_gguf(tiny_gguf)).generate(
          None, prompt_tokens=prompt, max_new_tokens=4, top_logprobs=8)
      if opts is not None:
        cache = _caches(be)[0]
        assert cache.group_rows(0) == 1 and cache.stats()["entries"] <= 4
    finally:
      be.close()
    logits.append((got.tokens, got.logprobs))
  assert logits[1] == logits[0]


def test_budget_below_one_tokens_experts(tiny_gguf):
  with pytest.raises(ValueError, match=r"^--ssd_streaming_cache_experts=1 is below one token's "
                     r"experts: at least 2 slots"):
    build.load_runner(tiny_gguf, ctx_size=CTX, prefill_chunk=CHUNK,
                      streaming=StreamingOptions.parse("1"))
  with pytest.raises(ValueError, match=f"at least {2 * ENTRY} bytes"):
    build.load_runner(tiny_gguf, ctx_size=CTX, prefill_chunk=CHUNK,
                      streaming=StreamingOptions.parse("100KB"))


def test_unsupported_modes_are_one_line_errors(tiny_gguf, tmp_path):
  opts = StreamingOptions.parse("1GB")
  with pytest.raises(ValueError, match="needs --weights=packed"):
    build.load_runner(tiny_gguf, ctx_size=CTX, weights="dequantized", streaming=opts)
  ckpt = tmp_path / "ckpt"
  checkpoint.save_stage_checkpoint(tiny_gguf, "0:1", ckpt)
  with pytest.raises(ValueError, match=r"^--ssd_streaming reads experts from a GGUF file; "
                     f"{ckpt} is not one"):
    build.load_runner(str(ckpt), "0:1", ctx_size=CTX, streaming=opts)


def test_options():
  assert expert_cache_option("32GB") == (32 * 10**9, None)
  assert expert_cache_option("1.5GiB") == (3 * 2**29, None)
  assert expert_cache_option(" 48 ") == (None, 48)
  for bad in ("0", "lots", "-1GB", "GB"):
    with pytest.raises(ValueError, match="--ssd_streaming_cache_experts"):
      expert_cache_option(bad)
  with pytest.raises(ValueError, match="preload_experts must be >= 0"):
    StreamingOptions.parse("1GB", preload=-1)


def test_truncated_file_is_a_streaming_error(tiny_gguf, tmp_path):
  path = str(tmp_path / "m.gguf")
  shutil.copy(tiny_gguf, path)
  cache = ExpertCache(open_gguf(path, cache=False), [3],
                      StreamingOptions.parse("2", cold=True), k=2, dtype=np.float32)
  planes = cache._host_gather(np.array([[0, 5]], np.int32), il=3, p=2)
  assert planes[-1].tolist() == [[0, 1]] and cache.stats()["misses"] == 2
  os.truncate(path, 4096)  # the header survives, the tensor data does not
  with pytest.raises(StreamingError, match="was truncated under a streaming process"):
    cache._host_gather(np.array([[1, 2]], np.int32), il=3, p=2)


def test_deleted_file_mid_run_is_a_clear_error(tiny_gguf, tmp_path):
  path = str(tmp_path / "m.gguf")
  shutil.copy(tiny_gguf, path)
  be = build.local_backend(path, ctx_size=CTX, prefill_chunk=CHUNK, max_sessions=1,
                           streaming=StreamingOptions.parse("2"))
  try:
    sid = be.new_session()
    be.step(sid, PROMPT[:4], SamplingParams(), 0)
    os.remove(path)
    with pytest.raises(Exception) as e:
      be.step(sid, PROMPT[4:8], SamplingParams(), 0)
    assert one_line(e.value) == f"{path} was deleted under a streaming process"
    assert streaming.stats()["misses"] > 0
  finally:
    be.close()


def test_generate_flags_report_and_errors(tiny_gguf, tiny_cache_dir, tiny_reference, tmp_path):
  gen = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "generate.py"
  base = [sys.executable, str(gen), f"--gguf={tiny_gguf}", f"--cache_dir={tiny_cache_dir}",
          f"--ctx_size={CTX}", f"--prefill_chunk={CHUNK}", "--max_new_tokens=8",
          "--prompt_tokens=" + ",".join(map(str, PROMPT)), "--ssd_streaming"]
  out = tmp_path / "out.json"
  env = dict(os.environ, DS4JAX_CACHE=tiny_cache_dir, JAX_PLATFORMS="cpu")
  p = subprocess.run(base + ["--ssd_streaming_cache_experts=6", f"--output_json={out}"],
                     capture_output=True, text=True, timeout=600, env=env)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "expert cache: 6 live entries" in p.stderr and "read from the file per token" in p.stderr
  got = json.loads(out.read_text())
  assert got["tokens"] == tiny_reference(prompt_tokens=PROMPT, max_new_tokens=8).tokens
  assert got["expert_cache"]["entries"] == 6 and got["expert_cache"]["bytes_read_per_token"] > 0
  p = subprocess.run(base + ["--ssd_streaming_cache_experts=1"], capture_output=True, text=True,
                     timeout=600, env=env)
  assert p.returncode != 0
  assert p.stderr.strip().splitlines()[-1] == (
      "error: --ssd_streaming_cache_experts=1 is below one token's experts: at least 2 slots "
      "(0.1 MiB)")


def test_a_bridge_coordinator_and_worker_both_stream(tiny_gguf, tiny_reference):
  """--ssd_streaming on both sides of a real bridge split (a coordinator 0:1 and a worker
  2:output over loopback, each with its own 3-slot cache): the whole model's greedy tokens."""
  from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
  from ds4jax.bridge.worker.worker import Worker, WorkerOptions
  from ds4jax.runtime.load import load_runner
  want = tiny_reference(prompt_tokens=PROMPT, max_new_tokens=8)

  def runner(spec):
    return load_runner(tiny_gguf, spec, ctx_size=CTX, max_chunk=CHUNK,
                       streaming_options=StreamingOptions.parse("3"))

  coord = Coordinator(runner("0:1"), CoordinatorOptions(port=0, route_timeout=60.0,
                                                         prefill_chunk=CHUNK))
  remote = runner("2:output")
  worker = Worker(coord.address, fingerprint=remote.fingerprint, n_layers=remote.cfg.n_layers,
                  vocab_size=remote.cfg.vocab_size, layers=remote.layers, load=lambda: remote,
                  options=WorkerOptions(ctx=CTX, backoff_min=0.01, backoff_max=0.1))
  t = threading.Thread(target=worker.run, daemon=True)
  t.start()
  try:
    coord.wait_route(60.0)
    got = Generator(coord, Tokenizer.from_gguf(tiny_gguf)).generate(
        None, prompt_tokens=PROMPT, max_new_tokens=8)
    remote_cache = nnx.merge(remote.graphdef, remote.params).blocks[0].moe.expert_source
  finally:
    worker.stop()
    coord.close()
    t.join(timeout=10)
  assert got.tokens == want.tokens
  assert remote_cache.layers == (2, 3) and remote_cache.stats()["misses"] > 0
