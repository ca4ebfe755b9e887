"""A tiny HF DeepseekV4ForCausalLM with every parameter and buffer re-randomised (the oracle).

Layers: SWA (hash-routed), SWA, CSA (ratio 4, 8 indexer heads, top-k 3), HCA (ratio 8).
HF's init leaves sinks, position biases, tid2eid and the router bias at 0 and the HC scales
at 1, which would hide bugs, so everything is redrawn here, seeded.
"""

from __future__ import annotations

import numpy as np

HF_KWARGS = dict(
    vocab_size=320, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=1, head_dim=32, partial_rotary_factor=8 / 32,
    q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, sliding_window=8, index_n_heads=8, index_head_dim=16, index_topk=3,
    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, swiglu_limit=10.0,
    routed_scaling_factor=1.5, max_position_embeddings=4096, rope_theta=10000.0,
    compress_rope_theta=160000.0,
    layer_types=["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                 "heavily_compressed_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 65536},
    num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1,
)


def build_hf_model(seed: int = 0, **overrides):
  """Returns an eval-mode f32 HF model with all weights redrawn from `seed`."""
  import torch
  import transformers

  transformers.logging.set_verbosity_error()
  cfg = transformers.DeepseekV4Config(**{**HF_KWARGS, **overrides})
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.DeepseekV4ForCausalLM(cfg).eval().float()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(_draw(name, tuple(p.shape), gen, cfg))
    for name, b in model.named_buffers():
      if name.endswith("tid2eid"):
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        rows = [torch.randperm(e, generator=gen)[:k] for _ in range(b.shape[0])]
        b.copy_(torch.stack(rows).to(b.dtype))
      elif name.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn(b.shape, generator=gen))
  return model, cfg


def _draw(name: str, shape: tuple, gen, cfg):
  import torch

  randn = lambda: torch.randn(shape, generator=gen)  # noqa: E731
  leaf = name.rsplit(".", 1)[-1]
  if "norm" in name and leaf == "weight":
    return 1.0 + 0.1 * randn()
  if leaf == "sinks":
    return 0.5 * randn()
  if leaf == "position_bias":
    return 0.5 * randn()
  if leaf in ("base", "hc_base"):
    return 0.3 * randn()
  if leaf in ("scale", "hc_scale"):
    return 1.0 + 0.3 * randn()
  if name.endswith("embed_tokens.weight"):
    return randn()
  if leaf in ("fn", "hc_fn"):
    return randn() / np.sqrt(shape[-1])
  # projections and experts: 1/sqrt(fan_in) keeps activations O(1)
  return randn() / np.sqrt(shape[-1])


def hf_logits(model, ids: np.ndarray, chunks=None) -> np.ndarray:
  """Logits [T, V] for ids, one-shot or through HF's cache in the given chunk sizes."""
  import torch

  with torch.no_grad():
    if chunks is None:
      return model(torch.as_tensor(ids[None]).long()).logits[0].float().numpy()
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    outs, s = [], 0
    for n in chunks:
      out = model(torch.as_tensor(ids[None, s:s + n]).long(), cache=cache, use_cache=True)
      cache = out.cache
      outs.append(out.logits[0].float().numpy())
      s += n
    return np.concatenate(outs, axis=0)
