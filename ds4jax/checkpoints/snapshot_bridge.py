"""Session snapshots over the bridge: workers' stage state in bounded chunks.

Two request/reply exchanges on the normal worker link (the coordinator asks, the worker
answers each request with one RESULT or ERROR frame, in order with its WORK):

  SNAPSHOT_SAVE {req, sid, n, hash, layers, part}      -> RESULT {kind: snapshot, part, parts,
                                                           total, meta (part 0)} + <= 8 MiB
  SNAPSHOT_LOAD {req, sid, n, hash, layers, part,      -> RESULT {kind: ack, part}
                 parts, total, meta (part 0)} + <= 8 MiB

The saved stream is the worker's packed layer blobs (`stage_state.pack`); the loaded one is
the n token ids (u32 LE) followed by the packed blobs of exactly the worker's layers. Both
sides check the session's position count and ds4 FNV prefix hash and the layer range before
anything moves; sizes are checked against the model layout before any buffer grows; every
layer's sha256 is checked on arrival. A worker installs a loaded state only once all parts
arrived and verified.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from typing import Any, Callable

import jax

from ds4jax.bridge.wire import protocol
from ds4jax.bridge.wire.errors import BridgeError, ProtocolError, RemoteError
from ds4jax.bridge.wire.protocol import MsgType, field
from ds4jax.checkpoints import stage_state
from ds4jax.checkpoints.stage_state import LayerBlob
from ds4jax.config import LayerRange

CHUNK_BYTES = 8 << 20
# Per worker: sid -> export in progress (bytes kept until the last part is sent) and
# sid -> import in progress. Only the lane of that session (one thread at a time) touches
# an entry.
_EXPORTS: "weakref.WeakKeyDictionary[Any, dict[str, dict]]" = weakref.WeakKeyDictionary()
_IMPORTS: "weakref.WeakKeyDictionary[Any, dict[str, dict]]" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()  # lanes of different sessions run on different threads


def _table(tables, worker) -> dict[str, dict]:
  with _TABLES_LOCK:
    return tables.setdefault(worker, {})


def _n_parts(total: int) -> int:
  return max(1, math.ceil(total / CHUNK_BYTES))


def max_state_nbytes(cfg, layers: LayerRange, n: int) -> int:
  """An upper bound of the state bytes of `layers` for n positions (f32 state)."""
  from ds4jax.model.decode_state import Capacity, init_layer_state
  cap = Capacity(ctx_size=1, max_chunk=1)
  total = 0
  for il in layers.layers():
    ls = jax.eval_shape(lambda il=il: init_layer_state(cfg, il, cap))
    for name in stage_state.FIELDS:
      buf = getattr(ls, name)
      if buf is not None:
        total += stage_state.valid_rows(cfg, il, name, n) * int(buf.shape[1]) * 4
  return total


# ------------------------------------------------------------------------------ worker side
def handle_worker_frame(worker, f: protocol.Frame) -> tuple[dict[str, Any], bytes]:
  """Answers one SNAPSHOT_SAVE / SNAPSHOT_LOAD frame on a worker: (RESULT header, payload)."""
  h = f.header
  req = field(h, "req", int, lo=0)
  sid = field(h, "sid", str)
  if not 0 < len(sid) <= 64:
    raise ProtocolError("session id must be 1..64 characters")
  n = field(h, "n", int, lo=0, hi=worker.runner.ctx_size)
  want = protocol.parse_hash(h.get("hash"), "hash")
  layers = field(h, "layers", str)
  if layers != str(worker.layers):
    raise ProtocolError(f"this worker serves {worker.layers} but the snapshot asks for {layers}")
  part = field(h, "part", int, lo=0)
  if f.type == MsgType.SNAPSHOT_SAVE:
    return _save_part(worker, req, sid, n, want, part)
  imports = _table(_IMPORTS, worker)
  try:
    return _load_part(worker, imports, f, req, sid, n, want, part)
  except BaseException:
    imports.pop(sid, None)  # a failed load leaves nothing half-received behind
    raise


def _save_part(worker, req, sid, n, want, part):
  exports = _table(_EXPORTS, worker)
  if part == 0:
    exports.pop(sid, None)
    s = worker.sessions.acquire(sid)  # not evictable while its state is read
    if s is None:
      raise ProtocolError(f"session {sid} is unknown here (evicted, or this worker restarted)")
    try:
      if s.n != n:
        raise ProtocolError(f"session {sid} holds {s.n} positions, the snapshot expects {n}")
      if s.hashes[n] != want:
        raise ProtocolError(f"session {sid} prefix hash {protocol.hash_hex(s.hashes[n])} != "
                            f"snapshot {protocol.hash_hex(want)}")
      state = worker.batcher.get(s.slot)  # in order with the pool's compute
    finally:
      worker.sessions.release(s)
    got_n, blobs = stage_state.export_stage(worker.runner, state)
    if got_n != n:
      raise ProtocolError(f"session {sid} state holds {got_n} positions, its timeline {n}")
    meta, data = stage_state.pack(blobs)
    exports[sid] = {"n": n, "hash": want, "meta": meta, "data": data}
  exp = exports.get(sid)
  if exp is None or exp["n"] != n or exp["hash"] != want:
    raise ProtocolError(f"no snapshot of session {sid} in progress at part {part}")
  data = exp["data"]
  parts = _n_parts(len(data))
  if part >= parts:
    raise ProtocolError(f"snapshot part {part} out of range ({parts} parts)")
  if part == parts - 1:
    del exports[sid]
  res = {"req": req, "sid": sid, "kind": "snapshot", "part": part, "parts": parts,
         "total": len(data)}
  if part == 0:
    res["meta"] = exp["meta"]
  return res, data[part * CHUNK_BYTES:(part + 1) * CHUNK_BYTES]


def _load_part(worker, imports, f, req, sid, n, want, part):
  h = f.header
  if len(f.payload) > CHUNK_BYTES:
    raise ProtocolError(f"snapshot chunk of {len(f.payload)} bytes exceeds {CHUNK_BYTES}")
  if part == 0:
    meta = field(h, "meta", dict)
    mine = sorted(str(il) for il in worker.layers.layers())
    if sorted(meta) != mine:
      raise ProtocolError(f"snapshot holds layers {sorted(meta, key=int)}, this worker serves "
                          f"{worker.layers}")
    total = field(h, "total", int, lo=0)
    expect = 4 * n + stage_state.expected_nbytes(worker.runner, n)
    if total != expect:
      raise ProtocolError(f"snapshot of {total} bytes, this stage's state for {n} positions "
                          f"is {expect} (another layout or state dtype)")
    imports[sid] = {"n": n, "hash": want, "meta": meta, "total": total,
                    "parts": _n_parts(total), "buf": bytearray(), "next": 0}
  imp = imports.get(sid)
  if imp is None or imp["n"] != n or imp["hash"] != want or imp["next"] != part:
    raise ProtocolError(f"snapshot load of session {sid}: unexpected part {part}")
  if len(imp["buf"]) + len(f.payload) > imp["total"]:
    raise ProtocolError("snapshot load: more bytes than announced")
  imp["buf"] += f.payload
  imp["next"] += 1
  if imp["next"] == imp["parts"]:
    del imports[sid]
    buf = imp["buf"]
    if len(buf) != imp["total"]:
      raise ProtocolError(f"snapshot load: {len(buf)} of {imp['total']} bytes arrived")
    tokens = protocol.tokens_from_bytes(buf, n).tolist()
    if protocol.fnv1a64(tokens) != want:
      raise ProtocolError("snapshot load: token prefix hash mismatch")
    if max(tokens, default=0) >= worker.vocab_size:
      raise ProtocolError(f"snapshot load: token id {max(tokens)} >= vocab {worker.vocab_size}")
    blobs = stage_state.unpack(imp["meta"], memoryview(buf)[4 * n:], "snapshot load")
    try:
      state = stage_state.import_stage(worker.runner, n, blobs, where=f"session {sid}")
    except stage_state.StateError as e:
      raise ProtocolError(str(e)) from None
    worker.sessions.install(sid, state, tokens)
  return {"req": req, "sid": sid, "kind": "ack", "part": part}, b""


# ------------------------------------------------------------------------- coordinator side
def _call(hop, mtype: int, header: dict[str, Any], payload=b"") -> protocol.Frame:
  """One request on a worker link, waited for (the link's deadline applies)."""
  done = threading.Event()
  box: dict[str, Any] = {}

  def cb(frame, err):
    box["f"], box["e"] = frame, err
    done.set()

  hop.request(header, payload, cb, mtype=mtype)
  if not done.wait(hop.request_timeout + 5.0):
    raise BridgeError(f"{hop!r} did not answer a snapshot request")
  if box["e"] is not None:
    e = box["e"]
    if isinstance(e, RemoteError):
      raise SnapshotTransferError(f"{hop!r} refused the snapshot: {e.remote_message}") from None
    raise e
  return box["f"]


class SnapshotTransferError(BridgeError):
  """A worker refused or garbled a snapshot transfer."""


def pull(hop, cfg, sid: str, n: int, prefix_hash: int) -> dict[int, LayerBlob]:
  """The layer blobs of `hop` for session sid at n positions."""
  base = {"sid": sid, "n": n, "hash": protocol.hash_hex(prefix_hash), "layers": str(hop.layers)}
  bound = max_state_nbytes(cfg, hop.layers, n)
  buf, meta, parts, part, total = bytearray(), None, 1, 0, 0
  while part < parts:
    f = _call(hop, MsgType.SNAPSHOT_SAVE, dict(base, part=part))
    h = f.header
    try:
      if h.get("kind") != "snapshot" or field(h, "part", int) != part:
        raise ProtocolError("not the requested snapshot part")
      if part == 0:
        meta = field(h, "meta", dict)
        total = field(h, "total", int, lo=0, hi=bound)
        parts = field(h, "parts", int, lo=1)
        if parts != _n_parts(total):
          raise ProtocolError(f"{parts} parts for {total} bytes")
      if len(f.payload) > CHUNK_BYTES or len(buf) + len(f.payload) > total:
        raise ProtocolError("more snapshot bytes than announced")
    except ProtocolError as e:
      raise SnapshotTransferError(f"{hop!r} sent a bad snapshot part: {e}") from None
    buf += f.payload
    part += 1
  if len(buf) != total:
    raise SnapshotTransferError(f"{hop!r}: {len(buf)} of {total} snapshot bytes arrived")
  blobs = stage_state.unpack(meta, buf, f"{hop!r}")
  if sorted(blobs) != list(hop.layers.layers()):
    raise SnapshotTransferError(f"{hop!r} sent layers {sorted(blobs)}, it serves {hop.layers}")
  for il, b in blobs.items():
    if stage_state.sha256(b.data) != b.meta.get("sha256"):
      raise SnapshotTransferError(f"{hop!r}: layer {il} state failed its sha256 check in transit")
  return blobs


def push(hop, sid: str, tokens: list[int], blobs: dict[int, LayerBlob]) -> None:
  """Installs `blobs` (exactly hop's layers) as session sid holding `tokens` on the worker."""
  n = len(tokens)
  meta, data = stage_state.pack(blobs)
  stream = protocol.tokens_to_bytes(tokens) + data
  parts = _n_parts(len(stream))
  base = {"sid": sid, "n": n, "hash": protocol.hash_hex(protocol.fnv1a64(tokens)),
          "layers": str(hop.layers), "parts": parts, "total": len(stream)}
  for part in range(parts):
    h = dict(base, part=part)
    if part == 0:
      h["meta"] = meta
    f = _call(hop, MsgType.SNAPSHOT_LOAD, h, stream[part * CHUNK_BYTES:(part + 1) * CHUNK_BYTES])
    if f.header.get("kind") != "ack" or f.header.get("part") != part:
      raise SnapshotTransferError(f"{hop!r} did not acknowledge snapshot part {part}")


class CoordinatorAdapter:
  """`snapshots.save_session/load_session` on a Coordinator: its stage + the route's workers."""

  def __init__(self, coord):
    self.c = coord
    self.cfg = coord.runner.cfg
    self.fingerprint = coord.fingerprint
    self.ctx_size = coord.ctx

  def _session(self, sid: str):
    sess = self.c._sessions.get(sid)
    if sess is None:
      raise KeyError(f"unknown session {sid!r}")
    return sess

  def export(self, sid: str):
    from ds4jax.checkpoints.snapshots import SnapshotError
    c, sess = self.c, self._session(sid)
    with sess.lock:
      n = len(sess.tokens)
      if sess.local_slot is None:
        raise SnapshotError(f"session {sid} holds no state (never stepped, or evicted)")
      got, blobs = stage_state.export_stage(c.runner, c.batcher.get(sess.local_slot))
      if got != n:
        raise SnapshotError(f"the coordinator's stage holds {got} positions, the session {n}")
      hops = c.wait_route()
      with c._leases(sess, hops):  # the workers' session slots (bridge/residency.py)
        for hop in hops:
          held = sess.held.get(hop.wid, 0)
          if held != n:
            raise SnapshotError(f"{hop!r} holds {held} of the session's {n} positions (a "
                                "worker was replaced or evicted it since the last step): step "
                                "the session, then save")
          blobs.update(pull(hop, self.cfg, sid, n, sess.hashes[n]))
      return list(sess.tokens), blobs

  def restore(self, sid: str, tokens: list[int], read: Callable) -> None:
    c, sess = self.c, self._session(sid)
    with sess.lock:
      hops = c.wait_route()
      local = stage_state.import_stage(c.runner, len(tokens), read(c.local.layers()),
                                       where=f"stage {c.local}")
      sess.reset()  # a failed push below leaves a clean session (the next step recomputes)
      with c._leases(sess, hops):  # a slot on each worker, evicting an idle session if full
        for hop in hops:
          push(hop, sid, tokens, read(hop.layers.layers()))
      c.local_put(sess, local)
      sess.append(tokens)
      sess.held = {hop.wid: len(tokens) for hop in hops}
      sess.last_used = time.monotonic()
    c._evict_idle(keep=sid)  # the restored state counts against max_sessions
