"""HTTP client plumbing shared by the proxy and the health checks."""

from __future__ import annotations

import socket
from functools import partial
from typing import Optional

from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from zope.interface import implementer

log = Logger()


def no_delay(transport) -> None:
    """Send small writes (SSE events, headers) at once: no Nagle delay."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


def raw_socket(transport) -> Optional[socket.socket]:
    """The TCP socket under ``transport`` (through a TLS wrapper), else None."""
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    return handle if isinstance(handle, socket.socket) else None


# the first probe after the idle time and then one every interval: Linux and
# the BSDs name them TCP_KEEPIDLE/TCP_KEEPINTVL, macOS calls the first TCP_KEEPALIVE
_KEEPALIVE_IDLE = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
_KEEPALIVE_INTERVAL = getattr(socket, "TCP_KEEPINTVL", None)


def tcp_keepalive(transport, period: float) -> bool:
    """TCP keepalive on the socket under ``transport``, like Go's
    ``net.Dialer.KeepAlive``: SO_KEEPALIVE with the idle time and the probe
    interval both ``period`` seconds (where the platform has those options);
    ``period`` 0 turns it off.  False when there is no TCP socket."""
    sock = raw_socket(transport)
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if period > 0 else 0)
        if period > 0:
            seconds = max(1, int(round(period)))
            for option in (_KEEPALIVE_IDLE, _KEEPALIVE_INTERVAL):
                if option is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, option, seconds)
    except OSError:
        return False
    return True


@implementer(IHandshakeListener)
class _Protocol(HTTP11ClientProtocol):
    """One upstream connection, with the transport settings of its pool.

    * ``keepalive``: TCP keepalive period (see ``tcp_keepalive``), 0 = off;
    * ``tls_handshake``: an https connection whose TLS handshake is not done
      within this many seconds is aborted (0 = no bound);
    * a request body may ask to see the upstream's first bytes (``bind_protocol``,
      used for ``Expect: 100-continue``).
    """

    reactor = None
    keepalive: float = 0
    tls_handshake: float = 0
    _tls_timer = None
    on_first_data = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        tcp_keepalive(self.transport, self.keepalive)
        if self.tls_handshake > 0 and self.reactor is not None and isinstance(self.transport, TLSMemoryBIOProtocol):
            self._tls_timer = self.reactor.callLater(self.tls_handshake, self._tls_too_slow)
        super().connectionMade()

    def handshakeCompleted(self) -> None:
        if self._tls_timer is not None and self._tls_timer.active():
            self._tls_timer.cancel()
        self._tls_timer = None

    def _tls_too_slow(self) -> None:
        self._tls_timer = None
        log.warn("upstream TLS handshake not done within {seconds}s (timeouts.tlsHandshake); aborting",
                 seconds=self.tls_handshake)
        self.transport.abortConnection()

    def request(self, request):
        bind = getattr(request.bodyProducer, "bind_protocol", None)
        if bind is not None:
            bind(self)
        return super().request(request)

    def dataReceived(self, data: bytes) -> None:
        waiter = self.on_first_data
        if waiter is not None:
            self.on_first_data = None
            waiter()
        super().dataReceived(data)

    def connectionLost(self, reason=None) -> None:
        self.handshakeCompleted()  # stop the handshake timer
        self.on_first_data = None
        super().connectionLost(reason)


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" log line per upstream connection

    def __init__(self, quiescentCallback, metadata, reactor=None, keepalive: float = 0, tls_handshake: float = 0):
        super().__init__(quiescentCallback, metadata)
        self.reactor = reactor
        self.keepalive = keepalive
        self.tls_handshake = tls_handshake

    def buildProtocol(self, addr) -> HTTP11ClientProtocol:
        protocol = _Protocol(self._quiescentCallback)
        protocol.reactor = self.reactor
        protocol.keepalive = self.keepalive
        protocol.tls_handshake = self.tls_handshake
        return protocol


def quiet_pool(reactor, persistent: bool, keepalive: float = 0, tls_handshake: float = 0) -> HTTPConnectionPool:
    """An HTTPConnectionPool that does not log every connection it opens; its
    connections get TCP keepalive and a TLS handshake bound (0 = none)."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = partial(_QuietFactory, reactor=reactor, keepalive=keepalive, tls_handshake=tls_handshake)
    return pool
