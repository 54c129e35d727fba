"""Optional bearer-token auth, off by default (localhost).

Clients send the gRPC metadata (or HTTP header) ``authorization: Bearer <token>``; a missing or
wrong token answers UNAUTHENTICATED (HTTP 401). The gRPC health service stays open so load
balancers and Kubernetes probes need no token. The plain grpcio server checks in a server
interceptor (`AuthInterceptor`); the Ray Serve app, whose gRPC proxy takes no interceptors,
checks in every deployment method (`check`, on the metadata Ray forwards in grpc_context) and in
an HTTP middleware for the JSON API.
"""

from __future__ import annotations

import hmac
import os

import grpc

from .errors import unauthenticated

HEADER = "authorization"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
"""gRPC methods that never need a token (health checks)."""


def resolve_token(token: str = "", token_env: str = "") -> str:
    """The configured token: `token` itself, else the value of the environment variable `token_env`."""
    if token:
        return token
    if token_env:
        value = os.environ.get(token_env, "")
        if not value:
            raise ValueError(f"auth_token_env={token_env!r} is set but that environment variable is empty")
        return value
    return ""


def authorized(header_value: str | None, token: str) -> bool:
    """Whether an ``authorization`` value carries `token` (always True when auth is off)."""
    if not token:
        return True
    if not header_value:
        return False
    scheme, _, given = header_value.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def header_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key.lower() == HEADER:
            return value
    return None


def check(grpc_context, token: str) -> None:
    """Raise UNAUTHENTICATED unless the call's metadata carries the token (no-op when auth is off)."""
    if not token:
        return
    md = grpc_context.invocation_metadata() if grpc_context is not None else ()
    if not authorized(header_of(md), token):
        raise unauthenticated()


class AuthInterceptor(grpc.ServerInterceptor):
    """grpcio server interceptor: every method but health needs the bearer token."""

    def __init__(self, token: str):
        self.token = token
        err = unauthenticated()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, err.message)

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)
        self._deny_bidi = grpc.stream_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_PREFIXES) or authorized(header_of(handler_call_details.invocation_metadata),
                                                          self.token):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is not None and handler.request_streaming:
            return self._deny_bidi
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary
