"""Throughput of one-shot prefill and single-token decode, ds4jax next to HF on one GGUF.

Used by `scripts/bench_model.py`. Both models live in one process and are timed in
alternating rounds (the order rotates every round), so on a shared, loaded machine each sees
the same load; every round also yields a paired ratio (ds4jax / HF of that round).
Compilation and warm-up runs are excluded from the timings (ds4jax compiles each chunk shape
once; HF eager has nothing to compile).
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np


def bench_interleaved(path, *, n_prompt: int, n_decode: int, dtype: str = "float32",
                      hf_threads=(1,), rounds: int = 3, weights=("packed",)) -> dict:
  """Alternating rounds of ds4jax and HF (one row per torch thread count; none if empty), and
  of ds4jax with each of `weights` ('packed' | 'dequantized'; the first is the reference of
  the paired ratios).

  Each round runs, per implementation: a one-shot prefill of `n_prompt` random ids from
  position 0, then `n_decode` single-token decode steps of the following ids.

  Returns {"rows": [row, ...], "load": (loadavg before, after), "max_abs_dlogit": float | None}
  with row = {impl, dtype, compile_s, prefill_tok_s / decode_tok_s (median of rounds),
  prefill_best / decode_best, prefill_cpu_s / decode_cpu_s (process CPU time, medians),
  paired_prefill / paired_decode (median over rounds of ds4jax's tok/s over this row's)}.
  """
  if n_prompt < 1 or n_decode < 1 or rounds < 1:
    raise ValueError("n_prompt, n_decode and rounds must be >= 1")
  from ds4jax.build import load_model
  load_before = os.getloadavg()
  impls: dict[str, Callable] = {}
  rows = {}
  for w in weights:
    model = load_model(path, dtype=dtype, ctx_size=n_prompt + n_decode,
                       max_chunk=_pow2_at_least(n_prompt), weights=w)
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, n_prompt + n_decode)
    name = "ds4jax" if len(weights) == 1 else f"ds4jax/{w[:6]}"
    impls[name] = _ds4jax_round(model, ids, n_prompt)
    rows[name] = dict(impl=name, dtype=dtype)
  ref = next(iter(impls))
  if hf_threads:
    hf_model = _hf_model(path)
    for th in hf_threads:
      name = f"hf/{int(th)}thr"
      impls[name] = _hf_round(hf_model, ids, n_prompt, int(th))
      rows[name] = dict(impl=name, dtype="float32")
  logits = {}
  for name, run in impls.items():  # warm-up: compiles ds4jax's two shapes
    t0 = time.perf_counter()
    logits[name] = run(2)[-1]
    rows[name]["compile_s"] = time.perf_counter() - t0 if name.startswith("ds4jax") else 0.0
  times = {name: [] for name in impls}
  names = list(impls)
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(impls[name](n_decode)[:4])
  for name, row in rows.items():
    p_s, d_s, p_cpu, d_cpu = (np.asarray(x) for x in zip(*times[name]))
    row.update(prefill_tok_s=n_prompt / np.median(p_s), prefill_best=n_prompt / p_s.min(),
               decode_tok_s=n_decode / np.median(d_s), decode_best=n_decode / d_s.min(),
               prefill_cpu_s=float(np.median(p_cpu)), decode_cpu_s=float(np.median(d_cpu)))
    ours = np.asarray([t[:2] for t in times[ref]])
    theirs = np.asarray([t[:2] for t in times[name]])
    row["paired_prefill"], row["paired_decode"] = np.median(theirs / ours, axis=0)
  diff = None
  if len(logits) > 1:
    diff = float(np.abs(logits[ref] - logits[names[1]]).max())
  return dict(rows=list(rows.values()), load=(load_before, os.getloadavg()),
              max_abs_dlogit=diff, ref=ref, other=names[1] if len(names) > 1 else None)


def _ds4jax_round(model, ids, n_prompt: int):
  """run(n_decode) -> (prefill s, decode s, prefill CPU s, decode CPU s, last prefill logits)."""
  session = model.session()

  def run(n_decode: int):
    session.rewind(0)
    c0, t0 = time.process_time(), time.perf_counter()
    logits = session.prefill(ids[:n_prompt])
    c1, t1 = time.process_time(), time.perf_counter()
    for p in range(n_prompt, n_prompt + n_decode):
      session.decode(int(ids[p]))
    c2, t2 = time.process_time(), time.perf_counter()
    return t1 - t0, t2 - t1, c1 - c0, c2 - c1, logits[-1]

  return run


def _hf_model(path):
  from ds4jax.gguf.hf import hf_model_from_gguf
  return hf_model_from_gguf(path)


def _hf_round(model, ids, n_prompt: int, threads: int):
  """The same round on HF DeepseekV4ForCausalLM (f32, eager, DynamicCache) with `threads`
  torch threads."""
  import torch
  from transformers import DynamicCache

  def run(n_decode: int):
    torch.set_num_threads(threads)
    with torch.no_grad():
      cache = DynamicCache(config=model.config)
      c0, t0 = time.process_time(), time.perf_counter()
      out = model(torch.as_tensor(ids[None, :n_prompt]), cache=cache, use_cache=True)
      c1, t1 = time.process_time(), time.perf_counter()
      cache = out.cache
      for p in range(n_prompt, n_prompt + n_decode):
        cache = model(torch.as_tensor(ids[None, p:p + 1]), cache=cache, use_cache=True).cache
      c2, t2 = time.process_time(), time.perf_counter()
    return t1 - t0, t2 - t1, c1 - c0, c2 - c1, out.logits[0, -1].numpy()

  return run


def _pow2_at_least(n: int) -> int:
  b = 1
  while b < n:
    b *= 2
  return b


def bench_layer_decode(path, layers: str, *, n_decode: int = 8, n_prompt: int = 8,
                       weights: str = "packed") -> dict:
  """ms per decode token of a slice without the embedding (e.g. one Flash-dims layer), next to
  its floor: the weight bytes one token reads (`bench.gpu.decode_weight_bytes` rules: the
  chosen experts' share of the routed tensors, every other tensor whole) over the measured
  memory bandwidth of this device.

  Returns {layers, weights, ms_per_token (median), read_bytes, gbs, floor_ms}.
  """
  from ds4jax.bench.gpu import hbm_bandwidth_gbs
  from ds4jax.build import load_model
  from ds4jax.gguf import names
  from ds4jax.gguf.reader import open_gguf
  f = open_gguf(path)
  rng = f.resolve(layers)
  if rng.embeds:
    raise ValueError(f"layers {layers}: the slice must not start at 0 (it would embed)")
  runner = load_model(path, rng, ctx_size=n_prompt + n_decode + 1, weights=weights).runner
  cfg = f.cfg
  read = 0.0
  for e in names.entries(cfg, rng, optional=True):
    if e.name not in f:
      continue
    share = cfg.n_experts_used / cfg.n_experts if e.spec.is_expert else 1.0
    if e.name.endswith("tid2eid.weight"):
      share = cfg.n_experts_used / float(np.prod(e.numpy_shape(cfg)))
    nbytes = f.nbytes(e.name) if weights == "packed" else 4 * int(np.prod(e.numpy_shape(cfg)))
    read += nbytes * share
  rs = np.random.default_rng(0)
  ids = rs.integers(0, cfg.vocab_size, n_prompt + n_decode)
  hc = rs.standard_normal((n_prompt + n_decode, cfg.n_hc, cfg.d_model)).astype(np.float32)
  state = runner.init_state()
  _, state = runner.forward(state, ids[:n_prompt], hc[:n_prompt], 0)
  times = []
  for p in range(n_prompt, n_prompt + n_decode):
    t0 = time.perf_counter()
    out, state = runner.forward(state, ids[p:p + 1], hc[p:p + 1], p)
    np.asarray(out)
    times.append(time.perf_counter() - t0)
  del runner, state
  gbs = hbm_bandwidth_gbs(1 << 28)
  return dict(layers=rng.describe(), weights=weights, ms_per_token=1e3 * float(np.median(times[1:])),
              read_bytes=int(read), gbs=gbs, floor_ms=1e3 * read / (gbs * 1e9))


def bench_devices(path, devices, *, n_prompt: int, n_decode: int, rounds: int = 3,
                  dtype: str = "float32", weights: str = "packed") -> dict:
  """Prefill and decode throughput of the whole model on a stage of `devices` local devices
  (the routed experts sharded over them, `model.sharding`), plus what each device holds.

  Run one device count per process (on CPU, `--xla_force_host_platform_device_count`
  decides how many devices there are; they share the host's cores, so a CPU run shows the
  cost of the collectives, not a speed-up). Returns {devices, compile_s, prefill_tok_s,
  decode_tok_s (medians of `rounds`), prefill_best, decode_best, bytes_per_device:
  {"experts", "other", "total"} (the largest device's), param_bytes (the stage's whole)}.
  """
  from ds4jax.build import load_model
  from ds4jax.model import sharding
  from ds4jax.runtime.runner import param_bytes
  model = load_model(path, dtype=dtype, ctx_size=n_prompt + n_decode,
                     max_chunk=_pow2_at_least(n_prompt), weights=weights, devices=devices)
  ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, n_prompt + n_decode)
  run = _ds4jax_round(model, ids, n_prompt)
  t0 = time.perf_counter()
  run(2)
  compile_s = time.perf_counter() - t0
  times = np.asarray([run(n_decode)[:2] for _ in range(rounds)])
  per = sharding.device_bytes(model.runner.params)
  return dict(devices=sharding.n_shards(model.runner.mesh), weights=weights, dtype=dtype,
              compile_s=compile_s, prefill_tok_s=n_prompt / float(np.median(times[:, 0])),
              decode_tok_s=n_decode / float(np.median(times[:, 1])),
              prefill_best=n_prompt / float(times[:, 0].min()),
              decode_best=n_decode / float(times[:, 1].min()),
              bytes_per_device=max(per.values(), key=lambda d: d["total"]),
              param_bytes=param_bytes(model.runner.params)["total"])


def floor_bytes(path, layers: str = "all") -> int:
  """Bytes one decode token must read from the weights of `layers` of a GGUF: every
  non-expert tensor whole, k/E of each routed-expert tensor, one row of the embedding (and of
  a hash layer's tid2eid), as stored (packed bytes)."""
  from ds4jax.gguf import names
  from ds4jax.gguf.reader import open_gguf
  f = open_gguf(path)
  cfg, rng = f.cfg, f.resolve(layers)
  read = 0.0
  for e in names.entries(cfg, rng, optional=True):
    if e.name not in f:
      continue
    share = 1.0
    if e.name == "token_embd.weight":
      share = 1.0 / cfg.vocab_size
    elif e.name.endswith("tid2eid.weight"):
      share = 1.0 / cfg.vocab_size
    elif e.spec.is_expert:
      share = cfg.n_experts_used / cfg.n_experts
    read += f.nbytes(e.name) * share
  return int(read)


def bench_floor(path, layers: str = "all", *, weights: str = "packed",
                activations: str = "exact", n_decode: int = 16, n_prompt: int = 8,
                batches=(1, 8), rounds: int = 3) -> dict:
  """Decode ms/token of `layers` of a GGUF (one session, after warm-up) next to its floor
  measured in the same process: `floor_bytes` over the rate XLA reads a 2 GiB array
  (`bench.kernels.read_gbs`); and the cost of one batched decode step (`forward_batch`, one
  token per row) for each B in `batches`. The single-session steps and the batched steps
  alternate (max(n_decode, 4 * rounds) of each), so they see the same load.

  Returns {layers, weights, activations, ms_per_token, floor_bytes, read_gbs, floor_ms,
  ratio (floor / measured), steps: {B: ms per step}, agg_tok_s: {B: B / step s}, load}.
  """
  from ds4jax.bench.kernels import read_gbs
  from ds4jax.gguf.reader import open_gguf
  from ds4jax.runtime.load import load_runner
  f = open_gguf(path)
  rng = f.resolve(layers)
  cfg = f.cfg
  batches = tuple(batches)
  n_slots, n_steps = max(batches), max(n_decode, 4 * rounds)
  ctx = n_prompt + n_steps * len(batches) + 8
  runner = load_runner(path, rng, ctx_size=ctx, max_chunk=max(8, n_prompt), weights=weights,
                       compile_sizes=(1, n_prompt), activations=activations,
                       compile_batches=(batches, (1,), n_slots))
  rs = np.random.default_rng(0)
  ids_SP = rs.integers(0, cfg.vocab_size, (n_slots, n_prompt + n_steps + 1))  # one per slot
  ids = ids_SP[0]
  hc = None if rng.embeds else rs.standard_normal(
      (n_prompt + n_steps + 1, cfg.n_hc, cfg.d_model)).astype(np.float32)

  def hc_at(a, b):
    return None if hc is None else hc[a:b]

  load0 = os.getloadavg()
  state = runner.init_state()
  _, state = runner.forward(state, ids[:n_prompt], hc_at(0, n_prompt), 0)
  pool = runner.init_pool(n_slots)
  for s in range(n_slots):  # each slot its own prompt, so B rows route to distinct experts
    _, pool = runner.forward_batch(pool, [s], ids_SP[s:s + 1, :n_prompt],
                                   None if hc is None else hc[None, :n_prompt], [n_prompt])
  times, steps = [], {b: [] for b in batches}
  for r in range(n_steps + 1):  # step 0 of each kind is a warm-up
    p = n_prompt + r
    t0 = time.perf_counter()
    out, state = runner.forward(state, ids[p:p + 1], hc_at(p, p + 1), p)
    np.asarray(out)
    times.append(time.perf_counter() - t0)
    for b in batches[r % len(batches):] + batches[:r % len(batches)]:
      h = None if hc is None else np.repeat(hc[None, p:p + 1], b, axis=0)
      t0 = time.perf_counter()
      out, pool = runner.forward_batch(pool, np.arange(b), ids_SP[:b, p:p + 1], h,
                                       np.ones(b, np.int64))
      np.asarray(out)
      steps[b].append(time.perf_counter() - t0)
  del state, pool, runner
  ms_token = 1e3 * float(np.median(times[1:]))
  step_ms = {b: 1e3 * float(np.median(v[1:])) for b, v in steps.items()}
  gbs = read_gbs()
  read = floor_bytes(path, layers)
  floor_ms = 1e3 * read / (gbs * 1e9)
  return dict(layers=rng.describe(), weights=weights, activations=activations,
              ms_per_token=ms_token, floor_bytes=read, read_gbs=gbs, floor_ms=floor_ms,
              ratio=floor_ms / ms_token, steps=step_ms,
              agg_tok_s={b: 1e3 * b / ms for b, ms in step_ms.items()},
              load=(load0, os.getloadavg()))


def activation_effect(path, *, n_prompt: int = 32, n_decode: int = 16,
                      acts=("exact", "q8"), hf: bool = True, seed: int = 0) -> dict:
  """Logits of each activation mode next to HF transformers (the oracle: f32 eager on the
  same dequantised weights) and to the exact mode, over a one-shot prefill of `n_prompt`
  random ids and `n_decode` single-token decode steps.

  Returns {act: {"vs_hf": stats | None, "vs_exact": stats}} with stats = {max_abs, rms,
  argmax_agree (fraction of positions), max_logit (largest |logit| of the reference)}.
  """
  from ds4jax.build import load_model

  def run(act):
    model = load_model(path, ctx_size=n_prompt + n_decode + 8,
                       max_chunk=_pow2_at_least(n_prompt), activations=act)
    s = model.session()
    out = [np.asarray(s.prefill(ids[:n_prompt]))]
    out += [np.asarray(s.decode(int(t)))[None] for t in ids[n_prompt:]]
    return np.concatenate(out)

  def stats(a, b):
    d = np.abs(a - b)
    return dict(max_abs=float(d.max()), rms=float(np.sqrt((d ** 2).mean())),
                argmax_agree=float((a.argmax(-1) == b.argmax(-1)).mean()),
                max_logit=float(np.abs(b).max()))

  from ds4jax.gguf.reader import open_gguf
  vocab = open_gguf(path).cfg.vocab_size
  ids = np.random.default_rng(seed).integers(0, vocab, n_prompt + n_decode)
  logits = {act: run(act) for act in acts}
  oracle = None
  if hf:
    import torch
    from transformers import DynamicCache
    model = _hf_model(path)
    with torch.no_grad():
      cache = DynamicCache(config=model.config)
      out = model(torch.as_tensor(ids[None, :n_prompt]), cache=cache, use_cache=True)
      rows, cache = [out.logits[0].numpy()], out.cache
      for p in range(n_prompt, n_prompt + n_decode):
        out = model(torch.as_tensor(ids[None, p:p + 1]), cache=cache, use_cache=True)
        rows.append(out.logits[0].numpy())
        cache = out.cache
    oracle = np.concatenate(rows).astype(np.float32)
  return {act: dict(vs_hf=None if oracle is None else stats(logits[act], oracle),
                    vs_exact=stats(logits[act], logits[acts[0]])) for act in acts}
