"""API keys: Basic password, Bearer token or ``x-api-key``, compared in constant time."""

from __future__ import annotations

import base64
import hmac
from typing import Optional, Sequence


def extract_api_key(authorization: Optional[str], x_api_key: Optional[str]) -> str:
    """The key a client sent: Basic password > Bearer token > x-api-key."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                decoded = ""
            if ":" in decoded:
                return decoded.split(":", 1)[1]
        elif scheme == "bearer":
            return value.strip()
    return (x_api_key or "").strip()


def key_allowed(key: str, allowed: Sequence[str]) -> bool:
    """True if ``key`` equals one of ``allowed``; every candidate is compared."""
    if not key:
        return False
    ok = False
    given = key.encode()
    for candidate in allowed:
        ok |= hmac.compare_digest(given, candidate.encode())
    return ok
