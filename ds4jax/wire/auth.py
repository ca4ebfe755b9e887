"""Link security for the bridge: pre-shared key, mutual HMAC handshake, TLS, bind checks.

The handshake runs on the raw (or TLS-wrapped) socket before any protocol frame. Every
message is a fixed 8-byte prefix ``!4sBBH`` (magic ``DS4A``, version, type, reason) and a
body whose size is fixed by the type, so nothing a peer sends picks an allocation size.
Modelled on cpython ``multiprocessing.connection.deliver_challenge``/``answer_challenge``,
but with one mutual exchange in which both sides contribute a nonce::

       Server (coordinator, accepts)           Client (worker, dials)
      ---------------------------------  -------------------------------------
  0.                                     connect (and TLS handshake if enabled)
  1.                                     Nc = 32 random bytes
                                         send HELLO(Nc)
  2.  read 8 bytes. Not "DS4A"? the peer
      sent no auth <- AuthError, FAIL
  3.  Ns = 32 random bytes
      send CHALLENGE(Ns)
  4.                                     read CHALLENGE (FAIL? <- AuthError)
                                         send PROOF(Ns, HMAC(K, "client"|Nc|Ns))
  5.  read PROOF. Echoed Ns != Ns?
      replayed/stale <- AuthError, FAIL
      HMAC wrong? wrong key <- AuthError,
      FAIL
  6.  send WELCOME(Nc, HMAC(K, "server"|Nc|Ns))
  7.                                     read WELCOME (FAIL? <- AuthError).
                                         Echoed Nc != Nc? replayed/stale;
                                         HMAC wrong? wrong key: send FAIL
                                         <- AuthError.  Else send OK <- RETURN
  8.  read OK (FAIL? <- AuthError)
      <- RETURN

Why it resists replay: the client's MAC covers the server's fresh Ns, and the server's MAC
covers the client's fresh Nc, so a captured PROOF or WELCOME never verifies on a later
connection. The role label stops reflecting one side's MAC back as the other's, and the
server only reveals a MAC after the client has proved the key. Comparisons use
``hmac.compare_digest``. The version byte is covered by the MAC input, so it cannot be
downgraded. The handshake authenticates the peer at connect time; it does not protect the
frames that follow against an active man-in-the-middle: use TLS for that.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import stat
import struct
import time

log = logging.getLogger("ds4jax.wire.auth")

KEY_ENV = "DS4JAX_KEY"
DEFAULT_BIND_HOST = "127.0.0.1"
MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 4096

MAGIC = b"DS4A"
VERSION = 1
NONCE_BYTES = 32
MAC_BYTES = 32
_PREFIX = struct.Struct("!4sBBH")  # magic, version, type, reason
_AFTER_MAGIC = struct.Struct("!BBH")

# Message types and the fixed size of each body.
HELLO, CHALLENGE, PROOF, WELCOME, OK, FAIL = 1, 2, 3, 4, 5, 6
_BODY_BYTES = {HELLO: NONCE_BYTES, CHALLENGE: NONCE_BYTES, PROOF: NONCE_BYTES + MAC_BYTES,
               WELCOME: NONCE_BYTES + MAC_BYTES, OK: 0, FAIL: 0}
_TYPE_NAMES = {HELLO: "HELLO", CHALLENGE: "CHALLENGE", PROOF: "PROOF", WELCOME: "WELCOME",
               OK: "OK", FAIL: "FAIL"}

# Failure reasons; the code travels in FAIL so the other side can log the same reason.
WRONG_KEY = "wrong key"
NO_AUTH = "peer sent no auth"
REPLAY = "replayed/stale response"
TIMEOUT = "timeout"
CLOSED = "connection closed during auth"
BAD_MESSAGE = "malformed auth message"
VERSION_MISMATCH = "unsupported auth version"
_REASON_CODES = {WRONG_KEY: 1, NO_AUTH: 2, REPLAY: 3, BAD_MESSAGE: 4, VERSION_MISMATCH: 5}
_CODE_REASONS = {v: k for k, v in _REASON_CODES.items()}


class AuthError(ConnectionError):
  """The handshake failed. ``reason`` is one of the module's reason strings."""

  def __init__(self, reason: str, detail: str = ""):
    self.reason = reason
    super().__init__(f"auth failed: {reason}" + (f" ({detail})" if detail else ""))


class KeyLoadError(ValueError):
  """The pre-shared key could not be loaded (missing, empty, unreadable, too short)."""


# ------------------------------------------------------------------------------------------
# Keys and bind addresses.


