"""StageRunner: the jitted executor of one Stage (design.md §4).

One pure function runs a chunk of any length at any start position through the whole stage
(one-shot prefill, chunked prefill and decode are the same call). The layer loop is unrolled
at trace time, so a step is a single compiled call. T is bucketed (1, 2, 4, ... max_chunk) and
longer inputs are split into max_chunk pieces, so only a handful of shapes ever compile;
the start position is traced, so decoding never recompiles.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ds4jax.model import decode_state, sharding
from ds4jax.model.decode_state import Capacity, StageState
from ds4jax.model.stage import Stage
from ds4jax.model.taps import Taps, edit_rows, pad_edit
from ds4jax.runtime.layer_programs import MIN_LAYER_BYTES, LayerPrograms
from ds4jax.quant.packed import Packed


def bucket(t: int, max_chunk: int) -> int:
  """Smallest power of two >= t, capped at max_chunk."""
  b = 1
  while b < t:
    b *= 2
  return min(b, max_chunk)


class StageRunner:
  """Runs `stage` with numpy in/out and explicit, donated decode state.

  Attributes: cfg, layers, ctx_size, max_chunk, fingerprint, n_traces (compilations so far).
  """

  def __init__(self, stage: Stage, *, ctx_size: int, max_chunk: int = 256,
               state_dtype=None, fingerprint: str | None = None, max_batch: int = 16,
               layer_programs: bool | None = None):
    if ctx_size < 1:
      raise ValueError(f"ctx_size must be >= 1, got {ctx_size}")
    if max_chunk < 1 or max_chunk & (max_chunk - 1):
      raise ValueError(f"max_chunk must be a power of two, got {max_chunk}")
    if max_batch < 1 or max_batch & (max_batch - 1):
      raise ValueError(f"max_batch must be a power of two, got {max_batch}")
    self.cfg, self.layers = stage.cfg, stage.layers
    self.ctx_size, self.max_chunk, self.max_batch = int(ctx_size), int(max_chunk), int(max_batch)
    self.fingerprint = fingerprint
    self.embeds, self.has_output = stage.layers.embeds, stage.layers.has_output
    self._cap = Capacity(self.ctx_size, self.max_chunk)
    self.graphdef, self.params = nnx.split(stage)
    if state_dtype is None:
      state_dtype = _stage_dtype(self.params)
    self.state_dtype = state_dtype
    self.n_traces = 0
    self._compiled_BT: dict[int, list[tuple[int, int]]] = {}  # n_slots -> compiled (B, T)
    # jit flattens its arguments on every call, and flattening an nnx.State goes through
    # Python per leaf (~2 ms per call for 250 leaves on a busy 2-core CPU, paid once per stage
    # per decode token). A plain list of the leaves flattens in microseconds.
    self._param_leaves, self._param_def = jax.tree.flatten(self.params)
    # A stage spanning several devices (`sharding.attach`): the step follows the weights'
    # shardings; the state is built replicated on the mesh (docs/design.md §12).
    self.mesh = sharding.stage_mesh(stage)

    def step(params, state, tokens_T, hc_TCD, n_valid):
      self.n_traces += 1  # runs only while tracing: counts compilations
      if isinstance(params, list):  # forward's fast path: the flat leaves
        params = jax.tree.unflatten(self._param_def, params)
      return nnx.merge(self.graphdef, params)(state, tokens_T, hc_TCD, n_valid)

    self._step = jax.jit(step, donate_argnames=("state",))

    def batch_step(params, pool, slots_B, tokens_BT, hc_BTCD, n_valid_B):
      self.n_traces += 1
      if isinstance(params, list):
        params = jax.tree.unflatten(self._param_def, params)
      return nnx.merge(self.graphdef, params).batched(pool, slots_B, tokens_BT, hc_BTCD,
                                                      n_valid_B)

    self._batch_step = jax.jit(batch_step, donate_argnames=("pool",))
    # Large layers: one program per kind of layer, not one unrolled over all of them, so the
    # compiled programs' memory does not grow with the layers (runtime/layer_programs.py).
    auto = layer_programs is None
    if auto:
      layer_programs = self.mesh is None and len(stage.blocks) > 0 and param_bytes(
          nnx.state(stage.blocks))["total"] / len(stage.blocks) >= MIN_LAYER_BYTES
    elif layer_programs and self.mesh is not None:
      raise ValueError("layer_programs: a stage on several devices runs as one program")
    if layer_programs:
      progs = LayerPrograms(stage, self._param_leaves, on_trace=self._count_trace)
      if not auto or progs.n_kinds < len(stage.blocks):
        self._batch_step = progs
    self.layer_programs = isinstance(self._batch_step, LayerPrograms)

    # The capturing variant (issue 22): a separate program, so a step that captures nothing
    # runs (and compiles) exactly `_batch_step`. `want` (static) is a frozenset of
    # (point, absolute layer) pairs of model.taps.STEP_POINTS.
    def capture_step(params, pool, slots_B, tokens_BT, hc_BTCD, n_valid_B, edits, want):
      self.n_traces += 1
      params = jax.tree.unflatten(self._param_def, params)
      taps = Taps(want, edit_rows(edits, tokens_BT.shape[1]))
      out, pool = nnx.merge(self.graphdef, params).batched(pool, slots_B, tokens_BT, hc_BTCD,
                                                           n_valid_B, taps=taps)
      b, t = tokens_BT.shape
      return out, {k: v.reshape((b, t) + v.shape[1:]) for k, v in taps.saved.items()}, pool

    self._capture_step = jax.jit(capture_step, donate_argnames=("pool",),
                                 static_argnames=("want",))

    def head_step(params, hc_RCD):
      self.n_traces += 1
      return nnx.merge(self.graphdef, jax.tree.unflatten(self._param_def, params)).head(hc_RCD)

    self._head_step = jax.jit(head_step)
    self._pools = {}  # n_slots -> jitted pool initialiser
    self._pool_get = jax.jit(decode_state.pool_get)
    self._pool_put = jax.jit(decode_state.pool_put, donate_argnums=(0,))
    self._pool_pos = jax.jit(lambda pool, slot, pos: pool.replace(pos=pool.pos.at[slot].set(pos)),
                             donate_argnums=(0,))
    # One compiled program builds a fresh state: op by op it would compile a few small
    # programs after the weights are in and copy the -inf-filled gate buffers.
    self._init = jax.jit(lambda: decode_state.init_stage_state(
        self.cfg, self.layers, self._cap, self.state_dtype), **sharding.replicated_out(self.mesh))

  def _count_trace(self) -> None:
    self.n_traces += 1

  def _abstract_params(self) -> list:
    """The parameter leaves as ShapeDtypeStructs (with their shardings on a mesh)."""
    if self.mesh is None:
      return [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self._param_leaves]
    shardings = jax.tree.leaves(sharding.param_shardings(self.params, self.mesh))
    return [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
            for x, s in zip(self._param_leaves, shardings)]

  def compile(self, sizes) -> None:
    """Compiles the step for chunks of `sizes` tokens (bucketed as `forward` does) from
    shapes alone: it needs neither the weights nor a state, so a loader can compile before
    it allocates them (the compiler's transient peak then does not add to theirs). `forward`
    reuses what this compiled."""
    params = self._abstract_params()
    self._init.lower().compile()
    state = jax.eval_shape(self._init)
    n_valid = jax.ShapeDtypeStruct((), jnp.int32)
    for t in sorted({bucket(min(int(s), self.ctx_size), self.max_chunk) for s in sizes if s}):
      hc = None
      if not self.embeds:
        hc = jax.ShapeDtypeStruct((t, self.cfg.n_hc, self.cfg.d_model), jnp.float32)
      tokens = jax.ShapeDtypeStruct((t,), jnp.int32)
      self._step.lower(params, state, tokens, hc, n_valid).compile()

  def serving_shapes(self, prefill_chunk: int, n_slots: int) -> list[tuple[int, int]]:
    """The (B, T) shapes of `forward_batch` that a `StageBatcher` of `n_slots` slots runs when
    prefills come in chunks of up to `prefill_chunk` tokens: every decode batch bucket up to
    n_slots rows ([B, 1]), then the prefill ladder of one session's chunk ([1, T]: the top
    chunk, a quarter of it, a sixteenth, ...); the batcher never runs several chunks, nor
    decode rows with a chunk, in one call. Once compiled, `forward_batch` pads a chunk to the
    smallest of these that holds it (`_fit`), so a prefill pads at most 4x and a server
    compiles log4, not log2, of its chunk sizes (docs/design.md §11)."""
    top_b = bucket(min(int(n_slots), self.max_batch), self.max_batch)
    top_t = bucket(min(int(prefill_chunk), self.max_chunk, self.ctx_size), self.max_chunk)
    decode = [(b, 1) for b in _powers_of_two(top_b)]
    return decode + [(1, t) for t in _quarters(top_t) if t > 1]

  def compile_shapes(self, shapes_BT, n_slots: int, on_shape=None, *,
                     only: bool = False) -> None:
    """Compiles `forward_batch` for each (B, T) of `shapes_BT` (bucketed as `forward_batch`
    does), and the pool's slot operations, for a pool of `n_slots`, from shapes alone (no
    weights, no pool needed); a shape this pool has compiled already is skipped.
    `on_shape(k, n, (B, T), seconds)` is called after each. `only`: these become the pool's
    whole compiled set, so `_fit` dispatches to them alone (a worker whose coordinator names
    another prefill chunk than the one it compiled for while it dialed)."""
    params = self._abstract_params()
    pool = jax.eval_shape(self._pool_init(n_slots))
    n_s = jax.ShapeDtypeStruct((), jnp.int32)
    self._pool_get.lower(pool, n_s).compile()
    self._pool_pos.lower(pool, n_s, n_s).compile()  # every alloc resets its slot
    shapes = list(dict.fromkeys((bucket(min(int(b), self.max_batch), self.max_batch),
                                 bucket(min(int(t), self.ctx_size), self.max_chunk))
                                for b, t in shapes_BT))
    done = self._compiled_BT.setdefault(int(n_slots), [])
    if only:
      done[:] = [s for s in done if s in shapes]
    for k, (b, t) in enumerate(shapes):
      t0 = time.perf_counter()
      if (b, t) in done:
        continue
      hc = None
      if not self.embeds:
        hc = jax.ShapeDtypeStruct((b, t, self.cfg.n_hc, self.cfg.d_model), jnp.float32)
      self._batch_step.lower(params, pool, jax.ShapeDtypeStruct((b,), jnp.int32),
                             jax.ShapeDtypeStruct((b, t), jnp.int32), hc,
                             jax.ShapeDtypeStruct((b,), jnp.int32)).compile()
      if (b, t) not in done:
        done.append((b, t))
      if on_shape is not None:
        on_shape(k + 1, len(shapes), (b, t), time.perf_counter() - t0)

  def compiled_shapes(self, n_slots: int) -> list[tuple[int, int]]:
    """The (B, T) shapes compiled for a pool of `n_slots`: those `forward_batch` runs at."""
    return list(self._compiled_BT.get(int(n_slots), ()))

  def compile_batch(self, batch_sizes, chunk_sizes=(1,), n_slots: int = 1) -> None:
    """Compiles `forward_batch` for every (bucketed) batch size x chunk size from shapes
    alone, for a pool of `n_slots` (the pool's shape is part of the program)."""
    self.compile_shapes([(b, t) for b in batch_sizes for t in chunk_sizes if t], n_slots)

  def first_runs(self, pool: StageState) -> StageState:
    """Runs every shape `compile_shapes` compiled for a pool of this size once, each row on
    the pool's scratch slot (no session's state changes; donates the pool): a program's first
    execution costs up to ~10x its later ones (XLA's runtime sets up then), and that belongs
    at load, not in front of the first requests. Returns the pool."""
    n_scratch = int(pool.pos.shape[0]) - 1
    for b, t in self._compiled_BT.get(n_scratch, ()):
      hc = None if self.embeds else np.zeros((b, t, self.cfg.n_hc, self.cfg.d_model), np.float32)
      out, pool = self._batch_step(self._param_leaves, pool, np.full((b,), n_scratch, np.int32),
                                   np.zeros((b, t), np.int32), hc, np.zeros((b,), np.int32))
      np.asarray(out)
    if n_scratch in self._compiled_BT:
      pool = self._pool_pos(pool, np.int32(n_scratch), np.int32(0))
    return pool

  def set_params(self, stage: Stage) -> None:
    """Takes the weights of `stage`, whose parameters must match this runner's in structure,
    shapes and dtypes (e.g. a runner built on `nnx.eval_shape`'s abstract stage): compiled
    shapes stay valid."""
    graphdef, params = nnx.split(stage)
    leaves, treedef = jax.tree.flatten(params)
    if graphdef != self.graphdef or treedef != self._param_def or any(
        (a.shape, a.dtype) != (b.shape, b.dtype) for a, b in zip(leaves, self._param_leaves)):
      raise ValueError("set_params: the stage's parameters do not match this runner's")
    self.params, self._param_leaves = params, leaves

  def init_state(self) -> StageState:
    """Fresh state at pos 0 with capacity ctx_size."""
    return self._init()

  # ------------------------------------------------------------------ pooled sessions
  def _pool_init(self, n_slots: int):
    if n_slots not in self._pools:
      self._pools[n_slots] = jax.jit(lambda: decode_state.init_pool(
          self.cfg, self.layers, self._cap, n_slots, self.state_dtype),
          **sharding.replicated_out(self.mesh))
    return self._pools[n_slots]

  def init_pool(self, n_slots: int) -> StageState:
    """A pool of `n_slots` session states at pos 0, plus the scratch slot (docs/design.md
    §11): every leaf has a leading axis of n_slots + 1."""
    if n_slots < 1:
      raise ValueError(f"a pool needs at least one slot, got {n_slots}")
    return self._pool_init(int(n_slots))()

  def pool_get(self, pool: StageState, slot: int) -> StageState:
    """The StageState held by `slot` (a copy, for snapshots and tools)."""
    return self._pool_get(pool, np.int32(slot))

  def pool_put(self, pool: StageState, slot: int, state: StageState) -> StageState:
    """The pool (donated) with `state` in `slot`."""
    return self._pool_put(pool, np.int32(slot), state)

  def pool_truncate(self, pool: StageState, slot: int, pos: int) -> StageState:
    """Rewinds (or resets, pos 0) one slot: only its counter moves (donates the pool)."""
    if not 0 <= pos <= self.ctx_size:
      raise ValueError(f"cannot truncate to pos {pos}")
    return self._pool_pos(pool, np.int32(slot), np.int32(pos))

  def forward_batch(self, pool: StageState, slots_B, tokens_BT, hc_BTCD, n_valid_B):
    """One chunk for each of B sessions of `pool`, in one compiled call (docs/design.md §11).

    Args:
      pool: from init_pool / forward_batch (donated: use the returned one).
      slots_B: int [B] distinct slots in [0, n_slots); row b runs at pool.pos[slots_B[b]]
        (the caller knows it: the pool is not read back here).
      tokens_BT: int [B, T] token ids, row b's first n_valid_B[b] real.
      hc_BTCD: float32 [B, T, C, D] or None iff the stage embeds.
      n_valid_B: int [B], each in [1, T].

    Returns:
      (out, pool): out is logits float32 [B, T, V] with the head, else hc float32
      [B, T, C, D] (a jax.Array: rows past n_valid are padding), the pool with each slot
      advanced by its n_valid. B is padded to a power of two (<= max_batch) with rows on the
      scratch slot, T to a chunk bucket (<= max_chunk), so after warm-up nothing compiles.
    """
    args, (b, t) = self._batch_args(pool, slots_B, tokens_BT, hc_BTCD, n_valid_B)
    out, pool = self._batch_step(self._param_leaves, pool, *args)
    return out[:b, :t], pool

  def forward_capture(self, pool: StageState, slots_B, tokens_BT, hc_BTCD, n_valid_B, want,
                      edits=None):
    """`forward_batch` that also keeps named points and applies interventions
    (model/taps.py): `want` is a set of (point, absolute layer) pairs of STEP_POINTS for
    layers of this stage; `edits` {(op, point, layer): per-row values} (host arrays with B
    rows: `scale` s [B]; `add` v [B, *row]; `project` (d [B, D], s [B]); `set` (v [B, T,
    *row], m [B, T] bool)); rows an edit does not touch hold its neutral value.

    Returns:
      (out, {"{point}.{layer}": jax.Array [B, T, ...]}, pool), rows past n_valid padding.
      Each distinct `want` and set of edit keys compiles its own program once per shape
      (the values are inputs); the plain step's program is never touched.
    """
    want = frozenset((str(p), int(il)) for p, il in want)
    edits = dict(edits or {})
    layers = [il for _, il in want] + [il for _, _, il in edits]
    outside = sorted(il for il in layers if not self.layers.start <= il <= self.layers.end)
    if outside:
      raise ValueError(f"layer {outside[0]} is not in this stage's range {self.layers}")
    args, (b, t) = self._batch_args(pool, slots_B, tokens_BT, hc_BTCD, n_valid_B)
    bb, tb = args[1].shape
    padded = {k: pad_edit(k[0], v, bb, tb) for k, v in edits.items()}
    out, caps, pool = self._capture_step(self._param_leaves, pool, *args, padded, want=want)
    return out[:b, :t], {k: v[:b, :t] for k, v in caps.items()}, pool

  def head_rows(self, hc_RCD) -> np.ndarray:
    """The model's head on HC rows: float32 [R, C, D] -> logits float32 [R, V] (the logit
    lens of a layer is this on its hc_out). Only a stage with the head has one; R is padded
    to a power of two, so a few shapes compile."""
    if not self.has_output:
      raise ValueError(f"stage {self.layers} has no output head")
    hc_RCD = np.asarray(hc_RCD, np.float32)
    want = (self.cfg.n_hc, self.cfg.d_model)
    if hc_RCD.ndim != 3 or hc_RCD.shape[1:] != want:
      raise ValueError(f"hc rows have shape {hc_RCD.shape}, expected [R, {want[0]}, {want[1]}]")
    r = hc_RCD.shape[0]
    if r == 0:
      return np.zeros((0, self.cfg.vocab_size), np.float32)
    rb = bucket(r, 1 << 30)
    pad = np.zeros((rb,) + want, np.float32)
    pad[:r] = hc_RCD
    return np.asarray(self._head_step(self._param_leaves, pad)[:r], np.float32)

  def _fit(self, n_slots: int, b: int, t: int) -> tuple[int, int]:
    """The padded (B, T) a [b, t] call of a pool of `n_slots` runs at: the cheapest shape
    `compile_shapes` compiled for that pool that holds it (so a served step never compiles),
    else the power-of-two buckets (compiled on first use). Fixed once a runner is built, so
    the same call always runs the same program."""
    fits = [(bb, tb) for bb, tb in self._compiled_BT.get(n_slots, ()) if bb >= b and tb >= t]
    if fits:
      return min(fits, key=lambda s: (s[0] * s[1], s))
    return bucket(b, self.max_batch), bucket(t, self.max_chunk)

  def _batch_args(self, pool, slots_B, tokens_BT, hc_BTCD, n_valid_B):
    """forward_batch's checks and bucket padding: ((slots, tokens, hc, n_valid), (B, T))."""
    tokens_BT = np.asarray(tokens_BT)
    slots_B = np.asarray(slots_B, np.int64)
    n_valid_B = np.asarray(n_valid_B, np.int64)
    if tokens_BT.ndim != 2 or not tokens_BT.size or not np.issubdtype(tokens_BT.dtype, np.integer):
      raise ValueError(f"tokens must be a non-empty int [B, T] array, got {tokens_BT.shape}")
    b, t = tokens_BT.shape
    n_scratch = pool.pos.shape[0] - 1
    if b > self.max_batch:
      raise ValueError(f"batch of {b} rows exceeds max_batch={self.max_batch}")
    if t > self.max_chunk:
      raise ValueError(f"chunk of {t} tokens exceeds max_chunk={self.max_chunk}")
    if slots_B.shape != (b,) or n_valid_B.shape != (b,):
      raise ValueError("slots and n_valid must have one entry per row")
    if len(set(slots_B.tolist())) != b or slots_B.min() < 0 or slots_B.max() >= n_scratch:
      raise ValueError(f"slots must be distinct and in [0, {n_scratch})")
    if n_valid_B.min() < 1 or n_valid_B.max() > t:
      raise ValueError(f"n_valid must be in [1, {t}]")
    if tokens_BT.min() < 0 or tokens_BT.max() >= self.cfg.vocab_size:
      raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
    if (hc_BTCD is None) != self.embeds:
      raise ValueError("hc must be None iff the stage embeds (starts at layer 0)")
    bb, tb = self._fit(n_scratch, b, t)
    tok = np.zeros((bb, tb), np.int32)
    tok[:b, :t] = tokens_BT
    slots = np.full((bb,), n_scratch, np.int32)
    slots[:b] = slots_B
    nv = np.zeros((bb,), np.int32)
    nv[:b] = n_valid_B
    hc = None
    if hc_BTCD is not None:
      want = (b, t, self.cfg.n_hc, self.cfg.d_model)
      if tuple(np.shape(hc_BTCD)) != want:
        raise ValueError(f"hc has shape {np.shape(hc_BTCD)}, expected {want}")
      hc = np.zeros((bb, tb) + want[2:], np.float32)
      hc[:b, :t] = np.asarray(hc_BTCD, np.float32)
    return (slots, tok, hc, nv), (b, t)

  def truncate(self, state: StageState, pos: int) -> StageState:
    """Rewinds to `pos` (0 <= pos <= state.pos); only the counter changes."""
    cur = int(state.pos)
    if not 0 <= pos <= cur:
      raise ValueError(f"cannot truncate to pos {pos}: state holds {cur} tokens")
    return decode_state.truncate(state, pos)

  def forward(self, state: StageState, tokens_T, hc_TCD, pos0: int):
    """Runs tokens at positions pos0 .. pos0+T-1.

    Args:
      state: from init_state/forward/truncate (donated: use the returned one).
      tokens_T: int [T] token ids (every stage needs them for hash routing).
      hc_TCD: float32 [T, C, D] from the previous stage, or None iff this stage embeds.
      pos0: must equal state.pos.

    Returns:
      (out, state): out is logits float32 [T, V] if the stage has the head, else the HC
      state float32 [T, C, D].
    """
    tokens_T = np.asarray(tokens_T)
    if tokens_T.ndim != 1 or tokens_T.shape[0] < 1:
      raise ValueError(f"tokens must be a non-empty 1-D array, got shape {tokens_T.shape}")
    if not np.issubdtype(tokens_T.dtype, np.integer):
      raise ValueError(f"tokens must be integers, got {tokens_T.dtype}")
    t = tokens_T.shape[0]
    if tokens_T.min() < 0 or tokens_T.max() >= self.cfg.vocab_size:
      raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
    if (hc_TCD is None) != self.embeds:
      raise ValueError("hc must be None iff the stage embeds (starts at layer 0)")
    if hc_TCD is not None:
      hc_TCD = np.asarray(hc_TCD, np.float32)
      want = (t, self.cfg.n_hc, self.cfg.d_model)
      if hc_TCD.shape != want:
        raise ValueError(f"hc has shape {hc_TCD.shape}, expected {want}")
    cur = int(state.pos)
    if pos0 != cur:
      raise ValueError(f"pos0={pos0} does not match state.pos={cur}")
    if pos0 + t > self.ctx_size:
      raise ValueError(f"pos0 + T = {pos0 + t} exceeds ctx_size={self.ctx_size}")
    outs = []
    for s in range(0, t, self.max_chunk):
      n = min(self.max_chunk, t - s)
      tb = bucket(n, self.max_chunk)
      tok = np.zeros((tb,), np.int32)
      tok[:n] = tokens_T[s:s + n]
      hc = None
      if hc_TCD is not None:
        hc = np.zeros((tb,) + hc_TCD.shape[1:], np.float32)
        hc[:n] = hc_TCD[s:s + n]
      out, state = self._step(self._param_leaves, state, tok, hc, np.int32(n))
      outs.append(np.asarray(out[:n], np.float32))
    return (outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)), state


