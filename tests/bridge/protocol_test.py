"""Frames, caps, deadlines and the prefix hash (bridge/protocol.py)."""

import socket
import struct
import threading

import numpy as np
import pytest

from ds4jax.wire import protocol
from ds4jax.wire.errors import ProtocolError
from ds4jax.wire.protocol import MsgType


@pytest.fixture
def pair():
  a, b = socket.socketpair()
  yield a, b
  a.close()
  b.close()


def test_roundtrip_small_and_large(pair):
  a, b = pair
  payload = bytes(range(256)) * 1024  # over the join limit: header and payload sent apart
  t = threading.Thread(target=lambda: [protocol.send_frame(a, MsgType.WORK, {"k": [1, "x"]},
                                                           payload),
                                       protocol.send_frame(a, MsgType.PING, {})])
  t.start()
  f = protocol.recv_frame(b, idle_timeout=5)
  g = protocol.recv_frame(b, idle_timeout=5)
  t.join()
  assert (f.type, f.header, bytes(f.payload)) == (MsgType.WORK, {"k": [1, "x"]}, payload)
  assert (g.type, g.header, bytes(g.payload)) == (MsgType.PING, {}, b"")


def test_header_layout_is_network_order():
  head = protocol.encode_header(MsgType.RESULT, {}, 7)  # no binary core fields: JSON, flags 0
  assert head[:16] == struct.pack("!4sBBHII", b"DS4J", protocol.PROTOCOL_VERSION, 6, 0, 2, 7)


def test_eof_between_frames_vs_inside(pair):
  a, b = pair
  a.close()
  with pytest.raises(EOFError):
    protocol.recv_frame(b, idle_timeout=2)
  c, d = socket.socketpair()
  c.sendall(protocol.encode_header(MsgType.WORK, {"a": 1}, 100) + b"x" * 10)
  c.close()
  with pytest.raises(ProtocolError, match="closed inside a frame"):
    protocol.recv_frame(d, idle_timeout=2)
  d.close()


def test_oversize_lengths_refused_before_reading(pair):
  a, b = pair
  a.sendall(struct.pack("!4sBBHII", b"DS4J", protocol.PROTOCOL_VERSION, 5, 0, 10, 2**31))
  with pytest.raises(ProtocolError, match="exceeds"):
    protocol.recv_frame(b, idle_timeout=2, max_payload=1 << 20)
  a.sendall(struct.pack("!4sBBHII", b"DS4J", protocol.PROTOCOL_VERSION, 5, 0,
                        protocol.MAX_HEADER + 1, 0))
  with pytest.raises(ProtocolError, match="control header length"):
    protocol.recv_frame(b, idle_timeout=2)


def test_bad_magic_type_json(pair):
  a, b = pair
  a.sendall(struct.pack("!4sBBHII", b"HTTP", 1, 5, 0, 0, 0))
  with pytest.raises(ProtocolError, match="magic"):
    protocol.recv_frame(b, idle_timeout=2)
  a.sendall(struct.pack("!4sBBHII", b"DS4J", protocol.PROTOCOL_VERSION, 99, 0, 0, 0))
  with pytest.raises(ProtocolError, match="unknown message type"):
    protocol.recv_frame(b, idle_timeout=2)
  a.sendall(struct.pack("!4sBBHII", b"DS4J", protocol.PROTOCOL_VERSION, 5, 0, 3, 0) + b"[1]")
  with pytest.raises(ProtocolError, match="not a JSON object"):
    protocol.recv_frame(b, idle_timeout=2)


def test_idle_timeout_consumes_nothing_and_stall_is_bounded(pair):
  a, b = pair
  with pytest.raises(protocol.IdleTimeout):  # nothing sent: the idle deadline ends the wait
    protocol.recv_frame(b, idle_timeout=0.1)
  protocol.send_frame(a, MsgType.PING, {"t": 1})  # ... and the next frame is read whole
  assert protocol.recv_frame(b, idle_timeout=1).header == {"t": 1}
  a.sendall(protocol.encode_header(MsgType.WORK, {}, 10))  # slowloris: payload never comes
  # "stalled", not IdleTimeout: the frame deadline (0.3 s) fired inside the frame, although
  # the idle deadline (120 s) was far away.
  with pytest.raises(ProtocolError, match="stalled"):
    protocol.recv_frame(b, idle_timeout=120, frame_timeout=0.3)


def _fnv_reference(tokens):
  h = 0xCBF29CE484222325
  for byte in np.asarray(tokens, "<u4").tobytes():
    h ^= byte
    h = (h * 0x100000001B3) % 2**64
  return h


def test_fnv1a64_matches_byte_reference_and_rolls():
  toks = [0, 1, 255, 256, 65535, 129279, 2**32 - 1]
  assert protocol.fnv1a64([]) == protocol.FNV_INIT
  assert protocol.fnv1a64(toks) == _fnv_reference(toks)
  assert protocol.fnv1a64(toks[3:], protocol.fnv1a64(toks[:3])) == _fnv_reference(toks)
  # The published FNV-1a 64 vectors: "" is the offset basis cbf29ce484222325 and "a" (0x61)
  # is af63dc4c8601ec8c. Token 0x61 is the bytes 61 00 00 00 (u32 little-endian): the three
  # zero bytes each multiply by the prime 100000001b3 (xor with 0 changes nothing).
  assert protocol.fnv1a64([]) == 0xCBF29CE484222325
  want = 0xAF63DC4C8601EC8C
  for _ in range(3):
    want = want * 0x100000001B3 % 2**64
  assert protocol.fnv1a64([0x61]) == want
  assert protocol.hash_hex(protocol.fnv1a64([0x61])) == f"{want:016x}"


def test_field_validation():
  h = {"n": 3, "b": True, "s": "x"}
  assert protocol.field(h, "n", int, lo=1, hi=4) == 3
  with pytest.raises(ProtocolError, match="outside"):
    protocol.field(h, "n", int, lo=4)
  with pytest.raises(ProtocolError, match="must be an integer"):
    protocol.field(h, "b", int)
  with pytest.raises(ProtocolError, match="missing"):
    protocol.field(h, "zz", str)
  with pytest.raises(ProtocolError, match="hex hash"):
    protocol.parse_hash("12", "hash_before")
