"""Tests for ds4jax.wire.auth: key loading, the mutual HMAC handshake, TLS, bind checks."""

import logging
import os
import socket
import threading
import time

import pytest

from ds4jax.wire import auth
from ds4jax.testing.certs import make_self_signed

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


class Recorder:
  """A socket proxy that records every byte sent through it (a passive eavesdropper)."""

  def __init__(self, sock):
    self.sock = sock
    self.sent = bytearray()

  def sendall(self, data):
    self.sent += data
    return self.sock.sendall(data)

  def __getattr__(self, name):
    return getattr(self.sock, name)


def run_pair(server_fn, client_fn, timeout=60.0):
  """Runs server_fn(sock) in a thread and client_fn(sock) here, over a socketpair.

  Returns (server_result, client_result); each is the return value or the exception.
  """
  s_sock, c_sock = socket.socketpair()
  out = {}

  def server():
    try:
      out["s"] = server_fn(s_sock)
    except Exception as e:  # noqa: BLE001 - the test inspects it
      out["s"] = e
    finally:
      s_sock.close()

  t = threading.Thread(target=server, daemon=True)
  t.start()
  try:
    c = client_fn(c_sock)
  except Exception as e:  # noqa: BLE001
    c = e
  finally:
    c_sock.close()
  t.join(timeout)
  assert not t.is_alive(), "server side hung"
  return out["s"], c


def assert_auth_error(result, reason):
  assert isinstance(result, auth.AuthError), result
  assert result.reason == reason, result


def test_same_key_succeeds_and_link_still_usable():
  def server(s):
    auth.server_handshake(s, KEY, timeout=5)
    return s.recv(5)

  def client(c):
    auth.client_handshake(c, KEY, timeout=5)
    c.sendall(b"after")

  s, c = run_pair(server, client)
  assert s == b"after" and c is None


def test_handshake_restores_socket_timeout():
  def server(s):
    s.settimeout(None)
    auth.server_handshake(s, KEY, timeout=5)
    return s.gettimeout()

  s, c = run_pair(server, lambda c: auth.client_handshake(c, KEY, timeout=5))
  assert s is None and c is None


def test_wrong_key_refused_on_both_sides_with_logged_reason(caplog):
  caplog.set_level(logging.WARNING, logger="ds4jax.wire.auth")
  s, c = run_pair(lambda s: auth.server_handshake(s, KEY, timeout=5),
                  lambda c: auth.client_handshake(c, OTHER_KEY, timeout=5))
  assert_auth_error(s, auth.WRONG_KEY)
  assert_auth_error(c, auth.WRONG_KEY)
  msgs = [r.getMessage() for r in caplog.records]
  assert any(m.startswith("server auth") and "wrong key" in m for m in msgs), msgs
  assert any(m.startswith("client auth") and "wrong key" in m for m in msgs), msgs


def test_keyless_client_refused_immediately_with_reason(caplog):
  caplog.set_level(logging.WARNING, logger="ds4jax.wire.auth")

  def client(c):
    c.sendall(b"DS4J" + b"\x00" * 60)  # a protocol frame, not an auth HELLO
    return c.recv(64)

  # NO_AUTH, not TIMEOUT: the peer is told from its first bytes, not after the 10 s deadline.
  s, c = run_pair(lambda s: auth.server_handshake(s, KEY, timeout=10), client)
  assert_auth_error(s, auth.NO_AUTH)
  assert c[:4] == auth.MAGIC, c  # the keyless side gets a FAIL it can report
  assert any("peer sent no auth" in r.getMessage() for r in caplog.records)


def test_keyed_client_against_keyless_server_fails_clearly():
  def keyless_server_closes(s):
    s.recv(8)  # sees bytes that are not a protocol frame and hangs up

  s, c = run_pair(keyless_server_closes, lambda c: auth.client_handshake(c, KEY, timeout=5))
  assert_auth_error(c, auth.CLOSED)
  assert "does the server have a key" in str(c)

  def keyless_server_answers(s):
    s.recv(8)
    s.sendall(b"DS4J" + b"\x00" * 60)  # e.g. a protocol ERROR frame

  s, c = run_pair(keyless_server_answers, lambda c: auth.client_handshake(c, KEY, timeout=5))
  assert_auth_error(c, auth.NO_AUTH)
  assert "no key" in str(c)


