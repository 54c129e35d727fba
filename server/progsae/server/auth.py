"""Optional bearer-token auth, off by default (localhost).

Clients send the gRPC metadata (or HTTP header) ``authorization: Bearer <token>``; a missing or
wrong token answers UNAUTHENTICATED (HTTP 401). The gRPC health service stays open so load
balancers and Kubernetes probes need no token. The servicer checks every call (`check`, on the
call's metadata or headers, whichever transport carried it), the HTTP API's routes included.
"""

from __future__ import annotations

import hmac
import os

from .errors import unauthenticated

HEADER = "authorization"


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


def check(header_value: str | None, token: str) -> None:
    """Raise UNAUTHENTICATED unless the call's ``authorization`` value carries the token (no-op when auth
    is off)."""
    if not authorized(header_value, token):
        raise unauthenticated()
