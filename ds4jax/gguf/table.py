"""The tensor table of a ds4 file from its config and quant recipe alone: name, GGML type,
dims and bytes of every tensor, without any data.

Used to plan hosts for a model that is not on disk (`ds4jax.partition.memory`) and to write
fixtures tensor by tensor (`ds4jax.gguf.tiny.make_streamed_gguf`). The types follow the
writer: `experts` picks the routed expert types (ds4's "q2" is `iq2`: IQ2_XXS gate/up, Q2_K
down), `types` the other tensors (`writer.policy_type`: ds4's mix, or F32 everywhere).
"""

from __future__ import annotations

import dataclasses
import math

import gguf
from gguf import GGMLQuantizationType as Q

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf import names
from ds4jax.gguf.writer import policy_type

EXPERT_RECIPES = {
    "iq2": (Q.IQ2_XXS, Q.Q2_K),   # ds4 "q2": IQ2_XXS gate/up, Q2_K down
    "q4": (Q.Q4_K, Q.Q4_K),       # ds4 "q4"
    "q8": (Q.Q8_0, Q.Q8_0),
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of the table. `layer` is -1 for the embedding and head tensors."""

  name: str
  spec: names.TensorSpec
  layer: int
  qtype: Q
  ggml_dims: tuple[int, ...]

  @property
  def numpy_shape(self) -> tuple[int, ...]:
    return tuple(reversed(self.ggml_dims))

  @property
  def nbytes(self) -> int:
    return tensor_nbytes(self.qtype, self.ggml_dims)


def tensor_nbytes(qtype: Q, ggml_dims) -> int:
  """Bytes of a tensor of `qtype` with `ggml_dims`, as a GGUF stores it (no padding)."""
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  n = math.prod(int(d) for d in ggml_dims)
  if int(ggml_dims[0]) % block:
    raise ValueError(f"dims {list(ggml_dims)}: ne[0] is not a multiple of the "
                     f"{qtype.name} block size {block}")
  return n // block * type_size


def check_recipe(experts: str) -> None:
  if experts not in EXPERT_RECIPES:
    raise ValueError(f"unknown expert recipe {experts!r}: expected one of {sorted(EXPERT_RECIPES)}")


def expert_type(spec: names.TensorSpec, experts: str) -> Q:
  """The routed expert type of `spec` under recipe `experts`."""
  check_recipe(experts)
  gate_up_t, down_t = EXPERT_RECIPES[experts]
  return down_t if spec.path[-1] == "down_exps" else gate_up_t


def tensor_type(spec: names.TensorSpec, experts: str = "iq2", types: str = "ds4") -> Q:
  """The GGML type the fixture writer gives `spec` (float q8 experts follow `types`)."""
  if spec.is_expert and experts != "q8":
    return expert_type(spec, experts)
  return policy_type(spec, types)


def tensor_table(cfg: ModelConfig, *, experts: str = "iq2", types: str = "ds4",
                 layers: LayerRange | None = None) -> list[TensorInfo]:
  """Every tensor a ds4 file of `cfg` carries, in file order (router bias on non-hash layers
  only, as ds4's files have it)."""
  check_recipe(experts)
  layers = (layers or LayerRange.parse("all")).resolve(cfg.n_layers)
  out = []
  for name in names.ds4_tensor_names(cfg, layers):
    spec, il = names.lookup(name)
    out.append(TensorInfo(name, spec, il, tensor_type(spec, experts, types),
                          tuple(int(d) for d in spec.ggml_dims(cfg, il))))
  return out


def layer_bytes(table, n_layers: int, *, resident_only: bool = False
                ) -> tuple[int, list[int], int]:
  """(embedding bytes, bytes per layer, head bytes), like `DS4File.layer_bytes`;
  `resident_only`: without the routed experts (what stays resident under --ssd_streaming)."""
  embed, head, per_layer = 0, 0, [0] * n_layers
  for t in table:
    if resident_only and t.spec.is_expert:
      continue
    if t.spec.scope == names.EMBED:
      embed += t.nbytes
    elif t.spec.scope == names.HEAD:
      head += t.nbytes
    else:
      per_layer[t.layer] += t.nbytes
  return embed, per_layer, head