def test_silent_peer_times_out():
  """The peer stays silent (and connected) until the server has given up: only the deadline
  can end the handshake."""
  done = threading.Event()

  def server(s):
    try:
      return auth.server_handshake(s, KEY, timeout=0.3)
    finally:
      done.set()

  s, c = run_pair(server, lambda c: done.wait(60))
  assert_auth_error(s, auth.TIMEOUT)


def test_trickling_peer_hits_the_overall_deadline():
  """Slowloris: one byte every 50 ms never resets the handshake deadline."""
  def client(c):
    for b in auth._PREFIX.pack(auth.MAGIC, auth.VERSION, auth.HELLO, 0) + b"n" * 32:
      try:
        c.sendall(bytes([b]))
      except OSError:
        return
      time.sleep(0.05)

  # TIMEOUT although no byte is more than 50 ms late: the 0.5 s deadline covers the whole
  # handshake (the trickle alone takes 1.8 s, and then the HELLO would be complete).
  s, _ = run_pair(lambda s: auth.server_handshake(s, KEY, timeout=0.5), client)
  assert_auth_error(s, auth.TIMEOUT)


def test_version_mismatch_and_garbage_type():
  def client_v2(c):
    c.sendall(auth._PREFIX.pack(auth.MAGIC, 2, auth.HELLO, 0) + b"n" * 32)
    return c.recv(64)

  s, c = run_pair(lambda s: auth.server_handshake(s, KEY, timeout=5), client_v2)
  assert_auth_error(s, auth.VERSION_MISMATCH)

  def client_bad_type(c):
    c.sendall(auth._PREFIX.pack(auth.MAGIC, auth.VERSION, 200, 0) + b"n" * 32)

  s, c = run_pair(lambda s: auth.server_handshake(s, KEY, timeout=5), client_bad_type)
  assert_auth_error(s, auth.BAD_MESSAGE)


def capture_handshake():
  """A legitimate handshake, as a passive eavesdropper records it (both directions)."""
  rec = {}

  def server(s):
    r = Recorder(s)
    auth.server_handshake(r, KEY, timeout=5)
    rec["server"] = bytes(r.sent)

  def client(c):
    r = Recorder(c)
    auth.client_handshake(r, KEY, timeout=5)
    rec["client"] = bytes(r.sent)

  s, c = run_pair(server, client)
  assert s is None and c is None
  return rec["client"], rec["server"]


def test_replayed_client_handshake_refused_on_both_sides(caplog):
  caplog.set_level(logging.WARNING, logger="ds4jax.wire.auth")
  client_bytes, _ = capture_handshake()
  hello, proof = client_bytes[:40], client_bytes[40:112]

  def replayer(c):
    c.sendall(hello)
    c.recv(40)  # the fresh challenge, which the attacker cannot answer
    c.sendall(proof)
    return c.recv(8)

  s, c = run_pair(lambda s: auth.server_handshake(s, KEY, timeout=5), replayer)
  assert_auth_error(s, auth.REPLAY)
  # The attacker is told why: FAIL with the replay code.
  magic, _, mtype, code = auth._PREFIX.unpack(c)
  assert (magic, mtype, code) == (auth.MAGIC, auth.FAIL, auth._REASON_CODES[auth.REPLAY])
  assert any("replayed/stale" in r.getMessage() for r in caplog.records)


def test_replay_with_patched_nonce_echo_is_a_wrong_mac():
  """Rewriting the echoed nonce to the fresh one does not help: the MAC covers it."""
  client_bytes, _ = capture_handshake()
  hello, proof = client_bytes[:40], client_bytes[40:112]

  def forger(c):
    c.sendall(hello)
    nonce_s = c.recv(40)[8:]
    c.sendall(proof[:8] + nonce_s + proof[40:])
    return c.recv(8)

  s, _ = run_pair(lambda s: auth.server_handshake(s, KEY, timeout=5), forger)
  assert_auth_error(s, auth.WRONG_KEY)


