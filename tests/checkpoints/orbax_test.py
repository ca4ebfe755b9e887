"""Orbax stage checkpoints: bit-identical to the GGUF load (packed, the default, and
dequantised), sub-range restores allocate only the slice, old (version 1) checkpoints still
load, and a corrupt or mismatched checkpoint is refused with a clear error."""

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

from ds4jax.runtime import sources
from ds4jax.checkpoints import orbax_io
from ds4jax.runtime import checkpoint
from ds4jax.checkpoints.orbax_io import CheckpointError
from ds4jax.config import LayerRange
from ds4jax.gguf import load as gguf_load, reader
from ds4jax.runtime.load import load_runner, load_stage
from ds4jax.runtime.runner import StageRunner
from ds4jax.quant.packed import Packed

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
  """Same paths; packed leaves of the same type, shapes and bytes; dense leaves equal."""
  fa, fb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (p, va), (_, vb) in zip(fa, fb):
    x, y = va.get_value(), vb.get_value()
    assert isinstance(x, Packed) == isinstance(y, Packed), p
    if isinstance(x, Packed):
      assert (x.qtype, x.shape, x.dtype) == (y.qtype, y.shape, y.dtype), p
      x, y = x.data, y.data
    x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
    assert x.dtype == y.dtype and np.array_equal(x, y), p


def n_packed(stage) -> int:
  return sum(isinstance(v.get_value(), Packed) for _, v in nnx.to_flat_state(nnx.state(stage)))


def n_params(stage) -> int:
  return len(jax.tree.leaves(nnx.state(stage)))


def test_packed_restore_is_bit_identical_to_the_packed_gguf(tiny_gguf, tiny_ckpt):
  """The default checkpoint stores the GGUF blocks: the restored stage is the packed GGUF
  stage (same Packed leaves, same bytes) and its logits are equal bit for bit."""
  ref = load_stage(tiny_gguf, "all")
  got = checkpoint.load_stage_checkpoint(tiny_ckpt)
  assert orbax_io.read_manifest(tiny_ckpt)["weights"] == "packed"
  assert n_packed(got) == n_packed(ref) > 20
  assert_same_params(ref, got)
  # The dispatcher opens the directory where a GGUF path goes.
  via_path = sources.load_stage(tiny_ckpt, "all")
  # Sensitivity: one norm weight off by 1e-3 changes the logits of the same program.
  bumped = sources.load_stage(tiny_ckpt, "all")
  w = bumped.blocks[1].attn_norm.scale
  w.set_value(w.get_value().at[0].add(1e-3))
  a, b, c, d = logits(ref, got, via_path, bumped)
  assert a.dtype == b.dtype == np.float32 and a.shape == (len(TOKENS), 512)
  assert np.array_equal(a, b) and np.array_equal(a, c)
  assert not np.array_equal(a, d)


def test_packed_checkpoint_bytes_are_the_gguf_slice_bytes(tiny_gguf, tiny_ckpt):
  """Stored array bytes equal the GGUF bytes of the slice, to within the tensors that are not
  packed (1-D norms, F32 and I32 tensors, read as float32 / int32, and the zero router bias
  the GGUF lacks); on disk orbax compresses a little, never adds more than its metadata."""
  f = reader.open_gguf(tiny_gguf)
  entries = f.validate("all")
  gguf_bytes = sum(f.nbytes(e.name) for e in entries)
  m = orbax_io.read_manifest(tiny_ckpt)
  stored = {k: int(np.prod(e["shape"])) * orbax_io._np_dtype(e["dtype"]).itemsize
            for k, e in m["params"].items()}
  packed = sum(n for k, n in stored.items() if m["params"][k]["qtype"] is not None)
  dense = sum(stored.values()) - packed
  in_gguf_packed = sum(f.nbytes(e.name) for e in entries
                       if gguf_load.packs(f.tensor(e.name).tensor_type, e.numpy_shape(f.cfg)))
  assert packed == in_gguf_packed  # the blocks themselves: exactly the GGUF's
  unpacked = gguf_bytes - in_gguf_packed
  assert 0 < dense and abs(sum(stored.values()) - gguf_bytes) <= dense + unpacked
  assert dense < 0.01 * gguf_bytes
  disk = sum(p.stat().st_size for p in (pathlib.Path(tiny_ckpt) / "params").rglob("*")
             if p.is_file())
  assert 0.9 * gguf_bytes <= disk <= gguf_bytes + dense + 64 * 1024, (disk, gguf_bytes)


def test_packed_checkpoint_serves_any_dtype_and_dequantized(tiny_gguf, tiny_ckpt):
  """A packed checkpoint restores like the GGUF whatever is asked: bfloat16 compute, or
  weights='dequantized' (gguf-py on the host, as the GGUF's dequantised load)."""
  assert_same_params(load_stage(tiny_gguf, "1:2", dtype="bfloat16"),
                     checkpoint.load_stage_checkpoint(tiny_ckpt, "1:2", dtype="bfloat16"))
  deq = checkpoint.load_stage_checkpoint(tiny_ckpt, "0:1", weights="dequantized")
  assert n_packed(deq) == 0
  assert_same_params(load_stage(tiny_gguf, "0:1", weights="dequantized"), deq)


