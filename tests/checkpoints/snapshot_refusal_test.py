"""A corrupt or mismatched session snapshot is refused with a clear error, and nothing is
restored: locally, and by a worker over the bridge."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from ds4jax.wire import protocol
from ds4jax.wire.protocol import MsgType
from ds4jax.bridge.coordinator import snapshots as snapshot_bridge
from ds4jax.checkpoints import orbax_io, snapshots, stage_state
from ds4jax.runtime import checkpoint
from ds4jax.checkpoints.snapshots import SnapshotError
from ds4jax.checkpoints.stage_state import StateError
from ds4jax.runtime.local import LocalBackend
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.runtime.runner import StageRunner

from session_snapshot_test import Route

PROMPT = [int(t) for t in np.random.default_rng(3).integers(3, 500, size=21)]


@pytest.fixture(scope="module")
def local(make_runner):
  return LocalBackend([make_runner("all")], prefill_chunk=16)


@pytest.fixture(scope="module")
def snap(local, tmp_path_factory) -> pathlib.Path:
  sid = local.new_session()
  local.step(sid, PROMPT, SamplingParams(), 0)
  d = tmp_path_factory.mktemp("refuse") / "good"
  snapshots.save_session(local, sid, d)
  return d


def copy(src, dst) -> pathlib.Path:
  shutil.copytree(src, dst)
  return pathlib.Path(dst)


def edit_manifest(d, fn):
  m = json.loads((d / snapshots.MANIFEST).read_text())
  fn(m)
  (d / snapshots.MANIFEST).write_text(json.dumps(m))


def refused(backend, d, match, exc=SnapshotError):
  sid = backend.new_session()
  with pytest.raises(exc, match=match):
    snapshots.load_session(backend, sid, d)
  assert backend.session_tokens(sid) == []  # nothing was restored


def test_good_snapshot_loads(local, snap):
  sid = local.new_session()
  assert snapshots.load_session(local, sid, snap) == PROMPT
  assert local.session_tokens(sid) == PROMPT


def test_missing_or_unreadable_manifest(local, snap, tmp_path):
  refused(local, tmp_path / "nope", "not a directory")
  refused(local, tmp_path, "not a session snapshot")
  d = copy(snap, tmp_path / "j")
  (d / snapshots.MANIFEST).write_text('{"format": ')
  refused(local, d, "corrupt manifest")


def test_corrupt_layer_files(local, snap, tmp_path):
  d = copy(snap, tmp_path / "flip")
  f = d / "layer_002.bin"
  raw = bytearray(f.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  f.write_bytes(bytes(raw))
  refused(local, d, "layer 2 state fails its size/sha256 check")
  d = copy(snap, tmp_path / "short")
  f = d / "layer_003.bin"
  f.write_bytes(f.read_bytes()[:-4])
  refused(local, d, "layer 3 state fails")
  d = copy(snap, tmp_path / "gone")
  (d / "layer_000.bin").unlink()
  refused(local, d, "cannot read layer 0")


def test_edited_transcript_breaks_the_prefix_hash(local, snap, tmp_path):
  d = copy(snap, tmp_path / "tok")
  edit_manifest(d, lambda m: m["tokens"].__setitem__(5, m["tokens"][5] + 1))
  refused(local, d, "does not match its prefix hash")


def test_another_model_is_refused(local, snap, tmp_path):
  d = copy(snap, tmp_path / "fp")
  edit_manifest(d, lambda m: m.__setitem__("fingerprint", "ab" * 32))
  refused(local, d, "another model")
  d = copy(snap, tmp_path / "cfg")
  edit_manifest(d, lambda m: m["config"].__setitem__("d_model", 512))
  refused(local, d, "another model")


def test_layout_context_and_dtype_mismatches(local, snap, tiny_ckpt, tmp_path):
  # A field whose shape disagrees with this layer's layout (bytes still match their hash).
  d = copy(snap, tmp_path / "shape")
  edit_manifest(d, lambda m: m["layers"]["2"]["fields"][0]["shape"].__setitem__(1, 1))
  refused(local, d, r"layer 2: field kv is \[", StateError)
  # More positions than this backend's context.
  small = LocalBackend([StageRunner(checkpoint.load_stage_checkpoint(tiny_ckpt), ctx_size=16,
                                    max_chunk=16)])
  refused(small, snap, "more than this backend's context 16")
  # State kept in another dtype.
  bf = LocalBackend([StageRunner(checkpoint.load_stage_checkpoint(tiny_ckpt), ctx_size=64,
                                 max_chunk=16, state_dtype=jnp.bfloat16)])
  refused(bf, snap, "this runner keeps bfloat16 state", StateError)


def test_saving_requires_a_prefix_transcript(local, tmp_path):
  sid = local.new_session()
  with pytest.raises(SnapshotError, match="holds no state"):
    snapshots.save_session(local, sid, tmp_path / "x")
  local.step(sid, PROMPT[:5], SamplingParams(), 0)
  with pytest.raises(SnapshotError, match="not a prefix"):
    snapshots.save_session(local, sid, tmp_path / "x", transcript=[1, 2, 3])
  snapshots.save_session(local, sid, tmp_path / "x")
  with pytest.raises(SnapshotError, match="already exists"):
    snapshots.save_session(local, sid, tmp_path / "x")


@pytest.fixture
def prefilled(make_runner):
  """(coordinator, sid, worker hop) of a split route 0:1 -> 2:output whose session holds PROMPT."""
  route = Route(make_runner, "0:1", ["2:output"])
  try:
    c = route.coord
    sid = c.new_session()
    c.step(sid, PROMPT, SamplingParams(), 0)
    yield c, sid, c.wait_route()[0]
  finally:
    route.close()


def test_worker_refuses_bad_snapshot_requests(prefilled, snap):
  """Over the bridge: wrong prefix hash, more positions than held, range or payload size are
  refused by the worker (a clear remote message) and the link keeps serving. A prefix of
  what it holds is served (the disk KV cache stores at chunk boundaries)."""
  c, sid, hop = prefilled
  n = len(PROMPT)
  good_hash = protocol.fnv1a64(PROMPT)
  with pytest.raises(snapshot_bridge.SnapshotTransferError, match="prefix hash"):
    snapshot_bridge.pull(hop, c.runner.cfg, sid, n, good_hash ^ 1)
  with pytest.raises(snapshot_bridge.SnapshotTransferError, match=f"holds {n} positions"):
    snapshot_bridge.pull(hop, c.runner.cfg, sid, n + 1, protocol.fnv1a64(PROMPT + [7]))
  prefix = snapshot_bridge.pull(hop, c.runner.cfg, sid, n - 1, protocol.fnv1a64(PROMPT[:-1]))
  assert sorted(prefix) == [2, 3] and all(
      b.meta["fields"][0]["shape"][0] == c.runner.cfg.window + n - 1 for b in prefix.values())
  with pytest.raises(snapshot_bridge.SnapshotTransferError, match="unknown here"):
    snapshot_bridge.pull(hop, c.runner.cfg, "nosuchsession", n, good_hash)
  m = snapshots.read_manifest(snap)
  # Blobs of the wrong layers for this worker.
  with pytest.raises(snapshot_bridge.SnapshotTransferError, match="this worker serves"):
    snapshot_bridge.push(hop, sid, PROMPT, snapshots.read_layers(snap, m, [1, 2, 3]))
  # A size that does not match this stage's layout.
  blobs = snapshots.read_layers(snap, m, [2, 3])
  blobs[3].data += b"\0" * 8
  with pytest.raises(snapshot_bridge.SnapshotTransferError, match="this stage's state"):
    snapshot_bridge.push(hop, sid, PROMPT, blobs)
  # A range the worker does not serve.
  with pytest.raises(snapshot_bridge.SnapshotTransferError, match="this worker serves 2:output"):
    snapshot_bridge._call(hop, MsgType.SNAPSHOT_SAVE, {"sid": sid, "n": n, "layers": "1:3",
                                                       "hash": protocol.hash_hex(good_hash),
                                                       "part": 0})
  # The worker still holds the session and the route still serves it.
  blobs = snapshot_bridge.pull(hop, c.runner.cfg, sid, n, good_hash)
  assert sorted(blobs) == [2, 3]
  assert c.step(sid, PROMPT + [7], SamplingParams(), 1).n_computed == 1


def test_multi_part_transfer(prefilled, monkeypatch):
  """With a small chunk cap, a save and a load move in many parts and round-trip exactly."""
  monkeypatch.setattr(stage_state, "CHUNK_BYTES", 4096)
  sent = []
  c, sid, hop = prefilled
  real_request = hop.request

  def spy(header, payload, cb, **kw):
    sent.append((kw.get("mtype"), len(payload)))
    return real_request(header, payload, cb, **kw)

  monkeypatch.setattr(hop, "request", spy)
  blobs = snapshot_bridge.pull(hop, c.runner.cfg, sid, len(PROMPT), protocol.fnv1a64(PROMPT))
  total = sum(b.nbytes for b in blobs.values())
  assert total > 3 * 4096
  saves = [s for s in sent if s[0] == MsgType.SNAPSHOT_SAVE]
  assert len(saves) == -(-total // 4096)
  snapshot_bridge.push(hop, "restored", PROMPT, blobs)
  loads = [s for s in sent if s[0] == MsgType.SNAPSHOT_LOAD]
  assert len(loads) == -(-(total + 4 * len(PROMPT)) // 4096)
  assert max(n for _, n in loads) <= 4096
  again = snapshot_bridge.pull(hop, c.runner.cfg, "restored", len(PROMPT),
                               protocol.fnv1a64(PROMPT))
  assert {il: b.data for il, b in again.items()} == {il: b.data for il, b in blobs.items()}
  # A chunk over the cap (4096 here, on both sides: same process) is refused by the worker.
  with pytest.raises(snapshot_bridge.SnapshotTransferError, match="exceeds 4096"):
    snapshot_bridge._call(hop, MsgType.SNAPSHOT_LOAD, {
        "sid": "x", "n": 1, "hash": protocol.hash_hex(protocol.fnv1a64([1])),
        "layers": str(hop.layers), "part": 0, "parts": 1, "total": 8192, "meta": {}},
        b"\0" * 8192)
