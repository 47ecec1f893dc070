"""``llamaswap.proxy.upstream``: the lean pooled client for plain-http upstreams.

Driven through ``llamaswap.proxy.stream.forward`` (as the pipeline calls it)
against upstreams written here: small Protocols on real loopback sockets that
parse each request with httptools and answer canned bytes, so each test says
exactly what the upstream sends and when.  Timers (header timeout, body idle,
100-continue wait, the pool's idle time) run on a ``Clock``; the only real
waits are for socket events, bounded by the test timeout.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import httptools
from twisted.internet import defer, reactor
from twisted.internet.defer import CancelledError, DeferredQueue
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from llamaswap.proxy import upstream
from llamaswap.proxy.stream import forward
from llamaswap.proxy.upstream import (
    BODY_PIECE, REJECT_BODY_LIMIT, UpstreamBodyIdle, UpstreamBroke, UpstreamClient, UpstreamPool, UpstreamRejected,
    UpstreamTimeout, UpstreamUnavailable, _BodySender, request_head,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Seen:
    """One request as the upstream parsed it."""

    def __init__(self):
        self.method = b""
        self.url = b""
        self.headers: dict = {}
        self.body = b""
        self.body_at: list = []  # the test Clock's time at each body piece (see _UpstreamFactory.clock)


class _Upstream(Protocol):
    """One upstream connection: answers each complete request with its
    factory's next answer (bytes written, or a callable given the protocol)."""

    def connectionMade(self):
        self.received = b""
        self.requests: list = []
        self.closed = defer.Deferred()
        self.parser = httptools.HttpRequestParser(self)
        self.factory.connections.append(self)

    def dataReceived(self, data):
        self.received += data
        self.parser.feed_data(data)

    def connectionLost(self, reason=None):
        self.closed.callback(None)

    def on_message_begin(self):
        self.requests.append(_Seen())

    def on_url(self, url):
        self.requests[-1].url += url

    def on_header(self, name, value):
        self.requests[-1].headers.setdefault(name.lower(), []).append(value)

    def on_headers_complete(self):
        seen = self.requests[-1]
        seen.method = self.parser.get_method()
        self.factory.heads.put((self, seen))
        if self.factory.on_head is not None:
            self.factory.on_head(self, seen)

    def on_body(self, body):
        self.requests[-1].body += body
        self.requests[-1].body_at.append(self.factory.clock.seconds() if self.factory.clock else None)

    def on_message_complete(self):
        self.factory.completes.put((self, self.requests[-1]))
        answer = self.factory.answers.pop(0) if self.factory.answers else None
        if isinstance(answer, bytes):
            self.transport.write(answer)
        elif answer is not None:
            answer(self)


Answer = Union[bytes, Callable[[_Upstream], None], None]


class _UpstreamFactory(Factory):
    protocol = _Upstream

    def __init__(self, *answers: Answer, on_head=None, clock: Optional[Clock] = None):
        self.answers = list(answers)
        self.on_head = on_head
        self.clock = clock
        self.connections: list = []
        self.heads: DeferredQueue = DeferredQueue()  # (protocol, _Seen) as each request head arrives
        self.completes: DeferredQueue = DeferredQueue()  # ... and as each request is complete


class _Request:
    """The client request: what ``_Exchange`` uses of a twisted.web ``Request``."""

    def __init__(self, method: bytes = b"GET", pause_on_write: bool = False):
        self.method = method
        self.channel = object()  # not None: the client is connected
        self.code: Optional[int] = None
        self.phrase = None
        self.responseHeaders = Headers()
        self.producer = None
        self.registrations = 0
        self.written: list = []
        self.pause_on_write = pause_on_write

    def setResponseCode(self, code, message=None):  # noqa: N802 - IRequest's names
        self.code, self.phrase = code, message

    def registerProducer(self, producer, streaming):  # noqa: N802
        assert self.producer is None and streaming
        self.producer = producer
        self.registrations += 1

    def unregisterProducer(self):  # noqa: N802
        assert self.producer is not None
        self.producer = None

    def write(self, data):
        self.written.append(data)
        if self.pause_on_write and data and self.producer is not None:  # the client's send buffer is full
            self.producer.pauseProducing()


