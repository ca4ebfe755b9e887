"""model.load.load_runner: compile first, then stream the weights in (issue 7, peak memory).

The order must not change a single bit of the output, and what it compiled up front must be
what `forward` runs (a silent second compile would bring the peak it avoids back).
"""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from ds4jax.gguf import dequant, load, reader
from ds4jax.runtime.load import load_runner, load_stage, stage_from_tensors
from ds4jax.runtime.runner import StageRunner

_PXLA = "jax._src.interpreters.pxla"  # logs "Compiling <module> ..." for every lowering


def _step_compiles(caplog) -> int:
  return sum(1 for r in caplog.records
             if r.name == _PXLA and r.getMessage().startswith("Compiling jit(step)"))


def _decode(runner, ids, hc):
  """Runs ids one token at a time from position 0 (the decode shape only: cheap to compile)."""
  st, outs = runner.init_state(), []
  for p in range(len(ids)):
    out, st = runner.forward(st, ids[p:p + 1], None if hc is None else hc[p:p + 1], p)
    outs.append(out)
  return np.concatenate(outs)


def test_compile_first_is_bit_exact_and_compiles_once(tiny_gguf, caplog):
  caplog.set_level(logging.DEBUG, logger=_PXLA)
  cfg = reader.read_config(tiny_gguf)
  spec = f"{cfg.n_layers - 1}:output"  # one layer and the head: the HC input path
  r = load_runner(tiny_gguf, spec, ctx_size=16, max_chunk=4, compile_sizes=(1,))
  assert _step_compiles(caplog) == 1  # before any weight was loaded
  rng = np.random.default_rng(0)
  ids = rng.integers(0, cfg.vocab_size, 3)
  hc = rng.standard_normal((3, cfg.n_hc, cfg.d_model)).astype(np.float32)
  caplog.clear()
  got = _decode(r, ids, hc)
  assert _step_compiles(caplog) == 0, "forward compiled the shape that load_runner compiled"
  ref = StageRunner(load_stage(tiny_gguf, spec), ctx_size=16, max_chunk=4)
  np.testing.assert_array_equal(got, _decode(ref, ids, hc))


def test_set_params_refuses_another_stage(tiny_gguf):
  r = load_runner(tiny_gguf, "0:1", ctx_size=16, max_chunk=4)
  with pytest.raises(ValueError, match="do not match"):
    r.set_params(load_stage(tiny_gguf, "1:2"))
  with pytest.raises(ValueError, match="do not match"):
    r.set_params(load_stage(tiny_gguf, "0:1", dtype="bfloat16"))


def test_bfloat16_cast_on_the_host_matches_jax(tiny_gguf):
  # The loader casts with numpy (ml_dtypes) before placing; jnp.asarray casts in XLA.
  cfg, tensors = load.load_tensors(tiny_gguf, "0:0")
  stage = load_stage(tiny_gguf, "0:0", dtype="bfloat16", weights="dequantized")
  ref = stage_from_tensors(cfg, "0:0", tensors, dtype="bfloat16")
  got = stage.blocks[0].moe.gate_exps[...]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(ref.blocks[0].moe.gate_exps[...], np.float32))
  want = jnp.asarray(tensors["blk.0.ffn_gate_exps.weight"], dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_iter_tensors_dequantises_lazily(tiny_gguf, monkeypatch):
  calls = []
  real = dequant.dequantize_tensor
  monkeypatch.setattr(dequant, "dequantize_tensor", lambda t: calls.append(t.name) or real(t))
  f = reader.open_gguf(tiny_gguf)
  it = load.iter_tensors(f, f.resolve("0:output"), progress=False)
  name, arr = next(it)
  assert calls == [name] and arr.dtype in (np.float32, np.int32)
  rest = dict(it)
  assert len(calls) == 1 + sum(1 for n in rest if n in f.tensors)
  _, want = load.load_tensors(tiny_gguf, "0:output", progress=False)
  assert set(want) == {name, *rest}
  for n, a in rest.items():
    np.testing.assert_array_equal(a, want[n])
