"""``llamaswap.server.fast.FastChannel``: our HTTP/1.1 server channel on httptools.

Driven through ``AccessLogSite.buildProtocol`` on a ``StringTransport`` with
the site's timers on a ``Clock``, so every byte the channel writes and every
timer it arms is seen.  The resources render through the real twisted.web
``Request`` (``LlamaSwapRequest``) the channel builds per request.
"""

from __future__ import annotations

import httptools
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import static
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from llamaswap.server import fast
from llamaswap.server.access import AccessLogSite, request_line
from llamaswap.server.fast import MAX_QUEUED, FastChannel

from .test_listeners import _Raw

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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


class _Resource(Resource):
    """Answers ``<METHOD> <uri> <body>`` at once, except under ``/hold``: those
    are kept in ``held`` unanswered (``NOT_DONE_YET``) for the test to finish."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen: list = []  # (method, uri, body) in the order rendered
        self.held: list = []

    def render(self, request):
        body = request.content.read()
        self.seen.append((request.method, request.uri, body))
        if request.path.startswith(b"/hold"):
            self.held.append(request)
            return NOT_DONE_YET
        return b"%s %s %s" % (request.method, request.uri, body)


class _HalfClosing(StringTransport):
    """A TCP-like transport: it can shut down its write side alone."""

    write_closed = False

    def loseWriteConnection(self):  # noqa: N802 - ITCPTransport's name
        self.write_closed = True


@implementer(IPushProducer)
class _Producer:
    """What a relay registers on its request; records the calls it gets."""

    def __init__(self):
        self.calls: list = []

    def pauseProducing(self):  # noqa: N802
        self.calls.append("pause")

    def resumeProducing(self):  # noqa: N802
        self.calls.append("resume")

    def stopProducing(self):  # noqa: N802
        self.calls.append("stop")


def _connect(resource: Resource, transport=None) -> tuple:
    clock = Clock()
    site = AccessLogSite(resource, clock, reactor=clock)  # the channels' timers on the Clock, not the reactor
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = transport if transport is not None else StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _served(transport=None) -> tuple:
    """A channel in front of a fresh ``_Resource``: ``(resource, protocol, transport)``."""
    resource = _Resource()
    return (resource, *_connect(resource, transport))


def _get(path: bytes, *headers: bytes, version: bytes = b"HTTP/1.1", method: bytes = b"GET") -> bytes:
    return b"%s %s %s\r\nHost: x\r\n%s\r\n" % (method, path, version, b"".join(h + b"\r\n" for h in headers))


def _post(path: bytes, body: bytes, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return _get(path, b"Content-Length: %d" % len(body), *headers, version=version, method=b"POST") + body


class _Parsed:
    """httptools callbacks collecting ``[status, headers, body]`` per response."""

    def __init__(self):
        self.responses: list = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self):
        self.responses.append([0, {}, b""])

    def on_header(self, name, value):
        self.responses[-1][1].setdefault(name.lower(), []).append(value)

    def on_headers_complete(self):
        self.responses[-1][0] = self.parser.get_status_code()

    def on_body(self, body):
        self.responses[-1][2] += body


def _responses(data: bytes) -> list:
    """``(status, {lower-case name: [values]}, de-chunked body)`` of each
    complete or partial response in ``data``, 1xx included."""
    parsed = _Parsed()
    parsed.parser.feed_data(data)
    return [tuple(response) for response in parsed.responses]


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

    def test_refused_request_gets_no_continue(self):
        """A request the front refuses from its head is not invited to send its
        body: it gets its answer at once."""
        front = _Front(refuse=(401, "unauthorized", None))
        protocol, transport = _connect(front)
        protocol.dataReceived(_get(b"/v1/completions", b"Content-Length: 5", b"Expect: 100-continue",
                                   method=b"POST"))
        self.assertNotIn(CONTINUE, transport.value())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))  # what _Front renders
        self.assertEqual(front.rendered, [((401, "unauthorized", None), b"")])


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


class KeepAliveTests(SynchronousTestCase):
    def test_two_requests_in_sequence(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/a"))
        ((code, headers, body),) = _responses(transport.value())
        self.assertEqual((code, body), (200, b"GET /a "))
        self.assertNotIn(b"connection", headers)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(_post(b"/b", b"xyz"))
        self.assertEqual([(c, b) for c, _, b in _responses(transport.value())],
                         [(200, b"GET /a "), (200, b"POST /b xyz")])
        self.assertFalse(transport.disconnecting)

    def test_head_split_across_reads(self):
        resource, protocol, transport = _served()
        data = _post(b"/split?q=1", b"body")
        for i in range(len(data)):
            protocol.dataReceived(data[i:i + 1])
        self.assertEqual(resource.seen, [(b"POST", b"/split?q=1", b"body")])
        self.assertEqual(_responses(transport.value())[0][2], b"POST /split?q=1 body")

    def test_http10_is_not_chunked_and_closes(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold", version=b"HTTP/1.0"))
        (request,) = resource.held
        request.write(b"abc")
        request.write(b"def")
        self.assertFalse(transport.disconnecting)
        request.finish()
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200 OK\r\n"))
        self.assertIn(b"\r\nConnection: close", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertEqual(body, b"abcdef")  # the end of the body is the end of the connection
        self.assertTrue(transport.disconnecting)

    def test_http10_keep_alive_is_not_kept(self):
        """An HTTP/1.0 client asking for keep-alive gets one response and a close."""
        protocol, transport = _connect(_Resource())
        protocol.dataReceived(_get(b"/a", b"Connection: keep-alive", version=b"HTTP/1.0"))
        self.assertIn(b"\r\nConnection: close\r\n", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_connection_close_from_http11(self):
        resource, protocol, transport = _served()
        # the second request comes after the client said close: never served
        protocol.dataReceived(_get(b"/a", b"Connection: close") + _get(b"/b"))
        ((code, headers, body),) = _responses(transport.value())
        self.assertEqual((code, body, headers[b"connection"]), (200, b"GET /a ", [b"close"]))
        self.assertTrue(transport.disconnecting)
        self.assertEqual([uri for _, uri, _ in resource.seen], [b"/a"])

    def test_connection_close_behind_held_request(self):
        """A request pipelined behind one that said ``Connection: close`` is
        neither served nor refused: the connection ends with the close response."""
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold", b"Connection: close") + _get(b"/b"))
        resource.held[0].write(b"x")
        resource.held[0].finish()
        data = transport.value()
        self.assertTrue(data.endswith(b"1\r\nx\r\n0\r\n\r\n"), data)  # nothing after the close response
        self.assertEqual(data.count(b"HTTP/1.1 "), 1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(resource.seen), 1)

    def test_upgrade_is_ignored(self):
        """``Upgrade: h2c`` (curl --http2 on http) or websocket: answered over
        HTTP/1.1 as twisted.web does, and the connection carries on."""
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/a", b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
                                   b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA") + _get(b"/b"))
        protocol.dataReceived(_get(b"/c"))
        self.assertEqual([(c, b) for c, _, b in _responses(transport.value())],
                         [(200, b"GET /a "), (200, b"GET /b "), (200, b"GET /c ")])
        self.assertFalse(transport.disconnecting)

    def test_upgrade_with_body_is_400(self):
        """httptools hands the body of an upgrade request over as the new
        protocol's bytes: such a request is refused, not served without its body."""
        resource, protocol, transport = _served()
        protocol.dataReceived(_post(b"/a", b"hi", b"Connection: Upgrade", b"Upgrade: websocket"))
        self.assertEqual(resource.seen, [])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))

    def test_chunked_request_body(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/up", b"Transfer-Encoding: chunked", method=b"POST") + b"5\r\nhel")
        protocol.dataReceived(b"lo\r\n6\r\n world\r\n")
        self.assertEqual(resource.seen, [])
        protocol.dataReceived(b"0\r\n\r\n")
        self.assertEqual(resource.seen, [(b"POST", b"/up", b"hello world")])
        self.assertEqual(_responses(transport.value())[0][2], b"POST /up hello world")

    def test_head_writes_no_body(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold", method=b"HEAD"))
        (request,) = resource.held
        request.setHeader(b"content-length", b"5")
        request.write(b"hello")
        request.finish()
        head, sep, rest = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: 5", head)
        self.assertEqual(rest, b"")
        protocol.dataReceived(_get(b"/after"))  # the connection goes on: nothing was left unsent
        after = transport.value()[len(head) + 4:]
        self.assertTrue(after.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(after.endswith(b"\r\n\r\nGET /after "))

    def test_head_rendered_by_the_resource(self):
        """twisted.web answers HEAD from ``render``'s bytes: their length, no body, no chunking."""
        protocol, transport = _connect(_Resource())
        protocol.dataReceived(_get(b"/a", method=b"HEAD") + _get(b"/b"))
        first, _, rest = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: 8", first)  # len(b"HEAD /a ")
        self.assertNotIn(b"chunked", first)
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(rest.endswith(b"\r\n\r\nGET /b "))


class PipeliningTests(SynchronousTestCase):
    def test_answered_in_order(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold/1") + _post(b"/2", b"two") + _get(b"/3"))
        self.assertEqual([uri for _, uri, _ in resource.seen], [b"/hold/1"])  # the second not started
        self.assertEqual(transport.value(), b"")
        resource.held[0].write(b"first")
        self.assertEqual([uri for _, uri, _ in resource.seen], [b"/hold/1"])  # still not, mid-response
        resource.held[0].finish()
        self.assertEqual([uri for _, uri, _ in resource.seen], [b"/hold/1", b"/2", b"/3"])
        self.assertEqual([body for _, _, body in _responses(transport.value())],
                         [b"first", b"POST /2 two", b"GET /3 "])

    def test_each_held_in_turn(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold/1") + _get(b"/hold/2"))
        self.assertEqual(len(resource.held), 1)
        resource.held[0].finish()
        self.assertEqual(len(resource.held), 2)
        self.assertEqual(len(_responses(transport.value())), 1)
        resource.held[1].write(b"2")
        resource.held[1].finish()
        self.assertEqual([body for _, _, body in _responses(transport.value())], [b"", b"2"])

    def test_reading_paused_beyond_max_queued(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold") + b"".join(_get(b"/%d" % i) for i in range(MAX_QUEUED - 1)))
        self.assertEqual(transport.producerState, "producing")  # MAX_QUEUED in the queue: still reading
        protocol.dataReceived(_get(b"/last"))
        self.assertEqual(transport.producerState, "paused")
        resource.held[0].finish()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(_responses(transport.value())), MAX_QUEUED + 1)
        self.assertEqual(resource.seen[-1][1], b"/last")

    def test_access_log_once_per_request(self):
        resource, protocol, transport = _served()
        logged = []
        protocol.site.log = logged.append
        protocol.dataReceived(_get(b"/hold") + _get(b"/b") + _get(b"/c"))
        self.assertEqual(logged, [])
        resource.held[0].finish()
        protocol.dataReceived(_get(b"/d"))
        self.assertEqual([r.uri for r in logged], [b"/hold", b"/b", b"/c", b"/d"])


class ContinueTests(SynchronousTestCase):
    def test_sent_before_the_body(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/up", b"Content-Length: 3", b"Expect: 100-continue", method=b"POST"))
        self.assertEqual(transport.value(), CONTINUE)
        self.assertEqual(resource.seen, [])
        protocol.dataReceived(b"abc")
        self.assertEqual([(c, b) for c, _, b in _responses(transport.value())], [(100, b""), (200, b"POST /up abc")])

    def test_not_inside_an_earlier_response(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold") + _get(b"/up", b"Content-Length: 3", b"Expect: 100-continue",
                                                     method=b"POST"))
        self.assertEqual(transport.value(), b"")
        resource.held[0].write(b"partial")
        self.assertNotIn(b" 100 ", transport.value())
        resource.held[0].finish()
        first_end = transport.value().index(b"0\r\n\r\n") + 5
        self.assertEqual(transport.value()[first_end:], CONTINUE)  # now its turn: invited
        protocol.dataReceived(b"abc")
        self.assertEqual([c for c, _, _ in _responses(transport.value())], [200, 100, 200])
        self.assertEqual(resource.seen[-1], (b"POST", b"/up", b"abc"))

    def test_not_sent_when_the_body_came_while_waiting(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold") + _post(b"/up", b"abc", b"Expect: 100-continue"))
        resource.held[0].finish()
        self.assertNotIn(b" 100 ", transport.value())
        self.assertEqual([c for c, _, _ in _responses(transport.value())], [200, 200])
        self.assertEqual(resource.seen[-1], (b"POST", b"/up", b"abc"))

    def test_ignored_for_http10(self):
        """RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored."""
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/up", b"Content-Length: 3", b"Expect: 100-continue", method=b"POST",
                                   version=b"HTTP/1.0"))
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"abc")
        self.assertTrue(transport.value().startswith(b"HTTP/1.0 200 OK\r\n"))


class EarlyAnswerTests(SynchronousTestCase):
    """A request refused before its body is all in is answered at once, and
    the connection closes with a lingering close: an upload over the limit is
    never waited for."""

    def assert_lingering(self, protocol, transport) -> None:
        self.assertIn(b"\r\nConnection: close\r\n", transport.value())
        self.assertTrue(transport.write_closed)
        written = transport.value()
        protocol.dataReceived(b"x" * 100_000)  # the rest of the body: read and dropped
        self.assertEqual(transport.value(), written)
        self.assertFalse(transport.disconnecting)
        protocol.site.clock.advance(FastChannel.LINGER)
        self.assertTrue(transport.disconnecting)

    def test_declared_length_refused_from_the_head(self):
        front = _Front(refuse=(413, "request body too large", None))
        protocol, transport = _connect(front, _HalfClosing())
        protocol.dataReceived(_get(b"/v1/embeddings", b"Content-Length: 10000000000", method=b"POST"))
        self.assertEqual(front.rendered, [((413, "request body too large", None), b"")])
        self.assert_lingering(protocol, transport)

    def test_chunked_body_over_the_limit_answered_while_reading(self):
        front = _Front()  # body_limit: 1 MiB
        protocol, transport = _connect(front, _HalfClosing())
        protocol.dataReceived(_get(b"/v1/embeddings", b"Transfer-Encoding: chunked", method=b"POST"))
        protocol.dataReceived(b"80000\r\n" + b"a" * 0x80000 + b"\r\n")  # 512 KiB: within the limit
        self.assertEqual((front.rendered, transport.value()), ([], b""))
        protocol.dataReceived(b"80001\r\n" + b"a" * 0x80001 + b"\r\n")  # past it: answered now
        self.assertEqual(front.rendered, [((413, "request body too large", None), b"")])
        self.assert_lingering(protocol, transport)

    def test_early_answer_waits_for_a_pipelined_request_before_it(self):
        resource = _Resource()
        front = _Front(refuse=(401, "unauthorized", None))
        protocol, transport = _connect(resource, _HalfClosing())
        protocol.dataReceived(_get(b"/hold"))
        protocol.site.front = front  # the next request is refused from its head
        protocol.dataReceived(_get(b"/v1/completions", b"Content-Length: 5000", method=b"POST"))
        self.assertEqual(transport.value(), b"")  # not inside the held response
        [held] = resource.held
        held.write(b"held")
        held.finish()
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 2)
        self.assertTrue(transport.write_closed)


class RefusalTests(SynchronousTestCase):
    def test_refusal_lingers(self):
        """The 400, then the write side shut, reads dropped, and the close after ``LINGER``."""
        resource, protocol, transport = _served(_HalfClosing())
        protocol.dataReceived(b"\x16\x03\x01 not http\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.disconnecting)
        written = transport.value()
        protocol.dataReceived(_get(b"/late"))  # read and dropped
        self.assertEqual((transport.value(), resource.seen), (written, []))
        protocol.site.clock.advance(FastChannel.LINGER - 0.01)
        self.assertFalse(transport.disconnecting)
        protocol.site.clock.advance(0.01)
        self.assertTrue(transport.disconnecting)

    def test_lingering_timer_cancelled_by_close(self):
        protocol, transport = _connect(_Resource(), _HalfClosing())
        protocol.dataReceived(b"garbage\r\n\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(protocol.site.clock.getDelayedCalls(), [])

    def test_oversized_head_closes_at_once_without_half_close(self):
        protocol, transport = _connect(_Resource())  # a transport without loseWriteConnection
        protocol.dataReceived(_get(b"/a", b"X-Big: " + b"a" * fast.MAX_HEAD))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(transport.disconnecting)

    def _behind(self, bad: bytes, status: bytes) -> None:
        resource, protocol, transport = _served(_HalfClosing())
        protocol.dataReceived(_get(b"/hold") + _get(b"/queued") + bad)
        self.assertEqual(transport.value(), b"")
        resource.held[0].write(b"partial")
        self.assertNotIn(status, transport.value())  # never inside the response in progress
        resource.held[0].finish()
        codes = [c for c, _, _ in _responses(transport.value())]
        self.assertEqual(codes, [200, 200, int(status)])  # the queued good request is answered first
        self.assertTrue(transport.write_closed)
        protocol.site.clock.advance(FastChannel.LINGER)
        self.assertTrue(transport.disconnecting)

    def test_400_behind_a_request_in_progress(self):
        self._behind(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"400")

    def test_431_behind_a_request_in_progress(self):
        self._behind(_get(b"/big", b"X-Big: " + b"a" * fast.MAX_HEAD), b"431")

    def test_400_in_a_later_read(self):
        resource, protocol, transport = _served(_HalfClosing())
        protocol.dataReceived(_get(b"/hold"))
        protocol.dataReceived(b"BAD\x00\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        resource.held[0].finish()
        self.assertEqual([c for c, _, _ in _responses(transport.value())], [200, 400])


class PullProducerTests(SynchronousTestCase):
    """A pull producer (``static.File`` registers one) is asked for more once
    per reactor turn until it is done, and not while the transport is full."""

    def test_static_file_is_served_whole(self):
        path = self.mktemp()
        content = bytes(range(256)) * 1200  # 300 KiB: static.File reads it in pieces
        with open(path, "wb") as f:
            f.write(content)
        root = Resource()
        root.putChild(b"f", static.File(path))
        protocol, transport = _connect(root)
        protocol.dataReceived(_get(b"/f"))
        protocol.pauseProducing()  # a full send buffer: nothing asked meanwhile
        written = len(transport.value())
        protocol.site.clock.advance(0)
        self.assertEqual(len(transport.value()), written)
        protocol.resumeProducing()
        for _ in range(100):
            protocol.site.clock.advance(0)
        [(status, headers, body)] = _responses(transport.value())
        self.assertEqual((status, body), (200, content))
        self.assertIsNone(protocol.producer)  # static.File unregistered itself, and nothing asks it for more:
        self.assertEqual(protocol.site.clock.getDelayedCalls(), [protocol.idle])  # the idle timer alone is left


class BackpressureTests(SynchronousTestCase):
    def test_pause_and_resume_reach_the_request_producer(self):
        resource, protocol, transport = _served()
        self.assertIs(transport.producer, protocol)  # the channel is its transport's producer
        protocol.dataReceived(_get(b"/hold"))
        producer = _Producer()
        resource.held[0].registerProducer(producer, True)
        protocol.pauseProducing()
        self.assertEqual(producer.calls, ["pause"])
        protocol.resumeProducing()
        self.assertEqual(producer.calls, ["pause", "resume"])
        protocol.stopProducing()
        self.assertEqual(producer.calls, ["pause", "resume", "stop"])

    def test_producer_registered_while_paused_starts_paused(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold"))
        protocol.pauseProducing()
        producer = _Producer()
        resource.held[0].registerProducer(producer, True)
        self.assertEqual(producer.calls, ["pause"])

    def test_unregistered_producer_not_called(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold"))
        producer = _Producer()
        request = resource.held[0]
        request.registerProducer(producer, True)
        request.unregisterProducer()
        protocol.pauseProducing()
        protocol.resumeProducing()
        self.assertEqual(producer.calls, [])

    def test_send_timeout_aborts(self):
        resource, protocol, transport = _served()
        clock = protocol.site.clock
        protocol.dataReceived(_get(b"/hold"))
        protocol.pauseProducing()
        clock.advance(protocol.site.send_timeout - 1)
        self.assertFalse(transport.disconnected)
        clock.advance(1)
        self.assertTrue(transport.disconnected)  # abortConnection, not a graceful close

    def test_resume_cancels_send_timeout(self):
        resource, protocol, transport = _served()
        clock = protocol.site.clock
        protocol.dataReceived(_get(b"/hold"))
        protocol.pauseProducing()
        clock.advance(protocol.site.send_timeout - 1)
        protocol.resumeProducing()
        clock.advance(protocol.site.send_timeout * 2)
        self.assertFalse(transport.disconnecting)


class IdleTimeoutTests(SynchronousTestCase):
    def test_idle_connection_closed(self):
        protocol, transport = _connect(_Resource())
        clock, timeout = protocol.site.clock, protocol.site.timeOut
        clock.advance(timeout - 1)
        protocol.dataReceived(_get(b"/a"))  # activity: the count starts again
        clock.advance(timeout - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_request_in_progress_is_not_idle(self):
        resource, protocol, transport = _served()
        clock, timeout = protocol.site.clock, protocol.site.timeOut
        protocol.dataReceived(_get(b"/hold"))
        clock.advance(timeout * 3)
        self.assertFalse(transport.disconnecting)
        resource.held[0].finish()  # idle from now on
        clock.advance(timeout - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_body_in_progress_is_not_idle(self):
        protocol, transport = _connect(_Resource())
        clock, timeout = protocol.site.clock, protocol.site.timeOut
        protocol.dataReceived(_get(b"/up", b"Content-Length: 10", method=b"POST") + b"abc")
        clock.advance(timeout * 3)
        self.assertFalse(transport.disconnecting)

    def test_timers_cancelled_on_close(self):
        protocol, transport = _connect(_Resource())
        protocol.pauseProducing()
        self.assertEqual(len(protocol.site.clock.getDelayedCalls()), 2)  # idle and send_timeout
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(protocol.site.clock.getDelayedCalls(), [])


class ConnectionLostTests(SynchronousTestCase):
    def test_request_in_progress_notified(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold") + _get(b"/queued"))
        finished = resource.held[0].notifyFinish()
        protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(finished, ConnectionLost)
        self.assertEqual(len(resource.seen), 1)  # the queued one never started

    def test_queued_and_partial_requests_told(self):
        """Requests not yet answered (queued, body half in) learn the connection is gone."""
        resource, protocol, transport = _served()
        made = []
        factory = protocol.site.requestFactory
        protocol.site.requestFactory = lambda channel, queued: made.append(factory(channel, queued=queued)) or made[-1]
        protocol.dataReceived(_get(b"/hold") + _get(b"/queued") + _get(b"/partial", b"Content-Length: 9",
                                                                         method=b"POST") + b"abc")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual([r._disconnected for r in made], [True, True, True])

    def test_finished_request_not_told(self):
        resource, protocol, transport = _served()
        protocol.dataReceived(_get(b"/hold"))
        request = resource.held[0]
        finished = request.notifyFinish()
        request.finish()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(finished))


class LoopbackTests(TestCase):
    """The channel on a real TCP connection: pipelined requests answered in
    order, then a 400 and the half-close the client reads as the end."""

    timeout = 5

    async def test_pipelined_then_refused(self):
        resource = _Resource()
        port = reactor.listenTCP(0, AccessLogSite(resource, reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _Raw(_get(b"/a") + _post(b"/b", b"x" * 100000) + b"no http here\r\n\r\n")
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        received = await client.done  # the server shut its side after the 400: EOF here, then the client closed
        self.assertEqual([(c, b[:8]) for c, _, b in _responses(received)],
                         [(200, b"GET /a "), (200, b"POST /b "), (400, b"400 Bad ")])
        self.assertEqual(len(resource.seen[1][2]), 100000)
