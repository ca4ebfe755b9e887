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
