"""The binary WORK/RESULT control headers (protocol v3) and the version handshake."""

import json
import socket
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds4jax.wire import headers, protocol
from ds4jax.wire.errors import HandshakeRefused, ProtocolError
from ds4jax.wire.protocol import FLAG_BINARY, MsgType
from ds4jax.bridge.worker.worker import Worker, WorkerOptions
from ds4jax.config import LayerRange

H0 = protocol.hash_hex(protocol.FNV_INIT)
WORK = {"req": 7, "sid": "0123456789abcdef", "p": 511, "n": 1, "hb": H0,
        "ha": protocol.hash_hex(protocol.fnv1a64([5])), "L": "4:output", "x": "f32"}
RESULT = {"req": 7, "sid": "0123456789abcdef", "ha": H0, "token": 42, "t": [1234, 5]}


def roundtrip(mtype, header, payload=b""):
  a, b = socket.socketpair()
  try:
    protocol.send_frame(a, mtype, header, payload)
    head = protocol.HEADER.unpack(b.recv(16, socket.MSG_PEEK))
    f = protocol.recv_frame(b, idle_timeout=2, frame_timeout=2)
  finally:
    a.close()
    b.close()
  return head, f


@pytest.mark.parametrize("mtype,header", [
    (MsgType.WORK, WORK),
    (MsgType.WORK, dict(WORK, w="ack", od="bf16", st=9, k=3, rl=True, s={"temperature": 0.5})),
    (MsgType.WORK, dict(WORK, rl=False, x="int8")),
    (MsgType.RESULT, RESULT),
    (MsgType.RESULT, dict(RESULT, kind="hidden", x={"dtype": "bf16", "shape": [1, 4, 512]})),
    (MsgType.RESULT, dict(RESULT, logits={"dtype": "f32", "shape": [4096]},
                          logprobs=[[42, -0.25], [7, -1.5]], x={"dtype": "f32", "shape": [2]})),
])
def test_decode_token_headers_go_binary_and_come_back_equal(mtype, header):
  (_, version, _, flags, hlen, _), f = roundtrip(mtype, header, b"xyz")
  assert (version, flags) == (protocol.PROTOCOL_VERSION, FLAG_BINARY)
  assert f.header == header and bytes(f.payload) == b"xyz"
  assert f.nbytes == 16 + hlen + 3
  assert hlen < len(json.dumps(header, separators=(",", ":")))


def test_decode_token_work_header_is_fixed_size_and_smaller_than_json():
  hj = json.dumps(WORK, separators=(",", ":")).encode()
  flags, hb = protocol.encode_control(MsgType.WORK, WORK)
  # 44 B of fixed fields + the two length-prefixed strings (16 + 8 B), against 121 B of JSON
  assert flags == FLAG_BINARY and len(hb) == 44 + 1 + 16 + 1 + 8 and len(hj) == 121


@pytest.mark.parametrize("header", [
    {"req": 1}, dict(WORK, req=True), dict(WORK, p=-1), dict(WORK, hb="CBF29CE484222325"),
    dict(WORK, sid="x" * 300), dict(WORK, L=3),
])
def test_work_that_does_not_fit_goes_as_json_unchanged(header):
  (_, _, _, flags, _, _), f = roundtrip(MsgType.WORK, header)
  assert flags == 0 and f.header == header


def test_json_work_and_result_are_still_read():
  for mtype, h in ((MsgType.WORK, WORK), (MsgType.RESULT, RESULT)):
    hj = json.dumps(h).encode()
    a, b = socket.socketpair()
    a.sendall(protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, mtype, 0,
                                   len(hj), 0) + hj)
    assert protocol.recv_frame(b, idle_timeout=2).header == h
    a.close()
    b.close()


def recv_raw(mtype, body, flags=FLAG_BINARY):
  a, b = socket.socketpair()
  try:
    a.sendall(protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, int(mtype), flags,
                                   len(body), 0) + body)
    return protocol.recv_frame(b, idle_timeout=2, frame_timeout=2)
  finally:
    a.close()
    b.close()


