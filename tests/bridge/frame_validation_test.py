"""Every field of the fixed frame header is validated, and a claimed length costs nothing
until its bytes arrive (issue 6, item 4)."""

import json
import socket
import threading
import tracemalloc

import pytest

from ds4jax.wire import protocol
from ds4jax.wire.errors import ProtocolError

H = protocol.HEADER


def recv(data: bytes, *, close=True, **kw):
  a, b = socket.socketpair()
  try:
    a.sendall(data)
    if close:
      a.shutdown(socket.SHUT_WR)
    kw.setdefault("idle_timeout", 1.0)
    kw.setdefault("frame_timeout", 0.3)
    return protocol.recv_frame(b, **kw)
  finally:
    a.close()
    b.close()


def head(magic=protocol.MAGIC, version=protocol.PROTOCOL_VERSION, mtype=protocol.MsgType.PING,
         flags=0, hlen=2, plen=0) -> bytes:
  return H.pack(magic, version, int(mtype), flags, hlen, plen)


@pytest.mark.parametrize("data,err", [
    (head(magic=b"HTTP") + b"{}", "bad magic"),
    (b"GET / HTTP/1.1\r\n", "bad magic"),
    (b"DS4A\x01\x01\x00\x00", "pre-shared key handshake"),
    (head(mtype=0) + b"{}", "unknown message type 0"),
    (head(mtype=250) + b"{}", "unknown message type 250"),
    (head(flags=1) + b"{}", "reserved header flags"),
    (head(hlen=protocol.MAX_HEADER + 1), "exceeds the 65536 cap"),
    (head(hlen=2**32 - 1), "exceeds the 65536 cap"),
    (head(plen=protocol.MAX_PAYLOAD + 1) + b"{}", "exceeds the"),
    (head(hlen=4) + b"[1]\n", "not a JSON object"),
    (head(hlen=10) + b'{"a":NaN}\n', "not valid JSON"),
    (head(hlen=3) + b"\xff\xfe\xfd", "not valid JSON"),
    (head(hlen=20000) + b"[" * 20000, "not valid JSON"),
    (head(hlen=5) + b"{}", "closed inside a frame"),
    (head()[:9], "closed inside a frame"),
])
def test_bad_headers_are_protocol_errors(data, err):
  with pytest.raises(ProtocolError, match=err):
    recv(data)


def test_clean_close_between_frames_is_eof():
  with pytest.raises(EOFError):
    recv(b"")


def test_foreign_magic_is_rejected_before_the_rest_of_the_header():
  """A peer that sends 4 foreign bytes and waits is refused at once, not at the deadline."""
  with pytest.raises(ProtocolError, match="bad magic"):
    recv(b"SSH-", close=False, frame_timeout=30.0)


def test_claimed_payload_is_not_allocated_up_front():
  """A header claiming ~512 MiB followed by a stall allocates only what arrived (plus one
  256 KiB starting buffer), and the stall is cut at the frame deadline."""
  hj = json.dumps({}).encode()
  data = head(mtype=protocol.MsgType.WORK, hlen=len(hj), plen=protocol.MAX_PAYLOAD) + hj
  tracemalloc.start()
  try:
    with pytest.raises(ProtocolError, match="stalled"):
      recv(data + b"x" * 1000, close=False, frame_timeout=0.2)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_large_payload_still_arrives_intact():
  payload = bytes(range(256)) * (3 * 2**20 // 256 + 7)  # ~3 MiB, grows past the first buffer
  a, b = socket.socketpair()
  try:
    t = threading.Thread(target=protocol.send_frame,
                         args=(a, protocol.MsgType.WORK, {"k": 1}, payload))
    t.start()
    f = protocol.recv_frame(b, idle_timeout=5, frame_timeout=5)
    t.join()
  finally:
    a.close()
    b.close()
  assert f.header == {"k": 1} and bytes(f.payload) == payload
  assert f.nbytes == len(protocol.encode_header(f.type, f.header, len(payload))) + len(payload)


def test_other_protocol_versions_are_refused_unless_asked_for():
  data = head(version=1) + b"{}"
  with pytest.raises(ProtocolError, match="protocol version mismatch: the peer speaks version 1, "
                     f"this side {protocol.PROTOCOL_VERSION}"):
    recv(data)
  a, b = socket.socketpair()
  try:
    a.sendall(data)
    assert protocol.recv_frame(b, idle_timeout=1, any_version=True).version == 1
  finally:
    a.close()
    b.close()


def test_payload_cap_zero_refuses_any_payload():
  with pytest.raises(ProtocolError, match="exceeds the 0 cap"):
    recv(head(plen=1) + b"{}x", max_payload=0)
  assert recv(head() + b"{}", max_payload=0).header == {}


# Property: whatever bytes arrive, the reader returns a frame or raises one of its own
# errors (never an IndexError/TypeError/RecursionError from the parsing code).
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from ds4jax.wire import auth  # noqa: E402

_prefixes = st.sampled_from([b"", protocol.MAGIC, head()[:6], head(), head(hlen=3),
                             head(plen=4), head(hlen=2**16, plen=2**31)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=_prefixes, body=st.binary(max_size=300))
def test_any_bytes_give_a_frame_or_a_protocol_error(prefix, body):
  try:
    f = recv(prefix + body, frame_timeout=0.2)
  except (ProtocolError, EOFError, protocol.IdleTimeout):
    return
  assert isinstance(f.header, dict) and f.type in protocol.MsgType


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200) | st.builds(lambda b: auth.MAGIC + b"\x01\x01\x00\x00" + b,
                                                 st.binary(max_size=120)))
def test_any_bytes_fail_the_key_handshake_with_a_reason(data):
  a, b = socket.socketpair()
  try:
    a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(auth.AuthError) as e:
      auth.server_handshake(b, b"k" * 32, timeout=0.5)
    assert e.value.reason in (auth.NO_AUTH, auth.CLOSED, auth.BAD_MESSAGE, auth.REPLAY,
                              auth.WRONG_KEY, auth.VERSION_MISMATCH, auth.TIMEOUT)
  finally:
    a.close()
    b.close()
