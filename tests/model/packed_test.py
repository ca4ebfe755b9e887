"""Packed weights (issue 12): device bytes = GGUF bytes, packed logits = dequantised logits,
and no step holds a layer's experts in f32."""

import jax
import numpy as np
import pytest
from flax import nnx

from ds4jax.gguf import names
from ds4jax.gguf.load import packs
from ds4jax.gguf.reader import open_gguf
from ds4jax.runtime.load import load_runner
from ds4jax.runtime.runner import param_bytes
from ds4jax.quant import matmul as quant_matmul
from ds4jax.quant.packed import Packed
from ds4jax.testing import tiny

IDS = list(range(3, 40))


@pytest.fixture(scope="module")
def tiny_path():
  return tiny.tiny_gguf_path("tiny")


@pytest.fixture(scope="module")
def runners(tiny_path):
  return {w: load_runner(tiny_path, "all", ctx_size=64, weights=w)
          for w in ("packed", "dequantized")}


@pytest.mark.parametrize("layers", ["0:1", "2:output", "all"])
def test_packed_device_bytes_equal_the_gguf_slice(tiny_path, layers):
  f = open_gguf(tiny_path)
  rng = f.resolve(layers)
  r = load_runner(tiny_path, rng, ctx_size=16)
  got = param_bytes(r.params)
  want_packed = want_dense_file = 0
  for e in f.validate(rng):
    t = f.tensor(e.name)
    if packs(t.tensor_type, e.numpy_shape(f.cfg)):
      want_packed += int(t.n_bytes)
    else:
      want_dense_file += int(t.n_bytes)
  assert got["packed"] == want_packed > 0
  # What is not packed (F32 norms, sinks, HC bases, I32 tid2eid, the zero router bias a file
  # may lack) is the only difference to the slice's GGUF bytes.
  assert got["dense"] >= want_dense_file
  assert got["dense"] - want_dense_file <= 4 * f.cfg.n_experts * rng.n_layers
  assert got["dense"] < 0.01 * got["packed"]
  kinds = {type(v.get_value()) for _, v in nnx.to_flat_state(r.params)}
  assert Packed in kinds


def test_packed_leaves_are_the_gguf_bytes(tiny_path, runners):
  f = open_gguf(tiny_path)
  flat = dict(nnx.to_flat_state(runners["packed"].params))
  for name in ("blk.2.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight",
               "blk.0.attn_q_a.weight", "output.weight"):
    w = flat[names.local_path(name, f.resolve("all"))].get_value()
    assert isinstance(w, Packed)
    raw = np.asarray(f.tensor(name).data).view(np.uint8).reshape(w.data.shape)
    np.testing.assert_array_equal(w.data, raw)


def test_packed_logits_equal_dequantised(runners):
  """Prefill (dequantise-then-dot) is bit-identical; decode (fused reduce, another summation
  order) agrees to the bound measured on this fixture (2.6e-6), with the same argmax."""
  out = {}
  for w, r in runners.items():
    state = r.init_state()
    pre, state = r.forward(state, np.asarray(IDS[:20]), None, 0)
    dec = []
    for p, t in enumerate(IDS[20:30], start=20):
      logits, state = r.forward(state, np.asarray([t]), None, p)
      dec.append(logits[0])
    out[w] = (pre, np.stack(dec))
  np.testing.assert_array_equal(out["packed"][0], out["dequantized"][0])
  a, b = out["packed"][1], out["dequantized"][1]
  assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())
  np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("kernels", ["xla", "auto"])
