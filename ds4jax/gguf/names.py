"""The one table mapping ds4 GGUF tensor names to parameter paths (docs/design.md §2).

No GGUF tensor name appears anywhere else in ds4jax. Each `TensorSpec` gives:

- `template`: the GGUF name, with `{i}` for the absolute layer index of `blk.*` tensors;
- `path`: the `nnx.State` path, with the string `"{i}"` where the layer index goes
  (`param_path` / `local_path` fill it in as an int);
- `ggml_dims(cfg, il)`: the expected GGUF dims (`ne` order, fastest axis first); the loaded
  numpy array has the reversed shape (`numpy_shape`);
- `ds4_type` and `types`: the type ds4 writes and the types ds4jax accepts;
- `presence`: when the tensor exists (`PRESENCE`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator

from gguf import GGMLQuantizationType as Q

from ds4jax.config import LayerRange, ModelConfig

# Presence conditions.
ALL = "all"              # every layer (or: the global tensor's owner, embed or head)
COMPRESSED = "m>0"       # layers with a compressor (ratio > 0)
INDEXER = "m==4"         # CSA layers (ratio == 4) carry the indexer
HASH = "hash"            # hash-routed layers (il < n_hash_layers), required there
OPTIONAL = "optional"    # may be present on any layer (router bias); zeros if absent
PRESENCE = (ALL, COMPRESSED, INDEXER, HASH, OPTIONAL)

# Where a tensor lives in the stage.
EMBED, HEAD, LAYER = "embed", "head", "layer"

# Converted HF checkpoints are float, so every float tensor also accepts these.
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
EXPERT_TYPES = frozenset({Q.IQ2_XXS, Q.Q2_K, Q.Q4_K, Q.Q8_0, Q.MXFP4}) | FLOAT_TYPES
INT_TYPES = frozenset({Q.I32})


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One row of the name table (see module docstring)."""

  template: str
  path: tuple[str, ...]
  ggml_dims: Callable[[ModelConfig, int], tuple[int, ...]]
  ds4_type: Q
  types: frozenset
  presence: str = ALL
  scope: str = LAYER

  @property
  def is_expert(self) -> bool:
    return self.template.endswith("_exps.weight")

  def name(self, il: int | None = None) -> str:
    return self.template.format(i=il) if self.scope == LAYER else self.template

  def numpy_shape(self, cfg: ModelConfig, il: int = -1) -> tuple[int, ...]:
    """The loaded array's shape: the reversed GGUF dims."""
    return tuple(reversed(self.ggml_dims(cfg, il)))

  def present(self, cfg: ModelConfig, il: int, *, optional: bool) -> bool:
    """Whether layer il carries this tensor (optional ones only when `optional`)."""
    if self.presence == ALL:
      return True
    if self.presence == COMPRESSED:
      return cfg.ratio(il) > 0
    if self.presence == INDEXER:
      return cfg.has_indexer(il)
    if self.presence == HASH:
      return cfg.is_hash_layer(il)
    return optional


def _c(cfg: ModelConfig, il: int) -> int:
  """Compressor width multiplier: overlapping (ratio 4) compressors keep 2 windows."""
  return 2 if cfg.overlap(il) else 1


def _spec(template, path, dims, ds4_type, *, presence=ALL, scope=LAYER, types=None):
  if types is None:
    types = INT_TYPES if ds4_type == Q.I32 else (frozenset({ds4_type}) | FLOAT_TYPES)
  return TensorSpec(template, tuple(path.split(".")), dims, ds4_type, frozenset(types),
                    presence, scope)


def _hc(kind: str) -> list[TensorSpec]:
  """The three mHC tensors of one set ('attn' or 'ffn')."""
  return [
      _spec(f"blk.{{i}}.hc_{kind}_fn.weight", f"blocks.{{i}}.hc_{kind}.fn",
            lambda c, il: (c.n_hc * c.d_model, c.hc_mix), Q.F16),
      _spec(f"blk.{{i}}.hc_{kind}_base.weight", f"blocks.{{i}}.hc_{kind}.base",
            lambda c, il: (c.hc_mix,), Q.F32),
      _spec(f"blk.{{i}}.hc_{kind}_scale.weight", f"blocks.{{i}}.hc_{kind}.scale",
            lambda c, il: (3,), Q.F32),
  ]