class _Tracked(upstream.UpstreamConnection):
    """The client's connections, each with a Deferred of its end (for cleanup and asserts)."""

    made: list = []

    def connectionMade(self):
        self.closed = defer.Deferred()
        self.made.append(self)
        super().connectionMade()

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self.closed.callback(None)


class _Base(TestCase):
    timeout = 5

    def setUp(self):
        self.made: list = []
        self.patch(_Tracked, "made", self.made)
        self.patch(upstream, "UpstreamConnection", _Tracked)  # what _ConnectionFactory builds
        self.factories: list = []
        self.pools: list = []
        self.addCleanup(self._close_all)

    async def _close_all(self):
        for factory in self.factories:
            for connection in factory.connections:
                connection.transport.abortConnection()
        for connection in self.made:
            connection.transport.abortConnection()
        await defer.gatherResults([c.closed for f in self.factories for c in f.connections] +
                                  [c.closed for c in self.made])
        await defer.gatherResults([pool.close() for pool in self.pools])

    def serve(self, factory: _UpstreamFactory) -> bytes:
        """Listen on loopback; the base URL."""
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.factories.append(factory)
        return b"http://127.0.0.1:%d" % port.getHost().port

    def client(self, clock=None, idle: float = 60.0) -> UpstreamClient:
        pool = UpstreamPool(clock if clock is not None else reactor, idle=idle)
        self.pools.append(pool)
        return UpstreamClient(reactor, pool)

    def forward(self, client, request, url: bytes, body: bytes = b"", headers: Optional[Headers] = None, **kw):
        return forward(client, request, url, body, headers if headers is not None else Headers(), **kw)

    async def unanswered(self, **kw) -> tuple:
        """A request to an upstream that never answers, once its head is
        there: ``(client, the forward's Deferred, the upstream's connection)``."""
        factory = _UpstreamFactory()
        base = self.serve(factory)
        client = self.client()
        d = self.forward(client, _Request(), base + b"/a", **kw)
        up, _ = await factory.heads.get()
        return client, d, up

    async def first_chunk(self, request, url: bytes, **kw) -> tuple:
        """Forward ``request`` with a fresh client until its first body piece
        is relayed: ``(the forward's Deferred, that piece)``."""
        first = defer.Deferred()
        d = self.forward(self.client(), request, url, on_chunk=lambda data: first.called or first.callback(data), **kw)
        return d, await first


