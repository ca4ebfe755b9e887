"""A stage that spans several devices of its host: expert parallelism (docs/design.md §12).

Within a host a stage runs as one SPMD program over a 1-D mesh whose axis is `"expert"`
(`make_mesh`); between hosts the socket bridge stays. The placement of every parameter is
written once, here, as MaxText writes it: logical axis names per parameter path pattern
(`PARAM_AXES`), and a rules table from logical axis to mesh axis (`LOGICAL_RULES`). Today
only the routed experts' leading axis maps to the mesh; everything else (attention, the
router, the shared expert, embedding, head, norms) and the decode state are replicated.

    mesh = sharding.make_mesh(4)                  # None for 1 device: today's program
    shardings = sharding.param_shardings(params, mesh)  # a NamedSharding per leaf

Packed weights (`quant.Packed`) shard like floats: the leading axes of every plane are the
element shape's leading axes, so an expert tensor's planes split along plane axis 0.

The routed MoE under a mesh is expert-parallel by construction, not by the auto-partitioner
(which would all-gather the experts for the dynamic expert indexing): `routed_experts` is a
`jax.shard_map` over the expert axis. Each device gets its E/N local experts and the
replicated tokens and routing, runs `MoE.routed` (the per-pair, grouped or all-experts path,
unchanged) on its slice with expert ids made local and other devices' pairs weighted 0, and
a `psum` adds the N partial sums (so the summation order differs from one device's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ds4jax.config import devices_option
from ds4jax.quant.packed import Packed

# The mesh axis of a stage: one per local device of the stage.
EXPERT_AXIS = "expert"

# Logical axes of the parameters, by stage-local path pattern ("*" matches one path entry);
# the first matching pattern wins, and a path no pattern matches is replicated.
PARAM_AXES: tuple[tuple[tuple[str, ...], tuple[str | None, ...]], ...] = (
    (("blocks", "*", "moe", "gate_exps"), ("expert", "expert_ff", "embed")),
    (("blocks", "*", "moe", "up_exps"), ("expert", "expert_ff", "embed")),
    (("blocks", "*", "moe", "down_exps"), ("expert", "embed", "expert_ff")),
    # The router scores every expert on every device (top-k needs them all): replicated.
    (("blocks", "*", "moe", "gate"), ("router", "embed")),
    (("blocks", "*", "moe", "bias"), ("router",)),
    (("blocks", "*", "moe", "tid2eid"), ("vocab", None)),
    (("blocks", "*", "moe", "shared_*"), ("expert_ff", "embed")),  # either orientation
    (("embed", "embedding"), ("vocab", "embed")),
    (("head", "out"), ("vocab", "embed")),
)

# Logical axis -> mesh axis (None: replicated), MaxText's `logical_axis_rules`.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("expert", EXPERT_AXIS),
    ("expert_ff", None),
    ("embed", None),
    ("router", None),
    ("vocab", None),
)


# ---------------------------------------------------------------------------- the mesh
def parse_devices(devices, available: int | None = None) -> int:
  """The device count a `devices` option names (`config.devices_option`: an int >= 1, a
  decimal string, or "all" = every local device). One-line ValueErrors for what is not such
  an option and for more than the `available` local devices (default:
  `len(jax.local_devices())`)."""
  spec = devices_option(devices)
  if available is None:
    available = len(jax.local_devices())
  if spec == "all":
    return int(available)
  if spec > available:
    raise ValueError(f"--devices={spec} exceeds the {available} local device(s) "
                     f"({jax.default_backend()})")
  return spec


def make_mesh(devices=1) -> Mesh | None:
  """The stage mesh of the first N local devices, axis "expert" (N = `parse_devices`); None
  for one device (no mesh: the single-device program, unchanged). A Mesh is returned as it
  is (it must have the "expert" axis)."""
  if isinstance(devices, Mesh):
    if EXPERT_AXIS not in devices.axis_names:
      raise ValueError(f"the stage mesh needs an {EXPERT_AXIS!r} axis, got {devices.axis_names}")
    return devices if devices.size > 1 else None
  n = parse_devices(devices)
  if n == 1:
    return None
  # Auto axes: the replicated rest of the stage is left to the partitioner; only the routed
  # experts are placed by hand (shard_map).
  return jax.make_mesh((n,), (EXPERT_AXIS,), (jax.sharding.AxisType.Auto,),
                       devices=jax.local_devices()[:n])


def n_shards(mesh: Mesh | None) -> int:
  """Devices on the expert axis (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.shape[EXPERT_AXIS])


def check_experts(n_experts: int, mesh: Mesh | int | None) -> None:
  """The expert count must split evenly over the mesh (or that many devices): a one-line
  ValueError otherwise."""
  n = mesh if isinstance(mesh, int) else n_shards(mesh)
  if n_experts % n:
    raise ValueError(f"--devices={n} does not divide the model's {n_experts} experts")


