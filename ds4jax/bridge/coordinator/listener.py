"""The coordinator's listening socket: accept, secure, read HELLO, admit or refuse.

`Listener` runs one accept thread. Each connection's handshake (TLS, mutual key auth, HELLO)
runs on its own short-lived thread, at most `max_handshakes` at once (more are closed at
once), so a slow or hostile peer cannot block admission nor exhaust threads. A HELLO is
checked by `check_hello`, whose reason both sides show on a refusal; an accepted worker's
channel goes to `on_admit`, which makes the link.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ds4jax.wire import protocol, transport
from ds4jax.wire.errors import ProtocolError
from ds4jax.wire.protocol import MsgType, field
from ds4jax.config import LayerRange

log = logging.getLogger("ds4jax.bridge.coordinator")


class Listener:
  """Accepts workers on a listening socket (see the module docstring).

  Args:
    lsock: the bound, listening socket.
    opt: the coordinator's options (tls, key, wrap, handshake_timeout, frame_timeout,
      max_handshakes).
    check: HELLO frame -> ('', LayerRange) to admit, or (reason, None).
    on_admit(channel, hello_header, layers, peer): makes the link (or closes the channel
      when the coordinator is closing).
    event: a sink for what a user should see (refusals).
  """

  def __init__(self, lsock, opt, *, check: Callable, on_admit: Callable,
               event: Callable[[str], None]):
    self._lsock = lsock
    self.opt = opt
    self._check = check
    self._on_admit = on_admit
    self._event = event
    self._stop = threading.Event()
    self._handshake_slots = threading.BoundedSemaphore(max(1, opt.max_handshakes))
    self.thread = threading.Thread(target=self._accept_loop, daemon=True, name="ds4jax-accept")

  def start(self) -> None:
    self.thread.start()

  def close(self) -> None:
    self._stop.set()
    try:
      self._lsock.close()
    except OSError:
      pass
    self.thread.join(timeout=5)

  def _accept_loop(self) -> None:
    try:
      self._lsock.settimeout(0.5)
    except OSError:  # close() ran before this thread started
      return
    while not self._stop.is_set():
      try:
        sock, addr = transport.accept(self._lsock, self.opt.wrap)
      except (TimeoutError, OSError):
        continue
      if not self._handshake_slots.acquire(blocking=False):
        log.warning("rejected connection from %s:%d: %d handshakes already in progress",
                    addr[0], addr[1], self.opt.max_handshakes)
        sock.close()
        continue
      try:
        threading.Thread(target=self._handshake_in_slot, args=(sock, addr), daemon=True,
                         name="ds4jax-handshake").start()
      except RuntimeError as e:  # cannot start a thread: refuse this peer, keep accepting
        self._handshake_slots.release()
        log.warning("rejected connection from %s:%d: %s", addr[0], addr[1], e)
        sock.close()

  def _handshake_in_slot(self, sock, addr) -> None:
    try:
      self._handshake(sock, addr)
    finally:
      self._handshake_slots.release()

  def _handshake(self, sock, addr) -> None:
    peer = f"{addr[0]}:{addr[1]}"
    opt = self.opt
    try:
      if opt.tls is not None and transport.is_plain_ds4jax(
          transport.peek(sock, 4, opt.handshake_timeout)):
        # Answer as a TLS server would, so the worker stops (final) instead of redialing.
        self._event(f"refused worker {peer}: it does not use TLS and this coordinator does")
        transport.refuse_and_close(sock, transport.TLS_ALERT)
        return
      sock = transport.secure_server(sock, key=opt.key, tls=opt.tls,
                                     timeout=opt.handshake_timeout)
      # HELLO carries no payload: until admission a peer cannot make us buffer any.
      ch = transport.Channel(sock, peer, frame_timeout=opt.frame_timeout, max_payload=0)
      f = ch.recv(idle_timeout=opt.handshake_timeout, any_version=True)
      if f.type != MsgType.HELLO:
        raise ProtocolError(f"expected HELLO, got {f.type.name}")
      reason, layers = self._check(f)
      if reason:
        self._event(f"refused worker {peer}: {reason}")
        # In the peer's own frame version (REFUSE is the same JSON in every version), so a
        # worker of another protocol version can read why and stop instead of redialing.
        ch.send(MsgType.REFUSE, {"reason": reason}, version=f.version)
        ch.close()
        return
      ch.max_payload = protocol.MAX_PAYLOAD
      self._on_admit(ch, f.header, layers, peer)
    except Exception as e:  # anything a peer does before admission only costs its link
      if isinstance(e, ProtocolError) and str(e).startswith(protocol.TLS_PEER):
        # A TLS worker: any plain answer makes its TLS stack fail with "wrong version
        # number", which it treats as final (worker.final_reason).
        self._event(f"refused worker {peer}: it uses TLS and this coordinator does not")
        transport.refuse_and_close(sock, protocol.encode_header(
            MsgType.REFUSE, {"reason": "this coordinator does not use TLS"}, 0))
        return
      log.warning("rejected connection from %s: %s: %s", peer, type(e).__name__, e)
      try:
        sock.close()
      except OSError:
        pass


def check_hello(f: protocol.Frame, *, fingerprint: str, n_layers: int, local: LayerRange,
                ctx: int) -> tuple[str, LayerRange | None]:
  """('', range) to accept, or (reason, None). Field types are checked (ProtocolError)."""
  h = f.header
  version = h.get("protocol", f.version)
  if version != protocol.PROTOCOL_VERSION or f.version != protocol.PROTOCOL_VERSION:
    return (f"protocol version {version} is not supported (this coordinator speaks "
            f"{protocol.PROTOCOL_VERSION})"), None
  fp = field(h, "fingerprint", str)
  if fp != fingerprint:
    return (f"model mismatch: worker fingerprint {fp[:16]} != coordinator "
            f"{str(fingerprint)[:16]} (a different GGUF)"), None
  n = field(h, "n_layers", int)
  if n != n_layers:
    return f"model mismatch: worker has {n} layers, coordinator {n_layers}", None
  start, end = field(h, "start", int, lo=0), field(h, "end", int)
  has_output = field(h, "has_output", bool)
  last = n_layers - 1
  desc = f"{start}:{'output' if has_output else end}"
  if start > last:
    return f"layer range {desc} starts past the final model layer {last}", None
  if end > last:
    return f"layer range {desc} ends past the final model layer {last}", None
  if end < start:
    return f"layer range {desc} ends before it starts", None
  if has_output and end != last:
    return f"layer range {desc} owns the output head but not the last layer {last}", None
  if start <= local.end:
    return f"layer range {desc} overlaps the coordinator's layers {local}", None
  wctx = field(h, "ctx", int, lo=0)
  if wctx < ctx:
    return f"worker context too small: worker={wctx} coordinator={ctx}", None
  field(h, "max_sessions", int, default=0, lo=0)  # the worker's session slots (residency)
  dtypes = field(h, "dtypes", list)
  if "f32" not in dtypes:
    return "worker does not support f32 activations", None
  return "", LayerRange(start, end, has_output)
