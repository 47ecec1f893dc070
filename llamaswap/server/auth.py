"""API keys: Basic password, Bearer token or ``x-api-key``, compared in constant time.

The front decides with :mod:`llamaswap.principal`; these remain for callers of this module."""

from __future__ import annotations

import hmac
from typing import Sequence

from ..principal import extract_api_key

__all__ = ["extract_api_key", "key_allowed"]


def key_allowed(key: str, allowed: Sequence[str]) -> bool:
    """True if ``key`` equals one of ``allowed``; every candidate is compared."""
    if not key:
        return False
    ok = False
    given = key.encode()
    for candidate in allowed:
        ok |= hmac.compare_digest(given, candidate.encode())
    return ok
