"""Every private Twisted API llamaswap depends on, checked in one place.

Twisted offers no public way to do these things, so llamaswap uses the
private names below (see each module for why).  setup.cfg pins the Twisted
range they are known to work with; when an upgrade renames or changes one,
a test here fails and names it, instead of a feature quietly degrading:

* ``HTTPConnectionPool._factory`` (``httpclient.UpstreamPool``: our own
  protocol for upstream connections);
* ``StreamServerEndpointService._raiseSynchronously`` (``service.build_service``:
  a bind error fails start-up, as ``strports.service`` arranges).

Also checked: what made a private dependency unnecessary.  Form bodies are
not parsed, so Twisted's ``_parseContentType`` is never on our path; the
HTTP/1.1 server channel is our own (``llamaswap.server.fast``, on httptools),
so ``HTTPChannel``'s ``_command``/``_path``, ``_receivedHeaderSize``,
``_respondToBadRequestAndDisconnect`` and ``_GenericHTTPChannelProtocol`` are
no longer used: what they gave (the request line while the body is coming,
the 400/431 refusals) is tested with the channel, in ``tests/test_fast_server.py``.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource

from llamaswap.httpclient import UpstreamPool, _Protocol, _QuietFactory
from llamaswap.server.access import AccessLogSite

from .test_fast_server import _Front


def _connect(front: Resource) -> tuple:
    clock = Clock()
    site = AccessLogSite(front, clock, reactor=clock)  # the channels' idle timers on the Clock, not the reactor
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class FormParsingTests(SynchronousTestCase):
    """``AccessLogSite`` turns Twisted's form parsing off, so a POST's
    Content-Type is never parsed (no ``_parseContentType`` to speed up)."""

    def test_form_bodies_are_not_parsed(self):
        parsed = []
        original = http._parseContentType
        self.patch(http, "_parseContentType", lambda line: parsed.append(line) or original(line))
        front = _Front()
        protocol, transport = _connect(front)
        body = b"model=m&prompt=hi"
        protocol.dataReceived(b"POST /v1/audio/transcriptions?q=1 HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Type: application/x-www-form-urlencoded\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertEqual(front.args, [{b"q": [b"1"]}])
        self.assertEqual(parsed, [])


class _Endpoint:
    def __init__(self):
        self.factories: list = []

    def connect(self, factory):
        self.factories.append(factory)
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return defer.succeed(protocol)


class PoolFactoryTests(SynchronousTestCase):
    """``HTTPConnectionPool._factory(quiescentCallback, metadata)`` builds each
    new connection's factory, and the callback hands the connection back."""

    def test_hook_exists(self):
        self.assertTrue(hasattr(HTTPConnectionPool, "_factory"))

    def test_connections_are_ours(self):
        pool = UpstreamPool(Clock(), persistent=True, keepalive=7, tls_handshake=3)
        endpoint = _Endpoint()
        protocol = self.successResultOf(pool.getConnection(("http", b"h", 80), endpoint))
        (factory,) = endpoint.factories
        self.assertIsInstance(factory, _QuietFactory)
        self.assertIsInstance(factory, Factory)
        self.assertFalse(factory.noisy)
        self.assertIsInstance(protocol, _Protocol)
        self.assertEqual((protocol.keepalive, protocol.tls_handshake), (7, 3))

    def test_quiescent_connection_goes_back_to_the_pool(self):
        pool = UpstreamPool(Clock(), persistent=True)
        pool.retryAutomatically = False
        key = ("http", b"h", 80)
        endpoint = _Endpoint()
        protocol = self.successResultOf(pool.getConnection(key, endpoint))
        endpoint.factories[0].quiescent(protocol)
        again = _Endpoint()
        self.assertIs(self.successResultOf(pool.getConnection(key, again)), protocol)
        self.assertEqual(again.factories, [])


class RaiseSynchronouslyTests(SynchronousTestCase):
    """``StreamServerEndpointService._raiseSynchronously`` makes a listen
    failure raise from ``privilegedStartService`` (twistd then stops)."""

    def test_bind_error_raises(self):
        class Refusing:
            def listen(self, factory):
                return defer.fail(CannotListenError("127.0.0.1", 1, OSError("in use")))

        service = StreamServerEndpointService(Refusing(), Factory())
        self.assertFalse(service._raiseSynchronously)
        service._raiseSynchronously = True
        self.assertRaises(CannotListenError, service.privilegedStartService)
