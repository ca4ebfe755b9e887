"""The TPU kernel of `quant.matmul` / `quant.expert_matmul` (design §8.1): Pallas Mosaic.

    expert_matmul(x_PK, w: Packed[E, N, K], e_P, *, interpret=False) -> f32[P, N]
    plan(w, p) -> Plan | None     # the tiling, None where these kernels do not apply

Grid (N / tn, min(rows, E)): output tiles ("parallel") times the call's slots ("arbitrary",
innermost): the distinct experts its rows chose (`pallas_tiles.slots`, scalar-prefetched
with their count; a plain matmul is one slot, expert 0). The planes' index maps read the
slot's expert id, so the pipeline DMAs only the chosen experts' tiles, each once per call; a
padding slot repeats the last id (no new DMA) and skips its compute. Per step the kernel
dequantises the tile in VMEM chunk by chunk (`pallas_tiles.dequant_tile`, `kb` blocks at a
time) and accumulates `x_chunk @ w_chunk^T` in f32 (`precision=HIGHEST`) into the output
block, which stays resident across the slots; rows whose expert is another slot's keep their
value. The IQ2_XXS grid lookup is a lane gather (`take_along_axis`) on a 2 x 128 code table.

Planes enter as rows of bytes, [E, N, B * fields] (a reshape: free where the planes are
stored so; XLA:TPU pads a minor dim under 128 in HBM, so the planes of `Packed` as loaded
today are relaid out by that reshape, see design §8.1), each block a lane-dense
(tn, B * fields) tile; the kernel cuts a chunk's bytes back into blocks. Blocks obey the
(8, 128) rule: whole rows of bytes, `tn` rows (a multiple of 128 dividing N, else all N), x
and y blocks whole [rows, K] / [rows, tn] with rows a multiple of 8.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ds4jax.quant import pallas_tiles as pt
from ds4jax.quant.packed import Packed

TILE_N = 128  # output rows per step (at most; untuned: no TPU here)
MAX_N = 2048  # an N with no 128-multiple divisor is one tile up to this
TILE_K = 1024  # elements per in-kernel chunk (at most)
MAX_ROWS = 256  # rows of x per call (padded); more go to the jax.numpy path


@dataclasses.dataclass(frozen=True)
class Plan:
  rows: int  # x rows, padded to a multiple of 8
  tn: int    # output rows per step
  kb: int    # blocks per chunk
  block: int  # elements per block (1: F16 / BF16)


def plan(w: Packed, p: int) -> Plan | None:
  """The tiling of a call with `p` rows on w [E, N, K] (or [N, K]), None where the blocks
  cannot meet the (8, 128) rule."""
  if w.qtype not in {int(q) for q in pt.TYPES} or w.ndim not in (2, 3):
    return None
  n, k = w.shape[-2], w.shape[-1]
  block = pt.block_size(w.qtype)
  rows = max(8, -(-p // 8) * 8)
  tn = pt.largest_divisor(n // 128, TILE_N // 128) * 128 if n % 128 == 0 else n
  kb = pt.largest_divisor(k // block, max(1, TILE_K // block))
  if rows > MAX_ROWS or tn > MAX_N:
    return None
  if int(w.qtype) == int(Q.IQ2_XXS) and (tn * kb * 32) % 128:
    return None  # the grid lookup gathers 128 lanes at a time
  return Plan(rows, tn, kb, block)


def _lookup(code_ref):
  """int32 grid indices (any shape, a multiple of 128 elements) -> their codes, by two lane
  gathers on the table halves."""
  def lookup(idx):
    flat = idx.reshape(-1, 128)
    lo = jnp.broadcast_to(code_ref[0:1, :], flat.shape)
    hi = jnp.broadcast_to(code_ref[1:2, :], flat.shape)
    i7 = flat & 127
    got = jnp.where(flat >= 128, jnp.take_along_axis(hi, i7, axis=1),
                    jnp.take_along_axis(lo, i7, axis=1))
    return got.reshape(idx.shape)
  return lookup


def _kernel(n_ref, uid_ref, e_ref, x_ref, *refs, qtype, dtype, plan: Plan, n_chunks: int,
            trails: tuple):
  *plane_refs, code_ref, o_ref = refs
  tn, kb, block = plan.tn, plan.kb, plan.block
  u = pl.program_id(1)

  @pl.when(u == 0)
  def _():
    o_ref[...] = jnp.zeros_like(o_ref)

  @pl.when(u < n_ref[0])
  def _():
    y_PN = jnp.zeros(o_ref.shape, jnp.float32)
    for c in range(n_chunks):  # static: every slice offset is a constant
      b0 = c * kb

      def get(i, lo=None, size=None, b0=b0):
        x = int(np.prod(trails[i]))  # bytes (fields) per block of plane i
        chunk = plane_refs[i][:, b0 * x:(b0 + kb) * x].reshape((tn, kb) + trails[i])
        return chunk if lo is None else chunk[..., lo:lo + size]

      w_NK = pt.dequant_tile(qtype, get, _lookup(code_ref), dtype)
      x_PK = x_ref[:, b0 * block:(b0 + kb) * block]
      y_PN = y_PN + lax.dot_general(x_PK, w_NK, (((1,), (1,)), ((), ())),
                                    precision=lax.Precision.HIGHEST,
                                    preferred_element_type=jnp.float32)
    o_ref[...] = jnp.where(e_ref[...] == uid_ref[u], y_PN, o_ref[...])


def expert_matmul(x_PK, w: Packed, e_P, *, interpret: bool = False):
  """Row p of x f32[P, K] times expert e_P[p] of w [E, N, K] -> f32[P, N] (an id outside
  [0, E) gives a zero row). x is multiplied as given (q8 rounding is the caller's); w's
  compute dtype rounds both operands as the reference does. ValueError where `plan` is
  None."""
  p, k = x_PK.shape
  pl_, x, e, n, uid = pt.prepare(x_PK, w, e_P, plan, "Mosaic")
  codes = jnp.asarray(pt.iq2_codes()).reshape(2, 128)
  n_out, tn, rows = w.shape[1], pl_.tn, pl_.rows
  # Each plane as rows of bytes [E, N, B * fields] (lane-dense VMEM tiles; free where the
  # planes are stored so), f16 fields as their bits (a same-width bitcast): the kernel widens
  # them with integer ops (`kernels.f16_to_f32`), and no f16 vector reaches Mosaic.
  trails = tuple(tuple(a.shape[3:]) if a.ndim > 3 else () for a in w.planes)
  planes = tuple((lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.float16 else a)
                 .reshape(a.shape[0], n_out, -1) for a in w.planes)

  def plane_spec(a):
    return pl.BlockSpec((None, tn, a.shape[2]), lambda j, s, n_ref, uid_ref: (uid_ref[s], j, 0))

  whole = lambda shape: pl.BlockSpec(shape, lambda j, s, n_ref, uid_ref: (0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(n_out // tn, min(rows, w.shape[0])),
      in_specs=[whole((rows, 1)), whole((rows, k)), *(plane_spec(a) for a in planes),
                whole((2, 128))],
      out_specs=pl.BlockSpec((rows, tn), lambda j, s, n_ref, uid_ref: (0, j)))
  y = pl.pallas_call(
      functools.partial(_kernel, qtype=int(w.qtype), dtype=jnp.dtype(w.dtype), plan=pl_,
                        n_chunks=k // (pl_.kb * pl_.block), trails=trails),
      out_shape=jax.ShapeDtypeStruct((rows, n_out), jnp.float32),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret, name="ds4_packed_matmul")(n, uid, e[:, None], x, *planes, codes)
  return y[:p]
