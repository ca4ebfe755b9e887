"""Continuous batching at one stage (docs/design.md §11).

`StageBatcher` owns a `StageRunner`'s pool of session states and one compute thread. Callers
on any thread `run(slot, tokens, hc, pos0)` and block for the output; the compute thread
takes everything pending at once:

  1. control operations (truncate, get, put) in arrival order;
  2. every pending one-token item (a decode step) of distinct slots, as ONE `forward_batch`
     call (up to `max_batch` rows; the rest go first in the next round);
  3. at most one longer item (a prefill chunk), as its own call.

So a decode step never waits behind more than one prefill chunk, and throughput grows with
the number of sessions decoding at once: a decode step reads every weight once for all its
rows. A `run` that finds the stage idle (nothing queued, no call in progress) computes on
the calling thread instead, as a one-row call: a lone stream crosses no thread hand-off, and
items that arrive meanwhile queue for the compute thread's next round. Items of one session cannot interleave (its caller blocks on each), so running the
control operations first keeps every slot's order.

    batcher = StageBatcher(runner, n_slots=8)
    slot = batcher.alloc()
    out_TV = batcher.run(slot, [0, 17, 42], None, pos0=0)   # prefill
    out_1V = batcher.run(slot, [7], None, pos0=3)           # decode, batched with others
    batcher.free(slot)
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any

import numpy as np

from ds4jax.config import point_name

log = logging.getLogger("ds4jax.runtime.batching")


class BatcherFull(RuntimeError):
  """Every slot of a stage's pool is held by a session."""


class StateLost(RuntimeError):
  """A slot's state is not at the position the caller expects (its pool was rebuilt after a
  failed call): the caller rebuilds the session from a shorter prefix."""


@dataclasses.dataclass
class _Item:
  kind: str  # "run", "truncate", "get", "put"
  slot: int
  future: concurrent.futures.Future
  tokens: np.ndarray | None = None
  hc: Any = None
  pos0: int = 0
  arg: Any = None
  t_submit: float = 0.0
  want: frozenset | None = None  # captured points (runner.forward_capture); None: none
  edits: dict | None = None  # this row's interventions (runtime/edits.py `for_chunk`)


@dataclasses.dataclass
class BatcherStats:
  """Counters of one stage batcher (for benchmarks and /metrics)."""

  calls: int = 0  # forward_batch calls
  decode_calls: int = 0
  decode_rows: int = 0  # rows of decode calls (rows / calls = mean batch)
  chunk_calls: int = 0
  chunk_tokens: int = 0
  compute_s: float = 0.0
  max_batch_seen: int = 0