def test_replayed_server_handshake_refused_by_client(caplog):
  caplog.set_level(logging.WARNING, logger="ds4jax.wire.auth")
  _, server_bytes = capture_handshake()
  challenge, welcome = server_bytes[:40], server_bytes[40:112]

  def fake_server(s):
    s.recv(40)
    s.sendall(challenge)
    s.recv(72)
    s.sendall(welcome)
    return s.recv(8)

  s, c = run_pair(fake_server, lambda c: auth.client_handshake(c, KEY, timeout=5))
  assert_auth_error(c, auth.REPLAY)
  assert auth._PREFIX.unpack(s)[2] == auth.FAIL  # the client tells the fake server why
  assert any(r.getMessage().startswith("client auth") and "replayed/stale" in r.getMessage()
             for r in caplog.records)


def test_nonces_are_fresh_per_connection():
  a, _ = capture_handshake()
  b, _ = capture_handshake()
  assert a[8:40] != b[8:40]


def test_empty_key_is_a_programming_error():
  with pytest.raises(ValueError):
    auth.server_handshake(None, b"")
  with pytest.raises(ValueError):
    auth.client_handshake(None, b"")


# ------------------------------------------------------------------------------------------
# Keys.


def test_load_key_from_file_strips_newline(tmp_path, monkeypatch):
  monkeypatch.delenv(auth.KEY_ENV, raising=False)
  p = tmp_path / "key"
  p.write_bytes(b"0123456789abcdef0123\n")
  os.chmod(p, 0o600)
  assert auth.load_key(str(p)) == b"0123456789abcdef0123"


def test_load_key_from_env_and_file_wins(tmp_path, monkeypatch):
  monkeypatch.setenv(auth.KEY_ENV, "envkey-envkey-envkey")
  assert auth.load_key() == b"envkey-envkey-envkey"
  p = tmp_path / "key"
  p.write_bytes(b"filekey-filekey-filekey")
  assert auth.load_key(str(p)) == b"filekey-filekey-filekey"


def test_no_key_anywhere_is_none(monkeypatch):
  monkeypatch.delenv(auth.KEY_ENV, raising=False)
  assert auth.load_key(None) is None


@pytest.mark.parametrize("content,err", [
    (b"", "is empty"),
    (b"  \n", "is empty"),
    (b"short", "use at least 16 bytes"),
    (b"x" * 5000, "at most 4096"),
])
def test_load_key_bad_files(tmp_path, content, err):
  p = tmp_path / "key"
  p.write_bytes(content)
  with pytest.raises(auth.KeyLoadError, match=err):
    auth.load_key(str(p))


def test_load_key_missing_and_not_a_file(tmp_path):
  with pytest.raises(auth.KeyLoadError, match="does not exist"):
    auth.load_key(str(tmp_path / "nope"))
  with pytest.raises(auth.KeyLoadError, match="not a regular file"):
    auth.load_key(str(tmp_path))


def test_load_key_empty_env_is_an_error(monkeypatch):
  monkeypatch.setenv(auth.KEY_ENV, "")
  with pytest.raises(auth.KeyLoadError, match=r"\$DS4JAX_KEY is empty"):
    auth.load_key()


def test_world_readable_key_file_warns(tmp_path, caplog):
  p = tmp_path / "key"
  p.write_bytes(b"0123456789abcdef0123")
  os.chmod(p, 0o644)
  with caplog.at_level(logging.WARNING, logger="ds4jax.wire.auth"):
    auth.load_key(str(p))
  assert any("chmod 600" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------
# Bind addresses.


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "localhost"])
def test_loopback_binds_do_not_warn(host):
  assert auth.bind_warning(host, None) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "10.1.2.3", "192.168.0.7"])
def test_exposed_bind_without_key_warns(host, caplog):
  with caplog.at_level(logging.WARNING, logger="ds4jax.wire.auth"):
    msg = auth.warn_if_exposed(host, None)
  assert msg and "without a key" in msg
  assert any("without a key" in r.getMessage() for r in caplog.records)
  assert auth.bind_warning(host, KEY) is None


def test_default_bind_host_is_loopback():
  assert auth.is_loopback(auth.DEFAULT_BIND_HOST)


# ------------------------------------------------------------------------------------------
# TLS over real loopback TCP.


