"""HTTP client plumbing shared by the proxy and the health checks."""

from __future__ import annotations

import socket
from typing import Optional

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IHandshakeListener, IResolutionReceiver, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTP11ClientProtocol, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
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


class _QuietFactory(Factory):
    """Builds one pool connection's :class:`_Protocol` (as Twisted's own
    ``_HTTP11ClientFactory`` builds its ``HTTP11ClientProtocol``)."""

    noisy = False  # no "Starting factory" log line per upstream connection

    def __init__(self, quiescent, metadata, reactor=None, keepalive: float = 0, tls_handshake: float = 0):
        self.quiescent = quiescent  # hands the connection back to its pool when idle
        self.metadata = metadata
        self.reactor = reactor
        self.keepalive = keepalive
        self.tls_handshake = tls_handshake

    def __repr__(self) -> str:
        return f"_QuietFactory({self.quiescent}, {self.metadata})"

    def buildProtocol(self, addr) -> HTTP11ClientProtocol:
        protocol = _Protocol(self.quiescent)
        protocol.reactor = self.reactor
        protocol.keepalive = self.keepalive
        protocol.tls_handshake = self.tls_handshake
        return protocol


class UpstreamPool(HTTPConnectionPool):
    """An ``HTTPConnectionPool`` whose connections are :class:`_Protocol`:
    quiet (no log line per connection), with TCP keepalive and a TLS
    handshake bound (0 = none).

    Twisted has no public way to choose the protocol of a pool's
    connections.  The one hook is ``HTTPConnectionPool._factory``, called as
    ``_factory(quiescentCallback, metadata)`` for each new connection: a
    documented ivar, which Twisted's own tests replace; overriding it here is
    the single private dependency of this module, and
    ``tests/test_twisted_private.py`` checks that contract.
    """

    def __init__(self, reactor, persistent: bool = True, keepalive: float = 0, tls_handshake: float = 0):
        super().__init__(reactor, persistent=persistent)
        self.reactor = reactor
        self.keepalive = keepalive
        self.tls_handshake = tls_handshake

    def _factory(self, quiescent, metadata) -> _QuietFactory:
        return _QuietFactory(quiescent, metadata, reactor=self.reactor, keepalive=self.keepalive,
                             tls_handshake=self.tls_handshake)


def quiet_pool(reactor, persistent: bool, keepalive: float = 0, tls_handshake: float = 0) -> UpstreamPool:
    """A connection pool that does not log every connection it opens; its
    connections get TCP keepalive and a TLS handshake bound (0 = none)."""
    return UpstreamPool(reactor, persistent=persistent, keepalive=keepalive, tls_handshake=tls_handshake)


# -- endpoints that fail fast --------------------------------------------------------