class StageBatcher:
  """The per-stage scheduler: one compute thread over a pool of `n_slots` session states.

  Args:
    runner: the stage's `StageRunner`.
    n_slots: sessions whose state the pool holds (`alloc` beyond them: BatcherFull).
    max_batch: most decode rows per call (<= runner.max_batch; default: that).
    name: for logs and the thread name.
    gather_s: longest wait, before a decode call, for the sessions of the previous decode
      call that have not resubmitted yet (a lone session never waits).
  """

  def __init__(self, runner, *, n_slots: int, max_batch: int | None = None, name: str = "",
               gather_s: float = 0.005):
    if n_slots < 1:
      raise ValueError(f"n_slots must be >= 1, got {n_slots}")
    self.runner = runner
    self.n_slots = int(n_slots)
    self.max_batch = int(min(max_batch or runner.max_batch, runner.max_batch))
    self.name = name or str(runner.layers)
    self.stats = BatcherStats()
    self._pool = runner.init_pool(self.n_slots)
    first_runs = getattr(runner, "first_runs", None)  # test doubles have none
    if first_runs is not None:  # the shapes compiled at load run once now, not on a request
      t0 = time.perf_counter()
      self._pool = first_runs(self._pool)
      if time.perf_counter() - t0 > 1.0:
        log.info("stage %s: first run of its compiled shapes in %.1fs", self.name,
                 time.perf_counter() - t0)
    self._pos = [0] * self.n_slots  # host mirror of pool.pos
    self._free = list(range(self.n_slots - 1, -1, -1))
    self._cv = threading.Condition()
    self._queue: collections.deque[_Item] = collections.deque()
    self._busy = False  # a thread (the compute thread, or an idle stage's caller) holds the pool
    # Slots of the last decode call of several rows: their callers are about to come back with
    # their next token, so the next decode call waits up to `gather_s` for them instead of
    # starting with whoever came first (which splits the sessions into groups that take
    # turns: two half-size calls per token instead of one).
    self._recent: set[int] = set()
    self.gather_s = float(gather_s)
    self._closed = False
    self._thread = threading.Thread(target=self._loop, daemon=True,
                                    name=f"ds4jax-batcher-{self.name}")
    self._thread.start()

  # -------------------------------------------------------------------------- slots
  def alloc(self) -> int:
    """A free slot, at position 0."""
    with self._cv:
      if not self._free:
        raise BatcherFull(f"stage {self.name}: all {self.n_slots} session slots are in use")
      slot = self._free.pop()
    self.truncate(slot, 0)
    return slot

  def free(self, slot: int) -> None:
    """Returns a slot (its state is garbage from now on)."""
    with self._cv:
      if slot in self._free or not 0 <= slot < self.n_slots:
        return
      self._free.append(slot)
      self._recent.discard(slot)
      self._cv.notify_all()

  @property
  def n_free(self) -> int:
    with self._cv:
      return len(self._free)

  def pos(self, slot: int) -> int:
    """Tokens the slot holds."""
    with self._cv:
      return self._pos[slot]

  # ---------------------------------------------------------------------- operations
  def truncate(self, slot: int, pos: int) -> None:
    """Rewinds a slot to `pos` tokens (0: reset)."""
    self._submit(_Item("truncate", slot, concurrent.futures.Future(), arg=int(pos))).result()

  def get(self, slot: int):
    """The slot's StageState (a copy, e.g. for a snapshot)."""
    return self._submit(_Item("get", slot, concurrent.futures.Future())).result()

  def put(self, slot: int, state) -> None:
    """Writes a StageState (e.g. restored from a snapshot) into the slot."""
    self._submit(_Item("put", slot, concurrent.futures.Future(), arg=state)).result()

  def run(self, slot: int, tokens_T, hc_TCD, pos0: int) -> np.ndarray:
    """Runs tokens at positions pos0 .. pos0+T-1 of the slot's session; blocks.

    Args:
      tokens_T: int [T] (T <= runner.max_chunk); hc_TCD: f32 [T, C, D] or None iff the
        stage embeds; pos0: must equal the slot's position (else `StateLost`).

    Returns:
      float32 [T, V] logits (head) or [T, C, D] HC state.
    """
    return self._run(slot, tokens_T, hc_TCD, pos0, None)

  def run_capture(self, slot: int, tokens_T, hc_TCD, pos0: int, want, edits=None):
    """`run` that also keeps the named points `want` ((point, layer) pairs; model/taps.py)
    and applies `edits` ({(op, point, layer): this row's values}, runtime/edits.py)
    -> (out, {"{point}.{layer}": np.ndarray [T, ...]}). It batches with plain items: the
    call captures the union of its items' points and carries the union of their edit keys,
    each row with its own values (neutral where it has none)."""
    return self._run(slot, tokens_T, hc_TCD, pos0, frozenset(want), edits or None)

  def _run(self, slot: int, tokens_T, hc_TCD, pos0: int, want, edits=None):
    tokens_T = np.asarray(tokens_T, np.int32).reshape(-1)
    if not 1 <= tokens_T.shape[0] <= self.runner.max_chunk:
      raise ValueError(f"a batcher item takes 1..{self.runner.max_chunk} tokens, "
                       f"got {tokens_T.shape[0]}")
    item = _Item("run", slot, concurrent.futures.Future(), tokens=tokens_T, hc=hc_TCD,
                 pos0=int(pos0), t_submit=time.perf_counter(), want=want, edits=edits)
    if not 0 <= slot < self.n_slots:
      raise ValueError(f"slot {slot} is not in [0, {self.n_slots})")
    with self._cv:
      if self._closed:
        raise RuntimeError(f"stage batcher {self.name} is closed")
      inline = not self._busy and not self._queue and len(self._recent) <= 1
      if inline:  # an idle stage: compute here, no hand-off
        self._busy = True
      else:
        self._queue.append(item)
        self._cv.notify()
    if inline:
      try:
        self._call([item])
      finally:
        with self._cv:
          self._busy = False
          if self._queue:
            self._cv.notify()
    return item.future.result()

  def close(self) -> None:
    with self._cv:
      self._closed = True
      self._cv.notify_all()
    self._thread.join(timeout=30)

  def _submit(self, item: _Item) -> concurrent.futures.Future:
    if not 0 <= item.slot < self.n_slots:
      raise ValueError(f"slot {item.slot} is not in [0, {self.n_slots})")
    with self._cv:
      if self._closed:
        raise RuntimeError(f"stage batcher {self.name} is closed")
      self._queue.append(item)
      self._cv.notify()
    return item.future

  # --------------------------------------------------------------------- compute thread
  def _loop(self) -> None:
    try:
      self._rounds()
    except BaseException as e:  # noqa: BLE001 - a bug here must not leave callers hanging
      log.exception("stage batcher %s stopped", self.name)
      with self._cv:
        self._closed = True
        pending = list(self._queue)
        self._queue.clear()
      for item in pending:
        item.future.set_exception(RuntimeError(f"stage batcher {self.name} stopped: {e}"))

  def _rounds(self) -> None:
    while True:
      with self._cv:
        while not self._queue or self._busy:
          if self._closed and not self._queue:
            return
          self._cv.wait()
        self._gather()
        pending = list(self._queue)
        self._queue.clear()
        self._busy = True
      try:
        self._round(pending)
      finally:
        with self._cv:
          self._busy = False

  def _gather(self) -> None:
    """(cv held) Waits up to gather_s for the previous decode call's sessions to resubmit,
    while only decode items are pending."""
    deadline = time.perf_counter() + self.gather_s
    while self._recent and not self._closed:
      if any(it.kind != "run" or it.tokens.shape[0] != 1 for it in self._queue):
        return
      if self._recent <= {it.slot for it in self._queue}:
        return
      left = deadline - time.perf_counter()
      if left <= 0:
        return
      self._cv.wait(left)

  def _round(self, pending: list[_Item]) -> None:
    """One round over the items that were pending together (see the module docstring)."""
    decode, chunks, rest = [], [], []
    for item in pending:
      if item.kind != "run":
        self._control(item)
      elif (item.tokens.shape[0] == 1 and len(decode) < self.max_batch
            and all(d.slot != item.slot for d in decode)):
        decode.append(item)
      elif item.tokens.shape[0] > 1 and not chunks:
        chunks.append(item)
      else:
        rest.append(item)
    if rest:  # next round, ahead of newer arrivals
      with self._cv:
        self._queue.extendleft(reversed(rest))
    if decode:
      self._call(decode)
    if chunks:
      self._call(chunks)

  def _control(self, item: _Item) -> None:
    try:
      if item.kind == "truncate":
        self._pool = self.runner.pool_truncate(self._pool, item.slot, item.arg)
        with self._cv:
          self._pos[item.slot] = item.arg
        item.future.set_result(None)
      elif item.kind == "get":
        item.future.set_result(self.runner.pool_get(self._pool, item.slot))
      elif item.kind == "put":
        self._pool = self.runner.pool_put(self._pool, item.slot, item.arg)
        with self._cv:
          self._pos[item.slot] = int(item.arg.pos)
        item.future.set_result(None)
    except BaseException as e:  # noqa: BLE001 - the caller gets it
      self._recover()
      item.future.set_exception(e)

  def _call(self, items: list[_Item]) -> None:
    ok = []
    for it in items:
      if it.pos0 != self._pos[it.slot]:
        it.future.set_exception(StateLost(
            f"stage {self.name}: slot {it.slot} holds {self._pos[it.slot]} tokens, "
            f"the step starts at {it.pos0}"))
      elif it.pos0 + it.tokens.shape[0] > self.runner.ctx_size:
        it.future.set_exception(ValueError(
            f"positions up to {it.pos0 + it.tokens.shape[0]} exceed ctx_size "
            f"{self.runner.ctx_size}"))
      else:
        ok.append(it)
    if not ok:
      return
    t = max(it.tokens.shape[0] for it in ok)
    tokens_BT = np.zeros((len(ok), t), np.int32)
    n_valid = np.zeros((len(ok),), np.int32)
    hc = None
    if not self.runner.embeds:
      row = np.shape(ok[0].hc)[1:]  # [C, D]
      hc = np.zeros((len(ok), t) + tuple(row), np.float32)
    for b, it in enumerate(ok):
      n = it.tokens.shape[0]
      tokens_BT[b, :n], n_valid[b] = it.tokens, n
      if hc is not None:
        hc[b, :n] = np.asarray(it.hc, np.float32)
    want = frozenset().union(*(it.want for it in ok if it.want))
    edits = _edit_table(ok, t)
    caps = {}
    t0 = time.perf_counter()
    try:
      if want or edits:
        out, caps, self._pool = self.runner.forward_capture(
            self._pool, [it.slot for it in ok], tokens_BT, hc, n_valid, want, edits)
        caps = {k: np.asarray(v) for k, v in caps.items()}
      else:
        out, self._pool = self.runner.forward_batch(
            self._pool, [it.slot for it in ok], tokens_BT, hc, n_valid)
      out = np.asarray(out, np.float32)
    except BaseException as e:  # noqa: BLE001 - every item of the call gets it (even a
      # KeyboardInterrupt: this thread must outlive any one call)
      self._recover()
      for it in ok:
        it.future.set_exception(e)
      return
    dt = time.perf_counter() - t0
    st = self.stats
    st.calls += 1
    st.compute_s += dt
    if t == 1:
      with self._cv:
        self._recent = {it.slot for it in ok} if len(ok) > 1 else set()
      st.decode_calls += 1
      st.decode_rows += len(ok)
      st.max_batch_seen = max(st.max_batch_seen, len(ok))
    else:
      st.chunk_calls += 1
      st.chunk_tokens += int(n_valid.sum())
    with self._cv:
      for it, n in zip(ok, n_valid):
        self._pos[it.slot] = it.pos0 + int(n)
    for b, (it, n) in enumerate(zip(ok, n_valid)):
      if it.want is None and it.edits is None:
        it.future.set_result(out[b, :n])
      else:
        it.future.set_result((out[b, :n], {point_name(p, il): caps[point_name(p, il)][b, :n]
                                           for p, il in it.want}))

  def _recover(self) -> None:
    """After a failed call the donated pool may be gone: rebuild it. Every slot is then at
    position 0, which the next `run` of each session sees (`StateLost`)."""
    pos = getattr(self._pool, "pos", None)
    if getattr(pos, "is_deleted", lambda: False)():
      log.warning("stage %s: rebuilding the state pool after a failed call", self.name)
      self._pool = self.runner.init_pool(self.n_slots)
      with self._cv:
        self._pos = [0] * self.n_slots


