"""Host memory planning: what each host of a contiguous layer split holds (weights plus decode
state) and whether it fits in a given host memory.

Weights come from a file's tensor table (`DS4File.layer_bytes`) or from metadata alone
(`ds4jax.gguf.table.tensor_table`: names, dims and GGML type sizes), so a model that is not on
disk can be planned. The decode state is sized by `jax.eval_shape` on
`decode_state.init_layer_state`, i.e. exactly the buffers a runner allocates for `ctx` tokens
and chunks of `max_chunk` rows (no memory is allocated to find out).

A host needs `weights + state`, plus an allowance for everything else (runtime, compiled
programs, activations of a prefill chunk, allocator slack, the embedding-row / logits
buffers): by default 25% of `weights + state` plus a fixed 1.5 GB (`Overhead`). This is an
allowance, not a measurement. One measurement (CPU, packed weights, ctx 256): layers 3:output
of a 4-layer Flash-dims file (2.52 GB of weights) peaked at 5.0-6.2 GB RSS in a 4-8 token
prefill (the step dequantises the chosen experts and tiles of the head), above the 4.65 GB
allowed: for small slices the transient is a fixed GB or two more, not a fraction.

All byte counts are exact; "GB" in the printed table is 10^9 bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.partition.plan import plan_ranges, stage_bytes

GB = 10**9
STATE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Overhead:
  """The allowance on top of weights and state: `fixed` bytes plus `frac` of them."""

  fixed: int = int(1.5 * GB)
  frac: float = 0.25

  def need(self, nbytes: int) -> int:
    return int(nbytes * (1 + self.frac)) + self.fixed

  def describe(self) -> str:
    return f"need = (weights + state) x {1 + self.frac:g} + {self.fixed / GB:g} GB"


@dataclasses.dataclass(frozen=True)
class HostRow:
  """One host of a plan. `fits` is None when no host memory was given."""

  layers: LayerRange
  weight_bytes: int
  state_bytes: int
  need_bytes: int
  fits: bool | None


def state_layer_bytes(cfg: ModelConfig, *, ctx: int, max_chunk: int = 256,
                      dtype: str = "float32") -> list[int]:
  """Bytes of each layer's decode state (one session) as `init_layer_state` allocates it."""
  import jax  # deferred: planning from a file's table needs no JAX until here
  import jax.numpy as jnp

  from ds4jax.model.decode_state import Capacity, init_layer_state

  if dtype not in STATE_DTYPES:
    raise ValueError(f"unknown state dtype {dtype!r}: expected one of {', '.join(STATE_DTYPES)}")
  if ctx < 1 or max_chunk < 1:
    raise ValueError(f"ctx and max_chunk must be >= 1, got {ctx} and {max_chunk}")
  cap = Capacity(int(ctx), int(max_chunk))
  jdtype = jnp.dtype(dtype)
  out, seen = [], {}
  for il in range(cfg.n_layers):
    # The state depends on the layer's ratio only: trace each kind once.
    key = cfg.ratio(il)
    if key not in seen:
      shapes = jax.eval_shape(lambda il=il: init_layer_state(cfg, il, cap, jdtype))
      seen[key] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    out.append(seen[key])
  return out


# StageState.pos: one int32 per stage.
POS_BYTES = 4


def plan_hosts(cfg: ModelConfig, embed_bytes: int, layer_bytes: Sequence[int],
               head_bytes: int, n_hosts: int, *, state_bytes: Sequence[int] | None = None,
               sessions: int = 1, host_memory: int | None = None,
               overhead: Overhead = Overhead()) -> list[HostRow]:
  """The contiguous split over `n_hosts` that minimises the largest host's bytes.

  Args:
    cfg: the model (its n_layers must match layer_bytes).
    embed_bytes, layer_bytes, head_bytes: weight bytes of the embedding, each layer, the head.
    n_hosts: number of hosts (1 <= n_hosts <= n_layers).
    state_bytes: decode state bytes of each layer for one session (`state_layer_bytes`);
      None for weights only.
    sessions: decode states a host keeps (a worker keeps up to --max_sessions).
    host_memory: bytes per host, to say whether each fits; None to skip.
    overhead: the allowance added to weights + state.
  Returns:
    One HostRow per host, in layer order. The split balances weights + state, so it is the
    weights-only split (`inspect_gguf.py --split`) unless the state is large (long ctx).
  """
  if len(layer_bytes) != cfg.n_layers:
    raise ValueError(f"{len(layer_bytes)} layer sizes for a model of {cfg.n_layers} layers")
  if sessions < 1:
    raise ValueError(f"sessions must be >= 1, got {sessions}")
  state = [int(s) * sessions for s in (state_bytes or [0] * cfg.n_layers)]
  if len(state) != cfg.n_layers:
    raise ValueError(f"{len(state)} state sizes for a model of {cfg.n_layers} layers")
  total = [int(w) + s for w, s in zip(layer_bytes, state)]
  ranges = plan_ranges(total, n_hosts, embed_bytes=embed_bytes, head_bytes=head_bytes)
  weights = stage_bytes(ranges, layer_bytes, embed_bytes=embed_bytes, head_bytes=head_bytes)
  rows = []
  for r, w in zip(ranges, weights):
    s = sum(state[il] for il in r.layers()) + (POS_BYTES * sessions if state_bytes else 0)
    need = overhead.need(w + s)
    rows.append(HostRow(r, w, s, need, None if host_memory is None else need <= host_memory))
  return rows


def fewest_hosts(cfg: ModelConfig, embed_bytes: int, layer_bytes: Sequence[int],
                 head_bytes: int, host_memory: int, **kw) -> int | None:
  """The smallest number of hosts whose every host fits, or None if even one layer per host
  does not."""
  for n in range(1, cfg.n_layers + 1):
    rows = plan_hosts(cfg, embed_bytes, layer_bytes, head_bytes, n, host_memory=host_memory,
                      **kw)
    if all(r.fits for r in rows):
      return n
  return None


def format_plan(rows: Sequence[HostRow], *, host_memory: int | None = None,
                overhead: Overhead = Overhead()) -> str:
  """The plan as a table, in GB (10^9 bytes)."""
  g = lambda n: f"{n / GB:10.2f}"
  head = "  host  layers          n  weights GB  state GB   need GB"
  if host_memory is not None:
    head += "   host GB  fits"
  lines = [head]
  for i, r in enumerate(rows):
    line = (f"  {i:4d}  {r.layers.describe():12s} {r.layers.n_layers:3d}  {g(r.weight_bytes)}"
            f"{g(r.state_bytes)}{g(r.need_bytes)}")
    if host_memory is not None:
      line += f"{g(host_memory)}  {'yes' if r.fits else 'NO'}"
    lines.append(line)
  w = sum(r.weight_bytes for r in rows)
  s = sum(r.state_bytes for r in rows)
  lines.append(f"  total{'':14s}{sum(r.layers.n_layers for r in rows):3d}  {g(w)}{g(s)}")
  lines.append(f"  ({overhead.describe()})")
  return "\n".join(lines)
