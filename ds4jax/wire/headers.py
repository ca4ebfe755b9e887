"""Control header codecs: JSON for every frame, and the fixed binary layout of WORK/RESULT.

The frames that ride on every decode token (WORK, RESULT) get a fixed layout, sent with the
frame flag `protocol.FLAG_BINARY`: the required fields in one struct, optional ones behind a
bit or a code each, the session id and layer range as short strings, and then, as the rest
of the control header, a JSON object with any other field (sampling parameters, logprobs;
usually absent). A header whose required fields are missing or do not fit goes as JSON, so
the receiver's field checks see exactly what was sent. Both decoders return the same dict
(docs/protocol.md §1 has the layouts). Stdlib only.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from ds4jax.wire.errors import ProtocolError


def to_json(header: dict[str, Any]) -> bytes:
  return json.dumps(header, separators=(",", ":"), allow_nan=False).encode()


def from_json(buf) -> dict[str, Any]:
  try:
    header = json.loads(bytes(buf).decode("utf-8"), parse_constant=_no_constant)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:  # deep nesting: RecursionError
    raise ProtocolError(f"control header is not valid JSON: {e}") from None
  if not isinstance(header, dict):
    raise ProtocolError("control header is not a JSON object")
  return header


def _no_constant(name: str):
  raise ValueError(f"{name} is not allowed in a control header")


# ------------------------------------------------------------------- binary WORK / RESULT
WORK_BIN = struct.Struct("!QQQIIIIBBBB")  # req hb ha p n st k, bits w x od
RESULT_BIN = struct.Struct("!QQIQQBB")  # req ha token t0 t1, bits kind
_WORK_CORE = frozenset(("req", "sid", "p", "n", "hb", "ha", "L"))
_RESULT_CORE = frozenset(("req", "sid", "ha"))
_W_ST, _W_K, _W_RL, _W_RL_TRUE = 1, 2, 4, 8  # WORK bits (w, x, od: code 0 = absent)
_R_TOKEN, _R_T, _R_X, _R_LOGITS = 1, 2, 4, 8  # RESULT bits (kind: code 0 = absent)
_DTYPES = ("f32", "bf16", "int8")  # tensors.WIRE_DTYPES (not imported: stdlib only here)
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


def work_to_bin(h: dict[str, Any]) -> bytes | None:
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
  return (WORK_BIN.pack(req, int(hb, 16), int(ha, 16), p, n, st, k, bits, w, x, od)
          + sid + L + (to_json(rest) if rest else b""))


def result_to_bin(h: dict[str, Any]) -> bytes | None:
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
  return (RESULT_BIN.pack(req, int(ha, 16), token, t0, t1, bits, kind) + sid + x + logits
          + (to_json(rest) if rest else b""))


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
    extra = from_json(buf[at:])
    if out.keys() & extra.keys():
      raise _bad(what, f"repeats field {sorted(out.keys() & extra.keys())[0]!r}")
    out.update(extra)
  return out


def work_from_bin(buf: bytes) -> dict[str, Any]:
  if len(buf) < WORK_BIN.size:
    raise _bad("WORK", "is truncated")
  req, hb, ha, p, n, st, k, bits, w, x, od = WORK_BIN.unpack_from(buf)
  if bits & ~15:
    raise _bad("WORK", f"sets unknown bits {bits:#04x}")
  (sid, L), at = _strings(buf, WORK_BIN.size, 2, "WORK")
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


def result_from_bin(buf: bytes) -> dict[str, Any]:
  if len(buf) < RESULT_BIN.size:
    raise _bad("RESULT", "is truncated")
  req, ha, token, t0, t1, bits, kind = RESULT_BIN.unpack_from(buf)
  if bits & ~15:
    raise _bad("RESULT", f"sets unknown bits {bits:#04x}")
  (sid,), at = _strings(buf, RESULT_BIN.size, 1, "RESULT")
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