def load_key(key_file: str | None = None, env: str = KEY_ENV) -> bytes | None:
  """Returns the pre-shared key from ``key_file``, else from ``$env``, else None (no auth).

  Surrounding whitespace (the newline ``echo`` adds) is stripped. The key is never a flag
  value, where ``ps`` would show it. Raises ``KeyLoadError`` with a one-line reason.
  """
  if key_file:
    try:
      st = os.stat(key_file)
    except FileNotFoundError:
      raise KeyLoadError(f"key file {key_file!r} does not exist") from None
    except OSError as e:
      raise KeyLoadError(f"cannot read key file {key_file!r}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
      raise KeyLoadError(f"key file {key_file!r} is not a regular file")
    if st.st_size > MAX_KEY_FILE_BYTES:
      raise KeyLoadError(f"key file {key_file!r} is {st.st_size} bytes; a key file holds at most "
                      f"{MAX_KEY_FILE_BYTES}")
    try:
      with open(key_file, "rb") as f:
        key = f.read(MAX_KEY_FILE_BYTES + 1).strip()
    except OSError as e:
      raise KeyLoadError(f"cannot read key file {key_file!r}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
      log.warning("key file %s is readable by group/others (mode %o); chmod 600 it",
                  key_file, stat.S_IMODE(st.st_mode))
    source = f"key file {key_file!r}"
  elif env and env in os.environ:
    key = os.environ[env].strip().encode("utf-8")
    source = f"${env}"
  else:
    return None
  if not key:
    raise KeyLoadError(f"{source} is empty")
  if len(key) < MIN_KEY_BYTES:
    raise KeyLoadError(f"{source} holds a {len(key)}-byte key; use at least {MIN_KEY_BYTES} bytes "
                    "(e.g. `head -c 32 /dev/urandom | base64 > key`)")
  return key


def is_loopback(host: str) -> bool:
  """True if ``host`` (an address or a name) only reaches this machine."""
  if host in ("", "0.0.0.0", "::"):
    return False  # every interface
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    pass
  try:
    infos = socket.getaddrinfo(host, None)
  except OSError:
    return False
  return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback
                             for i in infos)


def bind_warning(host: str, key: bytes | None) -> str | None:
  """The warning to print when listening on ``host`` exposes an unauthenticated port."""
  if key or is_loopback(host):
    return None
  where = "every interface" if host in ("", "0.0.0.0", "::") else f"non-loopback address {host}"
  return (f"WARNING: listening on {where} without a key: anyone who can reach this port can join "
          f"as a worker and read activations. Set --key_file or ${KEY_ENV}, or bind "
          f"{DEFAULT_BIND_HOST}.")


def warn_if_exposed(host: str, key: bytes | None) -> str | None:
  """Logs (and returns) ``bind_warning(host, key)`` if there is one. Call before listen()."""
  msg = bind_warning(host, key)
  if msg:
    log.warning("%s", msg)
  return msg


# ------------------------------------------------------------------------------------------
# The handshake.


def _mac(key: bytes, role: bytes, nonce_c: bytes, nonce_s: bytes) -> bytes:
  msg = b"ds4jax-auth\x00" + bytes([VERSION]) + role + b"\x00" + nonce_c + nonce_s
  return hmac.new(key, msg, hashlib.sha256).digest()


def _peer(sock) -> str:
  try:
    return "%s:%s" % sock.getpeername()[:2]
  except (OSError, TypeError, ValueError):
    return "?"


class _Link:
  """Fixed-size reads and writes on ``sock`` under one deadline for the whole handshake."""

  def __init__(self, sock, timeout: float):
    self.sock = sock
    self.deadline = time.monotonic() + timeout

  def _arm(self):
    left = self.deadline - time.monotonic()
    if left <= 0:
      raise AuthError(TIMEOUT, "handshake deadline passed")
    self.sock.settimeout(left)

  def send(self, mtype: int, body: bytes = b"", reason: int = 0):
    assert len(body) == _BODY_BYTES[mtype]
    self._arm()
    try:
      self.sock.sendall(_PREFIX.pack(MAGIC, VERSION, mtype, reason) + body)
    except (socket.timeout, TimeoutError):
      raise AuthError(TIMEOUT, "send timed out") from None
    except OSError as e:
      raise AuthError(CLOSED, f"send failed: {e}") from None

  def fail(self, reason: str):
    """Best effort: tell the peer why, so it can log the same reason."""
    try:
      self.send(FAIL, reason=_REASON_CODES.get(reason, 0))
    except AuthError:
      pass

  def drain(self, limit: int = 65536, quiet: float = 0.05):
    """Reads and discards what the peer already sent (bounded), so that closing with unread
    data does not send an RST that destroys our FAIL before the peer reads it."""
    end = min(self.deadline, time.monotonic() + 0.5)
    got = 0
    try:
      while got < limit and (left := end - time.monotonic()) > 0:
        self.sock.settimeout(min(quiet, left))
        data = self.sock.recv(min(4096, limit - got))
        if not data:
          return
        got += len(data)
    except OSError:  # includes the timeout that ends a quiet peer
      pass

  def recv_exact(self, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
      self._arm()
      try:
        k = self.sock.recv_into(view[got:], n - got)
      except (socket.timeout, TimeoutError):
        raise AuthError(TIMEOUT, f"peer sent {got} of {n} bytes in time") from None
      except OSError as e:
        raise AuthError(CLOSED, str(e)) from None
      if not k:
        raise AuthError(CLOSED, f"EOF after {got} of {n} bytes")
      got += k
    return bytes(buf)

  def recv(self, *expected: int, first: bool = False) -> bytes:
    """Reads one message of a type in ``expected``; a FAIL raises with the peer's reason."""
    # The magic alone first: a TLS alert (7 bytes, then close) must not end as a short read.
    magic = self.recv_exact(len(MAGIC))
    if magic != MAGIC:
      if first and magic[0] in (0x15, 0x16) and magic[1] == 3:  # a TLS record: alert/handshake
        raise AuthError(NO_AUTH, f"the peer speaks TLS (first bytes {magic!r}) and this side "
                                 "does not: configure TLS on both sides or on neither")
      if first:
        raise AuthError(NO_AUTH, f"first bytes {magic!r} are not an auth message; is the peer "
                                 "configured with a key?")
      raise AuthError(BAD_MESSAGE, f"bad magic {magic!r}")
    version, mtype, reason = _AFTER_MAGIC.unpack(self.recv_exact(_AFTER_MAGIC.size))
    if version != VERSION:
      raise AuthError(VERSION_MISMATCH, f"peer speaks auth v{version}, we speak v{VERSION}")
    if mtype == FAIL:
      why = _CODE_REASONS.get(reason, f"code {reason}")
      raise AuthError(why, "rejected by peer")
    if mtype not in expected:
      raise AuthError(BAD_MESSAGE, f"got {_TYPE_NAMES.get(mtype, mtype)}, expected "
                                   + "/".join(_TYPE_NAMES[t] for t in expected))
    return self.recv_exact(_BODY_BYTES[mtype])

  def recv_proof(self, mtype: int, nonce: bytes, mac: bytes) -> None:
    """Reads the peer's PROOF (client) or WELCOME (server): it must echo the fresh ``nonce``
    we sent (else it answers another connection: REPLAY) and carry ``mac`` (else WRONG_KEY).
    A failure is told to the peer (FAIL) before it raises."""
    body = self.recv(mtype)
    sender, ours = ("client", "challenge") if mtype == PROOF else ("server", "hello")
    if not hmac.compare_digest(body[:NONCE_BYTES], nonce):
      self.fail(REPLAY)
      raise AuthError(REPLAY, f"{_TYPE_NAMES[mtype]} answers another connection's {ours}")
    if not hmac.compare_digest(body[NONCE_BYTES:], mac):
      self.fail(WRONG_KEY)
      raise AuthError(WRONG_KEY, f"{sender}'s HMAC does not verify")


def _run(sock, timeout: float, role: str, steps):
  """Runs ``steps(link)``, restoring the socket timeout and logging any failure."""
  old = sock.gettimeout()
  link = _Link(sock, timeout)
  try:
    steps(link)
  except AuthError as e:
    log.warning("%s auth with %s failed: %s", role, _peer(sock), e)
    raise
  finally:
    try:
      sock.settimeout(old)
    except OSError:
      pass


def server_handshake(sock, key: bytes, timeout: float = 10.0) -> None:
  """Authenticates the dialling peer (and proves our key to it). Raises ``AuthError``."""
  if not key:
    raise ValueError("server_handshake needs a non-empty key")

  def steps(link: _Link):
    try:
      nonce_c = link.recv(HELLO, first=True)
    except AuthError as e:
      if e.reason in (NO_AUTH, VERSION_MISMATCH, BAD_MESSAGE):
        link.fail(e.reason)
        link.drain()  # the rest of what a keyless peer sent (its HELLO frame)
      raise
    nonce_s = secrets.token_bytes(NONCE_BYTES)
    link.send(CHALLENGE, nonce_s)
    link.recv_proof(PROOF, nonce_s, _mac(key, b"client", nonce_c, nonce_s))
    link.send(WELCOME, nonce_c + _mac(key, b"server", nonce_c, nonce_s))
    link.recv(OK)

  _run(sock, timeout, "server", steps)


def client_handshake(sock, key: bytes, timeout: float = 10.0) -> None:
  """Proves our key to the server and checks its proof. Raises ``AuthError``."""
  if not key:
    raise ValueError("client_handshake needs a non-empty key")

  def steps(link: _Link):
    nonce_c = secrets.token_bytes(NONCE_BYTES)
    link.send(HELLO, nonce_c)
    try:
      nonce_s = link.recv(CHALLENGE, first=True)
    except AuthError as e:
      if e.reason == CLOSED:
        raise AuthError(CLOSED, f"{e}; does the server have a key configured?") from None
      if e.reason == NO_AUTH and "speaks TLS" not in str(e):
        raise AuthError(NO_AUTH, "server answered with a non-auth message; it has no key "
                                 "configured") from None
      raise
    link.send(PROOF, nonce_s + _mac(key, b"client", nonce_c, nonce_s))
    link.recv_proof(WELCOME, nonce_c, _mac(key, b"server", nonce_c, nonce_s))
    link.send(OK)

  _run(sock, timeout, "client", steps)


# ------------------------------------------------------------------------------------------
# TLS.


def _check_file(path: str, what: str):
  if not path:
    raise ValueError(f"TLS {what} path is empty")
  if not os.path.isfile(path):
    raise ValueError(f"TLS {what} {path!r} does not exist")


def server_ssl_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
  """A TLS >= 1.2 server context for the coordinator's listener."""
  _check_file(certfile, "certificate")
  if keyfile:
    _check_file(keyfile, "private key")
  ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  ctx.minimum_version = ssl.TLSVersion.TLSv1_2
  try:
    ctx.load_cert_chain(certfile, keyfile)
  except (ssl.SSLError, OSError) as e:
    raise ValueError(f"cannot load TLS certificate {certfile!r} / key {keyfile!r}: {e}") from None
  return ctx


def client_ssl_context(cafile: str | None = None, *, insecure: bool = False) -> ssl.SSLContext:
  """A TLS >= 1.2 client context that verifies the server against ``cafile`` (or the system
  store). ``insecure`` skips verification: the link is encrypted but a man-in-the-middle is
  possible, so pair it with a key."""
  ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
  ctx.minimum_version = ssl.TLSVersion.TLSv1_2
  if insecure:
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    log.warning("TLS certificate verification is off (insecure)")
  elif cafile:
    _check_file(cafile, "CA file")
    try:
      ctx.load_verify_locations(cafile)
    except (ssl.SSLError, OSError) as e:
      raise ValueError(f"cannot load TLS CA file {cafile!r}: {e}") from None
  else:
    ctx.load_default_certs()
  return ctx


def secure_server(sock: socket.socket, *, key: bytes | None = None,
                  ssl_ctx: ssl.SSLContext | None = None, timeout: float = 10.0):
  """Accept side: TLS handshake (if ``ssl_ctx``), then the HMAC handshake (if ``key``).

  Returns the socket to use from now on (the TLS one if wrapped). Raises ``AuthError``
  (``ssl.SSLError`` is turned into one) and leaves closing ``sock`` to the caller.
  """
  if ssl_ctx is not None:
    sock = _tls(sock, timeout, lambda s: ssl_ctx.wrap_socket(s, server_side=True))
  if key:
    server_handshake(sock, key, timeout=timeout)
  return sock


def secure_client(sock: socket.socket, *, key: bytes | None = None,
                  ssl_ctx: ssl.SSLContext | None = None, server_hostname: str | None = None,
                  timeout: float = 10.0):
  """Dial side of ``secure_server``; ``server_hostname`` is checked against the certificate."""
  if ssl_ctx is not None:
    sock = _tls(sock, timeout,
                lambda s: ssl_ctx.wrap_socket(s, server_hostname=server_hostname or None))
  if key:
    client_handshake(sock, key, timeout=timeout)
  return sock


def _tls(sock, timeout: float, wrap):
  # CPython's do_handshake treats the socket timeout as one deadline for the whole
  # handshake, so a peer trickling its ClientHello is cut off in time (auth_test checks it).
  old = sock.gettimeout()
  sock.settimeout(timeout)
  try:
    wrapped = wrap(sock)
  except (socket.timeout, TimeoutError):
    log.warning("TLS handshake with %s timed out", _peer(sock))
    raise AuthError(TIMEOUT, "TLS handshake") from None
  except (ssl.SSLError, ssl.CertificateError, OSError) as e:
    log.warning("TLS handshake with %s failed: %s", _peer(sock), e)
    raise AuthError("TLS failed", str(e)) from None
  wrapped.settimeout(old)
  return wrapped
