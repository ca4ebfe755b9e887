"""Tests for ds4jax.testing.faults: each fault kind is detected by the frame reader with a
reason, deterministically, and nothing hangs."""

import socket
import threading
import time

import pytest

from ds4jax.testing import faults
from ds4jax.wire import protocol
from ds4jax.wire.errors import ProtocolError
from ds4jax.testing.faults import Fault, FaultInjector


def frames(n):
  return [(protocol.MsgType.PING, {"i": i}, bytes([i % 256]) * (10 + i)) for i in range(n)]


@pytest.fixture
def pair():
  a, b = socket.socketpair()
  yield a, b
  a.close()
  b.close()


def send_all(sock, fs):
  for mtype, header, payload in fs:
    protocol.send_frame(sock, mtype, header, payload)


def recv_n(sock, n, **kw):
  kw.setdefault("idle_timeout", 2.0)
  kw.setdefault("frame_timeout", 2.0)
  return [protocol.recv_frame(sock, **kw) for _ in range(n)]


def test_no_fault_passthrough(pair):
  a, b = pair
  fa = faults.FaultySocket(a, [])
  send_all(fa, frames(5))
  got = recv_n(b, 5)
  assert [f.header["i"] for f in got] == list(range(5))
  assert fa.events == []


def test_corrupt_magic_of_frame_is_bad_magic(pair):
  a, b = pair
  fa = faults.FaultySocket(a, [Fault("corrupt", after_frames=2, offset=0, length=1)], seed=1)
  send_all(fa, frames(3))
  ok = recv_n(b, 2)
  assert [f.header["i"] for f in ok] == [0, 1]
  with pytest.raises(ProtocolError, match="bad magic"):
    recv_n(b, 1)
  sizes = [len(protocol.encode_header(t, h, len(p))) + len(p) for t, h, p in frames(2)]
  assert fa.events == [("send", "corrupt", sum(sizes))]


def test_corrupt_json_header_is_reported(pair):
  a, b = pair
  fa = faults.FaultySocket(a, [Fault("corrupt", after_frames=0, offset=protocol.HEADER.size,
                                     length=3)], seed=0)
  send_all(fa, frames(1))
  with pytest.raises(ProtocolError, match="not valid JSON|not a JSON object"):
    recv_n(b, 1)


def test_truncate_inside_frame_is_detected(pair):
  a, b = pair
  fa = faults.FaultySocket(a, [Fault("truncate", after_frames=1, offset=20)])
  send_all(fa, frames(2))  # the sender does not notice
  recv_n(b, 1)
  with pytest.raises(ProtocolError, match="closed inside a frame"):
    recv_n(b, 1)
  with pytest.raises(BrokenPipeError):
    fa.sendall(b"more")


def test_truncate_between_frames_is_clean_eof(pair):
  a, b = pair
  fa = faults.FaultySocket(a, [Fault("truncate", after_frames=1)])
  send_all(fa, frames(2))
  recv_n(b, 1)
  with pytest.raises(EOFError):
    recv_n(b, 1)


def test_close_resets_both_sides(pair):
  a, b = pair
  fa = faults.FaultySocket(a, [Fault("close", after_frames=1)])
  protocol.send_frame(fa, protocol.MsgType.PING, {})
  with pytest.raises(ConnectionResetError):
    protocol.send_frame(fa, protocol.MsgType.PING, {})
  recv_n(b, 1)
  # AF_UNIX socketpairs report the reset as EOF; TCP peers get ECONNRESET (see below).
  with pytest.raises((EOFError, ConnectionResetError)):
    recv_n(b, 1)
  assert fa.fileno() >= 0  # still selectable, like a real reset socket


def test_close_over_tcp_gives_peer_an_rst():
  lsock = socket.create_server(("127.0.0.1", 0))
  c = socket.create_connection(lsock.getsockname())
  s, _ = lsock.accept()
  try:
    fc = faults.FaultySocket(c, [Fault("close", after_frames=0)])
    with pytest.raises(ConnectionResetError):
      protocol.send_frame(fc, protocol.MsgType.PING, {})
    with pytest.raises(ConnectionResetError):
      recv_n(s, 1)
  finally:
    for x in (lsock, c, s):
      x.close()


def test_delay_between_frames_then_frame_arrives(pair):
  a, b = pair
  fa = faults.FaultySocket(a, [Fault("delay", after_frames=1, delay_s=0.3)])
  t = threading.Thread(target=send_all, args=(fa, frames(2)))
  t0 = time.monotonic()
  t.start()
  got = recv_n(b, 2)
  t.join()
  assert time.monotonic() - t0 >= 0.3
  assert [f.header["i"] for f in got] == [0, 1]


def test_delay_inside_frame_beyond_frame_deadline_is_stall(pair):
  a, b = pair
  # The frame's rest is held until the receiver has given up: only its deadline can end it.
  fa = faults.FaultySocket(a, [Fault("delay", after_frames=0, offset=5, delay_s=120)])
  t = threading.Thread(target=send_all, args=(fa, frames(1)))
  t.start()
  try:
    with pytest.raises(ProtocolError, match="stalled"):
      recv_n(b, 1, frame_timeout=0.2)
  finally:
    fa.release()
    t.join()


