"""ds4's disk KV cache (`checkpoints/kv_disk.py`, `RouteBackend.kv_disk`): a prefill stores its
state at its last chunk boundary; a later prompt sharing a prefix loads the longest stored
one and computes only the rest, with the same logits. LRU eviction within the space limit;
corrupt, truncated and foreign entries are skipped with one warning and recomputed; a full
disk stops the writes and generation goes on; across a bridge split and back.

The backends run at the suite's shapes (CTX, CHUNK) on runners restored from the orbax
checkpoint (tests/checkpoints/conftest.py), shared with the snapshot tests.
"""

import errno
import logging
import os
import pathlib
import shutil
import time

import numpy as np
import pytest

from ds4jax.build import attach_kv_disk
from ds4jax.checkpoints import snapshots
from ds4jax.checkpoints.kv_disk import KVDiskCache, KVDiskError, check_dir
from ds4jax.checkpoints.stage_state import LayerBlob, sha256
from ds4jax.runtime.local import LocalBackend
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.suite import CHUNK

from session_snapshot_test import Route  # a coordinator 0:K + threaded workers

GREEDY = SamplingParams()
RNG = np.random.default_rng(23)
# 40 tokens: boundaries at 16 and 32 (CHUNK), and 8 tokens past the last one.
PROMPT = [0] + [int(t) for t in RNG.integers(3, 500, size=39)]
LOG = "ds4jax.kv_disk"


@pytest.fixture(scope="module")
def plain(make_runner):
  """The whole model, no disk cache: the reference."""
  with LocalBackend([make_runner("all")], prefill_chunk=CHUNK) as backend:
    yield backend


def first_step(backend, prompt, **kw):
  sid = backend.new_session()
  try:
    return backend.step(sid, prompt, GREEDY, 0, return_logits=True, **kw)
  finally:
    backend.close_session(sid)


def cached(make_runner, d, **kw):
  return attach_kv_disk(LocalBackend([make_runner("all")], prefill_chunk=CHUNK), d, **kw)


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno >= logging.WARNING]


def test_hit_miss_and_partial_prefix(make_runner, plain, tmp_path, caplog):
  caplog.set_level(logging.INFO, LOG)
  be = cached(make_runner, tmp_path)
  ref = first_step(plain, PROMPT)
  cold = first_step(be, PROMPT)  # a miss: computes all 40, stores tokens[:32]
  assert cold.n_computed == 40 and cold.token == ref.token
  assert [n for n in range(1, 41) if be.kv_disk.has(PROMPT[:n])] == [32]
  warm = first_step(be, PROMPT)  # in a fresh session: 32 from disk, 8 computed
  assert warm.n_computed == 8 and warm.token == ref.token
  np.testing.assert_allclose(warm.logits_V, ref.logits_V, rtol=0, atol=1e-5)
  # A prompt sharing 35 tokens: the longest stored boundary <= 35 is 32; it stores 48.
  other = PROMPT[:35] + [int(t) for t in RNG.integers(3, 500, size=15)]
  part = first_step(be, other)
  assert part.n_computed == 18 and part.token == first_step(plain, other).token
  assert be.kv_disk.has(other[:48])
  # Diverging before the first boundary: a miss (its 16 tokens are stored). Exactly a
  # boundary long: the last token is always computed, so the 32-token entry serves 33 tokens
  # and up; 32 tokens store (and then find) the state of 16.
  assert first_step(be, PROMPT[:5] + [7] * 20).n_computed == 25
  assert first_step(be, PROMPT[:32]).n_computed == 32 and be.kv_disk.has(PROMPT[:16])
  assert first_step(be, PROMPT[:32]).n_computed == 16
  assert first_step(be, PROMPT[:33]).n_computed == 1
  # A session that holds more than the disk has is not touched; decode steps store nothing.
  sid = be.new_session()
  tr = list(PROMPT)
  for i in range(3):
    res = be.step(sid, tr, GREEDY, i)
    tr.append(res.token)
  assert res.n_computed == 1
  be.close_session(sid)
  assert be.kv_disk.stats["stores"] == 4 and not warnings_of(caplog)
  be.close()
  # Another process (here: another cache object on the same directory) finds the entries.
  with cached(make_runner, tmp_path) as again:
    assert first_step(again, PROMPT).n_computed == 8


