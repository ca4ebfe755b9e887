"""Session snapshots over the bridge, the coordinator's side: workers' stage state in chunks.

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

import threading
from typing import Any, Callable, Sequence

import jax

from ds4jax.wire import protocol
from ds4jax.wire.errors import BridgeError, ProtocolError, RemoteError
from ds4jax.wire.protocol import MsgType, field
from ds4jax.checkpoints import stage_state
from ds4jax.checkpoints.snapshots import SnapshotError
from ds4jax.checkpoints.stage_state import LayerBlob
from ds4jax.config import LayerRange


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
        if parts != stage_state.n_parts(total):
          raise ProtocolError(f"{parts} parts for {total} bytes")
      if len(f.payload) > stage_state.CHUNK_BYTES or len(buf) + len(f.payload) > total:
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
  parts = stage_state.n_parts(len(stream))
  base = {"sid": sid, "n": n, "hash": protocol.hash_hex(protocol.fnv1a64(tokens)),
          "layers": str(hop.layers), "parts": parts, "total": len(stream)}
  for part in range(parts):
    h = dict(base, part=part)
    if part == 0:
      h["meta"] = meta
    f = _call(hop, MsgType.SNAPSHOT_LOAD, h, stream[part * stage_state.CHUNK_BYTES:(part + 1) * stage_state.CHUNK_BYTES])
    if f.header.get("kind") != "ack" or f.header.get("part") != part:
      raise SnapshotTransferError(f"{hop!r} did not acknowledge snapshot part {part}")


def pull_route(hops: Sequence[Any], cfg, sess, n: int | None = None) -> dict[int, LayerBlob]:
  """The layer blobs of every hop for the first n positions of session sess (default: its
  whole timeline, which every hop must hold)."""
  n = len(sess.tokens) if n is None else n
  blobs: dict[int, LayerBlob] = {}
  for hop in hops:
    held = sess.held.get(hop.wid, 0)
    if held != len(sess.tokens) or held < n:
      raise SnapshotError(f"{hop!r} holds {held} of the session's {len(sess.tokens)} positions "
                          "(a worker was replaced or evicted it since the last step): step the "
                          "session, then save")
    blobs.update(pull(hop, cfg, sess.sid, n, sess.hashes[n]))
  return blobs


def push_route(hops: Sequence[Any], sid: str, tokens: list[int],
               read: Callable[[Sequence[int]], dict[int, LayerBlob]]) -> None:
  """Installs the state of `tokens` as session sid on every hop (read(layers) -> blobs)."""
  for hop in hops:
    push(hop, sid, tokens, read(hop.layers.layers()))


__all__ = ["SnapshotTransferError", "pull", "pull_route", "push", "push_route"]
