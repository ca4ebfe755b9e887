"""A worker's side of session snapshots: answers SNAPSHOT_SAVE / SNAPSHOT_LOAD frames.

The exchange is specified in bridge/coordinator/snapshots.py. `SnapshotTransfers` belongs to
one Worker: exports in progress (bytes kept until the last part is sent) and imports in
progress (installed only once every part arrived and verified), by session id. Only the
lane of that session (one thread at a time) touches an entry; a lock guards the tables.
"""

from __future__ import annotations

import threading
from typing import Any

from ds4jax.wire import protocol
from ds4jax.wire.errors import ProtocolError
from ds4jax.wire.protocol import MsgType, field
from ds4jax.bridge.worker.work import request_ids
from ds4jax.checkpoints import stage_state


class SnapshotTransfers:
  """The snapshot exchanges of one worker (see the module docstring)."""

  def __init__(self, worker):
    self.worker = worker
    self._exports: dict[str, dict] = {}
    self._imports: dict[str, dict] = {}
    self._lock = threading.Lock()

  def handle(self, f: protocol.Frame) -> tuple[dict[str, Any], bytes]:
    """Answers one SNAPSHOT_SAVE / SNAPSHOT_LOAD frame: (RESULT header, payload)."""
    worker = self.worker
    h = f.header
    req, sid = request_ids(h)
    n = field(h, "n", int, lo=0, hi=worker.runner.ctx_size)
    want = protocol.parse_hash(h.get("hash"), "hash")
    layers = field(h, "layers", str)
    if layers != str(worker.layers):
      raise ProtocolError(f"this worker serves {worker.layers} but the snapshot asks for {layers}")
    part = field(h, "part", int, lo=0)
    if f.type == MsgType.SNAPSHOT_SAVE:
      return self._save_part(req, sid, n, want, part)
    try:
      return self._load_part(f, req, sid, n, want, part)
    except BaseException:
      with self._lock:
        self._imports.pop(sid, None)  # a failed load leaves nothing half-received behind
      raise

  def _save_part(self, req, sid, n, want, part):
    worker, exports = self.worker, self._exports
    if part == 0:
      exports.pop(sid, None)
      s = worker.sessions.acquire(sid)  # not evictable while its state is read
      if s is None:
        raise ProtocolError(f"session {sid} is unknown here (evicted, or this worker restarted)")
      try:
        if s.n < n:  # a prefix of the timeline is fine (the disk KV cache's boundaries)
          raise ProtocolError(f"session {sid} holds {s.n} positions, the snapshot expects {n}")
        if s.hashes[n] != want:
          raise ProtocolError(f"session {sid} prefix hash {protocol.hash_hex(s.hashes[n])} != "
                              f"snapshot {protocol.hash_hex(want)}")
        held = s.n
        state = worker.batcher.get(s.slot)  # in order with the pool's compute
      finally:
        worker.sessions.release(s)
      got_n, blobs = stage_state.export_stage(worker.runner, state, n)
      if got_n != held:
        raise ProtocolError(f"session {sid} state holds {got_n} positions, its timeline {held}")
      meta, data = stage_state.pack(blobs)
      exports[sid] = {"n": n, "hash": want, "meta": meta, "data": data}
    exp = exports.get(sid)
    if exp is None or exp["n"] != n or exp["hash"] != want:
      raise ProtocolError(f"no snapshot of session {sid} in progress at part {part}")
    data = exp["data"]
    parts = stage_state.n_parts(len(data))
    if part >= parts:
      raise ProtocolError(f"snapshot part {part} out of range ({parts} parts)")
    if part == parts - 1:
      del exports[sid]
    res = {"req": req, "sid": sid, "kind": "snapshot", "part": part, "parts": parts,
           "total": len(data)}
    if part == 0:
      res["meta"] = exp["meta"]
    return res, data[part * stage_state.CHUNK_BYTES:(part + 1) * stage_state.CHUNK_BYTES]


  def _load_part(self, f, req, sid, n, want, part):
    worker, imports = self.worker, self._imports
    h = f.header
    if len(f.payload) > stage_state.CHUNK_BYTES:
      raise ProtocolError(f"snapshot chunk of {len(f.payload)} bytes exceeds {stage_state.CHUNK_BYTES}")
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
                      "parts": stage_state.n_parts(total), "buf": bytearray(), "next": 0}
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


__all__ = ["SnapshotTransfers"]
