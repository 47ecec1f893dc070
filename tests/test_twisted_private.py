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
no longer used; the request-line and refusal tests below keep what they gave.
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
from llamaswap.server.access import AccessLogSite, request_line
from llamaswap.server.fast import FastChannel


class _Front(Resource):
    """A front that records what ``LlamaSwapRequest`` asks before the body."""

    isLeaf = True

    def __init__(self, refuse=None):
        super().__init__()
        self.checks: list = []
        self.args: list = []
        self.rendered: list = []  # (refused, body)
        self.refuse = refuse

    def check(self, request, method, path, length):
        self.checks.append((method, path, length))
        return self.refuse

    def body_limit(self) -> int:
        return 1 << 20

    def render(self, request):
        self.args.append(request.args)
        self.rendered.append((request.refused, request.content.read()))
        return b"ok"


def _connect(front: Resource) -> tuple:
    clock = Clock()
    site = AccessLogSite(front, clock, reactor=clock)  # the channels' idle timers on the Clock, not the reactor
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class RequestLineTests(SynchronousTestCase):
    """The request line is known while the body is still coming (``request_line``),
    so the front checks API key and size before a body is stored."""

    def test_attributes_while_the_body_is_coming(self):
        front = _Front()
        protocol, transport = _connect(front)
        seen = []
        factory = protocol.site.requestFactory

        def request(channel, queued):
            made = factory(channel, queued=queued)
            original = made.gotLength
            made.gotLength = lambda length: (seen.append(request_line(made)), original(length))
            return made

        protocol.site.requestFactory = request
        protocol.dataReceived(b"POST /v1/chat/completions?stream=true HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 2\r\n\r\n")
        self.assertEqual(seen, [(b"POST", b"/v1/chat/completions")])
        protocol.site.requestFactory = factory

    def test_the_front_checks_before_the_body(self):
        front = _Front()
        protocol, transport = _connect(front)
        protocol.dataReceived(b"POST /v1/embeddings?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(front.checks, [(b"POST", b"/v1/embeddings", 2)])
        protocol.dataReceived(b"{}")
        self.assertIn(b"\r\n\r\nok", transport.value())

    def test_chunked_body(self):
        front = _Front()
        protocol, transport = _connect(front)
        protocol.dataReceived(b"PUT /upstream/m/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(front.checks, [(b"PUT", b"/upstream/m/x", None)])

    def test_refused_before_the_body(self):
        front = _Front(refuse=(401, "unauthorized", None))
        protocol, transport = _connect(front)
        protocol.dataReceived(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(front.rendered, [((401, "unauthorized", None), b"")])  # the body was never stored


class ChannelTests(SynchronousTestCase):
    """What the channel answers to heads it will not serve."""

    def test_the_site_builds_our_channel(self):
        protocol, transport = _connect(_Front())
        self.assertIsInstance(protocol, FastChannel)
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"\r\n\r\nok", transport.value())

    def test_oversized_head_is_431(self):
        protocol, transport = _connect(_Front())
        header = b"X-Big: " + b"a" * 8000 + b"\r\n"
        protocol.dataReceived(b"GET /health HTTP/1.1\r\n" + header * 3 + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"))

    def test_endless_header_line_is_431(self):
        protocol, transport = _connect(_Front())
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nX-Big: ")
        for _ in range(10):
            protocol.dataReceived(b"a" * 8000)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"))

    def test_bad_request(self):
        protocol, transport = _connect(_Front())
        protocol.dataReceived(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                            b"Content-Length: 15\r\nConnection: close\r\n\r\n400 Bad Request")


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
