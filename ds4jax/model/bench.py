"""Throughput of one-shot prefill and single-token decode, ds4jax next to HF on one GGUF.

Used by `scripts/bench_model.py`. Compilation and warm-up runs are excluded from the
timings (ds4jax compiles each chunk shape once; HF eager has nothing to compile).
"""

from __future__ import annotations

import time

import numpy as np


def bench_ds4jax(path, *, n_prompt: int, n_decode: int, dtype: str = "float32",
                 repeats: int = 2) -> dict:
  """Best-of-`repeats` prefill and decode tok/s (plus compile time and the logits)."""
  import ds4jax
  t0 = time.perf_counter()
  model = ds4jax.load_model(path, dtype=dtype, ctx_size=n_prompt + n_decode,
                            max_chunk=_pow2_at_least(n_prompt))
  load_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  ids = rng.integers(0, model.cfg.vocab_size, n_prompt + n_decode)
  t0 = time.perf_counter()
  s = model.session()
  s.prefill(ids[:n_prompt])
  s.decode(int(ids[n_prompt]))
  compile_s = time.perf_counter() - t0
  best_p, best_d, logits = np.inf, np.inf, None
  for _ in range(repeats):
    s.rewind(0)
    t0 = time.perf_counter()
    logits = s.prefill(ids[:n_prompt])
    best_p = min(best_p, time.perf_counter() - t0)
    t0 = time.perf_counter()
    for p in range(n_prompt, n_prompt + n_decode):
      s.decode(int(ids[p]))
    best_d = min(best_d, time.perf_counter() - t0)
  return dict(impl="ds4jax", dtype=dtype, load_s=load_s, compile_s=compile_s,
              prefill_tok_s=n_prompt / best_p, decode_tok_s=n_decode / best_d,
              logits=logits, ids=ids)


def bench_hf(path, ids, *, n_prompt: int, n_decode: int, threads: int | None = None,
             repeats: int = 2) -> dict:
  """The same runs on HF DeepseekV4ForCausalLM (f32, eager, its own cache)."""
  import torch
  from transformers import DynamicCache
  from ds4jax.convert import hf_model_from_gguf
  if threads:
    torch.set_num_threads(threads)
  t0 = time.perf_counter()
  model = hf_model_from_gguf(path)
  load_s = time.perf_counter() - t0
  best_p, best_d, logits = np.inf, np.inf, None
  with torch.no_grad():
    for _ in range(repeats):
      cache = DynamicCache(config=model.config)
      t0 = time.perf_counter()
      out = model(torch.as_tensor(ids[None, :n_prompt]), cache=cache, use_cache=True)
      best_p = min(best_p, time.perf_counter() - t0)
      logits, cache = out.logits[0].numpy(), out.cache
      t0 = time.perf_counter()
      for p in range(n_prompt, n_prompt + n_decode):
        cache = model(torch.as_tensor(ids[None, p:p + 1]), cache=cache, use_cache=True).cache
      best_d = min(best_d, time.perf_counter() - t0)
  return dict(impl="hf", dtype="float32", load_s=load_s, compile_s=0.0,
              prefill_tok_s=n_prompt / best_p, decode_tok_s=n_decode / best_d, logits=logits)


def _pow2_at_least(n: int) -> int:
  b = 1
  while b < n:
    b *= 2
  return b
