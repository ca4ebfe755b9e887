"""Model configuration and layer ranges.

`ModelConfig` is a frozen, hashable dataclass, so it can be passed to `jax.jit` as a static
argument. It is built from GGUF metadata (`ds4jax.gguf.reader.read_config(path)`, which
checks the metadata's types and calls `ModelConfig.from_metadata`), from the published
DeepSeek V4 Flash dims (`ModelConfig.flash()`), or from tiny CPU test dims
(`ModelConfig.tiny()`, `ModelConfig.bench()`).

`LayerRange` is ds4's inclusive layer slice: `"A:B"`, `"A:output"` or `"all"`; a stage's
device count (`devices_option`) is N >= 1 or `"all"`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping


class ConfigError(ValueError):
  """A GGUF metadata key is missing or malformed, or a config is inconsistent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek V4 hyperparameters. Field names follow ds4-architecture.md §1.1.

  Every per-layer schedule (compress ratio, hash routing, rope kind, indexer) is derived from
  `compress_ratios` and `n_hash_layers`, which come from the GGUF metadata.
  """

  # Number of transformer blocks L.
  n_layers: int = 43
  # Hidden width D.
  d_model: int = 4096
  # Vocabulary size V.
  vocab_size: int = 129280
  # Query heads N (the single shared KV head is implicit).
  n_heads: int = 64
  # KV heads; DeepSeek V4 has exactly one shared K=V head.
  n_kv_heads: int = 1
  # Head dim H (both K and V).
  head_dim: int = 512
  # RoPE dims R, the tail of each head.
  rope_dim: int = 64
  # q LoRA rank.
  q_lora_rank: int = 1024
  # Output projection groups G and the per-group o LoRA rank.
  o_groups: int = 8
  o_lora_rank: int = 1024
  # Routed experts E, experts per token, shared experts.
  n_experts: int = 256
  n_experts_used: int = 6
  n_shared_experts: int = 1
  # Expert (and shared expert) FFN width F.
  expert_ff: int = 2048
  # Layers [0, n_hash_layers) route through the tid2eid table.
  n_hash_layers: int = 3
  # Sliding window W (rows, including the query's own row).
  window: int = 128
  # Compress ratio per layer: 0 = SWA only, 4 = CSA (+ indexer), other = HCA.
  compress_ratios: tuple[int, ...] = ()
  # Indexer heads, head dim and top-k.
  index_heads: int = 64
  index_head_dim: int = 128
  index_topk: int = 512
  # Hyper-connection copies C, Sinkhorn iterations and eps.
  n_hc: int = 4
  sinkhorn_iters: int = 20
  hc_eps: float = 1e-6
  # RMSNorm eps.
  rms_eps: float = 1e-6
  # SwiGLU clamp per layer.
  swiglu_clamp: tuple[float, ...] = ()
  # Routed expert weight scale and normalisation.
  routed_scale: float = 1.5
  norm_topk_prob: bool = True
  # RoPE bases: main (SWA layers) and compress (compressed layers), plus YaRN.
  rope_base: float = 10000.0
  compress_rope_base: float = 160000.0
  yarn_factor: float = 16.0
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_orig_ctx: int = 65536
  # Training context (summary only).
  context_length: int = 1048576
  # Optional QAT-faithful rounding (ds4-architecture.md §2.7): FP8 KV, Hadamard+FP4 indexer.
  qat: bool = False

  def __post_init__(self):
    if not self.compress_ratios:
      object.__setattr__(self, "compress_ratios", flash_schedule(self.n_layers))
    if not self.swiglu_clamp:
      object.__setattr__(self, "swiglu_clamp", (10.0,) * self.n_layers)
    object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
    object.__setattr__(self, "swiglu_clamp", tuple(float(c) for c in self.swiglu_clamp))
    self.validate()

  # ----------------------------------------------------------------------------- validation
  def validate(self) -> None:
    """Raises ConfigError naming the first inconsistent field."""
    if self.n_layers < 1:
      raise ConfigError(f"n_layers must be >= 1, got {self.n_layers}")
    if len(self.compress_ratios) < self.n_layers:
      raise ConfigError(
          f"compress_ratios has {len(self.compress_ratios)} entries, need >= n_layers={self.n_layers}")
    if len(self.swiglu_clamp) < self.n_layers:
      raise ConfigError(
          f"swiglu_clamp has {len(self.swiglu_clamp)} entries, need >= n_layers={self.n_layers}")
    for il in range(self.n_layers):
      if self.compress_ratios[il] < 0:
        raise ConfigError(f"compress_ratios[{il}] is negative")
    if self.n_kv_heads != 1:
      raise ConfigError(f"n_kv_heads must be 1 (one shared KV head), got {self.n_kv_heads}")
    if self.rope_dim % 2 or self.rope_dim > self.head_dim:
      raise ConfigError(f"rope_dim={self.rope_dim} must be even and <= head_dim={self.head_dim}")
    if self.n_heads % self.o_groups:
      raise ConfigError(f"n_heads={self.n_heads} is not divisible by o_groups={self.o_groups}")
    if self.n_experts_used > self.n_experts:
      raise ConfigError(f"n_experts_used={self.n_experts_used} > n_experts={self.n_experts}")
    if any(r == 4 for r in self.compress_ratios[: self.n_layers]) and self.rope_dim > self.index_head_dim:
      raise ConfigError(f"rope_dim={self.rope_dim} must be <= index_head_dim={self.index_head_dim}")

  # ----------------------------------------------------------------------- per-layer schedule
  def ratio(self, il: int) -> int:
    """Compress ratio m of layer il (0 = sliding window only)."""
    return self.compress_ratios[il]

  def has_indexer(self, il: int) -> bool:
    return self.compress_ratios[il] == 4

  def overlap(self, il: int) -> bool:
    """Ratio-4 compressors use overlapping windows (c = 2)."""
    return self.compress_ratios[il] == 4

  def is_hash_layer(self, il: int) -> bool:
    return il < self.n_hash_layers

  def rope_kind(self, il: int) -> str:
    """'main' for SWA-only layers, 'compress' (YaRN) for compressed layers."""
    return "main" if self.compress_ratios[il] == 0 else "compress"

  def layer_kind(self, il: int) -> str:
    m = self.compress_ratios[il]
    return "SWA" if m == 0 else ("CSA" if m == 4 else f"HCA{m}")

  @property
  def hc_mix(self) -> int:
    """Width of the HC mixing vector, (2 + C) * C."""
    return (2 + self.n_hc) * self.n_hc

  # ---------------------------------------------------------------------------- constructors
  @classmethod
  def flash(cls, **overrides) -> "ModelConfig":
    """The published DeepSeek V4 Flash dims (ds4-architecture.md §1.1)."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> "ModelConfig":
    """CPU test dims: SWA, SWA, CSA(4)+indexer, HCA(16); layer 0 hash-routed.

    Dims respect the quant block sizes (Q8_0: 32; K/IQ quants: 256).
    """
    kw: dict[str, Any] = dict(
        n_layers=4, d_model=256, vocab_size=512, n_heads=4, head_dim=128, rope_dim=64,
        q_lora_rank=64, o_groups=2, o_lora_rank=32, n_experts=8, n_experts_used=2,
        n_shared_experts=1, expert_ff=256, n_hash_layers=1, window=8,
        compress_ratios=(0, 0, 4, 16), index_heads=8, index_head_dim=128, index_topk=3,
        context_length=4096,
    )
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def bench(cls, **overrides) -> "ModelConfig":
    """Tens of millions of parameters, window 128, ratios 4 and 128, for speed work."""
    kw: dict[str, Any] = dict(
        n_layers=8, d_model=512, vocab_size=4096, n_heads=8, head_dim=128, rope_dim=64,
        q_lora_rank=256, o_groups=2, o_lora_rank=128, n_experts=16, n_experts_used=4,
        n_shared_experts=1, expert_ff=256, n_hash_layers=2, window=128,
        compress_ratios=(0, 0, 4, 128, 4, 128, 4, 128), index_heads=8, index_head_dim=128,
        index_topk=16, context_length=8192,
    )
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_metadata(cls, meta: Mapping[str, Any], **overrides) -> "ModelConfig":
    """Builds a config from already type-checked `deepseek4.*` metadata values.

    `meta` maps GGUF keys to python values (see `METADATA_KEYS`). Use
    `ds4jax.gguf.reader.read_config` to get it from a file with exact type checks.
    """
    kw: dict[str, Any] = {}
    for key, (field, _kind, required) in METADATA_KEYS.items():
      if key in meta:
        kw[field] = meta[key]
      elif required:
        raise ConfigError(f"missing GGUF metadata key {key!r}")
    for key in ("deepseek4.expert_group_count", "deepseek4.expert_group_used_count"):
      if meta.get(key, 0) not in (0, None):
        raise ConfigError(f"{key}={meta[key]} is not supported (must be 0 or absent)")
    n = kw.get("n_layers")
    for field in ("compress_ratios", "swiglu_clamp"):
      if n is not None and field in kw and len(kw[field]) < n:
        key = {v[0]: k for k, v in METADATA_KEYS.items()}[field]
        raise ConfigError(f"GGUF metadata key {key!r} has {len(kw[field])} entries, need >= {n}")
      if n is not None and field in kw:
        kw[field] = tuple(kw[field])[:n]
    kw.update(overrides)
    try:
      return cls(**kw)
    except ConfigError as e:
      raise ConfigError(f"GGUF metadata is inconsistent: {e}") from None

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def flash_schedule(n_layers: int) -> tuple[int, ...]:
  """ds4's Flash schedule: 0,0 then 4 on even layers and 128 on odd ones."""
  return tuple(0 if il < 2 else (4 if il % 2 == 0 else 128) for il in range(n_layers))