@pytest.mark.parametrize("layer", [0, 2])  # a hash-routed and a top-k layer
def test_no_moe_step_holds_a_layers_experts_in_f32(runners, layer, kernels, monkeypatch):
  """The compiled MoE of a packed stage, for a decode row and a 32-token prefill chunk, needs
  less temporary memory than half of one layer's routed experts as f32 (an all-experts path
  over packed weights would dequantise all of them: more than that). A 32-token chunk
  dequantises each chosen expert (at least one expert's three slabs); a decode row through
  the jax.numpy kernels dequantises one expert's slabs, through the C++ kernels (`auto` on
  the CPU) none: it reads the packed bytes in place (less than a tenth of one expert in f32)."""
  monkeypatch.setenv("DS4JAX_CPU_KERNELS", kernels)
  cfg = runners["packed"].cfg
  experts_f32 = 3 * cfg.n_experts * cfg.expert_ff * cfg.d_model * 4
  one_expert_f32 = experts_f32 // cfg.n_experts
  moe = nnx.merge(runners["packed"].graphdef, runners["packed"].params).blocks[layer].moe
  graphdef, st = nnx.split(moe)
  f = jax.jit(lambda st, x, tok: nnx.merge(graphdef, st)(x, tok))
  temps = {}
  for t in (1, 32):
    x = jax.ShapeDtypeStruct((t, cfg.d_model), np.float32)
    tok = jax.ShapeDtypeStruct((t,), np.int32)
    temps[t] = f.lower(st, x, tok).compile().memory_analysis().temp_size_in_bytes
  assert one_expert_f32 <= temps[32] < experts_f32 / 2, (temps, experts_f32)
  if kernels == "auto" and quant_matmul.uses_kernel(moe.gate_exps[...]):
    assert temps[1] < one_expert_f32 / 10, (temps, one_expert_f32)
  else:
    assert one_expert_f32 <= temps[1] < experts_f32 / 2, (temps, experts_f32)


@pytest.fixture(scope="module")
def q8_runner(tiny_path):
  return load_runner(tiny_path, "all", ctx_size=64, activations="q8")


def _decode(runner, n_prompt=20, n_decode=20):
  state = runner.init_state()
  pre, state = runner.forward(state, np.asarray(IDS[:n_prompt]), None, 0)
  rows = [np.asarray(pre)]
  for p, t in enumerate(IDS[n_prompt:n_prompt + n_decode], start=n_prompt):
    logits, state = runner.forward(state, np.asarray([t]), None, p)
    rows.append(np.asarray(logits))
  return np.concatenate(rows)


def test_q8_activations_are_a_load_option(tiny_path, runners, q8_runner):
  """activations="q8": every packed leaf carries it, F32 leaves stay arrays; the logits move
  by the statistical amount measured on this fixture (docs/benchmarks.md: rms 0.08-0.15 on
  logits up to ~4, greedy tokens 86-92 % equal over 64 positions; the per-product bound is
  tests/quant/matmul_test.py's), never by more than a rounding of the activations can."""
  leaves = [v.get_value() for _, v in nnx.to_flat_state(q8_runner.params)]
  packed = [x for x in leaves if isinstance(x, Packed)]
  assert packed and all(x.act == "q8" for x in packed)
  exact = _decode(runners["packed"])
  q8 = _decode(q8_runner)
  d = np.abs(q8 - exact)
  assert 0 < np.sqrt((d ** 2).mean()) < 0.3, np.sqrt((d ** 2).mean())
  assert (q8.argmax(-1) == exact.argmax(-1)).mean() >= 0.75
  with pytest.raises(ValueError, match="unsupported activations 'int4'"):
    load_runner(tiny_path, "0:1", ctx_size=16, activations="int4")


def test_prefill_temporaries_do_not_grow_with_the_layers(tiny_path, monkeypatch):
  """A packed prefill dequantises each weight once its input exists (`quant.matmul.after`),
  so XLA cannot start every layer's dequantisation at the top of the step: the compiled
  32-token step's temporaries grow by less than half as much from 1 to 3 layers as they do
  untied (TIE_BYTES lowered to 0 so the tiny weights are tied)."""
  from ds4jax.runtime import load as load_lib
  from ds4jax.runtime.runner import StageRunner
  growth = {}
  for tie in (1 << 40, 0):
    monkeypatch.setattr(quant_matmul, "TIE_BYTES", tie)
    temps = []
    for layers in ("0:0", "0:2"):
      graphdef, flat, _ = load_lib._abstract(load_lib.as_source(tiny_path), layers, None,
                                             "packed")
      r = StageRunner(nnx.merge(graphdef, nnx.from_flat_state(flat)), ctx_size=32,
                      max_chunk=32)
      step = r._step.lower(r._abstract_params(), jax.eval_shape(r._init),
                           jax.ShapeDtypeStruct((32,), np.int32), None,
                           jax.ShapeDtypeStruct((), np.int32)).compile()
      temps.append(step.memory_analysis().temp_size_in_bytes)
    growth[tie] = temps[1] - temps[0]
  assert 0 < 2 * growth[0] < growth[1 << 40], growth
