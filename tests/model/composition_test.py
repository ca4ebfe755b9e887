"""Layer-split composition: stages [0:a] then [a+1:output] equal the whole model bit for bit,
for one-shot prefill, decode and rewind; and decode does not recompile per token."""

import numpy as np
import pytest

from ds4jax.config import LayerRange
from ds4jax.gguf.load import load_tensors
from ds4jax.runtime.load import stage_from_tensors
from ds4jax.runtime.runner import StageRunner

CTX, MAX_CHUNK = 64, 32
N_PREFILL, N_DECODE = 21, 4


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
  return load_tensors(tiny_gguf, "all")


@pytest.fixture(scope="module")
def ids(tiny):
  cfg, _ = tiny
  return np.random.default_rng(3).integers(0, cfg.vocab_size, N_PREFILL + N_DECODE)


def _runner(tiny, spec):
  cfg, tensors = tiny
  return StageRunner(stage_from_tensors(cfg, LayerRange.parse(spec, cfg.n_layers), tensors),
                     ctx_size=CTX, max_chunk=MAX_CHUNK)


def _run(runners, ids):
  """Prefill, decode, then rewind 3 tokens and decode them again; returns all logits."""
  states = [r.init_state() for r in runners]

  def step(tokens, pos):
    hc = None
    for i, r in enumerate(runners):
      hc, states[i] = r.forward(states[i], tokens, hc, pos)
    return hc

  outs = [step(ids[:N_PREFILL], 0)]
  for p in range(N_PREFILL, len(ids)):
    outs.append(step(ids[p:p + 1], p))
  back = len(ids) - 3
  states[:] = [r.truncate(s, back) for r, s in zip(runners, states)]
  for p in range(back, len(ids)):
    outs.append(step(ids[p:p + 1], p))
  return np.concatenate(outs)


@pytest.fixture(scope="module")
def whole(tiny, ids):
  runner = _runner(tiny, "all")
  return runner, _run([runner], ids)


@pytest.mark.parametrize("a", [0, 1, 2])
def test_split_equals_whole_bitwise(tiny, ids, whole, a):
  got = _run([_runner(tiny, f"0:{a}"), _runner(tiny, f"{a + 1}:output")], ids)
  np.testing.assert_array_equal(got, whole[1])


def test_rewind_replays_exactly(whole):
  logits = whole[1]
  n = N_PREFILL + N_DECODE
  np.testing.assert_array_equal(logits[n:], logits[n - 3:n])


def test_decode_does_not_recompile(whole, ids):
  """The whole-model runner compiled one prefill bucket and one decode shape for its
  prefill + decode + rewind run; more decode steps and rewinds add nothing."""
  runner = whole[0]
  assert runner.n_traces == 2
  state = runner.init_state()
  _, state = runner.forward(state, ids[:N_PREFILL], None, 0)
  for p in range(N_PREFILL, len(ids)):
    _, state = runner.forward(state, ids[p:p + 1], None, p)
  state = runner.truncate(state, 5)
  _, state = runner.forward(state, ids[5:6], None, 5)
  assert runner.n_traces == 2
  assert runner._step._cache_size() == 2


def test_decode_updates_state_in_place(tiny):
  """No state-sized copy in the compiled decode step: the donated buffers are updated in
  place, so a step costs O(new rows), not O(context)."""
  import re
  import jax
  runner = _runner(tiny, "all")
  state = runner.init_state()
  txt = runner._step.lower(runner.params, state, np.zeros((1,), np.int32), None,
                           np.int32(1)).compile().as_text()
  shapes = {f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(state) if x.ndim == 2}
  copied = set(re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]+\} copy\(", txt))
  assert len(shapes) >= 4 and not shapes & copied