def test_malformed_binary_headers_are_one_line_protocol_errors():
  good = protocol.encode_control(MsgType.WORK, WORK)[1]
  bad_bits = bytearray(good)
  bad_bits[40] = 0x80  # the WORK bits byte (after req hb ha p n st k)
  bad_code = bytearray(good)
  bad_code[42] = 9  # x
  cases = [
      (MsgType.WORK, good[:20], "truncated"),
      (MsgType.WORK, good[:-3], "truncated"),
      (MsgType.WORK, bytes(bad_bits), "unknown bits"),
      (MsgType.WORK, bytes(bad_code), "unknown code 9"),
      (MsgType.WORK, good + b'{"sid": "again"}', "repeats field 'sid'"),
      (MsgType.WORK, good + b"[1]", "not a JSON object"),
      (MsgType.RESULT, b"\0" * 10, "truncated"),
  ]
  for mtype, body, msg in cases:
    with pytest.raises(ProtocolError, match=msg) as e:
      recv_raw(mtype, body)
    assert "\n" not in str(e.value)
  with pytest.raises(ProtocolError, match="reserved header flags are 0x0001 on a PING frame"):
    recv_raw(MsgType.PING, b"{}")
  with pytest.raises(ProtocolError, match="reserved header flags are 0x0002 on a WORK frame"):
    recv_raw(MsgType.WORK, good, flags=2)


_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**65),
                    st.sampled_from(["f32", "bf16", "int8", "ack", "out", "hidden", "token", H0,
                                     "", "\udc80", "é" * 200]),
                    st.lists(st.integers(-1, 2**64), max_size=3),
                    st.fixed_dictionaries({"dtype": st.sampled_from(["f32", "x"]),
                                           "shape": st.lists(st.integers(-1, 2**33), max_size=5)}))
_keys = st.sampled_from(["req", "sid", "p", "n", "hb", "ha", "L", "w", "x", "od", "st", "k",
                         "rl", "s", "token", "t", "kind", "logits", "logprobs", "zz"])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([MsgType.WORK, MsgType.RESULT]), st.dictionaries(_keys, _values),
       st.booleans())
def test_any_header_comes_back_exactly(mtype, header, with_core):
  if with_core:  # so that most examples take the binary path
    header = {**(WORK if mtype == MsgType.WORK else RESULT), **header}
  flags, body = protocol.encode_control(mtype, header)
  decoded = ((headers.work_from_bin if mtype == MsgType.WORK else headers.result_from_bin)
             (body) if flags else json.loads(body))
  assert decoded == header


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([MsgType.WORK, MsgType.RESULT]), st.binary(max_size=120))
def test_random_binary_headers_only_raise_protocol_errors(mtype, body):
  try:
    f = recv_raw(mtype, body)
  except ProtocolError:
    return
  assert isinstance(f.header, dict)


# ------------------------------------------------------------------------ version handshake
def fake_coordinator(answer):
  """A one-connection server that reads a HELLO and answers with answer(frame) bytes."""
  lsock = socket.create_server(("127.0.0.1", 0))
  seen = []

  def serve():
    s, _ = lsock.accept()
    with s:
      f = protocol.recv_frame(s, idle_timeout=5, any_version=True)
      seen.append(f)
      s.sendall(answer(f))
      s.recv(1)  # until the worker hangs up
    lsock.close()

  threading.Thread(target=serve, daemon=True).start()
  return lsock.getsockname()[:2], seen


def old_frame(mtype, header, version=2):
  hj = json.dumps(header).encode()
  return protocol.HEADER.pack(protocol.MAGIC, version, mtype, 0, len(hj), 0) + hj


def run_worker(addr):
  w = Worker(tuple(addr), fingerprint="f" * 64, n_layers=4, vocab_size=40,
             layers=LayerRange(1, 3, True), load=lambda: None,
             options=WorkerOptions(ctx=64, backoff_min=0.05, backoff_max=0.1, connect_timeout=2))
  with pytest.raises(HandshakeRefused) as e:
    w.run()
  return str(e.value)