# ------------------------------------------------------------------------ the rules
def _matches(pattern: Sequence[str], path: Sequence[Any]) -> bool:
  if len(pattern) != len(path):
    return False
  for pat, key in zip(pattern, path):
    key = str(key)
    if pat == "*" or pat == key or (pat.endswith("*") and key.startswith(pat[:-1])):
      continue
    return False
  return True


def logical_axes(path: Sequence[Any], ndim: int) -> tuple[str | None, ...]:
  """Logical axis names of the parameter at stage-local `path` (`PARAM_AXES`; all None if
  no pattern matches or the rank differs)."""
  for pattern, axes in PARAM_AXES:
    if _matches(pattern, path) and len(axes) == ndim:
      return axes
  return (None,) * ndim


def logical_to_mesh(axes: Sequence[str | None]) -> P:
  """The PartitionSpec of logical `axes` under `LOGICAL_RULES` (a mesh axis used twice is a
  ValueError)."""
  rules = dict(LOGICAL_RULES)
  out = tuple(None if a is None else rules.get(a) for a in axes)
  used = [a for a in out if a is not None]
  if len(used) != len(set(used)):
    raise ValueError(f"logical axes {axes} map to mesh axes {out}: an axis twice")
  return P(*out)


def param_spec(path: Sequence[Any], shape: Sequence[int]) -> P:
  """The PartitionSpec of the parameter at `path` with element shape `shape`."""
  return logical_to_mesh(logical_axes(path, len(shape)))


def _plane_spec(spec: P, value) -> P:
  """The spec of a leaf of `value`: a dense array's is `spec`; a Packed's planes take the
  leading axes' entries (`[*lead, B, *block]`): its contraction axis must be unsharded."""
  if isinstance(value, Packed):
    if len(spec) == len(value.shape) and spec[-1] is not None:
      raise ValueError("a packed weight cannot be sharded along its contraction axis")
    return P(*tuple(spec)[:len(value.shape) - 1])
  return spec


def leaf_shardings(path: Sequence[Any], value, mesh: Mesh):
  """The NamedSharding of a dense parameter at `path`, or the tuple of its planes' for a
  Packed one (or an abstract Packed)."""
  spec = _plane_spec(param_spec(path, value.shape), value)
  if isinstance(value, Packed):
    return tuple(NamedSharding(mesh, spec) for _ in value.planes)
  return NamedSharding(mesh, spec)


def param_shardings(params, mesh: Mesh):
  """A NamedSharding for every leaf of a stage's parameters (an `nnx.State`, abstract or
  not; a Packed's planes each get one), as a pytree of the same structure."""
  from flax import nnx
  flat = []
  for path, var in nnx.to_flat_state(params):
    value = var.get_value()
    shardings = leaf_shardings(path, value, mesh)
    if isinstance(value, Packed):
      shardings = dataclasses.replace(value, planes=shardings)
    flat.append((path, var.replace(shardings)))
  return nnx.from_flat_state(flat)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every leaf whole on every device of `mesh` (the decode state, activations)."""
  return NamedSharding(mesh, P())


def state_shardings(state, mesh: Mesh):
  """The decode state's placement: every leaf replicated on the stage mesh (a pool's
  leading slot axis too)."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def replicated_out(mesh: Mesh | None) -> dict:
  """`jax.jit` keywords that place a state-building function's outputs replicated on the
  mesh (`{}` without one: the single-device program, unchanged)."""
  return {} if mesh is None else {"out_shardings": replicated(mesh)}


# --------------------------------------------------------------------------- placement
def put(host, sharding: NamedSharding | None):
  """A host array on the devices of `sharding` (None: the default device, as
  `jax.device_put`). Each device reads only its own shard's bytes of `host` (a numpy array,
  e.g. a view into the mmapped GGUF), so no device copy of the whole tensor exists on a
  device that holds a shard of it."""
  if sharding is None:
    return jax.device_put(host)
  return jax.make_array_from_callback(tuple(np.shape(host)), sharding,
                                      lambda idx: np.ascontiguousarray(host[idx]))


