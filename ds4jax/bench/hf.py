"""Timing HF transformers' `DeepseekV4ForCausalLM` (torch CPU, eager, f32) on a ds4 GGUF's
weights (built by the one converter, `ds4jax.gguf.hf.hf_model_from_gguf`), so HF and ds4jax
run the very same numbers.

    model = hf_model_from_gguf(path)
    res = measure_hf(model, ids, prompt_lens=(512, 4096), decode_tokens=32)
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np


def hf_available() -> bool:
  try:
    import torch  # noqa: F401
    import transformers
  except ImportError:
    return False
  return hasattr(transformers, "DeepseekV4ForCausalLM")


def measure_hf(model, ids: Sequence[int], *, prompt_lens: Sequence[int], decode_tokens: int
               ) -> dict[str, Any]:
  """Prefill tok/s per prompt length (one forward), decode tok/s (greedy, KV cache).

  Decode continues the first prompt length; the first decode call is a warm-up and is not
  timed. Returns also the last prefill logits row of each length (for the parity check).
  """
  import torch
  from transformers import DynamicCache

  ids_N = np.asarray(ids, np.int64)
  out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "prefill": {},
                         "last_logits": {}}
  with torch.no_grad():
    model(torch.as_tensor(ids_N[None, :8]))  # warm-up (allocator, lazy init)
    for n in prompt_lens:
      t0 = time.perf_counter()
      logits = model(torch.as_tensor(ids_N[None, :n])).logits
      dt = time.perf_counter() - t0
      out["prefill"][str(n)] = {"tokens": int(n), "seconds": dt, "tok_s": n / dt}
      out["last_logits"][str(n)] = logits[0, -1].float().numpy()
    n0 = int(prompt_lens[0])
    cache = DynamicCache(config=model.config)
    res = model(torch.as_tensor(ids_N[None, :n0]), cache=cache, use_cache=True)
    cache, tok = res.cache, int(res.logits[0, -1].argmax())
    steps = []
    for i in range(decode_tokens + 1):
      t0 = time.perf_counter()
      res = model(torch.as_tensor([[tok]]), cache=cache, use_cache=True)
      cache, tok = res.cache, int(res.logits[0, -1].argmax())
      if i:
        steps.append(time.perf_counter() - t0)
  total = float(np.sum(steps)) if steps else 0.0
  out["decode"] = {"tokens": len(steps), "seconds": total,
                   "tok_s": len(steps) / total if total else 0.0,
                   "ms_per_token_median": 1e3 * float(np.median(steps)) if steps else 0.0}
  return out
