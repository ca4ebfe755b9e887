"""Expert streaming (ds4's `--ssd-streaming`, docs/design.md §15): the routed experts stay in
the GGUF, read on demand into a bounded host cache; every other weight is resident.

    opts = StreamingOptions.parse("1GB", preload=0, cold=False)
    cache = ExpertCache(ds4file, layers, opts, k=6, dtype=jnp.float32)  # checks the budget
    routed_TD = cache.routed(moe, x_TD, idx_TK, w_TK)  # inside the jitted step (MoE.__call__)
    cache.stats()  # live entries, hits, misses, bytes read

An expert is one layer's (gate, up, down) of one expert id. The step reaches the cache
through `jax.pure_callback`s, in the same `MoE.routed` paths as a resident layer:
- `gather` (decode rows, short chunks: the kernel pairs path) takes chosen ids int32 [T, k]
  and returns the unique chosen experts' packed planes, stacked with a static leading size
  P = min(T*k, E) (zero-padded; ascending ids), plus the ids remapped into that stack. More
  rows than `gather_bytes` allows gather in row groups, one group at a time.
- `expert` (prefill: the grouped path) reads one expert as the loop over chosen experts
  reaches it, so a long chunk never holds more than one of them in the step.
Misses are read with `os.pread` (a truncated file is a short read, a one-line
`StreamingError`, where a memory map would raise SIGBUS), split into planes once, and kept
least recently used first within the budget (bytes or slots).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q

from ds4jax.config import expert_cache_option
from ds4jax.quant import matmul as quant_matmul
from ds4jax.quant.packed import FLOAT16_TYPES, Packed, plane_specs, storage

# The routed expert tensors of layer {i}, in (gate, up, down) order, and their parameters.
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
EXPERT_PARAMS = ("gate_exps", "up_exps", "down_exps")
# The most expert bytes one gather brings into a step: the rows of a longer decode batch or
# chunk gather in groups (`ExpertCache.routed`), so what the step holds does not grow with
# them (Flash: 2 rows, 12 experts of 7.1 MB, per gather).
GATHER_BYTES = 128 << 20


class StreamingError(RuntimeError):
  """The GGUF under a streaming process failed (deleted, truncated, unreadable); one line."""


@dataclasses.dataclass(frozen=True)
class StreamingOptions:
  """ds4's streaming options, checked.

  Attributes:
    budget: the cache's byte budget, or None with `slots`.
    slots: the cache's expert slots, or None with `budget`.
    preload: experts read at start (layer by layer, ids ascending), at most what fits.
    cold: drop the file's pages from the OS page cache at start, so misses read the disk.
    spec: the cache option as given (for messages).
  """

  budget: int | None = None
  slots: int | None = None
  preload: int = 0
  cold: bool = False
  spec: str = ""

  @classmethod
  def parse(cls, cache="32GB", preload: int = 0, cold: bool = False) -> StreamingOptions:
    """`cache`: a byte size ('32GB', '512MiB', decimal and binary units) or a plain N (expert
    slots); one-line ValueErrors for anything else."""
    if int(preload) < 0:
      raise ValueError(f"--ssd_streaming_preload_experts must be >= 0, got {preload}")
    budget, slots = expert_cache_option(cache)
    return cls(budget=budget, slots=slots, preload=int(preload), cold=bool(cold),
               spec=str(cache).strip())


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """Where one layer's expert tensor sits in the file: numpy shape [E, ...], GGML type, the
  offset of its data and the bytes of one expert."""

  name: str
  shape: tuple
  qtype: int
  offset: int
  expert_bytes: int


class ExpertCache:
  """The routed experts of a slice's layers, read from the GGUF on demand (module docstring).

  Attributes: path, layers (absolute layer ids), n_experts, k, entry_bytes (per layer).
  The cache is reached from the jitted step, so it is a static attribute of each `MoE`
  (compared by identity).
  """

  def __init__(self, f, layers, options: StreamingOptions, *, k: int, dtype,
               act: str = "exact", gather_bytes: int | None = None):
    """f: the open `DS4File`; layers: absolute layer ids of the slice; k: experts per token;
    dtype: the compute dtype of the packed weights; act: their activation mode;
    gather_bytes: the most expert bytes one gather brings into the step (`routed`; default
    GATHER_BYTES)."""
    self.path = f.path
    self.options = options
    self.layers = tuple(int(il) for il in layers)
    self.n_experts, self.k = int(f.cfg.n_experts), int(k)
    self.dtype, self.act = dtype, act
    self.gather_bytes = int(GATHER_BYTES if gather_bytes is None else gather_bytes)
    self._tensors: dict[int, tuple[_Tensor, ...]] = {}
    for il in self.layers:
      ts = []
      for base in EXPERT_TENSORS:
        t = f.tensor(f"blk.{il}.{base}.weight")
        shape = tuple(int(d) for d in reversed(t.shape))
        ts.append(_Tensor(t.name, shape, int(t.tensor_type), int(t.data_offset),
                          int(t.n_bytes) // shape[0]))
      self._tensors[il] = tuple(ts)
    self.entry_bytes = {il: sum(t.expert_bytes for t in ts) for il, ts in self._tensors.items()}
    self._end = max((t.offset + t.expert_bytes * t.shape[0]
                     for ts in self._tensors.values() for t in ts), default=0)
    self._check_budget()
    self._lru: collections.OrderedDict = collections.OrderedDict()  # (il, e) -> (planes, bytes)
    self._bytes = 0
    self._lock = threading.Lock()
    self.hits = self.misses = self.evictions = self.bytes_read = 0
    self._fd = os.open(self.path, os.O_RDONLY)
    weakref.finalize(self, os.close, self._fd)
    if options.cold:
      _drop_page_cache(self._fd)
    self.preload(options.preload)
    _LIVE.add(self)

  # -- budget --------------------------------------------------------------------------
  def min_budget(self) -> tuple[int, int]:
    """(slots, bytes) of one token's experts: k experts of the slice's largest layer."""
    return self.k, self.k * max(self.entry_bytes.values(), default=0)

  def _check_budget(self) -> None:
    slots, need = self.min_budget()
    o = self.options
    if o.slots is not None and o.slots < slots:
      raise ValueError(f"--ssd_streaming_cache_experts={o.spec} is below one token's experts: "
                       f"at least {slots} slots ({need / 2**20:.1f} MiB)")
    if o.budget is not None and o.budget < need:
      raise ValueError(f"--ssd_streaming_cache_experts={o.spec} is below one token's experts: "
                       f"at least {need} bytes ({need / 2**20:.1f} MiB, {slots} experts of "
                       "the largest layer)")

  def _full(self, extra: int) -> bool:
    o = self.options
    if o.slots is not None:
      return len(self._lru) + 1 > o.slots
    return self._bytes + extra > o.budget

  # -- host side -----------------------------------------------------------------------
  def _read(self, il: int, e: int):
    """Expert `e` of layer `il` from the file: ((gate planes), (up planes), (down planes))."""
    try:
      st = os.fstat(self._fd)
    except OSError as err:
      raise StreamingError(f"{self.path}: cannot stat the streamed GGUF: {err.strerror}") from None
    if st.st_nlink == 0:
      raise StreamingError(f"{self.path} was deleted under a streaming process")
    if st.st_size < self._end:
      raise StreamingError(f"{self.path} was truncated under a streaming process ({st.st_size} "
                           f"bytes, the experts end at {self._end})")
    out = []
    for t in self._tensors[il]:
      buf = np.empty(t.expert_bytes, np.uint8)
      try:
        n = os.preadv(self._fd, [buf], t.offset + e * t.expert_bytes)
      except OSError as err:
        raise StreamingError(f"{self.path}: reading {t.name} expert {e}: "
                             f"{err.strerror}") from None
      if n != t.expert_bytes:
        raise StreamingError(f"{self.path} was truncated under a streaming process (a short "
                             f"read of {t.name} expert {e})")
      self.bytes_read += n
      out.append(_planes(buf, t.qtype, t.shape[1:]))
    return tuple(out)

  def _get(self, il: int, e: int, *, count: bool = True):
    """The planes of (il, e), from the cache or the file (then cached, LRU evicted first);
    `count`: as a hit or a miss in `stats()` (a preload is neither)."""
    key = (il, e)
    hit = self._lru.get(key)
    if hit is not None:
      self._lru.move_to_end(key)
      self.hits += count
      return hit[0]
    self.misses += count
    planes = self._read(il, e)
    size = self.entry_bytes[il]
    while self._lru and self._full(size):
      _, (_, old) = self._lru.popitem(last=False)
      self._bytes -= old
      self.evictions += 1
    self._lru[key] = (planes, size)
    self._bytes += size
    return planes

  def preload(self, n: int) -> int:
    """Reads up to `n` experts (layer by layer, ids ascending) while they fit; returns how
    many were read."""
    done = 0
    with self._lock:
      for il in self.layers:
        for e in range(self.n_experts):
          if done >= n or self._full(self.entry_bytes[il]):
            return done
          self._get(il, e, count=False)
          done += 1
    return done

  def _host_gather(self, idx_TK, *, il: int, p: int):
    """numpy side of `gather`: the planes of the unique ids, stacked [P, ...], and the ids
    remapped (ascending, so the grouped path visits them in the resident order)."""
    idx_TK = np.asarray(idx_TK)
    uniq = np.unique(idx_TK)
    with self._lock:
      got = [self._get(il, int(e)) for e in uniq]
    out = []
    for j, t in enumerate(self._tensors[il]):
      for s, (shape, dt) in enumerate(plane_specs(t.qtype, (p,) + t.shape[1:])):
        stack = np.zeros(shape, dt)
        for u, planes in enumerate(got):
          stack[u] = planes[j][s]
        out.append(stack)
    out.append(np.searchsorted(uniq, idx_TK).astype(np.int32))
    return tuple(out)

  def _host_one(self, e, *, il: int):
    """numpy side of `StreamedLayer.expert`: expert `e`'s planes, gate's, up's, then down's."""
    with self._lock:
      got = self._get(il, int(e))
    return tuple(p for planes in got for p in planes)

  # -- device side ---------------------------------------------------------------------
  def routed(self, moe, x_TD, idx_TK, w_TK):
    """`moe.routed` (the same kernels, the same paths as a resident layer) on the experts
    that layer `moe.layer_idx`'s tokens chose, f32 [T, D], for x [T, D], ids int32 [T, k]
    and weights f32 [T, k]. What the step holds of them at once is bounded:
    - rows that take the kernel pairs path (decode, short chunks) gather their chosen
      experts in row groups of at most `gather_bytes`, one group at a time (a `lax.map`);
      each row's sum is the one its resident call computes;
    - longer chunks (prefill) take the grouped path, whose loop reads each chosen expert
      as it reaches it (`StreamedLayer`): one expert in the step at a time.
    """
    il, (t, k) = moe.layer_idx, idx_TK.shape
    gate = Packed.abstract(self._tensors[il][0].qtype, self._tensors[il][0].shape, self.dtype,
                           self.act)
    if not quant_matmul.pairs_path(t, gate):
      return moe.routed(x_TD, idx_TK, w_TK, StreamedLayer(self, il))
    rows = self.group_rows(il)
    if t <= rows:
      experts, ids_TK = self.gather(il, idx_TK)
      return moe.routed(x_TD, ids_TK, w_TK, experts)
    n = -(-t // rows)
    pad = n * rows - t  # padding rows repeat the last row's ids (no new experts), weight 0

    def group(args):
      x_RD, idx_RK, w_RK = args
      experts, ids_RK = self.gather(il, idx_RK)
      return moe.routed(x_RD, ids_RK, w_RK, experts)

    x_GRD = jnp.pad(x_TD, ((0, pad), (0, 0))).reshape(n, rows, -1)
    idx_GRK = jnp.concatenate([idx_TK, jnp.repeat(idx_TK[-1:], pad, 0)]).reshape(n, rows, k)
    w_GRK = jnp.pad(w_TK, ((0, pad), (0, 0))).reshape(n, rows, k)
    return jax.lax.map(group, (x_GRD, idx_GRK, w_GRK)).reshape(n * rows, -1)[:t]

  def group_rows(self, il: int) -> int:
    """Rows whose chosen experts one gather brings in: the most whose k experts each fit
    `gather_bytes` (at least 1)."""
    return max(1, self.gather_bytes // (self.k * self.entry_bytes[il]))

  def gather(self, il: int, idx_TK):
    """The experts layer `il`'s tokens chose, for `MoE.routed`.

    Args:
      il: the absolute layer (static); idx_TK: int32 [T, k] chosen ids (traced).

    Returns:
      ((gate [P, F, D], up [P, F, D], down [P, D, F]) as `Packed`, int32 [T, k] ids into
      them), P = min(T*k, E).
    """
    t, k = idx_TK.shape
    p = min(t * k, self.n_experts)
    specs = []
    for tensor in self._tensors[il]:
      specs += [jax.ShapeDtypeStruct(s, d)
                for s, d in plane_specs(tensor.qtype, (p,) + tensor.shape[1:])]
    specs.append(jax.ShapeDtypeStruct((t, k), np.int32))
    res = jax.pure_callback(functools.partial(self._host_gather, il=il, p=p), tuple(specs),
                            idx_TK)
    experts, at = [], 0
    for tensor in self._tensors[il]:
      n = len(plane_specs(tensor.qtype, tensor.shape))
      experts.append(Packed(tuple(res[at:at + n]), tensor.qtype, (p,) + tensor.shape[1:],
                            self.dtype, self.act))
      at += n
    return tuple(experts), res[-1]

  def expert(self, il: int, e):
    """Expert `e` (traced int32) of layer `il`: (gate [F, D], up [F, D], down [D, F]) as
    `Packed`, read through the cache by a `jax.pure_callback`."""
    specs, n_planes = [], []
    for tensor in self._tensors[il]:
      ps = plane_specs(tensor.qtype, tensor.shape[1:])
      specs += [jax.ShapeDtypeStruct(sh, dt) for sh, dt in ps]
      n_planes.append(len(ps))
    res = jax.pure_callback(functools.partial(self._host_one, il=il), tuple(specs), e)
    out, at = [], 0
    for tensor, n in zip(self._tensors[il], n_planes):
      out.append(Packed(tuple(res[at:at + n]), tensor.qtype, tensor.shape[1:], self.dtype,
                        self.act))
      at += n
    return tuple(out)

  # -- reports -------------------------------------------------------------------------
  @property
  def nbytes(self) -> int:
    """Host bytes the cached experts hold (<= the budget)."""
    return self._bytes

  def stats(self) -> dict:
    """{entries, bytes, budget, slots, hits, misses, evictions, hit_rate, bytes_read}."""
    looks = self.hits + self.misses
    return {"entries": len(self._lru), "bytes": self._bytes, "budget": self.options.budget,
            "slots": self.options.slots, "hits": self.hits, "misses": self.misses,
            "evictions": self.evictions, "hit_rate": self.hits / looks if looks else 0.0,
            "bytes_read": self.bytes_read}

  def __repr__(self) -> str:
    return f"ExpertCache({os.path.basename(self.path)!r}, layers {self.layers})"


@dataclasses.dataclass(frozen=True)
class StreamedLayer:
  """One streamed layer's routed experts as `MoE.routed` reads them one at a time (its
  grouped path): `expert(e)` and `n_experts`."""

  cache: ExpertCache
  il: int

  @property
  def n_experts(self) -> int:
    return self.cache.n_experts

  def expert(self, e):
    return self.cache.expert(self.il, e)


def _planes(buf, qtype: int, shape) -> tuple:
  """One expert's GGUF bytes -> its packed planes (numpy), as `Packed.from_gguf_data`."""
  dshape, ddtype = storage(qtype, shape)
  arr = buf.view(ddtype).reshape(dshape)
  if Q(qtype) in FLOAT16_TYPES:
    return (arr,)
  from ds4jax.quant import kernels
  return tuple(np.ascontiguousarray(p) for p in kernels.split_planes(arr, Q(qtype),
                                                                     int(shape[-1])))


def _drop_page_cache(fd: int) -> None:
  if hasattr(os, "posix_fadvise"):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


_LIVE: weakref.WeakSet = weakref.WeakSet()


def stats() -> dict | None:
  """The summed `stats()` of this process's live caches (None without streaming)."""
  caches = list(_LIVE)
  if not caches:
    return None
  keys = ("entries", "bytes", "hits", "misses", "evictions", "bytes_read")
  out = {k: sum(c.stats()[k] for c in caches) for k in keys}
  looks = out["hits"] + out["misses"]
  out["hit_rate"] = out["hits"] / looks if looks else 0.0
  out["caches"] = len(caches)
  return out


def format_stats(s: dict) -> str:
  """The report line of `stats()` (with `bytes_read_per_token` added by the caller, who knows
  the tokens): live entries, hit rate, bytes read from the file per token."""
  line = (f"expert cache: {s['entries']} live entries ({s['bytes'] / 2**20:.1f} MiB), hit rate "
          f"{100 * s['hit_rate']:.1f}% ({s['hits']} hits, {s['misses']} misses)")
  if "bytes_read_per_token" in s:
    line += f", {s['bytes_read_per_token'] / 2**20:.3f} MiB read from the file per token"
  return line