def prefill_chunk_for(n_tokens: int, prefill_chunk: int) -> int:
  """The smallest prefill chunk whose ladder (`StageRunner.serving_shapes`) still runs a
  prompt of `n_tokens` in one call exactly as `prefill_chunk`'s would: a one-shot run
  (generate.py) then compiles only the shapes its prompt uses (a 10-token prompt: T = 4, 16,
  not 64 and 256). A prompt longer than `prefill_chunk` keeps it."""
  c = int(prefill_chunk)
  if n_tokens > c:
    return c
  fits = [t for t in _quarters(bucket(c, 1 << 30)) if t >= n_tokens]
  return min(fits[0], c) if fits else c


def _quarters(top: int) -> list[int]:
  """top (a power of two), top / 4, top / 16, ... down to 1 or 2, ascending."""
  out = [top]
  while out[-1] >= 4:
    out.append(out[-1] // 4)
  return out[::-1]


def _powers_of_two(top: int) -> list[int]:
  """1, 2, 4, ... top (a power of two)."""
  return [1 << k for k in range(top.bit_length())]


def _stage_dtype(params) -> jnp.dtype:
  """The compute dtype: that of the largest floating parameter (a packed one counts with the
  dtype it dequantises to)."""
  best, size = jnp.float32, -1
  for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Packed)):
    n = int(np.prod(leaf.shape))
    if jnp.issubdtype(leaf.dtype, jnp.floating) and n > size:
      best, size = leaf.dtype, n
  return best


def param_bytes(params) -> dict[str, int]:
  """Device bytes of a stage's parameters: {'packed': ..., 'dense': ..., 'total': ...}."""
  out = {"packed": 0, "dense": 0}
  for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Packed)):
    if isinstance(leaf, Packed):
      out["packed"] += leaf.nbytes
    else:
      out["dense"] += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  out["total"] = out["packed"] + out["dense"]
  return out