# GGUF key -> (ModelConfig field, GGUF value kind, required). Kinds: 'u32', 'u64' (u32 also
# accepted), 'f32', 'bool', 'u32[]' (u32 or i32 array), 'f32[]'. ds4 requires exact types.
METADATA_KEYS: dict[str, tuple[str, str, bool]] = {
    "deepseek4.block_count": ("n_layers", "u32", True),
    "deepseek4.embedding_length": ("d_model", "u32", True),
    "deepseek4.vocab_size": ("vocab_size", "u32", True),
    "deepseek4.context_length": ("context_length", "u64", False),
    "deepseek4.attention.head_count": ("n_heads", "u32", True),
    "deepseek4.attention.head_count_kv": ("n_kv_heads", "u32", True),
    "deepseek4.attention.key_length": ("head_dim", "u32", True),
    "deepseek4.attention.value_length": ("head_dim", "u32", True),
    "deepseek4.rope.dimension_count": ("rope_dim", "u32", True),
    "deepseek4.attention.q_lora_rank": ("q_lora_rank", "u32", True),
    "deepseek4.attention.output_group_count": ("o_groups", "u32", True),
    "deepseek4.attention.output_lora_rank": ("o_lora_rank", "u32", True),
    "deepseek4.expert_count": ("n_experts", "u32", True),
    "deepseek4.expert_used_count": ("n_experts_used", "u32", True),
    "deepseek4.expert_shared_count": ("n_shared_experts", "u32", True),
    "deepseek4.expert_feed_forward_length": ("expert_ff", "u32", True),
    "deepseek4.hash_layer_count": ("n_hash_layers", "u32", True),
    "deepseek4.attention.sliding_window": ("window", "u32", True),
    "deepseek4.attention.compress_ratios": ("compress_ratios", "u32[]", True),
    "deepseek4.attention.indexer.head_count": ("index_heads", "u32", True),
    "deepseek4.attention.indexer.key_length": ("index_head_dim", "u32", True),
    "deepseek4.attention.indexer.top_k": ("index_topk", "u32", True),
    "deepseek4.hyper_connection.count": ("n_hc", "u32", True),
    "deepseek4.hyper_connection.sinkhorn_iterations": ("sinkhorn_iters", "u32", True),
    "deepseek4.hyper_connection.epsilon": ("hc_eps", "f32", True),
    "deepseek4.attention.layer_norm_rms_epsilon": ("rms_eps", "f32", True),
    "deepseek4.swiglu_clamp_exp": ("swiglu_clamp", "f32[]", True),
    "deepseek4.expert_weights_scale": ("routed_scale", "f32", True),
    "deepseek4.expert_weights_norm": ("norm_topk_prob", "bool", True),
    "deepseek4.rope.freq_base": ("rope_base", "f32", True),
    "deepseek4.attention.compress_rope_freq_base": ("compress_rope_base", "f32", True),
    "deepseek4.rope.scaling.factor": ("yarn_factor", "f32", True),
    "deepseek4.rope.scaling.yarn_beta_fast": ("yarn_beta_fast", "f32", True),
    "deepseek4.rope.scaling.yarn_beta_slow": ("yarn_beta_slow", "f32", True),
    "deepseek4.rope.scaling.original_context_length": ("yarn_orig_ctx", "u64", True),
}


