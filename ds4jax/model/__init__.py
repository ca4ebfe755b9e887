"""DeepSeek V4 in Flax NNX: one module per component, a Stage per layer range, a jitted runner.

Shape alphabet (array names carry their shape as a suffix, e.g. `x_TCD`, `logits_TV`):

  B batch           T new tokens (chunk rows)   S cache slots / raw rows
  D model width     N query heads               K kv heads, or selected entries (top-k)
  H head dim        R rope dims, or q-LoRA rank I indexer head dim, or grouped input width
  C HC copies       E experts                   F expert FFN width
  W compressed windows                          V vocab            L layers
  G output groups   M HC mix width / window rows X a flattened projection width

Modules: norms (RMSNorm), rope (RoPE main/compress + inverse), hyper_connections
(HyperConnection, Head), attention, compressor, indexer, moe, block, stage (Stage, Embed),
decode_state (StageState pytrees), qat, sharding (placement). The runtime (runner, loader,
batcher) lives in `ds4jax.runtime`.
"""

from ds4jax.model.decode_state import LayerState, StageState
from ds4jax.model.stage import Stage

__all__ = ["LayerState", "Stage", "StageState"]