#: Twisted's default connect timeout, used when none is given.
DEFAULT_CONNECT_TIMEOUT = 30.0
#: Happy eyeballs: how long an attempt may go unanswered before the next
#: address is tried alongside it (Twisted's and Go's figure).
ATTEMPT_DELAY = 0.3


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """The endpoints an ``Agent`` connects to upstream servers through.

    Agent's default, ``HostnameEndpoint``, is slow in the two cases a cold
    start is made of: it passes even an IP literal to the resolver (a thread
    hop per connection), and it notices a failed attempt only on its next
    0.3 s tick, both to try the next address and to report that all failed.
    A health poll of a port that was not open yet was answered "refused"
    0.3 s late, and with ``localhost`` resolving to ::1 first, every
    connection to a server listening on 127.0.0.1 only took 0.3 s.  Here an
    IP literal is connected to directly and a host name goes through
    :class:`InTurnEndpoint`.  https is wrapped in TLS as ``Agent`` does.
    """

    def __init__(self, reactor, connect_timeout: Optional[float] = None, tls_policy=None,
                 attempt_delay: float = ATTEMPT_DELAY) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout if connect_timeout else DEFAULT_CONNECT_TIMEOUT
        self._tls_policy = tls_policy
        self._attempt_delay = attempt_delay

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:  # noqa: N802 - Twisted's name
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII") from None
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, self._timeout)
        else:
            endpoint = InTurnEndpoint(self._reactor, host, uri.port, self._timeout, self._attempt_delay)
        if uri.scheme == b"https":
            if self._tls_policy is None:
                self._tls_policy = BrowserLikePolicyForHTTPS()
            endpoint = wrapClientTLS(self._tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def upstream_agent(reactor, pool: HTTPConnectionPool, connect_timeout: Optional[float] = None) -> Agent:
    """An ``Agent`` over ``pool`` that connects through :class:`UpstreamEndpoints`."""
    return Agent.usingEndpointFactory(reactor, UpstreamEndpoints(reactor, connect_timeout), pool=pool)


@implementer(IStreamClientEndpoint)
class InTurnEndpoint:
    """A host name's addresses, tried in the resolver's order.

    Like ``HostnameEndpoint`` the next address is tried alongside an attempt
    still unanswered after ``attempt_delay`` seconds, and the first to
    connect wins; unlike it, an attempt that fails starts the next one at
    once, and the failure of the last is reported at once.
    """

    def __init__(self, reactor, host: str, port: int, timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 attempt_delay: float = ATTEMPT_DELAY) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout = timeout
        self._attempt_delay = attempt_delay

    def connect(self, protocolFactory) -> Deferred:  # noqa: N803 - Twisted's name
        resolver = getattr(self._reactor, "nameResolver", None)
        if resolver is None:  # a reactor without pluggable resolvers: Twisted's own way
            return HostnameEndpoint(self._reactor, self._host, self._port,
                                    self._timeout).connect(protocolFactory)
        resolved: Deferred = Deferred()
        addresses: list = []

        @implementer(IResolutionReceiver)
        class Receiver:
            @staticmethod
            def resolutionBegan(resolution) -> None:  # noqa: N802
                pass

            @staticmethod
            def addressResolved(address) -> None:  # noqa: N802
                addresses.append(address)

            @staticmethod
            def resolutionComplete() -> None:  # noqa: N802
                resolved.callback(addresses)  # ignored once cancelled (no canceller)

        resolver.resolveHostName(Receiver(), self._host, portNumber=self._port)
        return resolved.addCallback(self._attempt, protocolFactory)

    def _attempt(self, addresses: list, factory) -> Deferred:
        endpoints: list[IStreamClientEndpoint] = []
        for address in addresses:
            if isinstance(address, IPv6Address):
                endpoints.append(TCP6ClientEndpoint(self._reactor, address.host, address.port, self._timeout))
            elif isinstance(address, IPv4Address):
                endpoints.append(TCP4ClientEndpoint(self._reactor, address.host, address.port, self._timeout))
        if not endpoints:
            raise DNSLookupError(f"no results for hostname lookup: {self._host}")
        address = HostnameAddress(self._host.encode("ascii"), self._port)
        return _InTurn(self._reactor, endpoints, factory, self._attempt_delay, address).winner


class _InTurn:
    """Connection attempts to ``endpoints``, started one after another (see
    :class:`InTurnEndpoint`); ``winner`` fires with the first protocol
    connected or fails with the last attempt's failure."""

    def __init__(self, clock, endpoints: list, factory, delay: float, address: HostnameAddress) -> None:
        self._clock = clock
        self._address = address
        self._endpoints = endpoints
        self._factory = factory
        self._delay = delay
        self._next_index = 0
        self._pending: list[Deferred] = []
        self._timer = None
        self._done = False
        self.winner: Deferred = Deferred(self._cancelled)
        self._start_next()

    def _start_next(self) -> None:
        self._timer = None
        endpoint = self._endpoints[self._next_index]
        self._next_index += 1
        attempt = endpoint.connect(self._factory)
        self._pending.append(attempt)
        if self._next_index < len(self._endpoints):
            self._timer = self._clock.callLater(self._delay, self._start_next)
        attempt.addCallbacks(self._connected, self._failed, callbackArgs=(attempt,), errbackArgs=(attempt,))

    def _connected(self, protocol, attempt: Deferred) -> None:
        self._pending.remove(attempt)
        if self._done:  # a second attempt connected in the same turn
            protocol.transport.loseConnection()
            return
        self._finish()
        self.winner.callback(protocol)

    def _failed(self, failure: Failure, attempt: Deferred) -> None:
        self._pending.remove(attempt)
        if self._done:
            return  # an attempt cancelled by _finish
        if self._next_index < len(self._endpoints):
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._start_next()
        elif not self._pending:
            self._finish()
            self.winner.errback(failure)

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for attempt in self._pending[:]:
            attempt.cancel()

    def _cancelled(self, winner: Deferred) -> None:
        self._finish()
        winner.errback(Failure(ConnectingCancelledError(self._address)))
