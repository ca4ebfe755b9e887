"""Host memory plans: per-host weights add up to the file, the decode state is what the code
allocates, the Flash q2 total matches packed-quant.md §5, and inspect_gguf.py --plan prints it."""

import itertools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf import reader, table
from ds4jax.model.decode_state import Capacity, init_stage_state
from ds4jax.partition import memory
from ds4jax.partition.plan import plan_ranges

REPO = pathlib.Path(__file__).resolve().parents[2]
GB = memory.GB


def test_plan_weights_sum_to_the_files_tensor_bytes(tiny_gguf):
  f = reader.open_gguf(tiny_gguf)
  file_bytes = sum(int(t.n_bytes) for t in f.tensors.values())
  embed, per_layer, head = f.layer_bytes()
  state = memory.state_layer_bytes(f.cfg, ctx=128, max_chunk=16)
  for n in range(1, f.cfg.n_layers + 1):
    rows = memory.plan_hosts(f.cfg, embed, per_layer, head, n, state_bytes=state)
    assert sum(r.weight_bytes for r in rows) == file_bytes
    assert sum(r.state_bytes for r in rows) == sum(state) + 4 * n  # + each stage's pos
    assert rows[0].layers.start == 0 and rows[-1].layers.has_output
    for a, b in itertools.pairwise(rows):
      assert b.layers.start == a.layers.end + 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_bytes_are_what_init_stage_state_allocates(dtype):
  cfg = ModelConfig.tiny()
  per_layer = memory.state_layer_bytes(cfg, ctx=96, max_chunk=16, dtype=dtype)
  cap = Capacity(96, 16)
  for il in range(cfg.n_layers):
    st = init_stage_state(cfg, LayerRange(il, il), cap, jnp.dtype(dtype))
    real = sum(x.nbytes for x in jax.tree.leaves(st.layers))
    assert per_layer[il] == real, il
  f32 = memory.state_layer_bytes(cfg, ctx=96, max_chunk=16)
  assert all(2 * b == a for a, b in zip(f32, memory.state_layer_bytes(
      cfg, ctx=96, max_chunk=16, dtype="bfloat16")))
  assert f32[2] > f32[3] > f32[0] == f32[1]  # CSA + indexer > HCA > SWA (kv only)


def test_flash_metadata_plan_total_is_the_published_q2_size():
  """43 layers from metadata alone: 86.7 GB of weights (packed-quant.md §5), within 2%."""
  cfg = ModelConfig.flash()
  embed, per_layer, head = table.layer_bytes(table.tensor_table(cfg), cfg.n_layers)
  for n in (1, 2, 4):
    rows = memory.plan_hosts(cfg, embed, per_layer, head, n)
    total = sum(r.weight_bytes for r in rows)
    assert abs(total - 86.7e9) / 86.7e9 < 0.02
    # Weights only, so the plan is the --split one.
    assert [r.layers for r in rows] == plan_ranges(per_layer, n, embed_bytes=embed,
                                                   head_bytes=head)


def test_fits_uses_the_stated_overhead():
  cfg = ModelConfig.tiny(n_layers=2)
  over = memory.Overhead(fixed=100, frac=0.5)
  assert over.need(1000) == 1600
  rows = memory.plan_hosts(cfg, 0, [1000, 1000], 0, 2, host_memory=1600, overhead=over)
  assert [r.need_bytes for r in rows] == [1600, 1600] and all(r.fits for r in rows)
  rows = memory.plan_hosts(cfg, 0, [1000, 1000], 0, 2, host_memory=1599, overhead=over)
  assert not any(r.fits for r in rows)
  assert memory.plan_hosts(cfg, 0, [1000, 1000], 0, 1)[0].fits is None
  assert memory.fewest_hosts(cfg, 0, [1000, 1000], 0, 1600, overhead=over) == 2
  assert memory.fewest_hosts(cfg, 0, [1000, 1000], 0, 3100, overhead=over) == 1
  assert memory.fewest_hosts(cfg, 0, [1000, 1000], 0, 1000, overhead=over) is None
  # Sessions multiply the state.
  one = memory.plan_hosts(cfg, 0, [10, 10], 0, 1, state_bytes=[5, 7])[0]
  three = memory.plan_hosts(cfg, 0, [10, 10], 0, 1, state_bytes=[5, 7], sessions=3)[0]
  assert (one.state_bytes, three.state_bytes) == (16, 48)
  with pytest.raises(ValueError, match="3 layer sizes for a model of 2 layers"):
    memory.plan_hosts(cfg, 0, [1, 1, 1], 0, 1)
  with pytest.raises(ValueError, match="unknown state dtype 'float16'"):
    memory.state_layer_bytes(cfg, ctx=8, dtype="float16")


def _inspect(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(REPO / "scripts" / "inspect_gguf.py"), *args],
                        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
                        check=False)


@pytest.mark.e2e
def test_inspect_plan_script(tiny_gguf):
  p = _inspect("--preset=flash", "--plan=2", "--host_memory=24", "--ctx=8192")
  assert p.returncode == 0, p.stderr
  assert "weights 86.71 GB (80.76 GiB)" in p.stdout
  assert "     0  0:20          21       42.60" in p.stdout
  assert "     1  21:42+output  22       44.11" in p.stdout
  assert "some host does NOT fit in 24 GB; fewest hosts that fit: 6" in p.stdout
  # ds4's --ssd_streaming: the routed experts (72.6 GiB) stay in the file, so the whole Flash
  # fits one 24 GB host with a 4 GB expert cache (issue 23 item 2).
  p = _inspect("--preset=flash", "--plan=1", "--host_memory=24", "--ctx=8192",
               "--ssd_streaming_cache_experts=4GB")
  assert p.returncode == 0, p.stderr
  assert "routed experts 77.91 GB stay in the file" in p.stdout
  assert "     0  0:42+output   43        8.80      3.41     20.77     24.00  yes" in p.stdout
  assert "every host fits in 24 GB; fewest hosts that fit: 1" in p.stdout
  p = _inspect("--preset=flash", "--plan=1", "--ssd_streaming_cache_experts=3")
  assert p.returncode == 2 and "below one token's experts: at least 6 slots" in p.stderr
  p = _inspect(f"--gguf={tiny_gguf}", "--plan=2", "--host_memory=128", "--ctx=256",
               "--dtype=bfloat16", "--sessions=2")
  assert p.returncode == 0, p.stderr
  assert "every host fits in 128 GB; fewest hosts that fit: 1" in p.stdout
  assert "bfloat16, 2 session(s)" in p.stdout
  for args, needle in [(["--plan=2"], "exactly one of --gguf"),
                       ([f"--gguf={tiny_gguf}", "--plan=9"], "cannot split 4 layers into 9"),
                       ([], "--gguf is required")]:
    p = _inspect(*args)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], p.stderr
