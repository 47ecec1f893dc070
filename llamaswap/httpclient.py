"""HTTP client plumbing shared by the proxy and the health checks."""

from __future__ import annotations

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" log line per upstream connection


def quiet_pool(reactor, persistent: bool) -> HTTPConnectionPool:
    """An HTTPConnectionPool that does not log every connection it opens."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietFactory
    return pool