# ----------------------------------------------------------------------------------- ranges
class LayerRangeError(ValueError):
  """A layer range string is malformed or does not fit the model."""


@dataclasses.dataclass(frozen=True, order=True)
class LayerRange:
  """An inclusive layer slice [start, end], plus the output head when `has_output`.

  `embeds` is true when the slice starts at layer 0 (it owns `token_embd`).
  """

  start: int
  end: int
  has_output: bool = False

  @property
  def embeds(self) -> bool:
    return self.start == 0

  @property
  def n_layers(self) -> int:
    return self.end - self.start + 1

  def layers(self) -> range:
    return range(self.start, self.end + 1)

  def __contains__(self, il: int) -> bool:
    return self.start <= il <= self.end

  def __str__(self) -> str:
    return f"{self.start}:{'output' if self.has_output else self.end}"

  def describe(self) -> str:
    return f"{self.start}:{self.end}" + ("+output" if self.has_output else "")

  @classmethod
  def parse(cls, spec: str, n_layers: int | None = None) -> "LayerRange":
    """Parses ds4's inclusive syntax: 'A:B', 'A:output' or 'all'.

    With `n_layers`, the range is also checked against the model and 'A:output' is resolved
    to end = n_layers - 1. Without it, 'A:output' keeps end = -1 until `resolve` is called.
    """
    s = str(spec).strip()
    if s == "all":
      if n_layers is None:
        return cls(0, -1, True)
      return cls(0, n_layers - 1, True)
    if s.count(":") != 1:
      raise LayerRangeError(f"bad layer range {spec!r}: expected A:B, A:output or all")
    a, b = s.split(":")
    if not re.fullmatch(r"\d+", a):
      raise LayerRangeError(f"bad layer range {spec!r}: start {a!r} is not a non-negative integer")
    start = int(a)
    if b == "output":
      rng = cls(start, -1, True)
    else:
      if not re.fullmatch(r"\d+", b):
        raise LayerRangeError(
            f"bad layer range {spec!r}: end {b!r} is not a non-negative integer or 'output'")
      end = int(b)
      if end < start:
        raise LayerRangeError(f"bad layer range {spec!r}: end {end} is before start {start}")
      rng = cls(start, end, False)
    return rng.resolve(n_layers) if n_layers is not None else rng

  def resolve(self, n_layers: int) -> "LayerRange":
    """Resolves 'A:output' and checks the range fits a model of n_layers layers."""
    end = n_layers - 1 if self.end < 0 else self.end
    if self.start > n_layers - 1:
      raise LayerRangeError(
          f"layer range {self} starts past the final model layer {n_layers - 1}")
    if end > n_layers - 1:
      raise LayerRangeError(f"layer range {self} ends past the final model layer {n_layers - 1}")
    if end < self.start:
      raise LayerRangeError(f"layer range {self}: end {end} is before start {self.start}")
    return LayerRange(self.start, end, self.has_output)

  @classmethod
  def full(cls, n_layers: int) -> "LayerRange":
    return cls(0, n_layers - 1, True)


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