def fake_blobs(cfg, nbytes):
  data = bytes(nbytes)
  return {il: LayerBlob({"fields": [], "nbytes": nbytes, "sha256": sha256(data)}, data)
          for il in range(cfg.n_layers)}


def test_lru_eviction_within_the_space_limit(plain, tmp_path):
  cfg = plain.cfg
  mb = 2**20
  kv = KVDiskCache(tmp_path, cfg=cfg, fingerprint="fp", state_dtype="float32", every=4,
                   space_mb=1)  # room for two entries of 4 x 100 KiB
  blobs = fake_blobs(cfg, 100 << 10)
  a, b, c = ([k, 1, 2, 3] for k in (5, 6, 7))
  assert kv.store(a, blobs) and kv.store(b, blobs)
  now = time.time()
  os.utime(kv.path(a), (now - 100, now - 100))
  os.utime(kv.path(b), (now - 50, now - 50))
  assert kv.find(a + [9], 0)[0] == 4  # a hit makes `a` the most recently used
  assert kv.store(c, blobs)  # evicts b, the least recently used
  assert [kv.has(t) for t in (a, b, c)] == [True, False, True]
  assert kv.stats["evicted"] == 1
  assert sum(n for _, n, _ in kv.entries()) <= mb
  # An entry larger than the whole space is not stored (and evicts nothing).
  assert not kv.store([8, 1, 2, 3], fake_blobs(cfg, 300 << 10))
  assert [kv.has(t) for t in (a, c)] == [True, True]
  # Files that are not entries are neither counted nor removed; a crash's temp dir is swept.
  (tmp_path / "notes.txt").write_text("mine")
  stale = tmp_path / f".{'0' * 64}.crash"
  stale.mkdir()
  os.utime(stale, (now - 3600, now - 3600))
  KVDiskCache(tmp_path, cfg=cfg, fingerprint="fp", state_dtype="float32", every=4)
  assert (tmp_path / "notes.txt").exists() and not stale.exists()


