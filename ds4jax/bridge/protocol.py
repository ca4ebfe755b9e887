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
binary layout (`_WORK_BIN`/`_RESULT_BIN`, then the session id and range, then an optional
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
import json
import select
import socket
import struct
import time
from typing import Any, Sequence

import numpy as np

from ds4jax.bridge.errors import ProtocolError

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
      b = _work_bin(header)
      if b is not None:
        return FLAG_BINARY, b
    elif mtype == MsgType.RESULT:
      b = _result_bin(header)
      if b is not None:
        return FLAG_BINARY, b
  return 0, _json(header)


def _json(header: dict[str, Any]) -> bytes:
  return json.dumps(header, separators=(",", ":"), allow_nan=False).encode()


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
    header = (_work_from_bin if mtype == MsgType.WORK else _result_from_bin)(bytes(hbuf))
  else:
    header = _from_json(hbuf) if hlen else {}
  # Memory follows the bytes that actually arrive (doubling from 256 KiB), so a header that
  # merely claims a huge payload cannot make us allocate it.
  payload = bytearray(min(plen, _FIRST_ALLOC))
  _recv_exact_into(sock, memoryview(payload), deadline, "payload")
  while len(payload) < plen:
    got = len(payload)
    payload.extend(bytes(min(got, plen - got)))
    _recv_exact_into(sock, memoryview(payload)[got:], deadline, "payload")
  return Frame(mtype, header, payload, version, hlen)


def _from_json(buf) -> dict[str, Any]:
  try:
    header = json.loads(bytes(buf).decode("utf-8"), parse_constant=_no_constant)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:  # deep nesting: RecursionError
    raise ProtocolError(f"control header is not valid JSON: {e}") from None
  if not isinstance(header, dict):
    raise ProtocolError("control header is not a JSON object")
  return header


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


# ------------------------------------------------------------------- binary WORK / RESULT
# The frames that ride on every decode token get a fixed layout: the required fields in one
# struct, optional ones behind a bit each, the session id and range as short strings, and
# then, as the rest of the control header, a JSON object with any other field (sampling
# parameters, logprobs; usually absent). A header whose required fields are missing or do
# not fit goes as JSON, so the receiver's field checks see exactly what was sent.
_WORK_BIN = struct.Struct("!QQQIIIIBBBB")  # req hb ha p n st k, bits w x od
_RESULT_BIN = struct.Struct("!QQIQQBB")  # req ha token t0 t1, bits kind
_WORK_CORE = frozenset(("req", "sid", "p", "n", "hb", "ha", "L"))
_RESULT_CORE = frozenset(("req", "sid", "ha"))
_W_ST, _W_K, _W_RL, _W_RL_TRUE = 1, 2, 4, 8  # WORK bits (w, x, od: code 0 = absent)
_R_TOKEN, _R_T, _R_X, _R_LOGITS = 1, 2, 4, 8  # RESULT bits (kind: code 0 = absent)
_DTYPES = ("f32", "bf16", "int8")  # tensors.WIRE_DTYPES (protocol imports no bridge module)
_WANTS = ("out", "ack")
_KINDS = ("token", "ack", "hidden")
_U32, _U64 = 1 << 32, 1 << 64


def _fits(v, cap: int) -> bool:
  return type(v) is int and 0 <= v < cap  # noqa: E721 (a bool is not an integer here)


def _hash_fits(v) -> bool:
  return type(v) is str and len(v) == 16 and not v.strip("0123456789abcdef")  # noqa: E721


def _str8(v) -> bytes | None:
  """v as a length byte plus at most 255 bytes of UTF-8, or None."""
  if type(v) is not str or len(v) > 255:  # noqa: E721
    return None
  try:
    b = v.encode("utf-8")
  except UnicodeEncodeError:  # lone surrogates: only JSON can carry them
    return None
  return bytes((len(b),)) + b if len(b) < 256 else None


def _code(v, names) -> int:
  """1 + the index of v in names; 0 when it is none of them."""
  return names.index(v) + 1 if type(v) is str and v in names else 0  # noqa: E721


def _desc_bin(v) -> bytes | None:
  if type(v) is not dict or len(v) != 2:  # noqa: E721
    return None
  code, shape = _code(v.get("dtype"), _DTYPES), v.get("shape")
  if (not code or type(shape) is not list or not 1 <= len(shape) <= 4  # noqa: E721
      or not all(_fits(d, _U32) for d in shape)):
    return None
  return struct.pack(f"!BB{len(shape)}I", code, len(shape), *shape)


def _work_bin(h: dict[str, Any]) -> bytes | None:
  if not _WORK_CORE <= h.keys():
    return None
  req, p, n, hb, ha = h["req"], h["p"], h["n"], h["hb"], h["ha"]
  sid, L = _str8(h["sid"]), _str8(h["L"])
  if not (_fits(req, _U64) and _fits(p, _U32) and _fits(n, _U32) and _hash_fits(hb)
          and _hash_fits(ha) and sid is not None and L is not None):
    return None
  st = k = bits = w = x = od = 0
  rest = None
  for key in h.keys() - _WORK_CORE:
    v = h[key]
    if key == "st" and _fits(v, _U32):
      st, bits = v, bits | _W_ST
    elif key == "k" and _fits(v, _U32):
      k, bits = v, bits | _W_K
    elif key == "rl" and (v is True or v is False):
      bits |= _W_RL | (_W_RL_TRUE if v else 0)
    elif key == "w" and _code(v, _WANTS):
      w = _code(v, _WANTS)
    elif key == "x" and _code(v, _DTYPES):
      x = _code(v, _DTYPES)
    elif key == "od" and _code(v, _DTYPES):
      od = _code(v, _DTYPES)
    else:
      rest = rest or {}
      rest[key] = v
  return (_WORK_BIN.pack(req, int(hb, 16), int(ha, 16), p, n, st, k, bits, w, x, od)
          + sid + L + (_json(rest) if rest else b""))


def _result_bin(h: dict[str, Any]) -> bytes | None:
  if not _RESULT_CORE <= h.keys():
    return None
  req, ha, sid = h["req"], h["ha"], _str8(h["sid"])
  if not (_fits(req, _U64) and _hash_fits(ha) and sid is not None):
    return None
  token = t0 = t1 = bits = kind = 0
  x = logits = b""
  rest = None
  for key in h.keys() - _RESULT_CORE:
    v = h[key]
    if key == "token" and _fits(v, _U32):
      token, bits = v, bits | _R_TOKEN
    elif (key == "t" and type(v) is list and len(v) == 2  # noqa: E721
          and _fits(v[0], _U64) and _fits(v[1], _U64)):
      t0, t1, bits = v[0], v[1], bits | _R_T
    elif key == "kind" and _code(v, _KINDS):
      kind = _code(v, _KINDS)
    elif key == "x" and _desc_bin(v) is not None:
      x, bits = _desc_bin(v), bits | _R_X
    elif key == "logits" and _desc_bin(v) is not None:
      logits, bits = _desc_bin(v), bits | _R_LOGITS
    else:
      rest = rest or {}
      rest[key] = v
  return (_RESULT_BIN.pack(req, int(ha, 16), token, t0, t1, bits, kind) + sid + x + logits
          + (_json(rest) if rest else b""))


def _bad(what: str, why: str) -> ProtocolError:
  return ProtocolError(f"binary {what} header {why}")


def _enum(code: int, names, key: str, what: str) -> str:
  if code > len(names):
    raise _bad(what, f"gives field {key!r} the unknown code {code}")
  return names[code - 1]


def _strings(buf: bytes, at: int, count: int, what: str) -> tuple[list[str], int]:
  out = []
  for _ in range(count):
    if at >= len(buf) or at + 1 + buf[at] > len(buf):
      raise _bad(what, "is truncated")
    try:
      out.append(buf[at + 1:at + 1 + buf[at]].decode("utf-8"))
    except UnicodeDecodeError:
      raise _bad(what, "holds a string that is not UTF-8") from None
    at += 1 + buf[at]
  return out, at


def _rest(buf: bytes, at: int, out: dict[str, Any], what: str) -> dict[str, Any]:
  if at < len(buf):
    extra = _from_json(buf[at:])
    if out.keys() & extra.keys():
      raise _bad(what, f"repeats field {sorted(out.keys() & extra.keys())[0]!r}")
    out.update(extra)
  return out


def _work_from_bin(buf: bytes) -> dict[str, Any]:
  if len(buf) < _WORK_BIN.size:
    raise _bad("WORK", "is truncated")
  req, hb, ha, p, n, st, k, bits, w, x, od = _WORK_BIN.unpack_from(buf)
  if bits & ~15:
    raise _bad("WORK", f"sets unknown bits {bits:#04x}")
  (sid, L), at = _strings(buf, _WORK_BIN.size, 2, "WORK")
  out = {"req": req, "sid": sid, "p": p, "n": n, "hb": f"{hb:016x}", "ha": f"{ha:016x}", "L": L}
  if bits & _W_ST:
    out["st"] = st
  if bits & _W_K:
    out["k"] = k
  if bits & _W_RL:
    out["rl"] = bool(bits & _W_RL_TRUE)
  if w:
    out["w"] = _enum(w, _WANTS, "w", "WORK")
  if x:
    out["x"] = _enum(x, _DTYPES, "x", "WORK")
  if od:
    out["od"] = _enum(od, _DTYPES, "od", "WORK")
  return _rest(buf, at, out, "WORK")


def _result_from_bin(buf: bytes) -> dict[str, Any]:
  if len(buf) < _RESULT_BIN.size:
    raise _bad("RESULT", "is truncated")
  req, ha, token, t0, t1, bits, kind = _RESULT_BIN.unpack_from(buf)
  if bits & ~15:
    raise _bad("RESULT", f"sets unknown bits {bits:#04x}")
  (sid,), at = _strings(buf, _RESULT_BIN.size, 1, "RESULT")
  out: dict[str, Any] = {"req": req, "sid": sid, "ha": f"{ha:016x}"}
  if bits & _R_TOKEN:
    out["token"] = token
  if bits & _R_T:
    out["t"] = [t0, t1]
  if kind:
    out["kind"] = _enum(kind, _KINDS, "kind", "RESULT")
  for bit, key in ((_R_X, "x"), (_R_LOGITS, "logits")):
    if bits & bit:
      if at + 2 > len(buf) or not 1 <= buf[at + 1] <= 4 or at + 2 + 4 * buf[at + 1] > len(buf):
        raise _bad("RESULT", f"has a truncated or malformed {key!r} descriptor")
      code, rank = buf[at], buf[at + 1]
      out[key] = {"dtype": _enum(code, _DTYPES, "dtype", "RESULT") if code else "",
                  "shape": list(struct.unpack_from(f"!{rank}I", buf, at + 2))}
      at += 2 + 4 * rank
  return _rest(buf, at, out, "RESULT")


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
