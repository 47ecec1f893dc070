"""HTTP client plumbing shared by the proxy and the health checks."""

from __future__ import annotations

from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


def no_delay(transport) -> None:
    """Send small writes (SSE events, headers) at once: no Nagle delay."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


class _Protocol(HTTP11ClientProtocol):
    def connectionMade(self) -> None:
        no_delay(self.transport)
        super().connectionMade()


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" log line per upstream connection

    def buildProtocol(self, addr) -> HTTP11ClientProtocol:
        return _Protocol(self._quiescentCallback)


def quiet_pool(reactor, persistent: bool) -> HTTPConnectionPool:
    """An HTTPConnectionPool that does not log every connection it opens."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietFactory
    return pool
