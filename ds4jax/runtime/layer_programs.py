"""LayerPrograms: `Stage.batched` as one compiled program per kind of layer (issue 21 item 3).

The whole-stage step unrolls every layer into one XLA program, and XLA:CPU keeps each
compiled program's HLO, buffer assignment and thunks resident: about 9 MB a layer for every
compiled shape (12 Flash-dims layers: ~100 MB a shape, 4-5 shapes a run), so a stage's
memory grew with its layer count. Layers of one kind (same compress ratio, hash routing,
clamp, parameter tree, types and shapes: ds4's Flash schedule has four kinds) run the same
program on their own weights and state, so a stage keeps kinds x shapes programs, not
layers x shapes. A step is then L + 2 calls (`batch_begin`, each block, `batch_end`) instead
of one: about 0.1 ms each on CPU, nothing next to a Flash layer's 18 ms but a real share of a
small model's step, so `StageRunner` picks this only where layers are large (`auto`).

The math is `Stage.batched`'s: `batch_begin`, each `Block.batched`, `batch_end`, in order.
A streamed layer (`gguf.streaming`) is its own kind (its experts come by its layer index).
The capturing step (`forward_capture`) stays one program.
"""

from __future__ import annotations

import jax
from flax import nnx

from ds4jax.model.decode_state import StageState
from ds4jax.model.stage import Stage, batch_begin, batch_end

# `auto`: layer programs where a stage's blocks hold at least this many parameter bytes
# each (on average) and two or more blocks share a kind.
MIN_LAYER_BYTES = 32 << 20


def _kind_key(block) -> tuple:
  """What makes two blocks run the same program: their graph (with the layer index, which
  only names them, set aside) and their parameters' tree, shapes and dtypes."""
  mods = [m for _, m in nnx.iter_modules(block) if hasattr(m, "layer_idx")]
  if getattr(block.moe, "expert_source", None) is not None:
    return ("streamed", block.layer_idx)
  saved = [m.layer_idx for m in mods]
  try:
    for m in mods:
      m.layer_idx = -1
    gdef, state = nnx.split(block)
  finally:
    for m, il in zip(mods, saved):
      m.layer_idx = il
  leaves, treedef = jax.tree.flatten(state)
  return gdef, treedef, tuple((x.shape, str(x.dtype)) for x in leaves)