# ---------------------------------------------------------------------------------- devices
def devices_option(spec) -> int | str:
  """A `devices` option (`--devices`: the local devices a stage spans) as an int >= 1 or
  "all"; a one-line ValueError otherwise. Whether this host has that many devices is checked
  where the stage is placed (`model.sharding.parse_devices`)."""
  text = str(spec).strip()
  if text == "all":
    return "all"
  if isinstance(spec, bool) or not text.isdigit() or int(text) < 1:
    raise ValueError(f"--devices must be a positive integer or 'all', got {spec!r}")
  return int(text)


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)", re.IGNORECASE)


def expert_cache_option(spec) -> tuple[int | None, int | None]:
  """An expert cache option (`--ssd_streaming_cache_experts`, ds4's semantics) as (a byte
  budget, None) for a size ('32GB', '512MiB': decimal and binary units) or (None, N) for a
  plain N expert slots; a one-line ValueError otherwise."""
  text = str(spec).strip()
  if text.isdigit():
    if int(text) < 1:
      raise ValueError("--ssd_streaming_cache_experts must be at least 1 expert slot")
    return None, int(text)
  m = _SIZE_RE.fullmatch(text)
  if not m:
    raise ValueError(f"--ssd_streaming_cache_experts={text!r}: expected a size (e.g. 32GB, "
                     "512MiB) or a number of expert slots")
  return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]), None


