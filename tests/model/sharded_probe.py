"""Runs the tiny model on 1, 2 and 4 forced CPU devices and prints one JSON line (used by
sharding_test.py, in its own process: XLA's device count is fixed when JAX starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/model/sharded_probe.py TINY.gguf

A packed stage on 2 devices also runs with expert streaming. Everything decodes one token per
call (the T = 1 program: one compile per runner), except
the in-process split, which prefills a 2-token prompt. The routed paths the decode step does
not take under a mesh (grouped: packed prefill; all-experts: dense prefill) run on one MoE
layer of 8 tokens.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ds4jax.gguf.streaming import StreamingOptions
from ds4jax.runtime.local import LocalBackend
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.model import sharding
from ds4jax.runtime.load import load_runner, load_stage
from ds4jax.runtime.runner import StageRunner, param_bytes

PROMPT = [0, 17, 42, 5]
N_NEW = 4
CTX, CHUNK = 32, 4


def greedy(runner):
  """Feeds PROMPT then N_NEW greedy tokens one at a time: (new tokens, logits [P+N, V])."""
  state, outs, toks = runner.init_state(), [], []
  seq = list(PROMPT)
  for p in range(len(PROMPT) + N_NEW):
    out, state = runner.forward(state, seq[p:p + 1], None, p)
    outs.append(out)
    if p >= len(PROMPT) - 1:
      toks.append(int(np.argmax(out[-1])))
      seq.append(toks[-1])
  replicated = all(x.sharding.is_fully_replicated and len(x.sharding.device_set) ==
                   runner_devices(runner) for x in jax.tree.leaves(state))
  return toks[:N_NEW], np.concatenate(outs), replicated


def runner_devices(runner) -> int:
  return sharding.n_shards(runner.mesh)


def bytes_report(runner):
  per = sharding.device_bytes(runner.params)
  return {"per_device": per, "whole": param_bytes(runner.params)["total"]}


def expert_bytes(runner) -> int:
  total = 0
  for path, var in nnx.to_flat_state(runner.params):
    if str(path[-1]).endswith("_exps"):
      total += sum(x.nbytes for x in jax.tree.leaves(var.get_value()))
  return total


def moe_paths(path, weights):
  """Max |routed(mesh) - routed(1 device)| of layer 1's MoE on 8 tokens (grouped path for
  packed experts, all-experts path for dense ones)."""
  out = {}
  x_TD = jax.random.normal(jax.random.key(0), (8, 256), jnp.float32)
  tokens = jnp.arange(8, dtype=jnp.int32)
  ref = None
  for n in (1, 4):
    stage = load_stage(path, "1:1", weights=weights, devices=n)
    moe = stage.blocks[0].moe
    y = np.asarray(nnx.jit(lambda m, x, t: m(x, t))(moe, x_TD, tokens))
    if ref is None:
      ref = y
    out[n] = float(np.abs(y - ref).max())
  return out[4], float(np.abs(ref).max())


def main(path):
  t0 = time.perf_counter()
  res = {"devices": len(jax.devices()), "runs": {}}
  refs = {}
  for weights, counts in (("packed", (1, 2, 4)), ("dequantized", (1, 4))):
    for n in counts:
      t = time.perf_counter()
      if weights == "packed" and n == 4:
        # The compile-first path: the decode shape compiles before any weight exists.
        runner = load_runner(path, "all", ctx_size=CTX, max_chunk=CHUNK, weights=weights,
                             devices=n, compile_sizes=(1,))
      else:
        runner = StageRunner(load_stage(path, "all", weights=weights, devices=n),
                             ctx_size=CTX, max_chunk=CHUNK)
      traces = runner.n_traces
      toks, logits, replicated = greedy(runner)
      run = {"tokens": toks, "state_replicated": replicated,
             "new_traces": runner.n_traces - traces, "seconds": time.perf_counter() - t,
             "expert_bytes": expert_bytes(runner), **bytes_report(runner)}
      if n == 1:
        refs[weights] = logits
      run["max_abs_dlogit"] = float(np.abs(logits - refs[weights]).max())
      run["max_abs_logit"] = float(np.abs(refs[weights]).max())
      res["runs"][f"{weights}/{n}"] = run
      if (weights, n) == ("dequantized", 1):
        one_device = runner
      del runner
  # Expert streaming on 2 devices: the experts come through the host cache (4 slots), not the
  # mesh; the rest of the stage is placed as usual.
  t = time.perf_counter()
  runner = StageRunner(load_stage(path, "all", devices=2,
                                  streaming_options=StreamingOptions.parse("4")),
                       ctx_size=CTX, max_chunk=CHUNK)
  toks, logits, replicated = greedy(runner)
  res["streamed/2"] = {"tokens": toks, "state_replicated": replicated,
                       "mesh_devices": runner_devices(runner), "expert_bytes": expert_bytes(runner),
                       "max_abs_dlogit": float(np.abs(logits - refs["packed"]).max()),
                       "seconds": time.perf_counter() - t}
  del runner
  # An in-process split: layers 0:1 on 4 devices, 2:output on 1 (the default device).
  t = time.perf_counter()
  runners = [StageRunner(load_stage(path, spec, weights="dequantized", devices=n),
                         ctx_size=CTX, max_chunk=CHUNK) for spec, n in (("0:1", 4), ("2:output", 1))]
  backend = LocalBackend(runners, prefill_chunk=CHUNK)
  sid, seq, toks = backend.new_session(), PROMPT[:2], []
  logits = []
  for step in range(N_NEW + 2):
    r = backend.step(sid, seq, SamplingParams(), step, return_logits=True)
    toks.append(r.token)
    logits.append(r.logits_V)
    seq = seq + [r.token]
  res["split"] = {"tokens": toks, "mesh_devices": [runner_devices(r) for r in runners],
                  "seconds": time.perf_counter() - t}
  # The one-process reference of the split: the whole dequantised model on one device.
  ref = LocalBackend([one_device], prefill_chunk=CHUNK)
  sid, seq, want = ref.new_session(), PROMPT[:2], []
  dlogit = 0.0
  for step in range(N_NEW + 2):
    r = ref.step(sid, seq, SamplingParams(), step, return_logits=True)
    want.append(r.token)
    dlogit = max(dlogit, float(np.abs(r.logits_V - logits[step]).max()))
    seq = seq + [want[-1]]
  res["split"].update(want=want, max_abs_dlogit=dlogit)
  t = time.perf_counter()
  res["moe"] = {w: moe_paths(path, w) for w in ("packed", "dequantized")}
  res["moe_seconds"] = time.perf_counter() - t
  res["seconds"] = time.perf_counter() - t0
  print(json.dumps(res))


if __name__ == "__main__":
  main(sys.argv[1])