class LayerPrograms:
  """Callable like `StageRunner`'s whole-stage `batch_step(leaves, pool, slots_B, tokens_BT,
  hc_BTCD, n_valid_B) -> (out, pool)` (the pool donated), and `.lower(...)` with abstract
  arguments -> an object whose `.compile()` compiles every program that shape runs.

  `leaves` is the stage's flat parameter list (`jax.tree.flatten(nnx.split(stage)[1])`);
  each program takes its own part of it.
  """

  def __init__(self, stage: Stage, leaves: list, on_trace=None):
    graphdef, params = nnx.split(stage)
    index = {id(x): i for i, x in enumerate(leaves)}

    def part(module):  # (graphdef, treedef, indices of its leaves in `leaves`)
      g, st = nnx.split(module)
      sub, treedef = jax.tree.flatten(st)
      return g, treedef, [index[id(x)] for x in sub]

    self._embed = part(stage.embed) if stage.embed is not None else None
    self._head = part(stage.head) if stage.head is not None else None
    self._blocks, self.kinds = [], []  # per block: its part; its kind (an index)
    firsts: dict = {}
    for block in stage.blocks:
      key = _kind_key(block)
      if key not in firsts:
        firsts[key] = len(firsts)
      self.kinds.append(firsts[key])
      self._blocks.append(part(block))
    self.n_kinds = len(firsts)
    # A kind's program is traced with its first block's graph (one trace per kind and shape).
    self._kind_part = {}
    for (g, treedef, _), k in zip(self._blocks, self.kinds):
      self._kind_part.setdefault(k, (g, treedef))
    self._on_trace = on_trace or (lambda: None)

    def begin(embed_leaves, pos_S, slots_B, tokens_BT, hc_BTCD):
      self._on_trace()
      embed = None
      if self._embed is not None:
        g, treedef, _ = self._embed
        embed = nnx.merge(g, jax.tree.unflatten(treedef, embed_leaves))
      return batch_begin(embed, pos_S, slots_B, tokens_BT, hc_BTCD)

    def block(block_leaves, lp, x_NCD, tokens_N, pos0_B, slots_B, kind, t):
      self._on_trace()
      g, treedef = self._kind_part[kind]
      blk = nnx.merge(g, jax.tree.unflatten(treedef, block_leaves))
      return blk.batched(x_NCD, tokens_N, pos0_B, slots_B, lp, t)

    def end(head_leaves, x_NCD, pos_S, slots_B, pos0_B, n_valid_B, b, t):
      self._on_trace()
      head = None
      if self._head is not None:
        g, treedef, _ = self._head
        head = nnx.merge(g, jax.tree.unflatten(treedef, head_leaves))
      return batch_end(head, x_NCD, pos_S, slots_B, pos0_B, n_valid_B, b, t)

    self._begin = jax.jit(begin)
    self._block = jax.jit(block, static_argnames=("kind", "t"), donate_argnames=("lp",))
    self._end = jax.jit(end, static_argnames=("b", "t"), donate_argnames=("pos_S",))
    self._split_for = None

  def _parts(self, leaves: list):
    """leaves -> (embed leaves, [block leaves], head leaves), cached for the same list."""
    if self._split_for is not None and self._split_for[0] is leaves:
      return self._split_for[1]
    take = lambda p: [leaves[i] for i in p[2]] if p is not None else []
    out = take(self._embed), [take(p) for p in self._blocks], take(self._head)
    self._split_for = (leaves, out)
    return out

  def __call__(self, leaves, pool: StageState, slots_B, tokens_BT, hc_BTCD, n_valid_B):
    return self._run(self._parts(leaves), pool, slots_B, tokens_BT, hc_BTCD, n_valid_B, None)

  def _run(self, parts, pool, slots_B, tokens_BT, hc_BTCD, n_valid_B, lowered):
    embed_l, block_l, head_l = parts
    b, t = tokens_BT.shape
    call = (lambda f, *a, **k: lowered.append(f.lower(*a, **k))) if lowered is not None else None
    if call is None:
      x, tokens_N, pos0_B = self._begin(embed_l, pool.pos, slots_B, tokens_BT, hc_BTCD)
      layers = []
      for kind, leaves, lp in zip(self.kinds, block_l, pool.layers):
        x, lp = self._block(leaves, lp, x, tokens_N, pos0_B, slots_B, kind=kind, t=t)
        layers.append(lp)
      out, pos_S = self._end(head_l, x, pool.pos, slots_B, pos0_B, n_valid_B, b=b, t=t)
      return out, StageState(pos=pos_S, layers=tuple(layers))
    # Abstract: lower each distinct program once, following the shapes through eval_shape.
    args = (embed_l, pool.pos, slots_B, tokens_BT, hc_BTCD)
    call(self._begin, *args)
    x, tokens_N, pos0_B = jax.eval_shape(self._begin, *args)
    seen = set()
    for kind, leaves, lp in zip(self.kinds, block_l, pool.layers):
      if kind not in seen:
        seen.add(kind)
        call(self._block, leaves, lp, x, tokens_N, pos0_B, slots_B, kind=kind, t=t)
    call(self._end, head_l, x, pool.pos, slots_B, pos0_B, n_valid_B, b=b, t=t)
    return None

  def lower(self, leaves, pool, slots_B, tokens_BT, hc_BTCD, n_valid_B):
    lowered: list = []
    self._run(self._parts(leaves), pool, slots_B, tokens_BT, hc_BTCD, n_valid_B, lowered)
    return _Lowered(lowered)


class _Lowered:
  def __init__(self, lowered):
    self._lowered = lowered

  def compile(self):
    return [low.compile() for low in self._lowered]
