"""Bearer tokens, compared in constant time. With no token configured the API must be on loopback."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import Unauthenticated
from .settings import Settings
from .store import owner_of


def caller(request: Request) -> str:
    """The caller's owner id (a hash of its token, '' without tokens), or 401."""
    settings: Settings = request.app.state.settings
    if not settings.tokens:
        return owner_of(None)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("missing token: send 'Authorization: Bearer <token>'")
    matched = False
    for known in settings.tokens:
        matched |= hmac.compare_digest(token.encode(), known.encode())
    if not matched:
        raise Unauthenticated("wrong token")
    return owner_of(token)