def test_corrupt_truncated_and_foreign_entries_are_recomputed(make_runner, plain, tmp_path,
                                                              caplog):
  caplog.set_level(logging.INFO, LOG)
  be = cached(make_runner, tmp_path)
  ref = first_step(plain, PROMPT)
  first_step(be, PROMPT)
  entry = be.kv_disk.path(PROMPT[:32])
  layer = entry / "layer_002.bin"

  def damage_then_step(damage, why):
    damage()
    caplog.clear()
    res = first_step(be, PROMPT)
    assert res.n_computed == 40 and res.token == ref.token  # recomputed, never trusted
    said = warnings_of(caplog)
    assert len(said) == 1 and why in said[0] and "recomputing" in said[0], said
    assert be.kv_disk.has(PROMPT[:32])  # stored again, sound

  raw = bytearray(layer.read_bytes())
  raw[len(raw) // 2] ^= 0x40
  damage_then_step(lambda: layer.write_bytes(bytes(raw)), "sha256")
  damage_then_step(lambda: layer.write_bytes(layer.read_bytes()[:100]), "size/sha256")
  mf = entry / snapshots.MANIFEST
  damage_then_step(lambda: mf.write_text(mf.read_text()[:50]), "corrupt manifest")
  # Another model's entry under this prefix's name: refused by the fingerprint check.
  other = KVDiskCache(tmp_path / "other", cfg=be.cfg, fingerprint="another-model",
                      state_dtype="float32", every=CHUNK)
  other.store(PROMPT[:32], snapshots.read_layers(entry, snapshots.read_manifest(entry),
                                                  range(be.cfg.n_layers)))

  def graft():
    shutil.rmtree(entry)
    shutil.copytree(other.path(PROMPT[:32]), entry)
  damage_then_step(graft, "of another model")
  assert first_step(be, PROMPT).n_computed == 8
  be.close()


def test_a_full_disk_stops_writing_and_generation_goes_on(make_runner, plain, tmp_path,
                                                          caplog, monkeypatch):
  caplog.set_level(logging.INFO, LOG)
  be = cached(make_runner, tmp_path)
  ref, ref20 = first_step(plain, PROMPT), first_step(plain, PROMPT[:20])
  real = pathlib.Path.write_bytes
  calls = []

  def full(self, data):
    if str(self).startswith(str(tmp_path)):
      calls.append(self)
      if len(calls) > 1:  # the first layer file fits, the second does not
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return real(self, data)

  monkeypatch.setattr(pathlib.Path, "write_bytes", full)
  res = first_step(be, PROMPT)
  assert res.token == ref.token and res.n_computed == 40
  assert not be.kv_disk.writable
  said = warnings_of(caplog)
  assert len(said) == 1 and "is full" in said[0] and "generation goes on" in said[0]
  assert list(tmp_path.iterdir()) == []  # the half-written temp entry is gone
  caplog.clear()
  assert first_step(be, PROMPT[:20]).token == ref20.token
  assert len(calls) == 2 and not warnings_of(caplog)  # said once, no further writes
  be.close()


def test_bad_directories_are_one_line_errors(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(KVDiskError, match="is a file, not a directory"):
    check_dir(tmp_path / "f")
  with pytest.raises(KVDiskError, match="cannot create"):
    check_dir(tmp_path / "f" / "sub")
  assert check_dir(tmp_path / "new" / "kv").is_dir()


def test_through_a_bridge_split_and_back(make_runner, plain, tmp_path, caplog):
  """A coordinator 0:1 + worker 2:output stores (the worker's layers pulled for a prefix of
  what it holds); one process loads that entry; a second prompt stored by the one process
  loads on the split (pushed to the worker). Same tokens as the reference throughout."""
  caplog.set_level(logging.INFO, LOG)
  route = Route(make_runner, "0:1", ["2:output"])
  try:
    coord = attach_kv_disk(route.coord, tmp_path)
    res = first_step(coord, PROMPT)
    assert res.n_computed == 40 and coord.kv_disk.has(PROMPT[:32])
    with cached(make_runner, tmp_path) as local:
      res = first_step(local, PROMPT)
      assert res.n_computed == 8 and res.token == first_step(plain, PROMPT).token
      second = PROMPT[:3] + [int(t) for t in RNG.integers(3, 500, size=33)]
      first_step(local, second)
    res = first_step(coord, second)
    assert res.n_computed == 4 and res.token == first_step(plain, second).token
  finally:
    route.close()
  assert not warnings_of(caplog)


def test_a_steered_state_has_its_own_entries(make_runner, tmp_path):
  """A state computed under interventions (ds4's steering) is stored under their key: a plain
  prompt never loads it, the same steering does, with the same logits."""
  from ds4jax.runtime.edits import Interventions
  with cached(make_runner, tmp_path / "kv") as be:
    cfg = be.cfg
    dirs = np.random.default_rng(5).standard_normal((cfg.n_layers, cfg.d_model))
    (dirs / np.linalg.norm(dirs, axis=1, keepdims=True)).astype("<f4").tofile(tmp_path / "d")
    edits = Interventions.ds4_steering(tmp_path / "d", cfg, ffn=2.0)
    steered = first_step(be, PROMPT, edits=edits)
    assert first_step(be, PROMPT).n_computed == 40  # not the steered entry
    again = first_step(be, PROMPT, edits=edits)
    assert again.n_computed == 8 and again.token == steered.token
    np.testing.assert_allclose(again.logits_V, steered.logits_V, rtol=0, atol=1e-5)
