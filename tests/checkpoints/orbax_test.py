"""Orbax stage checkpoints: bit-identical to the GGUF load, sub-range restores allocate only the
slice, and a corrupt or mismatched checkpoint is refused with a clear error."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ds4jax.checkpoints import orbax_io
from ds4jax.checkpoints.orbax_io import CheckpointError
from ds4jax.config import LayerRange
from ds4jax.model.load import load_stage
from ds4jax.model.runner import StageRunner

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKENS = np.array([0, 17, 42, 300, 5, 9, 123, 77, 400, 2, 3], np.int32)


def logits(*stages, hc=None):
  """Logits of each stage from ONE compiled program (the stage's pure apply, jitted once and
  fed each stage's parameters): equal outputs then come from equal parameters."""
  graphdef = nnx.split(stages[0])[0]
  runner = StageRunner(stages[0], ctx_size=32, max_chunk=16)  # only for init_state
  traces = []

  @jax.jit
  def apply(params, state, tokens_T, hc_TCD):
    traces.append(1)
    out, _ = nnx.merge(graphdef, params)(state, tokens_T, hc_TCD, jnp.int32(len(TOKENS)))
    return out

  outs = [np.asarray(apply(nnx.split(st)[1], runner.init_state(), TOKENS, hc)) for st in stages]
  assert len(traces) == 1
  return outs


def assert_same_params(a, b):
  fa, fb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (p, va), (_, vb) in zip(fa, fb):
    x, y = np.asarray(va.get_value()), np.asarray(vb.get_value())
    assert x.dtype == y.dtype and np.array_equal(x, y), p


def n_params(stage) -> int:
  return len(jax.tree.leaves(nnx.state(stage)))


def test_restore_is_bit_identical_to_the_gguf(tiny_gguf, tiny_ckpt):
  ref = load_stage(tiny_gguf, "all")
  got = orbax_io.load_stage_checkpoint(tiny_ckpt)
  assert_same_params(ref, got)
  # load_stage accepts the directory in place of the GGUF.
  # Sensitivity: one weight row off by 1e-3 changes the logits of the same program.
  bumped = load_stage(tiny_ckpt, "all")
  w = bumped.blocks[1].attn.q_a
  w.set_value(w.get_value().at[0].add(1e-3))
  assert not np.array_equal(np.asarray(nnx.state(bumped)["blocks"][1]["attn"]["q_a"].get_value()),
                            np.asarray(nnx.state(got)["blocks"][1]["attn"]["q_a"].get_value()))
  a, b, c, d = logits(ref, got, load_stage(tiny_ckpt, "all"), bumped)
  assert a.dtype == b.dtype == np.float32 and a.shape == (len(TOKENS), 512)
  assert np.array_equal(a, b) and np.array_equal(a, c)
  assert not np.array_equal(a, d)


def test_bfloat16_checkpoint_matches_bfloat16_gguf_load(tiny_gguf, tmp_path):
  d = tmp_path / "bf16"
  m = orbax_io.save_stage_checkpoint(tiny_gguf, "0:1", d, dtype="bfloat16")
  assert m["dtype"] == "bfloat16"
  st = orbax_io.load_stage_checkpoint(d)
  assert_same_params(load_stage(tiny_gguf, "0:1", dtype="bfloat16"), st)
  with pytest.raises(CheckpointError, match="holds bfloat16 parameters, asked for float32"):
    orbax_io.load_stage_checkpoint(d, dtype="float32")


def test_sub_range_restore_holds_only_the_slice(tiny_gguf, tiny_ckpt):
  part = orbax_io.load_stage_checkpoint(tiny_ckpt, "2:output")
  ref = load_stage(tiny_gguf, "2:output")
  assert part.layers == LayerRange(2, 3, True) and part.embed is None and len(part.blocks) == 2
  assert n_params(part) == n_params(ref)
  assert_same_params(ref, part)
  hc = np.random.default_rng(0).standard_normal((len(TOKENS), 4, 256)).astype(np.float32)
  a, b = logits(ref, part, hc=hc)
  assert np.array_equal(a, b)


def test_checkpoint_refuses_mismatches(tiny_ckpt, tmp_path, tiny_gguf):
  with pytest.raises(CheckpointError, match="another model"):
    orbax_io.load_stage_checkpoint(tiny_ckpt, fingerprint="0" * 64)
  d = tmp_path / "mid"
  orbax_io.save_stage_checkpoint(tiny_gguf, "1:3", d)
  with pytest.raises(CheckpointError, match=r"holds layers 1:3, cannot serve 0:1"):
    orbax_io.load_stage_checkpoint(d, "0:1")
  with pytest.raises(CheckpointError, match=r"1:3 without the output head, cannot serve 2:output"):
    orbax_io.load_stage_checkpoint(d, "2:output")
  with pytest.raises(CheckpointError, match="already exists"):
    orbax_io.save_stage_checkpoint(tiny_gguf, "1:3", d)
  with pytest.raises(CheckpointError, match="not a ds4jax checkpoint"):
    orbax_io.load_stage_checkpoint(tmp_path)


def _copy(src, dst) -> pathlib.Path:
  shutil.copytree(src, dst)
  return pathlib.Path(dst)


def test_corrupt_checkpoints_are_refused(tiny_ckpt, tmp_path):
  # A flipped byte in the array data: the per-parameter sha256 catches it (or orbax does).
  d = _copy(tiny_ckpt, tmp_path / "flip")
  blobs = sorted((p for p in (d / "params").rglob("*") if p.is_file() and p.stat().st_size > 4096),
                 key=lambda p: -p.stat().st_size)
  assert blobs
  raw = bytearray(blobs[0].read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  blobs[0].write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match="corrupt"):
    orbax_io.load_stage_checkpoint(d)
  # A truncated data file.
  d = _copy(tiny_ckpt, tmp_path / "trunc")
  big = max((p for p in (d / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[: big.stat().st_size // 3])
  with pytest.raises(CheckpointError, match="corrupt"):
    orbax_io.load_stage_checkpoint(d)
  # A manifest that is not JSON, and one whose table disagrees with the model.
  d = _copy(tiny_ckpt, tmp_path / "badjson")
  (d / orbax_io.MANIFEST).write_text("{not json")
  with pytest.raises(CheckpointError, match="corrupt manifest"):
    orbax_io.load_stage_checkpoint(d)
  d = _copy(tiny_ckpt, tmp_path / "shape")
  m = json.loads((d / orbax_io.MANIFEST).read_text())
  m["params"]["blocks/1/attn/q_a"]["shape"][0] += 1
  (d / orbax_io.MANIFEST).write_text(json.dumps(m))
  with pytest.raises(CheckpointError, match="blocks/1/attn/q_a"):
    orbax_io.load_stage_checkpoint(d)
  # Missing data directory.
  d = _copy(tiny_ckpt, tmp_path / "nodata")
  shutil.rmtree(d / "params")
  with pytest.raises(CheckpointError, match="corrupt or unreadable"):
    orbax_io.load_stage_checkpoint(d)


def test_tokenizer_travels_with_the_checkpoint(tiny_gguf, tiny_ckpt):
  from ds4jax.tokenizer import Tokenizer
  a, b = Tokenizer.from_gguf(tiny_gguf), orbax_io.tokenizer_from_checkpoint(tiny_ckpt)
  text = "Hello, world! 123"
  assert a.encode(text) == b.encode(text) and a.vocab_size == b.vocab_size
  cfg, fp = orbax_io.model_info(tiny_ckpt)
  assert (cfg, fp) == orbax_io.model_info(tiny_gguf)


def _script(*args, **kw):
  return subprocess.run([sys.executable, str(REPO / "scripts" / "convert_to_orbax.py"), *args],
                        capture_output=True, text=True, timeout=300, cwd=str(REPO), **kw)


def test_convert_script(tiny_gguf, tmp_path):
  out = tmp_path / "c"
  r = _script(f"--gguf={tiny_gguf}", "--layers=3:output", f"--out={out}", "--dtype=bfloat16")
  assert r.returncode == 0, r.stderr
  assert "wrote" in r.stdout and "layers 3:output" in r.stdout
  m = orbax_io.read_manifest(out)
  assert (m["start"], m["end"], m["has_output"], m["dtype"]) == (3, 3, True, "bfloat16")
  r = _script(f"--gguf={tiny_gguf}", "--layers=3:output", f"--out={out}")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "already exists" in r.stderr and "Traceback" not in r.stderr
  r = _script(f"--gguf={tiny_gguf}", "--layers=9:10", f"--out={tmp_path / 'd'}")
  assert r.returncode == 2 and "Traceback" not in r.stderr


def test_worker_from_a_checkpoint_of_another_model_is_refused(tiny_ckpt, make_runner, tmp_path):
  """A worker serving a checkpoint says the checkpoint's fingerprint in HELLO: one of another
  model is refused by the coordinator before it loads anything."""
  from ds4jax.bridge import launch
  from ds4jax.bridge.coordinator import Coordinator, CoordinatorOptions
  from ds4jax.bridge.errors import HandshakeRefused
  from ds4jax.bridge.worker import WorkerOptions

  d = _copy(tiny_ckpt, tmp_path / "other")
  m = json.loads((d / orbax_io.MANIFEST).read_text())
  m["fingerprint"] = "ab" * 32
  (d / orbax_io.MANIFEST).write_text(json.dumps(m))
  coord = Coordinator(make_runner("0:1"), CoordinatorOptions(port=0))
  try:
    w = launch.worker_from_gguf(str(d), "2:output", coord.address,
                                options=WorkerOptions(ctx=64, connect_timeout=5.0))
    with pytest.raises(HandshakeRefused, match="model mismatch: worker fingerprint abab"):
      w.run()
    assert w.runner is None  # refused before loading
    ok = launch.worker_from_gguf(tiny_ckpt, "2:output", coord.address)
    assert ok.fingerprint == coord.fingerprint
  finally:
    coord.close()