def test_black_hole_is_an_idle_timeout_not_a_hang(pair):
  a, b = pair
  fa = faults.FaultySocket(a, [Fault("drop", after_frames=1, length=None)])
  send_all(fa, frames(4))
  recv_n(b, 1)
  t0 = time.monotonic()
  with pytest.raises(protocol.IdleTimeout):
    recv_n(b, 1, idle_timeout=0.3)
  assert time.monotonic() - t0 >= 0.25  # it did wait for the idle timeout


def test_drop_inside_frame_stalls_the_frame(pair):
  a, b = pair
  fa = faults.FaultySocket(a, [Fault("drop", after_frames=0, offset=4, length=4)])
  send_all(fa, frames(1))
  with pytest.raises(ProtocolError):  # lengths now come from the wrong bytes, or it stalls
    recv_n(b, 1, frame_timeout=0.3)


def test_recv_side_faults(pair):
  a, b = pair
  fb = faults.FaultySocket(b, [Fault("corrupt", direction="recv", after_frames=1, offset=1)])
  send_all(a, frames(2))
  recv_n(fb, 1)
  with pytest.raises(ProtocolError, match="bad magic"):
    recv_n(fb, 1)

  a2, b2 = socket.socketpair()
  try:
    fb2 = faults.FaultySocket(b2, [Fault("drop", direction="recv", after_bytes=0, length=None)])
    fb2.settimeout(0.3)
    send_all(a2, frames(1))
    with pytest.raises(socket.timeout):  # the dropped bytes never arrive: the timeout holds
      fb2.recv(100)

    fb3 = faults.FaultySocket(a2, [Fault("truncate", direction="recv", after_bytes=3)])
    b2.sendall(b"abcdef")
    assert fb3.recv(100) == b"abc"
    assert fb3.recv(100) == b""
  finally:
    a2.close()
    b2.close()


def corrupted_run(seed):
  a, b = socket.socketpair()
  try:
    fa = faults.FaultySocket(a, [Fault("corrupt", after_frames=0, offset=16, length=2, p=0.3,
                                       count=None)], seed=seed)
    fs = [(protocol.MsgType.PING, {}, bytes(40)) for _ in range(50)]
    send_all(fa, fs)
    a.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := b.recv(65536):
      data += chunk
    return fa.events, data
  finally:
    a.close()
    b.close()


def test_probabilistic_faults_are_deterministic_per_seed():
  ev1, d1 = corrupted_run(7)
  ev2, d2 = corrupted_run(7)
  ev3, _ = corrupted_run(8)
  assert ev1 == ev2 and d1 == d2
  assert ev1 != ev3
  assert 5 <= len(ev1) <= 30  # about 0.3 of 50 frames


def test_injector_wraps_only_selected_links():
  inj = FaultInjector([Fault("drop", after_bytes=0, length=None)], only=[1])
  socks = [socket.socketpair() for _ in range(3)]
  try:
    wrapped = [inj(a) for a, _ in socks]
    assert [isinstance(w, faults.FaultySocket) for w in wrapped] == [False, True, False]
    wrapped[1].sendall(b"gone")
    wrapped[0].sendall(b"kept")
    assert socks[0][1].recv(10) == b"kept"
    assert inj.events == [(1, "send", "drop", 0)]
  finally:
    for a, b in socks:
      a.close()
      b.close()


@pytest.mark.parametrize("kw,err", [
    (dict(kind="explode", after_bytes=0), "unknown fault kind"),
    (dict(kind="drop", direction="up", after_bytes=0), "direction"),
    (dict(kind="drop"), "exactly one"),
    (dict(kind="drop", after_bytes=0, after_frames=0), "exactly one"),
    (dict(kind="drop", after_bytes=0, p=1.5), "probability"),
])
def test_fault_validation(kw, err):
  with pytest.raises(ValueError, match=err):
    Fault(**kw)


def test_frame_type_filter_counts_only_that_type(pair):
  a, b = pair
  fa = faults.FaultySocket(a, [Fault("corrupt", after_frames=1, frame_type=protocol.MsgType.WORK)])
  seq = [protocol.MsgType.PING, protocol.MsgType.WORK, protocol.MsgType.PING,
         protocol.MsgType.WORK]
  for t in seq:
    protocol.send_frame(fa, t, {})
  got = recv_n(b, 3)
  assert [f.type for f in got] == seq[:3]
  with pytest.raises(ProtocolError, match="bad magic"):
    recv_n(b, 1)
  assert len(fa.events) == 1


def test_point_and_range_faults_at_the_same_byte(pair):
  """A delay at the byte where a corruption starts fires too (neither hides the other)."""
  a, b = pair
  fa = faults.FaultySocket(a, [Fault("corrupt", after_bytes=4, length=3),
                               Fault("delay", after_bytes=4, delay_s=0.01),
                               Fault("truncate", after_bytes=6)])
  fa.sendall(b"abcdefgh")
  got = b.recv(100)
  assert got[:4] == b"abcd" and len(got) == 6 and got[4:] != b"ef"
  assert [e[1] for e in fa.events] == ["delay", "corrupt", "truncate"]