def test_load_runner_from_a_checkpoint_compiles_first(tiny_gguf, tiny_ckpt):
  """The compile-first runner takes a checkpoint source as it takes a GGUF."""
  src = sources.open_source(tiny_ckpt)
  assert isinstance(src, orbax_io.OrbaxSource)
  r = load_runner(src, "2:output", ctx_size=16, max_chunk=4, compile_sizes=(1,))
  assert r.fingerprint == sources.model_info(tiny_gguf)[1]
  ref = StageRunner(load_stage(tiny_gguf, "2:output"), ctx_size=16, max_chunk=4)
  hc = np.random.default_rng(1).standard_normal((1, 4, 256)).astype(np.float32)
  a = r.forward(r.init_state(), TOKENS[:1], hc, 0)[0]
  b = ref.forward(ref.init_state(), TOKENS[:1], hc, 0)[0]
  assert np.array_equal(a, b)
  with pytest.raises(ValueError, match="another model"):
    load_runner(src, "2:output", ctx_size=16, fingerprint="0" * 64)


def test_dequantized_checkpoint_matches_the_dequantized_gguf_load(tiny_gguf, tmp_path):
  d = tmp_path / "bf16"
  m = checkpoint.save_stage_checkpoint(tiny_gguf, "0:1", d, weights="dequantized",
                                     dtype="bfloat16")
  assert (m["weights"], m["dtype"]) == ("dequantized", "bfloat16")
  st = checkpoint.load_stage_checkpoint(d)
  assert n_packed(st) == 0
  assert_same_params(load_stage(tiny_gguf, "0:1", dtype="bfloat16", weights="dequantized"), st)
  with pytest.raises(CheckpointError, match="holds bfloat16 parameters, asked for float32"):
    checkpoint.load_stage_checkpoint(d, dtype="float32")
  with pytest.raises(CheckpointError, match="packed checkpoint keeps the GGUF's own precision"):
    checkpoint.save_stage_checkpoint(tiny_gguf, "0:1", tmp_path / "no", dtype="bfloat16")


def test_version_1_checkpoints_still_load(tiny_gguf, tmp_path):
  """A checkpoint as the code before packed checkpoints wrote it (version 1: dequantised, no
  'weights', no 'qtype') restores as before, dense, bit-identical to the dequantised load."""
  d = tmp_path / "v1"
  checkpoint.save_stage_checkpoint(tiny_gguf, "2:output", d, weights="dequantized")
  m = json.loads((d / orbax_io.MANIFEST).read_text())
  m["version"] = 1
  del m["weights"]
  for e in m["params"].values():
    del e["qtype"]
  (d / orbax_io.MANIFEST).write_text(json.dumps(m))
  st = sources.load_stage(d, "3:output")
  assert n_packed(st) == 0
  assert_same_params(load_stage(tiny_gguf, "3:output", weights="dequantized"), st)
  m["version"] = 9
  (d / orbax_io.MANIFEST).write_text(json.dumps(m))
  with pytest.raises(CheckpointError, match=r"version 9 is not supported \(this code reads 1, 2\)"):
    checkpoint.load_stage_checkpoint(d)


def test_sub_range_restore_holds_only_the_slice(tiny_gguf, tiny_ckpt):
  part = checkpoint.load_stage_checkpoint(tiny_ckpt, "2:output")
  ref = load_stage(tiny_gguf, "2:output")
  assert part.layers == LayerRange(2, 3, True) and part.embed is None and len(part.blocks) == 2
  assert n_params(part) == n_params(ref)
  assert_same_params(ref, part)
  hc = np.random.default_rng(0).standard_normal((len(TOKENS), 4, 256)).astype(np.float32)
  a, b = logits(ref, part, hc=hc)
  assert np.array_equal(a, b)