def _edit_table(items, t: int) -> dict:
  """The call's edits: {(op, point, layer): values with one row per item} (the layout
  `StageRunner.forward_capture` takes), neutral where an item has no such edit."""
  keys = sorted({k for it in items if it.edits for k in it.edits})
  table = {}
  for key in keys:
    op = key[0]
    given = [(b, it.edits[key]) for b, it in enumerate(items) if it.edits and key in it.edits]
    if op == "scale":
      s = np.ones((len(items),), np.float32)
      for b, v in given:
        s[b] = v
      table[key] = s
    elif op == "add":
      v0 = np.asarray(given[0][1])
      v = np.zeros((len(items),) + v0.shape, np.float32)
      for b, x in given:
        v[b] = x
      table[key] = v
    elif op == "project":
      d0 = np.asarray(given[0][1][0])
      d, s = np.zeros((len(items),) + d0.shape, np.float32), np.zeros((len(items),), np.float32)
      for b, (x, sc) in given:
        d[b], s[b] = x, sc
      table[key] = (d, s)
    else:  # set: [n, *row] rows and [n] mask per item, padded to the call's t
      row = np.asarray(given[0][1][0]).shape[1:]
      v, m = np.zeros((len(items), t) + row, np.float32), np.zeros((len(items), t), bool)
      for b, (x, mask) in given:
        v[b, :len(mask)], m[b, :len(mask)] = x, mask
      table[key] = (v, m)
  return table


def warmup_batched(runner, batch_sizes, chunk_sizes, n_slots: int) -> None:
  """Compiles `forward_batch` for these decode batch sizes x chunk sizes on a pool of
  `n_slots` (what a StageBatcher of that many slots runs); a runner without `compile_batch`
  (test fakes) compiles nothing."""
  compile_batch = getattr(runner, "compile_batch", None)
  sizes = sorted(set(min(int(s), runner.ctx_size) for s in chunk_sizes if s))
  if compile_batch is not None and sizes:
    compile_batch(tuple(batch_sizes) or (1,), sizes, n_slots=n_slots)


__all__ = ["BatcherFull", "BatcherStats", "StageBatcher", "StateLost", "warmup_batched"]
