"""LayerPrograms (runtime/layer_programs.py): one compiled program per kind of layer gives
the whole-stage step's outputs and pool bit for bit, on the bench model (8 layers, 3 kinds)
and on a stage that starts mid-model, and compiles kinds, not layers, per shape."""

import jax
import numpy as np
import pytest

from ds4jax.runtime.layer_programs import LayerPrograms
from ds4jax.runtime.load import load_stage
from ds4jax.runtime.runner import StageRunner


def _pair(path, layers):
  stage = load_stage(path, layers)
  whole = StageRunner(stage, ctx_size=64, max_chunk=16, max_batch=2, layer_programs=False)
  per = StageRunner(stage, ctx_size=64, max_chunk=16, max_batch=2, layer_programs=True)
  return whole, per


def _run(runner, hc_in=None):
  """A 2-session prefill then 6 decode steps: every output and the final pool."""
  rng = np.random.default_rng(0)
  v = runner.cfg.vocab_size
  pool = runner.init_pool(3)
  outs = []
  prompts = rng.integers(0, v, size=(2, 11))
  hc = None if runner.embeds else rng.standard_normal(
      (2, 11, runner.cfg.n_hc, runner.cfg.d_model)).astype(np.float32)
  out, pool = runner.forward_batch(pool, [2, 0], prompts, hc, [11, 9])
  outs.append(np.asarray(out))
  for i in range(6):
    tok = rng.integers(0, v, size=(2, 1))
    hc = None if runner.embeds else rng.standard_normal(
        (2, 1, runner.cfg.n_hc, runner.cfg.d_model)).astype(np.float32)
    out, pool = runner.forward_batch(pool, [0, 2], tok, hc, [1, 1])
    outs.append(np.asarray(out))
  return outs, [np.asarray(x) for x in jax.tree.leaves(pool)]


@pytest.mark.parametrize("layers", ["all", "3:output"])  # embeds and not; both have the head
def test_layer_programs_equal_the_whole_stage(bench_gguf, layers):
  whole, per = _pair(bench_gguf, layers)
  assert per.layer_programs and not whole.layer_programs
  (o1, p1), (o2, p2) = _run(whole), _run(per)
  for a, b in zip(o1 + p1, o2 + p2):
    np.testing.assert_array_equal(a, b)


def test_one_program_per_kind_and_shape(bench_gguf):
  stage = load_stage(bench_gguf)
  progs = LayerPrograms(stage, jax.tree.leaves(StageRunner(stage, ctx_size=64).params))
  # The bench schedule: two hash-routed SWA layers, then CSA (ratio 4) and HCA (128) in turn.
  assert progs.kinds == [0, 0, 1, 2, 1, 2, 1, 2]
  runner = StageRunner(stage, ctx_size=64, max_chunk=16, max_batch=2, layer_programs=True)
  runner.compile_shapes([(1, 1), (1, 4)], n_slots=1)
  # begin + 4 kinds + end, per shape.
  assert runner.n_traces == 2 * (1 + progs.n_kinds + 1)
  pool = runner.init_pool(1)
  n = runner.n_traces
  out, pool = runner.forward_batch(pool, [0], np.array([[1, 2, 3]]), None, [3])
  out, pool = runner.forward_batch(pool, [0], np.array([[4]]), None, [1])
  assert runner.n_traces == n  # what compile_shapes compiled is what runs


def test_auto_picks_whole_stage_for_small_layers(bench_gguf):
  assert not StageRunner(load_stage(bench_gguf), ctx_size=64).layer_programs
