"""Optional bearer-token auth, as LocalAI's own Python backends do it.

With `LOCALAI_GRPC_AUTH_TOKEN` set, LocalAI sends `authorization: Bearer <token>` on every
call; any call without it, or with another token, fails with UNAUTHENTICATED (Health too: a
process that cannot prove it is LocalAI learns nothing about this one).
"""

from __future__ import annotations

import hmac
import os

import grpc

TOKEN_ENV = "LOCALAI_GRPC_AUTH_TOKEN"


def token_from_env() -> str | None:
  return os.environ.get(TOKEN_ENV) or None


def _deny_unary(handler):
  async def deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing bearer token")
  return grpc.unary_unary_rpc_method_handler(
      deny, request_deserializer=handler.request_deserializer,
      response_serializer=handler.response_serializer)


def _deny_stream(handler):
  async def deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing bearer token")
    yield  # never reached: makes this an async generator, as a streaming handler must be
  return grpc.unary_stream_rpc_method_handler(
      deny, request_deserializer=handler.request_deserializer,
      response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
  """Rejects calls whose `authorization` metadata is not `Bearer <token>`."""

  def __init__(self, token: str):
    self._want = f"Bearer {token}".encode()

  async def intercept_service(self, continuation, details):
    got = ""
    for key, value in details.invocation_metadata or ():
      if key == "authorization":
        got = value if isinstance(value, str) else value.decode("latin-1")
    handler = await continuation(details)
    if handler is None or hmac.compare_digest(got.encode(), self._want):
      return handler
    return _deny_stream(handler) if handler.unary_stream else _deny_unary(handler)