def make_cert(tmp_path, name):
  return make_self_signed(str(tmp_path), name)


def tcp_pair(server_fn, client_fn):
  """Like run_pair, but over a real 127.0.0.1 TCP connection (TLS needs a real socket)."""
  lsock = socket.create_server(("127.0.0.1", 0))
  port = lsock.getsockname()[1]

  def server_side(_):
    conn, _ = lsock.accept()
    try:
      return server_fn(conn)
    finally:
      conn.close()

  def client_side(_):
    c = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
      return client_fn(c)
    finally:
      c.close()

  try:
    return run_pair(server_side, client_side)
  finally:
    lsock.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
  d = tmp_path_factory.mktemp("certs")
  return make_cert(d, "server"), make_cert(d, "other")


def test_tls_plus_key_link_works(certs):
  (certfile, keyfile), _ = certs
  sctx = auth.server_ssl_context(certfile, keyfile)
  cctx = auth.client_ssl_context(certfile)

  def server(s):
    s = auth.secure_server(s, key=KEY, ssl_ctx=sctx, timeout=5)
    data = s.recv(4)
    s.sendall(data[::-1])
    return s.version()

  def client(c):
    c = auth.secure_client(c, key=KEY, ssl_ctx=cctx, server_hostname="127.0.0.1", timeout=5)
    c.sendall(b"ping")
    return c.recv(4)

  s, c = tcp_pair(server, client)
  assert c == b"gnip"
  assert s.startswith("TLSv1."), s


def test_tls_untrusted_server_refused(certs):
  (certfile, keyfile), (other_cert, _) = certs
  sctx = auth.server_ssl_context(certfile, keyfile)
  cctx = auth.client_ssl_context(other_cert)  # trusts a different certificate
  s, c = tcp_pair(lambda s: auth.secure_server(s, ssl_ctx=sctx, timeout=5),
                  lambda c: auth.secure_client(c, ssl_ctx=cctx, server_hostname="127.0.0.1",
                                               timeout=5))
  assert_auth_error(c, "TLS failed")
  assert "certificate verify failed" in str(c)
  assert isinstance(s, auth.AuthError)


def test_tls_insecure_client_and_plaintext_client(certs):
  (certfile, keyfile), _ = certs
  sctx = auth.server_ssl_context(certfile, keyfile)
  s, c = tcp_pair(lambda s: auth.secure_server(s, key=KEY, ssl_ctx=sctx, timeout=5).version(),
                  lambda c: auth.secure_client(c, key=KEY, timeout=5,
                                               ssl_ctx=auth.client_ssl_context(insecure=True)))
  assert s.startswith("TLSv1.") and not isinstance(c, Exception)

  # A plaintext client (auth only) against a TLS listener: the server refuses it.
  s, c = tcp_pair(lambda s: auth.secure_server(s, key=KEY, ssl_ctx=sctx, timeout=2),
                  lambda c: auth.secure_client(c, key=KEY, timeout=2))
  assert_auth_error(s, "TLS failed")
  assert isinstance(c, auth.AuthError)


def test_tls_context_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    auth.server_ssl_context(str(tmp_path / "nope.crt"))
  bad = tmp_path / "bad.crt"
  bad.write_text("not a pem")
  with pytest.raises(ValueError, match="cannot load TLS certificate"):
    auth.server_ssl_context(str(bad))
  with pytest.raises(ValueError, match="does not exist"):
    auth.client_ssl_context(str(tmp_path / "nope.pem"))


def test_tls_handshake_has_an_overall_deadline(certs):
  """A client that trickles its ClientHello a byte at a time is cut off at the deadline."""
  (certfile, keyfile), _ = certs
  sctx = auth.server_ssl_context(certfile, keyfile)

  def trickler(c):
    for b in b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100:
      try:
        c.sendall(bytes([b]))
      except OSError:
        return
      time.sleep(0.1)

  # TIMEOUT although no byte is more than 100 ms late: the trickle would take 11 s.
  s, _ = tcp_pair(lambda s: auth.secure_server(s, ssl_ctx=sctx, timeout=0.5), trickler)
  assert_auth_error(s, auth.TIMEOUT)
