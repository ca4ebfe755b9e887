"""The one HF converter: a HF `DeepseekV4ForCausalLM` (state dict + config) into a ds4-layout
GGUF, and back: a ds4 GGUF's weights in HF transformers (the reference model of the parity
tests and the benchmark).

    from ds4jax.gguf.hf import hf_to_gguf, hf_model_from_gguf
    hf_to_gguf(model, model.config, "my-model.gguf", types="f32")
    reference = hf_model_from_gguf("my-model.gguf")  # torch CPU, eager, float32

`types="f32"` keeps every float tensor in F32 (exact); `types="ds4"` uses ds4's mix where
gguf-py can quantise (routed experts become Q8_0). The HF -> GGUF names follow
ds4-architecture.md §4.2; HF's fused `gate_up_proj` [E, 2F, D] is split gate first. Back to
HF, the tensors are dequantised to float32 and the config round trip
(`config_from_hf(hf_config_from_cfg(cfg)) == cfg`) is checked, so a field that does not
survive the mapping is an error rather than a silently different model.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from ds4jax import extras
from ds4jax.config import ModelConfig


# HF name (after `model.layers.{i}.`) -> GGUF name suffix (after `blk.{i}.`).
_LAYER_MAP = {
    "attn_hc.fn": "hc_attn_fn.weight",
    "attn_hc.base": "hc_attn_base.weight",
    "attn_hc.scale": "hc_attn_scale.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_norm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_proj.weight": "attn_kv.weight",
    "self_attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "self_attn.sinks": "attn_sinks.weight",
    "self_attn.o_a_proj.weight": "attn_output_a.weight",
    "self_attn.o_b_proj.weight": "attn_output_b.weight",
    "self_attn.compressor.position_bias": "attn_compressor_ape.weight",
    "self_attn.compressor.kv_proj.weight": "attn_compressor_kv.weight",
    "self_attn.compressor.gate_proj.weight": "attn_compressor_gate.weight",
    "self_attn.compressor.kv_norm.weight": "attn_compressor_norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "indexer.attn_q_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "indexer.proj.weight",
    "self_attn.compressor.indexer.position_bias": "indexer_compressor_ape.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "indexer_compressor_kv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "indexer_compressor_gate.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "indexer_compressor_norm.weight",
    "ffn_hc.fn": "hc_ffn_fn.weight",
    "ffn_hc.base": "hc_ffn_base.weight",
    "ffn_hc.scale": "hc_ffn_scale.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.gate.tid2eid": "ffn_gate_tid2eid.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.hc_head.hc_fn": "output_hc_fn.weight",
    "model.hc_head.hc_base": "output_hc_base.weight",
    "model.hc_head.hc_scale": "output_hc_scale.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _get(cfg: Any, key: str, default=None):
  return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def config_from_hf(hf_config: Any) -> ModelConfig:
  """ModelConfig from a HF DeepseekV4Config (or its dict), schedule and YaRN included."""
  if _get(hf_config, "scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
    raise ValueError(f"unsupported scoring_func {_get(hf_config, 'scoring_func')!r}: "
                     "ds4 routes with sqrtsoftplus")
  n = int(_get(hf_config, "num_hidden_layers"))
  rates = dict(_get(hf_config, "compress_rates") or {})
  ratio_of = {"sliding_attention": 0, "compressed_sparse_attention":
              int(rates.get("compressed_sparse_attention", 4)),
              "heavily_compressed_attention": int(rates.get("heavily_compressed_attention", 128))}
  if ratio_of["compressed_sparse_attention"] != 4:
    raise ValueError("CSA compress rate must be 4 (ds4 derives overlap and indexer from it)")
  ratios = tuple(ratio_of[t] for t in _get(hf_config, "layer_types"))
  mlp_types = list(_get(hf_config, "mlp_layer_types"))
  n_hash = sum(1 for t in mlp_types if t == "hash_moe")
  if mlp_types[:n_hash] != ["hash_moe"] * n_hash:
    raise ValueError("hash_moe layers must be a prefix of mlp_layer_types")
  rope = _get(hf_config, "rope_parameters") or {}
  main, comp = rope.get("main", {}), rope.get("compress", {})
  yarn = comp.get("rope_type") == "yarn"
  head_dim = int(_get(hf_config, "head_dim"))
  return ModelConfig(
      n_layers=n, d_model=int(_get(hf_config, "hidden_size")),
      vocab_size=int(_get(hf_config, "vocab_size")),
      n_heads=int(_get(hf_config, "num_attention_heads")),
      n_kv_heads=int(_get(hf_config, "num_key_value_heads")), head_dim=head_dim,
      rope_dim=int(round(head_dim * float(_get(hf_config, "partial_rotary_factor")))),
      q_lora_rank=int(_get(hf_config, "q_lora_rank")), o_groups=int(_get(hf_config, "o_groups")),
      o_lora_rank=int(_get(hf_config, "o_lora_rank")),
      n_experts=int(_get(hf_config, "n_routed_experts")),
      n_experts_used=int(_get(hf_config, "num_experts_per_tok")),
      n_shared_experts=int(_get(hf_config, "n_shared_experts")),
      expert_ff=int(_get(hf_config, "moe_intermediate_size")), n_hash_layers=n_hash,
      window=int(_get(hf_config, "sliding_window")), compress_ratios=ratios,
      index_heads=int(_get(hf_config, "index_n_heads")),
      index_head_dim=int(_get(hf_config, "index_head_dim")),
      index_topk=int(_get(hf_config, "index_topk")), n_hc=int(_get(hf_config, "hc_mult")),
      sinkhorn_iters=int(_get(hf_config, "hc_sinkhorn_iters")),
      hc_eps=float(_get(hf_config, "hc_eps")), rms_eps=float(_get(hf_config, "rms_norm_eps")),
      swiglu_clamp=(float(_get(hf_config, "swiglu_limit")),) * n,
      routed_scale=float(_get(hf_config, "routed_scaling_factor")),
      norm_topk_prob=bool(_get(hf_config, "norm_topk_prob")),
      rope_base=float(main.get("rope_theta", _get(hf_config, "rope_theta"))),
      compress_rope_base=float(comp.get("rope_theta", _get(hf_config, "compress_rope_theta"))),
      yarn_factor=float(comp.get("factor", 1.0)) if yarn else 1.0,
      yarn_beta_fast=float(comp.get("beta_fast") or 32.0),
      yarn_beta_slow=float(comp.get("beta_slow") or 1.0),
      yarn_orig_ctx=int(comp.get("original_max_position_embeddings", 65536)),
      context_length=int(_get(hf_config, "max_position_embeddings")),
  )


def _numpy(t) -> np.ndarray:
  if hasattr(t, "detach"):
    t = t.detach().cpu()
    if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
      t = t.float()
    return t.numpy()
  return np.asarray(t)


def tensors_from_hf(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """`{gguf_name: array}` (float32, int32 tid2eid) from a HF state dict."""
  out: dict[str, np.ndarray] = {}
  f = cfg.expert_ff
  for hf_name, value in state_dict.items():
    arr = _numpy(value)
    if hf_name in _GLOBAL_MAP:
      out[_GLOBAL_MAP[hf_name]] = arr.astype(np.float32)
      continue
    if not hf_name.startswith("model.layers."):
      continue  # rotary buffers and the like
    il_str, rest = hf_name[len("model.layers."):].split(".", 1)
    il = int(il_str)
    if rest == "mlp.experts.gate_up_proj":
      out[f"blk.{il}.ffn_gate_exps.weight"] = arr[:, :f].astype(np.float32)
      out[f"blk.{il}.ffn_up_exps.weight"] = arr[:, f:].astype(np.float32)
      continue
    suffix = _LAYER_MAP.get(rest)
    if suffix is None:
      continue
    if suffix == "exp_probs_b.bias" and cfg.is_hash_layer(il):
      continue  # ds4 ignores the bias on hash layers (HF keeps none there either)
    if suffix == "ffn_gate_tid2eid.weight":
      out[f"blk.{il}.{suffix}"] = arr.astype(np.int32)
    else:
      out[f"blk.{il}.{suffix}"] = arr.astype(np.float32)
  return out


def hf_to_gguf(hf_model_or_state_dict: Any, hf_config: Any, path: str | os.PathLike, *,
               types: str = "f32", tokenizer=None) -> str:
  """Writes a HF DeepseekV4ForCausalLM (module or state dict) as a ds4-layout GGUF."""
  from ds4jax.gguf.writer import write_gguf  # deferred: keeps the HF half light
  sd = (hf_model_or_state_dict.state_dict() if hasattr(hf_model_or_state_dict, "state_dict")
        else hf_model_or_state_dict)
  cfg = config_from_hf(hf_config)
  return write_gguf(path, cfg, tensors_from_hf(sd, cfg), types=types, tokenizer=tokenizer,
                    name="ds4jax-from-hf")


# ------------------------------------------------------------------------ GGUF -> HF (reference)
_HCA = "heavily_compressed_attention"
_CSA = "compressed_sparse_attention"


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


def hf_config_from_cfg(cfg: ModelConfig):
  """A transformers DeepseekV4Config (eager attention) with cfg's dims and schedule."""
  transformers = extras.need("reference", "transformers", "the HF reference model")
  hcfg = transformers.DeepseekV4Config(**hf_config_kwargs(cfg))
  hcfg._attn_implementation = "eager"
  return hcfg


def hf_state_dict(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """`{hf_name: array}` from whole-model `{gguf_name: array}` (numpy orientation on both
  sides; HF's fused gate_up_proj is the gate and up experts concatenated)."""
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


def hf_model_from_gguf(path: str | os.PathLike):
  """An eval-mode float32 eager DeepseekV4ForCausalLM holding the GGUF's (dequantised)
  weights; ValueError if HF cannot describe this model exactly."""
  torch = extras.need("reference", "torch", "the HF reference model")
  transformers = extras.need("reference", "transformers", "the HF reference model")
  from ds4jax.gguf.load import load_tensors

  transformers.logging.set_verbosity_error()
  cfg, tensors = load_tensors(path, "all", output=True)
  hcfg = hf_config_from_cfg(cfg)
  back = config_from_hf(hcfg)
  if back != cfg.replace(qat=back.qat):
    raise ValueError("the HF config does not describe this GGUF's model exactly")
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