def put_packed(data, qtype: int, shape, dtype, shardings) -> Packed:
  """`Packed.from_gguf_data`, each plane placed with its sharding (`leaf_shardings`): the
  GGUF rows of each device's shard (its experts) are split into planes on the host and
  placed, one shard at a time, so the host never splits the whole tensor at once."""
  from ds4jax.quant import kernels
  from ds4jax.quant.packed import FLOAT16_TYPES, plane_specs, storage
  from gguf import GGMLQuantizationType as Q
  if shardings is None:
    return Packed.from_gguf_data(data, qtype, shape, dtype)
  dshape, ddtype = storage(qtype, shape)
  arr = np.asarray(data)
  if arr.nbytes != int(np.prod(dshape)) * ddtype.itemsize:
    raise ValueError(f"{Q(int(qtype)).name} data of {arr.nbytes} bytes does not hold "
                     f"shape {list(shape)}")
  rows = arr.view(ddtype).reshape(dshape)  # [*lead, row_bytes] (or the 16-bit array itself)
  specs = plane_specs(qtype, shape)
  n_lead = len(shape) - 1
  # Devices grouped by the rows (leading-axis slices) they hold: identical for every plane.
  by_rows: dict[tuple, list] = {}
  for dev, idx in shardings[0].addressable_devices_indices_map(specs[0][0]).items():
    key = tuple((s.start, s.stop) for s in idx[:n_lead])
    by_rows.setdefault(key, []).append((dev, idx[:n_lead]))
  parts = [[] for _ in specs]
  for group in by_rows.values():
    lead_idx = group[0][1]
    shard = rows[lead_idx]
    if Q(int(qtype)) in FLOAT16_TYPES:
      planes = (np.ascontiguousarray(shard),)
    else:
      planes = kernels.split_planes(shard, Q(int(qtype)), int(shape[-1]))
    for i, p in enumerate(planes):
      p = np.ascontiguousarray(p)
      parts[i].extend(jax.device_put(p, dev) for dev, _ in group)
    del planes, shard
  placed = tuple(jax.make_array_from_single_device_arrays(s, sh, part)
                 for (s, _), sh, part in zip(specs, shardings, parts))
  return Packed(placed, int(qtype), tuple(int(s) for s in shape), jnp.dtype(dtype))


def attach(stage, mesh: Mesh | None) -> None:
  """Makes `stage`'s routed experts run expert-parallel on `mesh` (their MoE modules'
  static `expert_mesh`, part of the graph: the jitted step traces `routed_experts`). None
  leaves the stage as it is."""
  if mesh is None:
    return
  check_experts(stage.cfg.n_experts, mesh)
  for block in stage.blocks:
    block.moe.expert_mesh = mesh


def stage_mesh(stage) -> Mesh | None:
  """The mesh `attach` gave `stage` (None: one device)."""
  return stage.blocks[0].moe.expert_mesh if len(stage.blocks) else None


# ----------------------------------------------------------------- expert parallelism
def _local(w, n_local: int):
  """A stacked expert weight as the shard_map body sees it: [E/N, ...] (a Packed's static
  element shape is rewritten to the local expert count)."""
  if isinstance(w, Packed):
    return dataclasses.replace(w, shape=(n_local,) + tuple(w.shape[1:]))
  return w


def routed_experts(moe, x_TD, idx_TK, w_TK):
  """The routed-expert sum of `moe` (an `MoE` whose experts are sharded on
  `moe.expert_mesh`), expert-parallel.

  Args:
    moe: the MoE module (weights [E, F, D] / [E, D, F], dense or Packed, sharded on axis 0).
    x_TD: f32 [T, D] normalised input (replicated); idx_TK: int32 [T, k] chosen experts
      (global ids); w_TK: f32 [T, k] their weights.

  Returns:
    f32 [T, D], replicated.

  Pipeline (per device d of N, local experts [d*E/N, (d+1)*E/N)):
    1. ids made local (e - d*E/N); a pair of another device's expert gets id E/N (past the
       local experts: the per-pair path clamps it, the grouped path sorts it last and never
       visits it, the all-experts path one-hots it to zeros) and weight 0;
    2. `moe.routed` on the local slice: the partial sum of the local experts' contributions;
    3. `psum` over the expert axis.
  """
  mesh = moe.expert_mesh
  n = n_shards(mesh)
  n_local = moe.n_experts // n
  experts = (moe.gate_exps[...], moe.up_exps[...], moe.down_exps[...])
  specs = tuple(P(EXPERT_AXIS) for _ in experts)  # a prefix: every plane of a Packed too

  def body(x_TD, idx_TK, w_TK, experts):
    first = jax.lax.axis_index(EXPERT_AXIS) * n_local
    rel_TK = idx_TK - first
    mine_TK = (rel_TK >= 0) & (rel_TK < n_local)
    idx_TK = jnp.where(mine_TK, rel_TK, n_local).astype(jnp.int32)
    w_TK = jnp.where(mine_TK, w_TK, 0.0)
    local = tuple(_local(w, n_local) for w in experts)
    return jax.lax.psum(moe.routed(x_TD, idx_TK, w_TK, local), EXPERT_AXIS)

  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), specs), out_specs=P(),
                       check_vma=False)(x_TD, idx_TK, w_TK, experts)


# ---------------------------------------------------------------------------- reports
def device_bytes(params) -> dict[str, dict[str, int]]:
  """Bytes each device holds of a stage's parameters, from the arrays' addressable shards:
  {str(device): {"experts": ..., "other": ..., "total": ...}} ("experts": the routed
  expert tensors)."""
  from flax import nnx
  out: dict[str, dict[str, int]] = {}
  for path, var in nnx.to_flat_state(params):
    value = var.get_value()
    kind = "experts" if str(path[-1]).endswith("_exps") else "other"
    for leaf in jax.tree.leaves(value):
      for s in leaf.addressable_shards:
        d = out.setdefault(str(s.device), {"experts": 0, "other": 0})
        d[kind] += int(s.data.nbytes)
  for d in out.values():
    d["total"] = d["experts"] + d["other"]
  return out
