"""HF transformers `DeepseekV4ForCausalLM` (torch CPU, eager, f32) on a ds4 GGUF's weights.

The inverse of `ds4jax.convert`: the GGUF's tensors are dequantised to float32 and mapped
back onto HF parameter names, so HF and ds4jax run the very same numbers. The config round
trip (`convert.config_from_hf(hf_config(cfg)) == cfg`) is checked, so a field that does not
survive the mapping is an error rather than a silently different model.

    model = hf_model_from_gguf(path)
    res = measure_hf(model, ids, prompt_lens=(512, 4096), decode_tokens=32)
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ds4jax.config import ModelConfig
from ds4jax.convert import _GLOBAL_MAP, _LAYER_MAP, config_from_hf

_HCA = "heavily_compressed_attention"
_CSA = "compressed_sparse_attention"


def hf_available() -> bool:
  try:
    import torch  # noqa: F401
    import transformers
  except ImportError:
    return False
  return hasattr(transformers, "DeepseekV4ForCausalLM")


def hf_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
  """DeepseekV4Config kwargs describing `cfg`; ValueError for what HF cannot express."""
  n = cfg.n_layers
  ratios = cfg.compress_ratios[:n]
  hca = sorted({r for r in ratios if r not in (0, 4)})
  if len(hca) > 1:
    raise ValueError(f"HF has one HCA compress rate; this model uses {hca}")
  clamps = set(cfg.swiglu_clamp[:n])
  if len(clamps) != 1:
    raise ValueError("HF has one swiglu_limit; this model varies it per layer")
  kind = {0: "sliding_attention", 4: _CSA}
  return dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, moe_intermediate_size=cfg.expert_ff,
      num_hidden_layers=n, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, partial_rotary_factor=cfg.rope_dim / cfg.head_dim,
      q_lora_rank=cfg.q_lora_rank, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
      n_routed_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_used,
      n_shared_experts=cfg.n_shared_experts, sliding_window=cfg.window,
      index_n_heads=cfg.index_heads, index_head_dim=cfg.index_head_dim,
      index_topk=cfg.index_topk, hc_mult=cfg.n_hc, hc_sinkhorn_iters=cfg.sinkhorn_iters,
      hc_eps=cfg.hc_eps, rms_norm_eps=cfg.rms_eps, swiglu_limit=clamps.pop(),
      routed_scaling_factor=cfg.routed_scale, norm_topk_prob=cfg.norm_topk_prob,
      max_position_embeddings=cfg.context_length, rope_theta=cfg.rope_base,
      compress_rope_theta=cfg.compress_rope_base,
      layer_types=[kind.get(r, _HCA) for r in ratios],
      compress_rates={_CSA: 4, _HCA: hca[0] if hca else 128},
      mlp_layer_types=["hash_moe" if cfg.is_hash_layer(il) else "moe" for il in range(n)],
      rope_parameters={"rope_type": "yarn", "factor": cfg.yarn_factor,
                       "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow,
                       "original_max_position_embeddings": cfg.yarn_orig_ctx},
      num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1,
  )


def hf_state_dict(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """`{hf_name: array}` from `{gguf_name: array}` (numpy orientation on both sides)."""
  glob = {g: h for h, g in _GLOBAL_MAP.items()}
  per_layer = {g: h for h, g in _LAYER_MAP.items()}
  out: dict[str, np.ndarray] = {}
  for name, arr in tensors.items():
    if name in glob:
      out[glob[name]] = arr
      continue
    _, il, suffix = name.split(".", 2)
    if suffix in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
      continue  # fused below
    if suffix == "exp_probs_b.bias" and cfg.is_hash_layer(int(il)):
      continue  # hash layers route by token id: ds4 ignores the bias, HF has none
    out[f"model.layers.{il}.{per_layer[suffix]}"] = arr
  for il in range(cfg.n_layers):
    gate, up = tensors[f"blk.{il}.ffn_gate_exps.weight"], tensors[f"blk.{il}.ffn_up_exps.weight"]
    out[f"model.layers.{il}.mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
  return out


def hf_model_from_gguf(path: str):
  """An eval-mode f32 eager DeepseekV4ForCausalLM holding the GGUF's (dequantised) weights."""
  from ds4jax import extras
  torch = extras.need("reference", "torch", "the HF benchmark")
  transformers = extras.need("reference", "transformers", "the HF benchmark")
  from ds4jax.gguf.load import load_tensors

  transformers.logging.set_verbosity_error()
  cfg, tensors = load_tensors(path, "all", output=True)
  hcfg = transformers.DeepseekV4Config(**hf_config_kwargs(cfg))
  back = config_from_hf(hcfg)
  if back != cfg.replace(qat=back.qat):
    raise ValueError("the HF config does not describe this GGUF's model exactly")
  hcfg._attn_implementation = "eager"
  torch.manual_seed(0)  # HF's own init is overwritten below; only the buffers it builds stay
  model = transformers.DeepseekV4ForCausalLM(hcfg)
  sd = model.state_dict()
  want = {k for k in sd if not k.endswith("inv_freq")}
  got = hf_state_dict(tensors, cfg)
  if set(got) - set(sd) or want - set(got):
    raise ValueError(f"GGUF -> HF mapping mismatch: missing {sorted(want - set(got))[:3]}, "
                     f"unexpected {sorted(set(got) - set(sd))[:3]}")
  with torch.no_grad():
    for k, arr in got.items():
      sd[k].copy_(torch.as_tensor(np.ascontiguousarray(arr)).to(sd[k].dtype))
  return model.eval().float()


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