class KeepAliveTests(_Base):
    async def test_connection_reused(self):
        factory = _UpstreamFactory(OK, b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\nX-Up: 1\r\n\r\nnew")
        base = self.serve(factory)
        client = self.client()
        first, second = _Request(), _Request(b"POST")
        self.assertEqual(await self.forward(client, first, base + b"/a?x=1"), 2)
        self.assertEqual(len(client.pool.parked()), 1)
        self.assertEqual(await self.forward(client, second, base + b"/b", b"{}"), 3)
        self.assertEqual(len(factory.connections), 1)
        self.assertEqual([(r.method, r.url, r.body) for r in factory.connections[0].requests],
                         [(b"GET", b"/a?x=1", b""), (b"POST", b"/b", b"{}")])
        self.assertEqual((first.code, b"".join(first.written)), (200, b"ok"))
        self.assertEqual((second.code, second.phrase, b"".join(second.written)), (201, b"Created", b"new"))
        self.assertEqual(second.responseHeaders.getRawHeaders(b"x-up"), [b"1"])
        self.assertIsNone(second.producer)  # unregistered at the end
        self.assertEqual(len(client.pool.parked()), 1)

    async def _not_reused(self, answer: bytes):
        factory = _UpstreamFactory(answer, OK)
        base = self.serve(factory)
        client = self.client()
        request = _Request()
        self.assertEqual(await self.forward(client, request, base + b"/a"), 2)
        self.assertEqual(client.pool.parked(), [])
        await factory.connections[0].closed  # the client closed it
        await self.forward(client, _Request(), base + b"/b")
        self.assertEqual(len(factory.connections), 2)

    async def test_connection_close_not_reused(self):
        await self._not_reused(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    async def test_http10_not_reused(self):
        await self._not_reused(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def test_request_head_sent(self):
        factory = _UpstreamFactory(OK)
        base = self.serve(factory)
        headers = Headers({b"X-Keep": [b"1", b"2"], b"Host": [b"client"], b"Content-Length": [b"99"],
                           b"Transfer-Encoding": [b"chunked"]})
        await self.forward(self.client(), _Request(b"PUT"), base + b"/p", b"abc", headers)
        (seen,) = factory.connections[0].requests
        port = base.rsplit(b":", 1)[1]
        self.assertEqual(seen.headers, {b"host": [b"127.0.0.1:" + port], b"x-keep": [b"1", b"2"],
                                        b"content-length": [b"3"]})
        self.assertEqual(seen.body, b"abc")


class RetryTests(_Base):
    async def test_stale_connection_retried_on_a_fresh_one(self):
        factory = _UpstreamFactory(OK, lambda up: up.transport.abortConnection(), b"HTTP/1.1 200 OK\r\n"
                                   b"Content-Length: 5\r\n\r\nfresh")
        base = self.serve(factory)
        client = self.client()
        await self.forward(client, _Request(), base + b"/a")
        request = _Request(b"POST")
        self.assertEqual(await self.forward(client, request, base + b"/b", b"body"), 5)
        self.assertEqual(b"".join(request.written), b"fresh")
        self.assertEqual(len(factory.connections), 2)
        self.assertEqual([r.body for r in factory.connections[1].requests], [b"body"])  # sent whole again

    async def test_fresh_connection_not_retried(self):
        factory = _UpstreamFactory(lambda up: up.transport.abortConnection(), OK)
        base = self.serve(factory)
        with self.assertRaises(UpstreamUnavailable):
            await self.forward(self.client(), _Request(), base + b"/a")
        self.assertEqual(len(factory.connections), 1)

    async def test_no_retry_once_a_byte_came(self):
        def partial(up):
            up.transport.write(b"HTTP/1.1 20")
            up.transport.loseConnection()  # after those bytes

        factory = _UpstreamFactory(OK, partial, OK)
        base = self.serve(factory)
        client = self.client()
        await self.forward(client, _Request(), base + b"/a")
        request = _Request()
        with self.assertRaises(UpstreamUnavailable):
            await self.forward(client, request, base + b"/b")
        self.assertEqual(len(factory.connections), 1)
        self.assertEqual((request.code, request.written), (None, []))

    async def test_retried_connection_keeps_its_continue_wait(self):
        """A retry on a fresh connection holds the body for a whole new wait: the
        first attempt's timer must not release it early."""
        clock = Clock()

        def stale(up, seen):
            if up is factory.connections[0] and len(up.requests) == 2:  # the parked one: closed on its 2nd head
                up.transport.abortConnection()

        factory = _UpstreamFactory(OK, OK, on_head=stale, clock=clock)
        base = self.serve(factory)
        client = self.client()
        await self.forward(client, _Request(), base + b"/warm")
        d = self.forward(client, _Request(b"POST"), base + b"/b", b"body", Headers({b"expect": [b"100-continue"]}),
                         clock=clock, expect_continue=3)
        await factory.heads.get()  # /warm
        await factory.heads.get()  # /b on the parked connection: resumes here, before the client sees the close
        clock.advance(2)
        up, seen = await factory.heads.get()  # /b again, on a fresh connection, at t=2: its wait ends at t=5
        self.assertIs(up, factory.connections[1])
        clock.advance(1)  # t=3: the first attempt's wait would have ended here
        self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [5])
        self.assertEqual(up.requests[0].body, b"")
        clock.advance(2)
        self.assertEqual(await d, 2)
        self.assertEqual((seen.body, seen.body_at), (b"body", [5]))


class ResponseTests(_Base):
    async def test_interim_responses_skipped(self):
        factory = _UpstreamFactory(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", OK)
        base = self.serve(factory)
        client = self.client()
        request = _Request()
        self.assertEqual(await self.forward(client, request, base + b"/a"), 2)
        self.assertEqual((request.code, b"".join(request.written)), (200, b"ok"))
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"link"))  # the interim's headers stay there
        await self.forward(client, _Request(), base + b"/b")
        self.assertEqual(len(factory.connections), 1)

    async def test_head_with_length_completes_and_is_reused(self):
        factory = _UpstreamFactory(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", OK)
        base = self.serve(factory)
        client = self.client()
        request = _Request(b"HEAD")
        self.assertEqual(await self.forward(client, request, base + b"/a"), 0)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"10"])
        second = _Request()
        self.assertEqual(await self.forward(client, second, base + b"/b"), 2)
        self.assertEqual(b"".join(second.written), b"ok")
        self.assertEqual(len(factory.connections), 1)

    async def test_204_and_304_without_body(self):
        factory = _UpstreamFactory(b"HTTP/1.1 204 No Content\r\n\r\n",
                                   b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", OK)
        base = self.serve(factory)
        client = self.client()
        no_content, not_modified = _Request(b"DELETE"), _Request()
        self.assertEqual(await self.forward(client, no_content, base + b"/a"), 0)
        self.assertEqual(await self.forward(client, not_modified, base + b"/b"), 0)
        self.assertEqual((no_content.code, not_modified.code), (204, 304))
        self.assertEqual(await self.forward(client, _Request(), base + b"/c"), 2)
        self.assertEqual(len(factory.connections), 1)

    async def test_body_until_close(self):
        def answer(up):
            up.transport.write(b"HTTP/1.1 200 OK\r\n\r\nabc")
            up.transport.write(b"def")
            up.transport.loseConnection()

        factory = _UpstreamFactory(answer)
        base = self.serve(factory)
        client = self.client()
        request = _Request()
        self.assertEqual(await self.forward(client, request, base + b"/a"), 6)
        self.assertEqual(b"".join(request.written), b"abcdef")
        self.assertEqual(client.pool.parked(), [])

    async def test_chunked_response_relayed(self):
        def answer(up):
            up.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n"
                               b"Connection: keep-alive\r\n\r\n5\r\nhello\r\n")
            reactor.callLater(0, up.transport.write, b"6\r\n world\r\n0\r\n\r\n")

        factory = _UpstreamFactory(answer, OK)
        base = self.serve(factory)
        client = self.client()
        request, chunks = _Request(), []
        self.assertEqual(await self.forward(client, request, base + b"/a", on_chunk=chunks.append), 11)
        self.assertEqual(b"".join(request.written), b"hello world")  # de-chunked: the client side re-frames it
        self.assertEqual(b"".join(chunks), b"hello world")
        headers = request.responseHeaders
        self.assertFalse(headers.hasHeader(b"transfer-encoding") or headers.hasHeader(b"connection"))
        self.assertEqual(headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        await self.forward(client, _Request(), base + b"/b")
        self.assertEqual(len(factory.connections), 1)

    async def test_rejected_answer_reaches_nothing(self):
        big = bytes(range(256)) * (REJECT_BODY_LIMIT // 128)  # twice the limit
        factory = _UpstreamFactory(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n%s"
                                   % (len(big), big))
        base = self.serve(factory)
        request = _Request()
        with self.assertRaises(UpstreamRejected) as caught:
            await self.forward(self.client(), request, base + b"/a", reject=lambda code: code >= 500)
        self.assertEqual((caught.exception.head.code, caught.exception.head.phrase), (503, b"Service Unavailable"))
        self.assertEqual(caught.exception.body, big[:REJECT_BODY_LIMIT])
        self.assertEqual((request.code, request.written, request.registrations), (None, [], 0))
        self.assertFalse(request.responseHeaders.hasHeader(b"content-length"))

    async def test_not_rejected_is_relayed(self):
        factory = _UpstreamFactory(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
        base = self.serve(factory)
        request = _Request()
        self.assertEqual(await self.forward(self.client(), request, base + b"/a", reject=lambda code: code >= 500), 2)
        self.assertEqual((request.code, b"".join(request.written)), (404, b"no"))

    async def test_malformed_response_dropped(self):
        factory = _UpstreamFactory(b"HTTP/1.1 OK nonsense\r\n\r\n")
        base = self.serve(factory)
        client = self.client()
        with self.assertRaises(UpstreamUnavailable) as caught:
            await self.forward(client, _Request(), base + b"/a")
        self.assertIn("malformed", str(caught.exception))
        await factory.connections[0].closed
        self.assertEqual(client.pool.parked(), [])

    async def test_malformed_body_is_broke(self):
        factory = _UpstreamFactory(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        base = self.serve(factory)
        request = _Request()
        with self.assertRaises(UpstreamBroke):
            await self.forward(self.client(), request, base + b"/a")
        self.assertEqual((request.code, request.producer), (200, None))
        await factory.connections[0].closed

    async def test_client_gone_before_the_head(self):
        factory = _UpstreamFactory(OK)
        base = self.serve(factory)
        request = _Request()
        request.channel = None
        with self.assertRaises(UpstreamBroke):
            await self.forward(self.client(), request, base + b"/a")
        self.assertEqual((request.code, request.registrations), (None, 0))
        await factory.connections[0].closed


class TimeoutTests(_Base):
    async def test_header_timeout(self):
        clock = Clock()
        client, d, up = await self.unanswered(clock=clock, header_timeout=5)
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.failureResultOf(d, UpstreamTimeout)
        await up.closed  # the upstream connection was dropped
        self.assertEqual(client.pool.parked(), [])

    async def _stalls(self, head: bytes):
        clock = Clock()
        factory = _UpstreamFactory(head + b"abc")
        base = self.serve(factory)
        d, first = await self.first_chunk(_Request(), base + b"/a", clock=clock, body_idle=5)
        self.assertEqual(first, b"abc")
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        with self.assertRaises(UpstreamBodyIdle):
            await d
        await factory.connections[0].closed

    async def test_body_idle(self):
        await self._stalls(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")

    async def test_body_idle_without_length(self):
        """A body that ends with the connection and stalls is not complete
        because the client dropped the stalled connection."""
        await self._stalls(b"HTTP/1.1 200 OK\r\n\r\n")

    async def test_paused_client_is_not_idle(self):
        clock = Clock()
        factory = _UpstreamFactory(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        base = self.serve(factory)
        request = _Request()
        d, _ = await self.first_chunk(request, base + b"/a", clock=clock, body_idle=5)
        request.producer.pauseProducing()
        clock.advance(60)
        self.assertNoResult(d)
        request.producer.resumeProducing()
        factory.connections[0].transport.write(b"def")
        self.assertEqual(await d, 6)


class ContinueTests(_Base):
    HEADERS = {b"expect": [b"100-continue"]}

    async def test_body_sent_on_100(self):
        clock = Clock()
        factory = _UpstreamFactory(OK, clock=clock,
                                   on_head=lambda up, seen: up.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n"))
        base = self.serve(factory)
        request = _Request(b"POST")
        d = self.forward(self.client(), request, base + b"/a", b"body", Headers(self.HEADERS), clock=clock,
                         expect_continue=3)
        self.assertEqual(await d, 2)
        (seen,) = factory.connections[0].requests
        self.assertEqual((seen.body, seen.body_at), (b"body", [0]))  # with no wait on the Clock
        self.assertEqual(seen.headers[b"expect"], [b"100-continue"])
        self.assertEqual(request.code, 200)

    async def test_body_sent_after_the_wait(self):
        clock = Clock()
        factory = _UpstreamFactory(OK, clock=clock)
        base = self.serve(factory)
        d = self.forward(self.client(), _Request(b"POST"), base + b"/a", b"body", Headers(self.HEADERS),
                         clock=clock, expect_continue=3)
        up, seen = await factory.heads.get()
        self.assertEqual(up.received.partition(b"\r\n\r\n")[2], b"")
        clock.advance(2.9)
        self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [3])  # the body still held
        clock.advance(0.1)
        self.assertEqual(await d, 2)
        self.assertEqual((seen.body, seen.body_at), (b"body", [3]))

    async def test_final_status_first_body_never_sent(self):
        clock = Clock()
        factory = _UpstreamFactory(clock=clock, on_head=lambda up, seen: up.transport.write(
            b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 4\r\n\r\nnope"))
        base = self.serve(factory)
        client = self.client()
        request = _Request(b"POST")
        d = self.forward(client, request, base + b"/a", b"body", Headers(self.HEADERS), clock=clock,
                         expect_continue=3)
        self.assertEqual(await d, 4)
        self.assertEqual((request.code, b"".join(request.written)), (417, b"nope"))
        self.assertEqual(clock.getDelayedCalls(), [])  # the wait is over
        up = factory.connections[0]
        await up.closed  # not reused: the upstream still waits for a body that will never come
        self.assertEqual(up.requests[0].body, b"")  # everything the client sent was read by now
        self.assertEqual(client.pool.parked(), [])

    async def test_without_expect_not_held(self):
        clock = Clock()
        factory = _UpstreamFactory(OK, clock=clock)
        base = self.serve(factory)
        await self.forward(self.client(), _Request(b"POST"), base + b"/a", b"body", clock=clock, expect_continue=3)
        self.assertEqual(factory.connections[0].requests[0].body_at, [0])


class BodyTests(_Base):
    async def test_large_body(self):
        body = bytes(range(256)) * (3 * BODY_PIECE // 256) + b"tail"
        factory = _UpstreamFactory(OK)
        base = self.serve(factory)
        self.assertEqual(await self.forward(self.client(), _Request(b"POST"), base + b"/big", body), 2)
        (seen,) = factory.connections[0].requests
        self.assertEqual(seen.headers[b"content-length"], [b"%d" % len(body)])
        self.assertTrue(seen.body == body)

    async def test_early_answer_while_the_body_is_sent_is_not_reused(self):
        """An upstream that answers before reading a big body: the connection
        still carries the rest of the body, so it is not parked for another request."""
        def refuse(up, seen):
            up.transport.pauseProducing()  # reads nothing more: the client's send buffer fills
            up.transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")

        factory = _UpstreamFactory(on_head=refuse)
        base = self.serve(factory)
        client = self.client()
        request = _Request(b"POST")
        self.assertEqual(await self.forward(client, request, base + b"/big", b"x" * (64 * BODY_PIECE)), 0)
        self.assertEqual(request.code, 413)
        self.assertEqual(client.pool.parked(), [])
        await self.made[0].closed


class BackpressureTests(_Base):
    async def test_pausing_the_exchange_pauses_the_upstream(self):
        factory = _UpstreamFactory(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        base = self.serve(factory)
        request = _Request()
        d, _ = await self.first_chunk(request, base + b"/a")
        transport = self.made[0].transport
        self.assertIn(transport, reactor.getReaders())
        request.producer.pauseProducing()
        self.assertNotIn(transport, reactor.getReaders())
        factory.connections[0].transport.write(b"def")
        request.producer.resumeProducing()
        self.assertIn(transport, reactor.getReaders())
        self.assertEqual(await d, 6)
        self.assertEqual(b"".join(request.written), b"abcdef")

    async def test_parked_connection_reads_again(self):
        factory = _UpstreamFactory(OK, OK)
        base = self.serve(factory)
        client = self.client()
        request = _Request(pause_on_write=True)  # the last write fills the client's buffer
        self.assertEqual(await self.forward(client, request, base + b"/a"), 2)
        (parked,) = client.pool.parked()
        self.assertIn(parked.transport, reactor.getReaders())
        self.assertEqual(await self.forward(client, _Request(), base + b"/b"), 2)
        self.assertEqual(len(factory.connections), 1)


class CancelTests(_Base):
    async def test_cancel_aborts_the_upstream_connection(self):
        client, d, up = await self.unanswered()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        await up.closed
        self.assertEqual(client.pool.parked(), [])

    async def test_cancel_mid_body(self):
        factory = _UpstreamFactory(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        base = self.serve(factory)
        request = _Request()
        d, _ = await self.first_chunk(request, base + b"/a")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertIsNone(request.producer)
        await factory.connections[0].closed

    async def test_cancel_while_connecting(self):
        factory = _UpstreamFactory()
        base = self.serve(factory)
        d = self.forward(self.client(), _Request(), base + b"/a")
        d.cancel()
        self.failureResultOf(d, CancelledError)

    async def test_connect_refused(self):
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        with self.assertRaises(UpstreamUnavailable):
            await self.forward(self.client(), _Request(), b"http://127.0.0.1:%d/a" % number)


class PoolTests(_Base):
    async def test_close_closes_parked_connections(self):
        factory = _UpstreamFactory(OK, OK)
        base = self.serve(factory)
        client = self.client()
        await self.forward(client, _Request(), base + b"/a")
        self.assertEqual(len(client.pool.parked()), 1)
        await client.pool.close()
        self.assertEqual(client.pool.parked(), [])
        await factory.connections[0].closed

    async def test_close_with_nothing_parked(self):
        self.assertIsNone(self.successResultOf(UpstreamPool(Clock()).close()))

    async def test_closed_pool_parks_nothing(self):
        client, d, up = await self.unanswered()
        await client.pool.close()  # nothing parked yet: the busy connection is left alone
        up.transport.write(OK)
        self.assertEqual(await d, 2)
        await up.closed
        self.assertEqual(client.pool.parked(), [])

    async def test_idle_connection_closed(self):
        clock = Clock()
        factory = _UpstreamFactory(OK)
        base = self.serve(factory)
        client = self.client(clock=clock, idle=10)
        await self.forward(client, _Request(), base + b"/a")
        clock.advance(9.9)
        self.assertEqual(len(client.pool.parked()), 1)
        clock.advance(0.1)
        await factory.connections[0].closed
        await self.made[0].closed
        self.assertEqual(client.pool.parked(), [])

    async def test_upstream_closing_an_idle_connection(self):
        factory = _UpstreamFactory(OK, OK)
        base = self.serve(factory)
        client = self.client()
        await self.forward(client, _Request(), base + b"/a")
        factory.connections[0].transport.loseConnection()
        await self.made[0].closed
        self.assertEqual(client.pool.parked(), [])  # forgotten
        self.assertEqual(await self.forward(client, _Request(), base + b"/b"), 2)
        self.assertEqual(len(factory.connections), 2)


class _Filling(StringTransport):
    """A send buffer that is full after each write, until resumed (as a TCP
    transport past its ``bufferSize``)."""

    def __init__(self):
        super().__init__()
        self.pieces: list = []

    def write(self, data):
        super().write(data)
        self.pieces.append(len(data))
        if self.producer is not None:
            self.producer.pauseProducing()


class BodySenderTests(SynchronousTestCase):
    """A big request body goes out ``BODY_PIECE`` bytes per reactor turn, paused by the connection."""

    def test_pieces_with_pause(self):
        clock = Clock()
        transport = _Filling()
        body = b"a" * BODY_PIECE + b"b" * BODY_PIECE + b"tail"
        sender = _BodySender(transport, body, clock)
        self.assertIs(transport.producer, sender)
        self.assertEqual(transport.value(), b"")  # nothing in the caller's turn
        clock.advance(0)
        clock.advance(0)
        self.assertEqual(transport.pieces, [BODY_PIECE])  # paused by the full buffer
        sender.resumeProducing()  # drained
        clock.advance(0)
        self.assertEqual(transport.pieces, [BODY_PIECE, BODY_PIECE])
        sender.resumeProducing()
        clock.advance(0)
        self.assertEqual(transport.value(), body)
        self.assertEqual(transport.pieces, [BODY_PIECE, BODY_PIECE, 4])
        self.assertIsNone(transport.producer)  # unregistered once done
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pause_before_the_first_piece(self):
        clock = Clock()
        transport = StringTransport()
        body = b"x" * (BODY_PIECE + 1)
        sender = _BodySender(transport, body, clock)
        sender.pauseProducing()
        clock.advance(0)
        self.assertEqual(transport.value(), b"")
        sender.resumeProducing()
        clock.advance(0)
        self.assertEqual(transport.value(), body)

    def test_stop(self):
        clock = Clock()
        transport = _Filling()
        sender = _BodySender(transport, b"x" * (BODY_PIECE * 3), clock)
        clock.advance(0)
        sender.stopProducing()  # the connection went away
        sender.resumeProducing()
        clock.advance(0)
        self.assertEqual(transport.pieces, [BODY_PIECE])
        self.assertIsNone(transport.producer)


class RequestHeadTests(SynchronousTestCase):
    def test_ipv6_and_default_port(self):
        self.assertTrue(request_head(b"GET", b"/", b"::1", 8080, Headers(), None).startswith(
            b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n"))
        self.assertEqual(request_head(b"POST", b"/x?y", b"h", 80, Headers(), 0),
                         b"POST /x?y HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
