"""The GPU kernel of `quant.matmul` / `quant.expert_matmul` (design §8.1): Pallas Triton.

    expert_matmul(x_PK, w: Packed[E, N, K], e_P, *, interpret=False) -> f32[P, N]
    plan(w, p) -> Plan | None     # the tiling, None where these kernels do not apply

One program per tile of `tn` output rows (grid N / tn). A program walks the call's slots
(the distinct experts its rows chose, `pallas_tiles.slots`; a plain matmul is one slot,
expert 0) and, for each, the row's K in chunks of `kb` blocks: it loads the chunk's plane
bytes, dequantises them in registers (`pallas_tiles.dequant_tile`) and accumulates
`x_chunk @ w_chunk^T` in f32 (IEEE f32 products, `precision=HIGHEST`), then keeps the rows
whose expert is that slot's. Every chosen expert's bytes are read and unpacked once per call,
whatever the number of rows (padded to a power of two >= 16, the Triton dot's minimum).
The IQ2_XXS grid is a 256-entry int32 table read by a gathered load (L1-resident).

Triton wants power-of-two tiles: tn (<= TILE_N, >= 16) must divide N and kb the blocks per
row; `plan` says None otherwise and `quant.matmul` keeps the jax.numpy path. The custom call
is `__gpu$xla.gpu.triton`; `jax.export` needs it allowed (`EXPORT_CHECKS`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ds4jax.quant import pallas_tiles as pt
from ds4jax.quant.packed import Packed

TILE_N = 32  # output rows per program
TILE_K = 256  # elements per K chunk (at most; a power of two)
MAX_ROWS = 128  # rows of x per call (padded); more go to the jax.numpy path
TRITON_CALL = "__gpu$xla.gpu.triton"
EXPORT_CHECKS = (jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL),)


@dataclasses.dataclass(frozen=True)
class Plan:
  rows: int  # x rows, padded
  tn: int    # output rows per program
  kb: int    # blocks per K chunk
  block: int  # elements per block (1: F16 / BF16)


def _pow2_at_least(n: int, lo: int) -> int:
  return max(lo, 1 << max(0, (n - 1).bit_length()))


def plan(w: Packed, p: int) -> Plan | None:
  """The tiling of a call with `p` rows on w [E, N, K] (or [N, K]), None where it does not
  fit Triton's power-of-two tiles."""
  if w.qtype not in {int(q) for q in pt.TYPES} or w.ndim not in (2, 3):
    return None
  n, k = w.shape[-2], w.shape[-1]
  block = pt.block_size(w.qtype)
  rows = _pow2_at_least(p, 16)
  tn = pt.largest_divisor(n, TILE_N, pow2=True)
  kb = pt.largest_divisor(k // block, max(1, TILE_K // block), pow2=True)
  if rows > MAX_ROWS or tn < 16 or kb * block < 16:
    return None
  return Plan(rows, tn, kb, block)


def _kernel(n_ref, uid_ref, e_ref, x_ref, *refs, qtype, dtype, plan: Plan, n_chunks: int):
  *plane_refs, code_ref, o_ref = refs
  tn, kb, block = plan.tn, plan.kb, plan.block
  n0 = pl.program_id(0) * tn
  e_P = e_ref[...]

  def lookup(idx):
    return code_ref[idx]

  def one_slot(u, out_PN):
    e = uid_ref[u]

    def one_chunk(c, acc_PN):
      b0 = c * kb

      def get(i, lo=None, size=None):
        ref = plane_refs[i]
        trail = tuple(slice(None) for _ in ref.shape[3:])
        if lo is not None:
          trail = trail[:-1] + (pl.ds(lo, size),)
        return ref[(e, pl.ds(n0, tn), pl.ds(b0, kb)) + trail]

      w_NK = pt.dequant_tile(qtype, get, lookup, dtype)
      x_PK = x_ref[:, pl.ds(b0 * block, kb * block)]
      return acc_PN + lax.dot_general(x_PK, w_NK, (((1,), (1,)), ((), ())),
                                      precision=lax.Precision.HIGHEST,
                                      preferred_element_type=jnp.float32)

    y_PN = lax.fori_loop(0, n_chunks, one_chunk, jnp.zeros_like(out_PN))
    return jnp.where(e_P[:, None] == e, y_PN, out_PN)

  o_ref[...] = lax.fori_loop(0, n_ref[0], one_slot,
                             jnp.zeros((plan.rows, tn), jnp.float32))


def expert_matmul(x_PK, w: Packed, e_P, *, interpret: bool = False):
  """`pallas_tpu.expert_matmul` through Triton: row p of x f32[P, K] times expert e_P[p] of
  w [E, N, K] -> f32[P, N]."""
  p, k = x_PK.shape
  pl_, x, e, n, uid = pt.prepare(x_PK, w, e_P, plan, "Triton")
  codes = jnp.asarray(pt.iq2_codes())
  planes = tuple(w.planes)
  n_out = w.shape[1]
  full = lambda a: pl.BlockSpec(a.shape, lambda j, nd=a.ndim: (0,) * nd)
  ins = (n, uid, e, x, *planes, codes)
  y = pl.pallas_call(
      functools.partial(_kernel, qtype=int(w.qtype), dtype=jnp.dtype(w.dtype), plan=pl_,
                        n_chunks=k // (pl_.kb * pl_.block)),
      out_shape=jax.ShapeDtypeStruct((pl_.rows, n_out), jnp.float32),
      grid=(n_out // pl_.tn,),
      in_specs=[full(a) for a in ins],
      out_specs=pl.BlockSpec((pl_.rows, pl_.tn), lambda j: (0, j)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="ds4_packed_matmul")(*ins)
  return y[:p]