def test_checkpoint_refuses_mismatches(tiny_ckpt, tmp_path, tiny_gguf):
  with pytest.raises(CheckpointError, match="another model"):
    checkpoint.load_stage_checkpoint(tiny_ckpt, fingerprint="0" * 64)
  d = tmp_path / "mid"
  checkpoint.save_stage_checkpoint(tiny_gguf, "1:3", d)
  with pytest.raises(CheckpointError, match=r"holds layers 1:3, cannot serve 0:1"):
    checkpoint.load_stage_checkpoint(d, "0:1")
  with pytest.raises(CheckpointError, match=r"1:3 without the output head, cannot serve 2:output"):
    checkpoint.load_stage_checkpoint(d, "2:output")
  with pytest.raises(CheckpointError, match="already exists"):
    checkpoint.save_stage_checkpoint(tiny_gguf, "1:3", d)
  with pytest.raises(CheckpointError, match="not a ds4jax checkpoint"):
    checkpoint.load_stage_checkpoint(tmp_path)


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
    checkpoint.load_stage_checkpoint(d)
  # A truncated data file.
  d = _copy(tiny_ckpt, tmp_path / "trunc")
  big = max((p for p in (d / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[: big.stat().st_size // 3])
  with pytest.raises(CheckpointError, match="corrupt"):
    checkpoint.load_stage_checkpoint(d)
  # A manifest that is not JSON, and one whose table disagrees with the model.
  d = _copy(tiny_ckpt, tmp_path / "badjson")
  (d / orbax_io.MANIFEST).write_text("{not json")
  with pytest.raises(CheckpointError, match="corrupt manifest"):
    checkpoint.load_stage_checkpoint(d)
  d = _copy(tiny_ckpt, tmp_path / "shape")
  m = json.loads((d / orbax_io.MANIFEST).read_text())
  m["params"]["blocks/1/attn/q_a"]["shape"][0] += 1
  (d / orbax_io.MANIFEST).write_text(json.dumps(m))
  with pytest.raises(CheckpointError, match="blocks/1/attn/q_a"):
    checkpoint.load_stage_checkpoint(d)
  # Missing data directory.
  d = _copy(tiny_ckpt, tmp_path / "nodata")
  shutil.rmtree(d / "params")
  with pytest.raises(CheckpointError, match="corrupt or unreadable"):
    checkpoint.load_stage_checkpoint(d)


def test_tokenizer_travels_with_the_checkpoint(tiny_gguf, tiny_ckpt):
  from ds4jax.tokenizer import Tokenizer
  a, b = Tokenizer.from_gguf(tiny_gguf), orbax_io.tokenizer_from_checkpoint(tiny_ckpt)
  text = "Hello, world! 123"
  assert a.encode(text) == b.encode(text) and a.vocab_size == b.vocab_size
  assert a.encode(text) == sources.open_tokenizer(tiny_ckpt).encode(text)
  cfg, fp = sources.model_info(tiny_ckpt)
  assert (cfg, fp) == sources.model_info(tiny_gguf)


def _script(*args, **kw):
  return subprocess.run([sys.executable, str(REPO / "scripts" / "convert_to_orbax.py"), *args],
                        capture_output=True, text=True, timeout=300, cwd=str(REPO), **kw)


@pytest.mark.e2e
def test_convert_script(tiny_gguf, tmp_path):
  """The script's flags reach the writer, and its refusals are one line (exit 2). The
  writer's own checks are the tests above and below; the range one is here."""
  out = tmp_path / "c"
  r = _script(f"--gguf={tiny_gguf}", "--layers=3:output", f"--out={out}",
              "--weights=dequantized", "--dtype=bfloat16")
  assert r.returncode == 0, r.stderr
  assert "wrote" in r.stdout and "layers 3:output, dequantized bfloat16" in r.stdout
  m = orbax_io.read_manifest(out)
  assert (m["start"], m["end"], m["has_output"], m["dtype"]) == (3, 3, True, "bfloat16")
  assert m["weights"] == "dequantized"
  r = _script(f"--gguf={tiny_gguf}", "--layers=3:output", f"--out={out}")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "already exists" in r.stderr and "Traceback" not in r.stderr
  with pytest.raises(ValueError, match="layer range 9:10 starts past the final model layer 3"):
    checkpoint.save_stage_checkpoint(tiny_gguf, "9:10", tmp_path / "d")
  assert not (tmp_path / "d").exists()


def test_worker_from_a_checkpoint_of_another_model_is_refused(tiny_ckpt, make_runner, tmp_path):
  """A worker serving a checkpoint says the checkpoint's fingerprint in HELLO: one of another
  model is refused by the coordinator before it loads anything."""
  from ds4jax import build
  from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
  from ds4jax.wire.errors import HandshakeRefused
  from ds4jax.bridge.worker.worker import WorkerOptions

  d = _copy(tiny_ckpt, tmp_path / "other")
  m = json.loads((d / orbax_io.MANIFEST).read_text())
  m["fingerprint"] = "ab" * 32
  (d / orbax_io.MANIFEST).write_text(json.dumps(m))
  coord = Coordinator(make_runner("0:1"), CoordinatorOptions(port=0))
  try:
    w = build.worker(str(d), "2:output", coord.address,
                     options=WorkerOptions(ctx=64, connect_timeout=5.0))
    with pytest.raises(HandshakeRefused, match="model mismatch: worker fingerprint abab"):
      w.run()
    assert w.runner is None  # refused before loading
    ok = build.worker(tiny_ckpt, "2:output", coord.address)
    assert ok.fingerprint == coord.fingerprint
  finally:
    coord.close()