def test_worker_stops_with_the_reason_an_older_coordinator_refuses_it_with():
  addr, seen = fake_coordinator(lambda f: old_frame(MsgType.REFUSE, {
      "reason": f"protocol version {f.version} is not supported (this coordinator speaks 2)"}))
  assert run_worker(addr).endswith(
      ": protocol version 3 is not supported (this coordinator speaks 2)")
  assert seen[0].version == protocol.PROTOCOL_VERSION


def test_worker_stops_on_an_accept_of_another_version():
  addr, _ = fake_coordinator(lambda f: old_frame(MsgType.ACCEPT, {"worker_id": 1,
                                                                  "heartbeat_s": 1.0}))
  assert run_worker(addr).endswith(
      ": protocol version mismatch: the coordinator speaks version 2, this worker 3")


def test_an_older_worker_is_refused_in_its_own_frame_version():
  from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
  from ds4jax.testing.fake_stage import FakeConfig, FakeRunner
  cfg = FakeConfig()
  coord = Coordinator(FakeRunner(cfg, LayerRange(0, 0, False)),
                      CoordinatorOptions(port=0, handshake_timeout=5))
  try:
    s = socket.create_connection(coord.address, timeout=5)
    with s:
      s.sendall(old_frame(MsgType.HELLO, {"protocol": 2, "fingerprint": cfg.fingerprint(),
                                          "n_layers": 4, "start": 1, "end": 3,
                                          "has_output": True, "ctx": 64}))
      f = protocol.recv_frame(s, idle_timeout=5, any_version=True)
  finally:
    coord.close()
  assert (f.version, f.type) == (2, MsgType.REFUSE)
  assert f.header["reason"] == "protocol version 2 is not supported (this coordinator speaks 3)"


# --------------------------------------------------------------------- TLS on one side only
@pytest.mark.parametrize("side,key", [("coordinator", None), ("worker", None),
                                      ("coordinator", b"k" * 32)])
def test_tls_on_one_side_only_is_a_final_one_line_error(tmp_path, side, key):
  """A worker without TLS dialing a TLS coordinator (or the reverse) stops at once with the
  reason instead of redialing forever; the coordinator logs why it refused. With a key on
  both sides the worker's key handshake meets the TLS alert: it says so, not "no key"."""
  from ds4jax.wire import auth
  from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
  from ds4jax.testing.certs import make_self_signed
  from ds4jax.testing.fake_stage import FakeConfig, FakeRunner
  cert, key_file = make_self_signed(str(tmp_path))
  cfg = FakeConfig()
  coord = Coordinator(FakeRunner(cfg, LayerRange(0, 1, False)), CoordinatorOptions(
      port=0, handshake_timeout=5, key=key,
      tls=auth.server_ssl_context(cert, key_file) if side == "coordinator" else None))
  try:
    w = Worker(tuple(coord.address), fingerprint=cfg.fingerprint(), n_layers=4, vocab_size=40,
               layers=LayerRange(2, 3, True), load=lambda: None,
               options=WorkerOptions(ctx=64, connect_timeout=5, backoff_min=0.05, key=key,
                                     tls=auth.client_ssl_context(cert) if side == "worker"
                                     else None, tls_server_name="localhost"))
    with pytest.raises(HandshakeRefused) as e:
      w.run()
    assert w.connections == 0
  finally:
    coord.close()
  msg = str(e.value)
  assert "\n" not in msg
  if key is not None:
    assert "the peer speaks TLS" in msg and "no key" not in msg, msg
  elif side == "coordinator":
    assert "the coordinator uses TLS and this worker does not" in msg
    assert any("does not use TLS and this coordinator does" in ev for ev in coord.events)
  else:
    assert "the coordinator does not use TLS" in msg
    assert any("uses TLS and this coordinator does not" in ev for ev in coord.events)
