"""ds4's disk KV cache (`--kv_disk_dir`, `--kv_disk_space_mb`): decode states on disk, keyed
by their token prefix, so a later prompt sharing the prefix, in this process or in another
one after a restart, loads the state instead of computing it (design.md §7).

    cache = KVDiskCache("kv/", cfg=cfg, fingerprint=fp, state_dtype="float32", every=256)
    hit = cache.find(tokens, held=0)    # (n, {layer: LayerBlob}) of the longest entry, or None
    cache.store(tokens[:n], blobs)      # after a prefill, at its last chunk boundary

The backend that owns a cache (`runtime.backend.RouteBackend.kv_disk`) looks up before a step
and stores after a prefill; this module is the storage: keys, entries, trust, space.

An entry is a session snapshot directory (`snapshots.write_snapshot`: one file per layer with
its sha256, and a manifest with the tokens), so it is independent of the route that wrote it:

    DIR/<sha256 hex>/snapshot.json, layer_NNN.bin

Its name is the sha256 of the scope and the tokens (u32 LE). The scope is the snapshot format
and version, the model (fingerprint and config), the state dtype, and the key of the
interventions the state was computed under ('' for none). Entries sit at multiples of `every`
(the prefill chunk): a lookup tries the boundaries n with held < n <= len(tokens) - 1, the
longest first, and checks each candidate fully before it is used: its manifest is of this
model and holds exactly tokens[:n], and every layer file passes its size and sha256 check. A
corrupt or foreign entry is skipped with a one-line warning, removed, and computed again.

Space: a directory's mtime is its entry's last use (set on every hit); a store first evicts
the least recently used entries until the new one fits in `space_mb`. Only directories named
like entries are counted or removed. Writes are atomic (a temp directory renamed into place);
temp directories a crash left behind are removed when a cache opens the directory. A full
disk (ENOSPC, EDQUOT) stops the writes with one warning; lookups go on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import threading
import time
from typing import Sequence

import numpy as np

from ds4jax.checkpoints import snapshots
from ds4jax.checkpoints.snapshots import SnapshotError
from ds4jax.checkpoints.stage_state import LayerBlob

log = logging.getLogger("ds4jax.kv_disk")

DEFAULT_SPACE_MB = 4096  # ds4-server's default --kv-disk-space-mb
STALE_TEMP_S = 600.0  # a temp directory this old is a crash's leftover
_ENTRY = re.compile(r"[0-9a-f]{64}")
_TEMP = re.compile(r"\.[0-9a-f]{64}\..+")


class KVDiskError(ValueError):
  """A disk KV cache directory or size that cannot be used (one line)."""


def check_dir(directory) -> pathlib.Path:
  """The cache directory as an absolute path, created if missing; KVDiskError if it is a file
  or cannot be created or written. Cheap: the scripts call it before loading a model."""
  d = pathlib.Path(directory).expanduser().absolute()
  if d.exists() and not d.is_dir():
    raise KVDiskError(f"{d} is a file, not a directory")
  try:
    d.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise KVDiskError(f"cannot create {d} ({e.strerror or e})") from None
  if not os.access(d, os.W_OK | os.X_OK):
    raise KVDiskError(f"{d} is not writable")
  return d


class KVDiskCache:
  """The entries of one model's decode states in `directory` (see the module docstring).

  Args:
    directory: where the entries live (created if missing; other files there are left alone).
    cfg, fingerprint: the model (`ModelConfig`, its fingerprint or None).
    state_dtype: the decode state's dtype name ("float32", "bfloat16").
    every: the boundary spacing, in tokens (the backend's prefill chunk).
    space_mb: the most megabytes (MiB) of entries; least recently used ones are evicted.
  """

  def __init__(self, directory, *, cfg, fingerprint: str | None, state_dtype: str, every: int,
               space_mb: float = DEFAULT_SPACE_MB):
    if every < 1:
      raise KVDiskError(f"the boundary spacing must be >= 1 token, got {every}")
    if not space_mb > 0:
      raise KVDiskError(f"the space limit must be > 0 MB, got {space_mb}")
    self.root = check_dir(directory)
    self.cfg, self.fingerprint = cfg, fingerprint
    self.every = int(every)
    self.space_bytes = int(float(space_mb) * 2**20)
    self.writable = True  # False after a full disk
    self.stats = {"hits": 0, "hit_tokens": 0, "misses": 0, "stores": 0, "evicted": 0,
                  "rejected": 0}
    self._scope = json.dumps({"format": snapshots.FORMAT, "version": snapshots.VERSION,
                              "fingerprint": fingerprint, "config": cfg.to_dict(),
                              "state_dtype": str(state_dtype)}, sort_keys=True)
    self._lock = threading.Lock()  # stores and evictions (sessions step on several threads)
    self._said: set[str] = set()
    self._sweep_temps()

  def __repr__(self):
    return f"KVDiskCache({str(self.root)!r}, every={self.every})"

  # ------------------------------------------------------------------------------ keys
  def boundaries(self, lo: int, hi: int) -> list[int]:
    """The entry lengths n with lo < n <= hi, longest first."""
    return list(range(hi // self.every * self.every, lo, -self.every)) if hi > lo else []

  def _names(self, tokens: Sequence[int], tag: str, lengths: Sequence[int]) -> dict[int, str]:
    """{n: the entry name of tokens[:n]} (one incremental sha256 over the prefix)."""
    h = hashlib.sha256(f"{self._scope}\0{tag}\0".encode())
    ids = np.asarray(tokens[:max(lengths, default=0)], "<u4").tobytes()
    out, prev = {}, 0
    for n in sorted(lengths):
      h.update(ids[4 * prev:4 * n])
      out[n], prev = h.copy().hexdigest(), n
    return out

  def path(self, tokens: Sequence[int], tag: str = "") -> pathlib.Path:
    """The entry directory of exactly `tokens` (which may not exist)."""
    return self.root / self._names(tokens, tag, [len(tokens)])[len(tokens)]

  def has(self, tokens: Sequence[int], tag: str = "") -> bool:
    return (self.path(tokens, tag) / snapshots.MANIFEST).is_file()

  # --------------------------------------------------------------------------- lookups
  def find(self, tokens: Sequence[int], held: int = 0,
           tag: str = "") -> tuple[int, dict[int, LayerBlob]] | None:
    """(n, every layer's checked blob) of the longest entry tokens[:n] with
    held < n <= len(tokens) - 1 (the last token is always computed); None if there is none.
    `tag`: the interventions' key ('' for none)."""
    lengths = self.boundaries(held, len(tokens) - 1)
    if not lengths:  # the session holds every boundary already (a decode step)
      return None
    names = self._names(tokens, tag, lengths)
    for n in lengths:
      d = self.root / names[n]
      if not d.is_dir():
        continue
      try:
        m = snapshots.read_manifest(d, cfg=self.cfg, fingerprint=self.fingerprint)
        if m["n_kv"] != n or m["tokens"] != [int(t) for t in tokens[:n]]:
          raise SnapshotError(f"snapshot {d} holds another prefix than its name says")
        blobs = snapshots.read_layers(d, m, range(self.cfg.n_layers))
      except SnapshotError as e:
        self.reject(d, e)
        continue
      self.touch(d)
      self.stats["hits"] += 1
      self.stats["hit_tokens"] += n
      log.info("kv disk cache: %d of %d prompt tokens from %s", n, len(tokens), d.name[:16])
      return n, blobs
    self.stats["misses"] += 1
    return None

  def reject(self, entry: pathlib.Path, why: BaseException | str) -> None:
    """Warns (one line) that an entry is not used, and removes it: it is recomputed."""
    self.stats["rejected"] += 1
    log.warning("kv disk cache: skipping entry %s (%s); recomputing it", entry.name[:16],
                str(why).splitlines()[0] if str(why) else type(why).__name__)
    shutil.rmtree(entry, ignore_errors=True)

  @staticmethod
  def touch(entry: pathlib.Path) -> None:
    """Marks an entry as just used (its directory mtime: the LRU order, shared by processes)."""
    try:
      os.utime(entry)
    except OSError:
      pass

  # ---------------------------------------------------------------------------- stores
  def store(self, tokens: Sequence[int], blobs: dict[int, LayerBlob], tag: str = "") -> bool:
    """Writes the state of `tokens` (every layer's blob) as an entry, after evicting least
    recently used entries so that it fits; False if it was not written (the disk is full,
    the entry is larger than the whole space, a write failed: each said on one line)."""
    if not self.writable:
      return False
    tokens = [int(t) for t in tokens]
    d = self.path(tokens, tag)
    size = sum(b.nbytes for b in blobs.values()) + 16 * len(tokens) + 4096  # + the manifest
    if size > self.space_bytes:
      self._say_once("big", "kv disk cache: a %d-token entry (%.1f MB) is larger than the "
                     "space limit (%.1f MB): not stored", len(tokens), size / 2**20,
                     self.space_bytes / 2**20)
      return False
    with self._lock:
      if (d / snapshots.MANIFEST).is_file():  # another session stored it meanwhile
        return False
      self._evict(self.space_bytes - size, keep=d.name)
      try:
        snapshots.write_snapshot(d, cfg=self.cfg, fingerprint=self.fingerprint, tokens=tokens,
                                 n_kv=len(tokens), blobs=blobs, overwrite=True)
      except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
          self.writable = False
          log.warning("kv disk cache: %s is full (%s): no more entries are written; "
                      "generation goes on", self.root, e.strerror or e)
        else:
          self._say_once(f"os{e.errno}", "kv disk cache: cannot write to %s (%s): entry not "
                         "stored", self.root, e.strerror or e)
        return False
      except SnapshotError as e:
        self._say_once("snapshot", "kv disk cache: entry not stored (%s)", e)
        return False
    self.stats["stores"] += 1
    log.info("kv disk cache: stored %d tokens (%.1f MB) as %s", len(tokens), size / 2**20,
             d.name[:16])
    return True

  def entries(self) -> list[tuple[float, int, pathlib.Path]]:
    """(last use, bytes, directory) of every entry, least recently used first."""
    out = []
    for p in self._listdir():
      if not _ENTRY.fullmatch(p.name):
        continue
      try:
        used = p.stat().st_mtime
        nbytes = sum(f.stat().st_size for f in p.iterdir())
      except OSError:  # removed meanwhile (another process evicted it)
        continue
      out.append((used, nbytes, p))
    return sorted(out, key=lambda e: e[0])

  def _evict(self, budget: int, keep: str) -> None:
    """Removes least recently used entries until the others take at most `budget` bytes."""
    live = [e for e in self.entries() if e[2].name != keep]
    total = sum(nbytes for _, nbytes, _ in live)
    for _, nbytes, p in live:
      if total <= budget:
        break
      shutil.rmtree(p, ignore_errors=True)
      total -= nbytes
      self.stats["evicted"] += 1
      log.info("kv disk cache: evicted %s (%.1f MB, least recently used)", p.name[:16],
               nbytes / 2**20)

  # ------------------------------------------------------------------------------ misc
  def describe(self) -> str:
    """'kv disk cache DIR: N entries, X of Y MB, H hits (T tokens), M misses, S stored'."""
    e = self.entries()
    s = self.stats
    return (f"kv disk cache {self.root}: {len(e)} entries, "
            f"{sum(n for _, n, _ in e) / 2**20:.1f} of {self.space_bytes / 2**20:.0f} MB, "
            f"{s['hits']} hits ({s['hit_tokens']} tokens), {s['misses']} misses, "
            f"{s['stores']} stored" + ("" if self.writable else ", writes stopped (disk full)"))

  def _listdir(self) -> list[pathlib.Path]:
    try:
      return list(self.root.iterdir())
    except OSError:
      return []

  def _sweep_temps(self) -> None:
    now = time.time()
    for p in self._listdir():
      try:
        if _TEMP.fullmatch(p.name) and now - p.stat().st_mtime > STALE_TEMP_S:
          shutil.rmtree(p, ignore_errors=True)
      except OSError:
        pass

  def _say_once(self, what: str, msg: str, *args) -> None:
    if what not in self._said:
      self._said.add(what)
      log.warning(msg, *args)


__all__ = ["DEFAULT_SPACE_MB", "KVDiskCache", "KVDiskError", "check_dir"]