# The named points of a step (issue 22): model/taps.py documents them, runtime/capture.py
# plans their capture. Points computed inside a layer's step, in the order a layer passes
# them; then the lens (the head on a layer's hc_out) and the model's logits.
STEP_POINTS = ("attn_out", "router_scores", "router_ids", "router_weights", "ffn_out", "hc_out")
LAYER_POINTS = STEP_POINTS + ("lens",)
POINTS = LAYER_POINTS + ("logits",)


def point_shape(cfg: ModelConfig, point: str) -> tuple[int, ...]:
  """The per-row shape of a named point for this model, e.g. (C, D) for hc_out."""
  shapes = {
      "attn_out": (cfg.d_model,), "ffn_out": (cfg.d_model,),
      "hc_out": (cfg.n_hc, cfg.d_model), "router_ids": (cfg.n_experts_used,),
      "router_weights": (cfg.n_experts_used,), "router_scores": (cfg.n_experts,),
      "lens": (cfg.vocab_size,), "logits": (cfg.vocab_size,),
  }
  if point not in shapes:
    raise ValueError(f"unknown capture point {point!r} (known: {', '.join(POINTS)})")
  return shapes[point]


def point_name(point: str, layer: int | None) -> str:
  """The key of a captured array: "{point}.{layer}", or "logits"."""
  return point if layer is None else f"{point}.{layer}"


def split_point_name(key: str) -> tuple[str, int | None]:
  """Inverse of `point_name`: "ffn_out.3" -> ("ffn_out", 3), "logits" -> ("logits", None)."""
  point, _, layer = key.partition(".")
  if point not in POINTS or (point == "logits") != (layer == "") or not (
      layer == "" or layer.isdigit()):
    raise ValueError(f"bad capture name {key!r} (expected point.layer or logits)")
  return point, (int(layer) if layer else None)


__all__ = [
    "ConfigError", "ModelConfig", "METADATA_KEYS", "LayerRange", "LayerRangeError",
    "LAYER_POINTS", "POINTS", "STEP_POINTS", "ceil_div", "devices_option", "flash_schedule",
    "point_name", "point_shape", "split_point_name",
]
