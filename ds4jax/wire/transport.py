"""All bridge sockets are made here: `listen`, `accept`, `connect`, then `secure_*`.

`wrap` is a hook `wrap(sock) -> sock-like` applied to every raw socket right after it is
made (tests inject faults with `faults.py`; anything with sendall/recv_into/settimeout/
fileno/close works: receivers select() on fileno for idle waits). `secure_server` / `secure_client` then layer optional TLS (stdlib ssl) and the
optional pre-shared-key HMAC handshake of `auth.py`, before any protocol frame.

`Channel` is one framed, thread-safe-for-send connection.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any, Callable

from ds4jax.wire import protocol
from ds4jax.wire.errors import LinkLost

Wrap = Callable[[Any], Any]


def _tune(sock: socket.socket) -> None:
  sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def listen(host: str = "127.0.0.1", port: int = 0, backlog: int = 64) -> socket.socket:
  """A listening TCP socket; port 0 picks an ephemeral port (read it with getsockname)."""
  infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  family, _, _, _, addr = infos[0]
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(addr)
  sock.listen(backlog)
  return sock


def accept(lsock: socket.socket, wrap: Wrap | None = None):
  sock, addr = lsock.accept()
  _tune(sock)
  return (wrap(sock) if wrap else sock), addr


def connect(host: str, port: int, timeout: float, wrap: Wrap | None = None):
  sock = socket.create_connection((host, port), timeout=timeout)
  _tune(sock)
  return wrap(sock) if wrap else sock


def secure_server(sock, *, key: bytes | None = None, tls=None, timeout: float = 10.0):
  """Server side of optional TLS (`tls`: ssl.SSLContext) then the optional HMAC handshake."""
  if tls is None and not key:
    return sock
  from ds4jax.wire import auth  # deferred: only secured links need it
  return auth.secure_server(sock, key=key, ssl_ctx=tls, timeout=timeout)


def secure_client(sock, *, key: bytes | None = None, tls=None, server_hostname=None,
                  timeout: float = 10.0):
  if tls is None and not key:
    return sock
  from ds4jax.wire import auth
  return auth.secure_client(sock, key=key, ssl_ctx=tls, server_hostname=server_hostname,
                            timeout=timeout)


# What a TLS server sends a peer that is not speaking TLS: one plaintext fatal
# handshake_failure alert record. A ds4jax peer without TLS reads it where its first frame
# (or auth message) should start and stops with protocol.TLS_PEER instead of redialing.
TLS_ALERT = bytes((0x15, 3, 3, 0, 2, 2, 40))


def peek(sock, n: int, timeout: float) -> bytes:
  """Up to n of the first bytes the peer sent, left unread; b"" if none came within timeout
  (or sock is a test wrapper that cannot peek)."""
  if not isinstance(sock, socket.socket):
    return b""
  try:
    if not select.select([sock], [], [], timeout)[0]:
      return b""
    return sock.recv(n, socket.MSG_PEEK)
  except OSError:
    return b""


def is_plain_ds4jax(head: bytes) -> bool:
  """The peer's first bytes are a ds4jax frame or auth message in plain text."""
  return head[:3] == b"DS4"


def refuse_and_close(sock, data: bytes, linger: float = 1.0) -> None:
  """Sends data, then reads until the peer closes (at most `linger` s) before closing: a
  close with unread input sends a reset, which may discard data the peer has not read."""
  try:
    sock.settimeout(linger)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + linger
    while time.monotonic() < deadline and sock.recv(4096):
      pass
  except OSError:
    pass
  finally:
    try:
      sock.close()
    except OSError:
      pass


class Channel:
  """A framed connection. Any thread may send; exactly one thread receives.

  Send failures are reported as LinkLost; `bytes_out`/`bytes_in` count every frame.
  """

  def __init__(self, sock, peer: str = "?", *, frame_timeout: float = 30.0,
               max_payload: int = protocol.MAX_PAYLOAD):
    # One fixed socket timeout bounds every send and recv call (a peer that stops reading
    # cannot block a sender forever); idle waits use select and never change it.
    sock.settimeout(frame_timeout)
    self.sock = sock
    self.peer = peer
    self.frame_timeout = frame_timeout
    self.max_payload = max_payload
    self._send_lock = threading.Lock()
    self.bytes_out = 0
    self.bytes_in = 0
    self.last_recv = time.monotonic()
    self.in_frame = False  # a frame is arriving: the peer is alive (frame_timeout bounds it)
    self.closed = False

  def send(self, mtype: int, header: dict[str, Any], payload=b"", *,
           version: int = protocol.PROTOCOL_VERSION) -> int:
    with self._send_lock:
      if self.closed:
        raise LinkLost(f"link to {self.peer} is closed")
      try:
        n = protocol.send_frame(self.sock, mtype, header, payload, version=version)
      except OSError as e:
        raise LinkLost(f"send to {self.peer} failed: {e}") from None
      self.bytes_out += n
      return n

  def try_send(self, mtype: int, header: dict[str, Any]) -> bool:
    """Sends a small control frame unless another send is in progress (heartbeats: a busy
    link is a live link, and the monitor must never block behind a large send)."""
    if not self._send_lock.acquire(blocking=False):
      return False
    try:
      if self.closed:
        raise LinkLost(f"link to {self.peer} is closed")
      try:
        self.bytes_out += protocol.send_frame(self.sock, mtype, header)
      except OSError as e:
        raise LinkLost(f"send to {self.peer} failed: {e}") from None
      return True
    finally:
      self._send_lock.release()

  def recv(self, idle_timeout: float | None, *, any_version: bool = False) -> protocol.Frame:
    def started():
      self.in_frame = True
      self.last_recv = time.monotonic()
    try:
      f = protocol.recv_frame(self.sock, idle_timeout=idle_timeout,
                              frame_timeout=self.frame_timeout, max_payload=self.max_payload,
                              on_start=started, any_version=any_version)
    finally:
      self.in_frame = False
    self.bytes_in += f.nbytes
    self.last_recv = time.monotonic()
    return f

  def silent_for(self, now: float) -> float:
    """Seconds since the last frame began or ended (0 while one is arriving)."""
    return 0.0 if self.in_frame else now - self.last_recv

  def close(self) -> None:
    self.closed = True
    try:
      self.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass
    try:
      self.sock.close()
    except OSError:
      pass
