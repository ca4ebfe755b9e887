"""The ds4jax bridge wire format (docs/protocol.md has the full specification).

Every message is one frame:

    offset  size  field            (all integers network order, struct '!4sBBHII')
    0       4     magic            b'DS4J'
    4       1     version          PROTOCOL_VERSION of the sender
    5       1     type             MsgType
    6       2     flags            FLAG_BINARY on WORK/RESULT, else 0
    8       4     header_len       bytes of the control header (<= MAX_HEADER)
    12      4     payload_len      bytes of raw payload (<= the receiver's max_payload)
    16      ...   control header, then payload

Both lengths are checked against the caps *before* anything is allocated. The control header
is a JSON object (never pickle: nothing a peer sends is ever executed), except on the two
frames that ride on every decode token: a WORK or RESULT with FLAG_BINARY carries a fixed
binary layout (`headers.py`: a struct, then the session id and range, then an optional
JSON object with the rare fields), decoded into the same dict the JSON form gives, so one set
of field checks serves both. A header the fixed layout cannot represent goes as JSON.
Tensors travel in the payload as raw little-endian bytes described by a `{"dtype", "shape"}`
entry (see `tensors.py`); WORK payloads start with the token ids as little-endian u32.

WORK/RESULT keys (docs/protocol.md §4): p = pos0, hb/ha = prefix hash before/after,
L = layer range, w = want (default "out"), od = out dtype (default f32), x = the activation
dtype (shape implied: [n, n_hc, d_model]), s = non-default sampling fields, st = step,
k = top_logprobs, rl = return_logits, kind default "token", t = [compute_us, queue_us].

Reading rules (cpython multiprocessing/connection.py): `EOFError` only when the peer closes
cleanly *between* frames; a close or stall inside a frame is a `ProtocolError`. Once the first
byte of a frame arrives, the whole frame must arrive within `frame_timeout` (no slowloris).
Small frames are sent as one buffer with their header (dodges Nagle + delayed-ACK stalls).

The rolling prefix hash is ds4's: FNV-1a 64 over the little-endian u32 bytes of each token.
"""

from __future__ import annotations

import dataclasses
import enum
import select
import socket
import struct
import time
from typing import Any, Sequence

import numpy as np

from ds4jax.wire import headers
from ds4jax.wire.errors import ProtocolError

MAGIC = b"DS4J"
PROTOCOL_VERSION = 3
HEADER = struct.Struct("!4sBBHII")
FLAG_BINARY = 0x0001  # the control header is the fixed binary layout of WORK/RESULT
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
  # Session snapshots (ds4jax/bridge/{coordinator,worker}/snapshots.py), coordinator -> worker.
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
  hlen: int | None = None  # control header bytes on the wire (set by recv_frame)

  @property
  def nbytes(self) -> int:
    hlen = self.hlen
    if hlen is None:
      hlen = len(encode_control(self.type, self.header)[1])
    return HEADER.size + hlen + len(self.payload)


# ------------------------------------------------------------------------------------- sending
def encode_control(mtype: int, header: dict[str, Any], version: int = PROTOCOL_VERSION,
                   ) -> tuple[int, bytes]:
  """(flags, control header bytes): the binary layout where it applies, else JSON."""
  if version == PROTOCOL_VERSION:
    if mtype == MsgType.WORK:
      b = headers.work_to_bin(header)
      if b is not None:
        return FLAG_BINARY, b
    elif mtype == MsgType.RESULT:
      b = headers.result_to_bin(header)
      if b is not None:
        return FLAG_BINARY, b
  return 0, headers.to_json(header)


def encode_header(mtype: int, header: dict[str, Any], payload_len: int,
                  version: int = PROTOCOL_VERSION) -> bytes:
  flags, hj = encode_control(mtype, header, version)
  if len(hj) > MAX_HEADER:
    raise ProtocolError(f"control header of {len(hj)} bytes exceeds the {MAX_HEADER} cap")
  return HEADER.pack(MAGIC, version, int(mtype), flags, len(hj), payload_len) + hj


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
  if version != PROTOCOL_VERSION and not any_version:
    raise ProtocolError(f"protocol version mismatch: the peer speaks version {version}, this "
                        f"side {PROTOCOL_VERSION}")
  if hlen > MAX_HEADER:
    raise ProtocolError(f"control header length {hlen} exceeds the {MAX_HEADER} cap")
  if plen > max_payload:
    raise ProtocolError(f"payload length {plen} exceeds the {max_payload} cap")
  try:
    mtype = MsgType(mtype)
  except ValueError:
    raise ProtocolError(f"unknown message type {mtype}") from None
  binary = flags == FLAG_BINARY and mtype in (MsgType.WORK, MsgType.RESULT)
  if flags and not binary:
    raise ProtocolError(f"reserved header flags are {flags:#06x} on a {mtype.name} frame, "
                        "not 0 (a newer peer?)")
  hbuf = bytearray(hlen)
  _recv_exact_into(sock, memoryview(hbuf), deadline, "control header")
  if binary:
    header = (headers.work_from_bin if mtype == MsgType.WORK else headers.result_from_bin)(
        bytes(hbuf))
  else:
    header = headers.from_json(hbuf) if hlen else {}
  # Memory follows the bytes that actually arrive (doubling from 256 KiB), so a header that
  # merely claims a huge payload cannot make us allocate it.
  payload = bytearray(min(plen, _FIRST_ALLOC))
  _recv_exact_into(sock, memoryview(payload), deadline, "payload")
  while len(payload) < plen:
    got = len(payload)
    payload.extend(bytes(min(got, plen - got)))
    _recv_exact_into(sock, memoryview(payload)[got:], deadline, "payload")
  return Frame(mtype, header, payload, version, hlen)


# A TLS record (0x15 alert, 0x16 handshake; version 3.x) where a frame should start.
TLS_PEER = "the peer speaks TLS and this side does not"


def _check_magic(magic: bytes) -> None:
  if magic[:1] in (b"\x15", b"\x16") and magic[1:2] == b"\x03":
    raise ProtocolError(f"{TLS_PEER} (first bytes {magic!r})")
  if magic == b"DS4A":  # auth.MAGIC: the peer runs the key handshake and we do not
    raise ProtocolError("the peer expects a pre-shared key handshake: give both sides the "
                        "same key (--key_file or $DS4JAX_KEY)")
  if magic != MAGIC:
    raise ProtocolError(f"bad magic {magic!r} (not a ds4jax bridge peer)")


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


def fnv1a64_steps(tokens: Sequence[int], h: int = FNV_INIT) -> list[int]:
  """The rolling hash after each token: [H(t0), H(t0 t1), ...] continuing from h."""
  out = []
  for t in tokens:
    t = int(t) & 0xFFFFFFFF
    for shift in (0, 8, 16, 24):
      h = ((h ^ ((t >> shift) & 0xFF)) * FNV_PRIME) & _MASK64
    out.append(h)
  return out


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