SPECS: tuple[TensorSpec, ...] = tuple([
    # ---------------------------------------------------------------------------- globals
    _spec("token_embd.weight", "embed.embedding", lambda c, il: (c.d_model, c.vocab_size),
          Q.F16, scope=EMBED),
    _spec("output_hc_fn.weight", "head.hc_fn", lambda c, il: (c.n_hc * c.d_model, c.n_hc),
          Q.F16, scope=HEAD),
    _spec("output_hc_base.weight", "head.hc_base", lambda c, il: (c.n_hc,), Q.F32, scope=HEAD),
    _spec("output_hc_scale.weight", "head.hc_scale", lambda c, il: (1,), Q.F32, scope=HEAD),
    _spec("output_norm.weight", "head.norm.scale", lambda c, il: (c.d_model,), Q.F32,
          scope=HEAD),
    _spec("output.weight", "head.out", lambda c, il: (c.d_model, c.vocab_size), Q.Q8_0,
          scope=HEAD),
    # ---------------------------------------------------------------------------- attention
    *_hc("attn"),
    _spec("blk.{i}.attn_norm.weight", "blocks.{i}.attn_norm.scale",
          lambda c, il: (c.d_model,), Q.F32),
    _spec("blk.{i}.attn_q_a.weight", "blocks.{i}.attn.q_a",
          lambda c, il: (c.d_model, c.q_lora_rank), Q.Q8_0),
    _spec("blk.{i}.attn_q_a_norm.weight", "blocks.{i}.attn.q_a_norm.scale",
          lambda c, il: (c.q_lora_rank,), Q.F32),
    _spec("blk.{i}.attn_q_b.weight", "blocks.{i}.attn.q_b",
          lambda c, il: (c.q_lora_rank, c.n_heads * c.head_dim), Q.Q8_0),
    _spec("blk.{i}.attn_kv.weight", "blocks.{i}.attn.kv",
          lambda c, il: (c.d_model, c.head_dim), Q.Q8_0),
    _spec("blk.{i}.attn_kv_a_norm.weight", "blocks.{i}.attn.kv_norm.scale",
          lambda c, il: (c.head_dim,), Q.F32),
    _spec("blk.{i}.attn_sinks.weight", "blocks.{i}.attn.sinks",
          lambda c, il: (c.n_heads,), Q.F32),
    _spec("blk.{i}.attn_output_a.weight", "blocks.{i}.attn.o_a",
          lambda c, il: (c.n_heads // c.o_groups * c.head_dim, c.o_groups * c.o_lora_rank),
          Q.Q8_0),
    _spec("blk.{i}.attn_output_b.weight", "blocks.{i}.attn.o_b",
          lambda c, il: (c.o_groups * c.o_lora_rank, c.d_model), Q.Q8_0),
    # --------------------------------------------------------------------------- compressor
    _spec("blk.{i}.attn_compressor_ape.weight", "blocks.{i}.attn.compressor.ape",
          lambda c, il: (_c(c, il) * c.head_dim, c.ratio(il)), Q.F16, presence=COMPRESSED),
    _spec("blk.{i}.attn_compressor_kv.weight", "blocks.{i}.attn.compressor.kv",
          lambda c, il: (c.d_model, _c(c, il) * c.head_dim), Q.F16, presence=COMPRESSED),
    _spec("blk.{i}.attn_compressor_gate.weight", "blocks.{i}.attn.compressor.gate",
          lambda c, il: (c.d_model, _c(c, il) * c.head_dim), Q.F16, presence=COMPRESSED),
    _spec("blk.{i}.attn_compressor_norm.weight", "blocks.{i}.attn.compressor.norm.scale",
          lambda c, il: (c.head_dim,), Q.F32, presence=COMPRESSED),
    # ------------------------------------------------------------------------------ indexer
    _spec("blk.{i}.indexer.attn_q_b.weight", "blocks.{i}.attn.indexer.q_b",
          lambda c, il: (c.q_lora_rank, c.index_heads * c.index_head_dim), Q.F16,
          presence=INDEXER),
    _spec("blk.{i}.indexer.proj.weight", "blocks.{i}.attn.indexer.proj",
          lambda c, il: (c.d_model, c.index_heads), Q.F16, presence=INDEXER),
    _spec("blk.{i}.indexer_compressor_ape.weight", "blocks.{i}.attn.indexer.compressor.ape",
          lambda c, il: (2 * c.index_head_dim, 4), Q.F16, presence=INDEXER),
    _spec("blk.{i}.indexer_compressor_kv.weight", "blocks.{i}.attn.indexer.compressor.kv",
          lambda c, il: (c.d_model, 2 * c.index_head_dim), Q.F16, presence=INDEXER),
    _spec("blk.{i}.indexer_compressor_gate.weight", "blocks.{i}.attn.indexer.compressor.gate",
          lambda c, il: (c.d_model, 2 * c.index_head_dim), Q.F16, presence=INDEXER),
    _spec("blk.{i}.indexer_compressor_norm.weight",
          "blocks.{i}.attn.indexer.compressor.norm.scale",
          lambda c, il: (c.index_head_dim,), Q.F32, presence=INDEXER),
    # ---------------------------------------------------------------------------------- MoE
    *_hc("ffn"),
    _spec("blk.{i}.ffn_norm.weight", "blocks.{i}.ffn_norm.scale",
          lambda c, il: (c.d_model,), Q.F32),
    _spec("blk.{i}.ffn_gate_inp.weight", "blocks.{i}.moe.gate",
          lambda c, il: (c.d_model, c.n_experts), Q.F16),
    _spec("blk.{i}.exp_probs_b.bias", "blocks.{i}.moe.bias",
          lambda c, il: (c.n_experts,), Q.F32, presence=OPTIONAL),
    _spec("blk.{i}.ffn_gate_tid2eid.weight", "blocks.{i}.moe.tid2eid",
          lambda c, il: (c.n_experts_used, c.vocab_size), Q.I32, presence=HASH),
    _spec("blk.{i}.ffn_gate_exps.weight", "blocks.{i}.moe.gate_exps",
          lambda c, il: (c.d_model, c.expert_ff, c.n_experts), Q.IQ2_XXS, types=EXPERT_TYPES),
    _spec("blk.{i}.ffn_up_exps.weight", "blocks.{i}.moe.up_exps",
          lambda c, il: (c.d_model, c.expert_ff, c.n_experts), Q.IQ2_XXS, types=EXPERT_TYPES),
    _spec("blk.{i}.ffn_down_exps.weight", "blocks.{i}.moe.down_exps",
          lambda c, il: (c.expert_ff, c.d_model, c.n_experts), Q.Q2_K, types=EXPERT_TYPES),
    _spec("blk.{i}.ffn_gate_shexp.weight", "blocks.{i}.moe.shared_gate",
          lambda c, il: (c.d_model, c.expert_ff), Q.Q8_0),
    _spec("blk.{i}.ffn_up_shexp.weight", "blocks.{i}.moe.shared_up",
          lambda c, il: (c.d_model, c.expert_ff), Q.Q8_0),
    _spec("blk.{i}.ffn_down_shexp.weight", "blocks.{i}.moe.shared_down",
          lambda c, il: (c.expert_ff, c.d_model), Q.Q8_0),
])

_GLOBAL_BY_NAME = {s.template: s for s in SPECS if s.scope != LAYER}
_LAYER_BY_SUFFIX = {s.template[len("blk.{i}."):]: s for s in SPECS if s.scope == LAYER}
_BLK_RE = re.compile(r"blk\.(0|[1-9]\d*)\.(.+)")


class UnknownTensorError(KeyError):
  """A tensor name that is not part of the ds4 layout."""

  def __str__(self) -> str:
    return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Entry:
  """One concrete tensor of a model: name, spec and absolute layer (-1 for globals)."""

  name: str
  spec: TensorSpec
  layer: int
  required: bool

  def ggml_dims(self, cfg: ModelConfig) -> tuple[int, ...]:
    return self.spec.ggml_dims(cfg, self.layer)

  def numpy_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
    return self.spec.numpy_shape(cfg, self.layer)


def lookup(name: str) -> tuple[TensorSpec, int]:
  """Returns (spec, absolute layer or -1) for a GGUF tensor name; UnknownTensorError if none."""
  spec = _GLOBAL_BY_NAME.get(name)
  if spec is not None:
    return spec, -1
  m = _BLK_RE.fullmatch(name)
  if m and m.group(2) in _LAYER_BY_SUFFIX:
    return _LAYER_BY_SUFFIX[m.group(2)], int(m.group(1))
  raise UnknownTensorError(f"tensor {name!r} is not part of the ds4 layout")


def entries(cfg: ModelConfig, layers: LayerRange, *, optional: bool = True) -> Iterator[Entry]:
  """Every tensor a slice owns, in canonical order (embed, blocks, head).

  With `optional`, the optional tensors (router bias) are listed for every layer; whether a
  file carries them is the file's business.
  """
  layers = layers.resolve(cfg.n_layers)
  if layers.embeds:
    for s in SPECS:
      if s.scope == EMBED:
        yield Entry(s.name(), s, -1, True)
  for il in layers.layers():
    for s in SPECS:
      if s.scope == LAYER and s.present(cfg, il, optional=optional):
        yield Entry(s.name(il), s, il, s.presence != OPTIONAL)
  if layers.has_output:
    for s in SPECS:
      if s.scope == HEAD:
        yield Entry(s.name(), s, -1, True)


def tensor_names(cfg: ModelConfig, layers: LayerRange, *, optional: bool = False) -> list[str]:
  """Expected GGUF names of a slice: the required ones, plus the optional ones if asked."""
  return [e.name for e in entries(cfg, layers, optional=optional)]


def ds4_tensor_names(cfg: ModelConfig, layers: LayerRange) -> list[str]:
  """The names a ds4 file carries: required ones plus the router bias on non-hash layers."""
  return [e.name for e in entries(cfg, layers)
          if e.required or not cfg.is_hash_layer(e.layer)]


def same_type_groups(il: int) -> list[tuple[str, ...]]:
  """Tensors of layer il that ds4 requires to share one GGML type (gate and up experts)."""
  return [(_LAYER_BY_SUFFIX["ffn_gate_exps.weight"].name(il),
           _LAYER_BY_SUFFIX["ffn_up_exps.weight"].name(il))]


def param_path(name: str) -> tuple:
  """The absolute parameter path of a GGUF name, e.g. ('blocks', 3, 'attn', 'q_a')."""
  spec, il = lookup(name)
  return tuple(il if p == "{i}" else p for p in spec.path)


def local_path(name: str, layers: LayerRange) -> tuple:
  """The stage-local path: the `blocks` index is made relative to `layers.start`."""
  spec, il = lookup(name)
  if spec.scope == LAYER and il not in layers:
    raise UnknownTensorError(f"tensor {name!r} is outside layer range {layers.describe()}")
  return tuple(il - layers.start if p == "{i}" else p for p in spec.path)


def owner(name: str, layers: LayerRange) -> bool:
  """Whether the slice `layers` owns tensor `name` (layers must be resolved)."""
  spec, il = lookup(name)
  if spec.scope == EMBED:
    return layers.embeds
  if spec.scope == HEAD:
    return layers.has_output
  return il in layers
