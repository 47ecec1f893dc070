"""The endpoints llamaswap connects to upstream servers through
(``llamaswap.httpclient.UpstreamEndpoints``): IP literals directly, host names
address by address, and a failure reported at once, not on a 0.3 s tick."""

from __future__ import annotations

import socket
import time

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported

from llamaswap.httpclient import ATTEMPT_DELAY, UpstreamEndpoints, quiet_pool, upstream_agent
from llamaswap.process.process import http_status


class FakeResolver:
    """A name resolver with fixed answers, answering at once."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,  # noqa: N802,N803
                        transportSemantics="TCP"):  # noqa: N803
        self.lookups.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.answers.get(hostName, []):
            receiver.addressResolved(address)
        receiver.resolutionComplete()


class Reactor(MemoryReactorClock):
    def __init__(self, answers: dict | None = None) -> None:
        super().__init__()
        self.nameResolver = FakeResolver(answers or {})


LOCALHOST = {"localhost": [IPv6Address("TCP", "::1", 8080), IPv4Address("TCP", "127.0.0.1", 8080)]}


class EndpointTests(SynchronousTestCase):
    def connect(self, url: bytes, answers: dict | None = None, **kw):
        self.reactor = Reactor(answers)
        endpoint = UpstreamEndpoints(self.reactor, **kw).endpointForURI(URI.fromBytes(url))
        return endpoint.connect(Factory.forProtocol(Protocol))

    def attempt(self, i: int):
        host, port, factory, timeout, _ = self.reactor.tcpClients[i]
        return host, port, factory, timeout

    def refuse(self, i: int) -> None:
        factory = self.reactor.tcpClients[i][2]
        factory.clientConnectionFailed(self.reactor.connectors[i], Failure(ConnectionRefusedError()))

    def accept(self, i: int) -> None:
        protocol = self.reactor.tcpClients[i][2].buildProtocol(None)
        protocol.makeConnection(StringTransport())

    def test_ip_literal_is_connected_to_directly(self) -> None:
        d = self.connect(b"http://127.0.0.1:8080/health")
        self.assertEqual(self.reactor.nameResolver.lookups, [])  # no resolver, no thread hop
        self.assertEqual(self.attempt(0)[:2], ("127.0.0.1", 8080))
        self.refuse(0)
        self.failureResultOf(d, ConnectionRefusedError)  # at once, no clock advance
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_ipv6_literal(self) -> None:
        d = self.connect(b"http://[::1]:9/")
        self.assertEqual(self.attempt(0)[:2], ("::1", 9))
        self.accept(0)
        self.assertIsInstance(self.successResultOf(d), Protocol)

    def test_connect_timeout(self) -> None:
        self.connect(b"http://127.0.0.1:1/", connect_timeout=5)
        self.assertEqual(self.attempt(0)[3], 5)
        self.connect(b"http://127.0.0.1:1/")
        self.assertEqual(self.attempt(0)[3], 30)  # Twisted's default, as before
        self.connect(b"http://localhost:1/", {"localhost": [IPv4Address("TCP", "127.0.0.1", 1)]},
                     connect_timeout=7)
        self.assertEqual(self.attempt(0)[3], 7)

    def test_next_address_at_once_after_a_failure(self) -> None:
        d = self.connect(b"http://localhost:8080/", LOCALHOST)
        self.assertEqual(self.reactor.nameResolver.lookups, ["localhost"])
        self.assertEqual([a[0] for a in self.reactor.tcpClients], ["::1"])
        self.refuse(0)  # a server listening on 127.0.0.1 only
        self.assertEqual([a[0] for a in self.reactor.tcpClients], ["::1", "127.0.0.1"])
        self.accept(1)
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_all_refused_is_reported_at_once(self) -> None:
        d = self.connect(b"http://localhost:8080/", LOCALHOST)
        self.refuse(0)
        self.refuse(1)
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_slow_attempt_is_raced_by_the_next(self) -> None:
        d = self.connect(b"http://localhost:8080/", LOCALHOST)
        self.reactor.advance(ATTEMPT_DELAY * 0.99)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(ATTEMPT_DELAY * 0.01)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.accept(1)
        self.successResultOf(d)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)  # the loser is given up

    def test_cancel(self) -> None:
        d = self.connect(b"http://localhost:8080/", LOCALHOST)
        self.reactor.advance(ATTEMPT_DELAY)
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertTrue(all(c.stoppedConnecting for c in self.reactor.connectors))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_unresolvable(self) -> None:
        d = self.connect(b"http://nowhere.invalid:1/")
        self.failureResultOf(d, DNSLookupError)

    def test_https_is_wrapped_in_tls(self) -> None:
        self.connect(b"https://127.0.0.1:8443/")
        host, port, factory, _ = self.attempt(0)
        self.assertEqual((host, port), ("127.0.0.1", 8443))
        self.assertEqual(type(factory._wrappedFactory).__name__, "TLSMemoryBIOFactory")

    def test_other_schemes_refused(self) -> None:
        factory = UpstreamEndpoints(Reactor())
        self.assertRaises(SchemeNotSupported, factory.endpointForURI, URI.fromBytes(b"ftp://127.0.0.1/"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealRefusalTests(TestCase):
    timeout = 10

    @defer.inlineCallbacks
    def test_refused_health_poll_is_answered_at_once(self) -> None:
        """A health poll of a port nobody listens on yet fails within
        milliseconds (through Agent's default endpoints: 0.3 s)."""
        pool = quiet_pool(reactor, persistent=False)
        agent = upstream_agent(reactor, pool, 1.0)
        url = f"http://127.0.0.1:{closed_port()}/health"
        took = []
        for _ in range(5):
            started = time.perf_counter()
            try:
                yield http_status(reactor, agent, url, 1.0)
            except ConnectionRefusedError:
                took.append(time.perf_counter() - started)
        self.assertEqual(len(took), 5)
        print(f"\n    refused in {min(took) * 1000:.2f}-{max(took) * 1000:.2f} ms", end=" ")
        self.assertLess(min(took), 0.1)
