"""The ds4jax bridge wire format: fixed binary frames, JSON control headers, raw tensors.

Every message is one frame:

    offset  size  field            (all integers network order, struct '!4sBBHII')
    0       4     magic            b'DS4J'
    4       1     version          PROTOCOL_VERSION of the sender
    5       1     type             MsgType
    6       2     flags            reserved, 0
    8       4     header_len       bytes of UTF-8 JSON control header (<= MAX_HEADER)
    12      4     payload_len      bytes of raw payload (<= the receiver's max_payload)
    16      ...   header JSON, then payload

Both lengths are checked against the caps *before* anything is allocated. Control data is
JSON (never pickle: nothing a peer sends is ever executed). Tensors travel in the payload as
raw little-endian bytes described by a `{"dtype", "shape"}` entry of the header (see
`tensors.py`); WORK payloads start with the token ids as little-endian u32.

Connection life (worker dials; left column coordinator, right column worker):

     coordinator (listens)                      worker (dials, retries with backoff)
  1.                                  <-------  TCP connect (+ optional TLS)
  2. [auth] challenge, nonce_c        ------->  (only with a pre-shared key; auth.py)
  3.                                  <-------  HMAC(key, nonce_c), challenge nonce_w
  4. HMAC(key, nonce_w)               ------->  both sides now trust the link
  5.                                  <-------  HELLO {protocol, fingerprint, n_layers,
                                                 layers, has_output, ctx, dtypes, caps}
  6. ACCEPT {worker_id, ctx, hb_s}    ------->  or REFUSE {reason}: both sides log the
                                                 reason; the coordinator closes
  7.                                  <-------  READY (after loading the slice)
  8. WORK {req, sid, p, n, hb, ha, L ------->  worker checks hb (hash before) against its
     [, w, od, x, s, st, k, rl]}                KV for sid BEFORE computing
  9.                                  <-------  RESULT {req, sid, ha, [kind], t, token|x|
                                                 logits} or ERROR {req, etype, message,
                                                 traceback}

WORK/RESULT keys are short and fields at their default are omitted (they ride on every
decode token; docs/protocol.md §4 has the table): p = pos0, hb/ha = prefix hash before/after,
L = layer range, w = want (default "out"), od = out dtype (default f32), x = the activation
dtype (shape implied: [n, n_hc, d_model]), s = non-default sampling fields, st = step,
k = top_logprobs, rl = return_logits, kind default "token", t = [compute_us, queue_us].
 10. PING (idle links)                ------->
 11.                                  <-------  PONG
 12. DROP {sid}                       ------->  forget one session's KV

Reading rules (cpython multiprocessing/connection.py): `EOFError` only when the peer closes
cleanly *between* frames; a close or stall inside a frame is a `ProtocolError`. Once the first
byte of a frame arrives, the whole frame must arrive within `frame_timeout` (no slowloris).
Small frames are sent as one buffer with their header (dodges Nagle + delayed-ACK stalls).

The rolling prefix hash is ds4's: FNV-1a 64 over the little-endian u32 bytes of each token.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import select
import socket
import struct
import time
from typing import Any, Sequence

import numpy as np

from ds4jax.bridge.errors import ProtocolError

MAGIC = b"DS4J"
PROTOCOL_VERSION = 2
HEADER = struct.Struct("!4sBBHII")
MAX_HEADER = 64 * 1024
# Default payload cap: a 4096-token f32 chunk of Flash hyper-connection state is 256 MiB.
MAX_PAYLOAD = 512 * 1024 * 1024
# A payload buffer starts this big and doubles as bytes arrive (see recv_frame).
_FIRST_ALLOC = 256 * 1024
# Frames up to this size are joined with their header into a single send.
_JOIN_LIMIT = 64 * 1024

FNV_INIT = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


class MsgType(enum.IntEnum):
  HELLO = 1
  ACCEPT = 2
  REFUSE = 3
  READY = 4
  WORK = 5
  RESULT = 6
  ERROR = 7
  PING = 8
  PONG = 9
  DROP = 10
  # Session snapshots (ds4jax/checkpoints/snapshot_bridge.py), coordinator -> worker.
  SNAPSHOT_SAVE = 11
  SNAPSHOT_LOAD = 12


class IdleTimeout(TimeoutError):
  """No frame started within the idle timeout; nothing was consumed (safe to retry)."""


@dataclasses.dataclass
class Frame:
  type: MsgType
  header: dict[str, Any]
  payload: bytes | bytearray | memoryview = b""
  version: int = PROTOCOL_VERSION

  @property
  def nbytes(self) -> int:
    return (HEADER.size + len(json.dumps(self.header, separators=(",", ":")).encode())
            + len(self.payload))


# ------------------------------------------------------------------------------------- sending
def encode_header(mtype: int, header: dict[str, Any], payload_len: int,
                  version: int = PROTOCOL_VERSION) -> bytes:
  hj = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
  if len(hj) > MAX_HEADER:
    raise ProtocolError(f"control header of {len(hj)} bytes exceeds the {MAX_HEADER} cap")
  return HEADER.pack(MAGIC, version, int(mtype), 0, len(hj), payload_len) + hj


def send_frame(sock, mtype: int, header: dict[str, Any], payload=b"", *,
               version: int = PROTOCOL_VERSION) -> int:
  """Sends one frame; returns the bytes written. Not thread-safe: callers hold a send lock."""
  head = encode_header(mtype, header, len(payload), version)
  if len(payload) <= _JOIN_LIMIT:
    sock.sendall(head + bytes(payload))
  else:
    sock.sendall(head)
    sock.sendall(payload)
  return len(head) + len(payload)


# ----------------------------------------------------------------------------------- receiving
def _wait_readable(sock, timeout: float | None) -> bool:
  """True when sock has bytes (or EOF) to read within timeout. Never touches the socket's
  own timeout, which the sending thread shares."""
  pending = getattr(sock, "pending", None)
  if pending is not None and pending():
    return True  # TLS keeps decrypted bytes that select cannot see
  r, _, _ = select.select([sock], [], [], None if timeout is None else max(timeout, 0.0))
  return bool(r)


def _recv_exact_into(sock, view: memoryview, deadline: float, what: str) -> None:
  got = 0
  while got < len(view):
    if not _wait_readable(sock, deadline - time.monotonic()):
      raise ProtocolError(f"{what} stalled: {got}/{len(view)} bytes before the frame deadline")
    try:
      n = sock.recv_into(view[got:])
    except (socket.timeout, TimeoutError):
      raise ProtocolError(f"{what} stalled: {got}/{len(view)} bytes") from None
    if n == 0:
      raise ProtocolError(f"connection closed inside a frame ({what}: {got}/{len(view)} bytes)")
    got += n


def recv_frame(sock, *, idle_timeout: float | None, frame_timeout: float = 30.0,
               max_payload: int = MAX_PAYLOAD, on_start=None, any_version: bool = False,
               ) -> Frame:
  """Receives one frame. The socket's own timeout (if any) only bounds single calls.

  `on_start()` runs when the frame's first bytes arrive (liveness: a peer streaming a large
  frame is alive; the frame deadline bounds it). A frame of another protocol version is a
  ProtocolError unless `any_version` (the coordinator reads a HELLO of any version, to
  refuse it with a reason).

  Raises:
    IdleTimeout: no byte arrived within idle_timeout (None waits forever; callers never pass
      None on a live link).
    EOFError: the peer closed cleanly between frames.
    ProtocolError: bad magic, oversize lengths, bad JSON, truncation or a stalled frame.
  """
  head = bytearray(HEADER.size)
  view = memoryview(head)
  if not _wait_readable(sock, idle_timeout):
    raise IdleTimeout("no frame within the idle timeout")
  try:
    n = sock.recv_into(view)
  except (socket.timeout, TimeoutError):
    raise IdleTimeout("no frame within the idle timeout") from None
  if n == 0:
    raise EOFError("peer closed the connection")
  deadline = time.monotonic() + frame_timeout
  if on_start is not None:
    on_start()
  if n >= 4:
    _check_magic(bytes(head[:4]))  # early: a foreign peer may send fewer than 16 bytes
  if n < HEADER.size:
    _recv_exact_into(sock, view[n:], deadline, "frame header")
  magic, version, mtype, flags, hlen, plen = HEADER.unpack(head)
  _check_magic(magic)
  if flags:
    raise ProtocolError(f"reserved header flags are {flags:#06x}, not 0 (a newer peer?)")
  if version != PROTOCOL_VERSION and not any_version:
    raise ProtocolError(f"peer speaks protocol version {version}, this side "
                        f"{PROTOCOL_VERSION}")
  if hlen > MAX_HEADER:
    raise ProtocolError(f"control header length {hlen} exceeds the {MAX_HEADER} cap")
  if plen > max_payload:
    raise ProtocolError(f"payload length {plen} exceeds the {max_payload} cap")
  try:
    mtype = MsgType(mtype)
  except ValueError:
    raise ProtocolError(f"unknown message type {mtype}") from None
  hbuf = bytearray(hlen)
  _recv_exact_into(sock, memoryview(hbuf), deadline, "control header")
  try:
    header = json.loads(hbuf.decode("utf-8"), parse_constant=_no_constant) if hlen else {}
  except (UnicodeDecodeError, ValueError, RecursionError) as e:  # deep nesting: RecursionError
    raise ProtocolError(f"control header is not valid JSON: {e}") from None
  if not isinstance(header, dict):
    raise ProtocolError("control header is not a JSON object")
  # Memory follows the bytes that actually arrive (doubling from 256 KiB), so a header that
  # merely claims a huge payload cannot make us allocate it.
  payload = bytearray(min(plen, _FIRST_ALLOC))
  _recv_exact_into(sock, memoryview(payload), deadline, "payload")
  while len(payload) < plen:
    got = len(payload)
    payload.extend(bytes(min(got, plen - got)))
    _recv_exact_into(sock, memoryview(payload)[got:], deadline, "payload")
  return Frame(mtype, header, payload, version)


def _check_magic(magic: bytes) -> None:
  if magic == b"DS4A":  # auth.MAGIC: the peer runs the key handshake and we do not
    raise ProtocolError("the peer expects a pre-shared key handshake: give both sides the "
                        "same key (--key_file or $DS4JAX_KEY)")
  if magic != MAGIC:
    raise ProtocolError(f"bad magic {magic!r} (not a ds4jax bridge peer)")


def _no_constant(name: str):
  raise ValueError(f"{name} is not allowed in a control header")


# ------------------------------------------------------------------------------- field checks
_TYPES = {int: "an integer", str: "a string", bool: "a boolean", list: "a list",
          dict: "an object", float: "a number"}


def field(header: dict[str, Any], key: str, kind: type, *, default: Any = ...,
          lo: int | None = None, hi: int | None = None) -> Any:
  """Returns header[key] checked for type (and integer bounds); ProtocolError otherwise."""
  if key not in header:
    if default is ...:
      raise ProtocolError(f"missing header field {key!r}")
    return default
  v = header[key]
  ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
  if kind is float and isinstance(v, int) and not isinstance(v, bool):
    ok, v = True, float(v)
  if not ok:
    raise ProtocolError(f"header field {key!r} must be {_TYPES.get(kind, kind.__name__)}")
  if kind is int and ((lo is not None and v < lo) or (hi is not None and v > hi)):
    raise ProtocolError(f"header field {key!r}={v} is outside [{lo}, {hi}]")
  return v


# ------------------------------------------------------------------------------- prefix hash
def fnv1a64(tokens: Sequence[int], h: int = FNV_INIT) -> int:
  """ds4's rolling prefix hash: FNV-1a 64 over each token id's 4 little-endian bytes."""
  for t in tokens:
    t = int(t) & 0xFFFFFFFF
    for shift in (0, 8, 16, 24):
      h = ((h ^ ((t >> shift) & 0xFF)) * FNV_PRIME) & _MASK64
  return h


def hash_hex(h: int) -> str:
  return f"{h:016x}"


def parse_hash(s: Any, key: str) -> int:
  if not isinstance(s, str) or len(s) != 16:
    raise ProtocolError(f"header field {key!r} must be a 16-digit hex hash")
  try:
    return int(s, 16)
  except ValueError:
    raise ProtocolError(f"header field {key!r} must be a 16-digit hex hash") from None


def tokens_to_bytes(tokens: Sequence[int]) -> bytes:
  return np.asarray(tokens, dtype="<u4").tobytes()


def tokens_from_bytes(buf, n: int) -> np.ndarray:
  if len(buf) < 4 * n:
    raise ProtocolError(f"payload holds {len(buf)} bytes, too few for {n} token ids")
  return np.frombuffer(bytes(buf[: 4 * n]), dtype="<u4").astype(np.int32)
