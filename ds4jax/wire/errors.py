"""Bridge errors. Every failure a caller can act on has its own type.

Transport failures (`LinkLost`, `DeadlineExceeded`) mean the peer is gone or silent and the
coordinator drops it; a `RemoteError` means the peer answered with an error and is still there.
"""

from __future__ import annotations


class BridgeError(RuntimeError):
  """Base class of every bridge error."""


class ProtocolError(BridgeError):
  """A peer sent a malformed, oversized or unexpected frame; the connection is closed."""


class HandshakeRefused(BridgeError):
  """The coordinator refused a worker's HELLO; `reason` is the exact text both sides log."""

  def __init__(self, reason: str):
    super().__init__(f"refused by coordinator: {reason}")
    self.reason = reason


class LinkLost(BridgeError):
  """The connection to a peer closed or failed while a request was outstanding."""


class DeadlineExceeded(LinkLost):
  """A peer did not answer a request (or a heartbeat) within its deadline."""


class RouteUnavailable(BridgeError):
  """No complete route to the output head formed within the route timeout."""


class RemoteError(BridgeError):
  """A peer answered a request with an error.

  Attributes:
    etype: the remote exception type name (for example 'PrefixMismatch').
    remote_message: the remote one-line message.
    remote_traceback: the remote traceback text ('' when the peer sent none).
  """

  def __init__(self, etype: str, message: str, remote_traceback: str = "", where: str = ""):
    super().__init__(f"{where + ': ' if where else ''}{etype}: {message}")
    self.etype = etype
    self.remote_message = message
    self.remote_traceback = remote_traceback
    self.where = where

  def __str__(self) -> str:
    s = super().__str__()
    if self.remote_traceback:
      s += "\n--- remote traceback ---\n" + self.remote_traceback.rstrip()
    return s


class PrefixMismatch(BridgeError):
  """A WORK frame's prefix hash does not match the worker's KV for that session."""
