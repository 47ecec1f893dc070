"""The streaming relay against a real responder on loopback."""

from __future__ import annotations

import json

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from llamaswap.proxy.stream import UpstreamUnavailable, forward, make_agent, upstream_headers
from llamaswap.testing.responder import ResponderOptions, build_site

from .test_e2e import wait_until


class _ProxyResource(Resource):
    isLeaf = True

    def __init__(self, agent, upstream: str):
        super().__init__()
        self.agent = agent
        self.upstream = upstream
        self.errors: list = []

    def render(self, request):
        body = request.content.read()
        headers = upstream_headers(request.requestHeaders, request.getClientAddress().host.encode(), b"http",
                                   request.getHeader(b"host"))
        d = forward(self.agent, request, (self.upstream + request.uri.decode()).encode(), body, headers)

        def finished(_):
            if not request._disconnected:
                request.finish()

        def failed(f):
            if f.check(defer.CancelledError):
                return
            self.errors.append(f.value)
            request.setResponseCode(502)
            request.write(b"bad gateway")
            request.finish()

        d.addCallbacks(finished, failed)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET


class _Chunks(Protocol):
    def __init__(self, stop_after=None):
        self.chunks = []
        self.done = defer.Deferred()
        self.first = defer.Deferred()
        self.stop_after = stop_after

    def dataReceived(self, data):
        self.chunks.append(data)
        if not self.first.called:
            self.first.callback(None)
        if self.stop_after and len(self.chunks) >= self.stop_after:
            self.transport.stopProducing()

    def connectionLost(self, reason):
        self.reason = reason
        if not self.done.called:
            self.done.callback(None)


class StreamTests(TestCase):
    timeout = 20

    def setUp(self):
        self.responder_site = build_site(ResponderOptions(id="up", tokens=20, token_delay=0.02, silent=True), reactor)
        self.upstream_port = reactor.listenTCP(0, self.responder_site, interface="127.0.0.1")
        self.addCleanup(self.upstream_port.stopListening)
        self.agent, self.pool = make_agent(reactor)
        self.addCleanup(self.pool.closeCachedConnections)
        up = f"http://127.0.0.1:{self.upstream_port.getHost().port}"
        self.proxy = _ProxyResource(self.agent, up)
        self.proxy_port = reactor.listenTCP(0, Site(self.proxy), interface="127.0.0.1")
        self.addCleanup(self.proxy_port.stopListening)
        self.client_pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = Agent(reactor, pool=self.client_pool)
        self.base = f"http://127.0.0.1:{self.proxy_port.getHost().port}"

    def post(self, path, obj):
        from llamaswap.proxy.stream import BytesProducer

        return self.client.request(b"POST", (self.base + path).encode(),
                                   Headers({b"content-type": [b"application/json"]}),
                                   BytesProducer(json.dumps(obj).encode()))

    @defer.inlineCallbacks
    def test_streams_chunk_by_chunk(self):
        response = yield self.post("/v1/chat/completions", {"model": "up", "stream": True})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        collector = _Chunks()
        response.deliverBody(collector)
        yield collector.done
        self.assertTrue(collector.reason.check(ResponseDone))
        self.assertGreater(len(collector.chunks), 5)  # arrived as generated, not buffered
        body = b"".join(collector.chunks)
        self.assertIn(b"data: [DONE]", body)

    @defer.inlineCallbacks
    def test_echo_sees_forwarded_headers(self):
        response = yield self.post("/anything?x=1", {"model": "up"})
        collector = _Chunks()
        response.deliverBody(collector)
        yield collector.done
        echo = json.loads(b"".join(collector.chunks))
        self.assertEqual(echo["path"], "/anything")
        self.assertEqual(echo["query"], "x=1")
        self.assertEqual(echo["headers"]["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(echo["headers"]["x-forwarded-proto"], "http")
        self.assertEqual(json.loads(echo["body"]), {"model": "up"})

    @defer.inlineCallbacks
    def test_client_disconnect_cancels_upstream(self):
        response = yield self.post("/v1/chat/completions", {"model": "up", "stream": True})
        collector = _Chunks(stop_after=2)
        response.deliverBody(collector)
        yield collector.done
        responder = self.responder_site.responder
        yield wait_until(self, lambda: responder.cancelled >= 1, timeout=2)
        self.assertEqual(responder.cancelled, 1)

    @defer.inlineCallbacks
    def test_upstream_down_is_unavailable(self):
        self.proxy.upstream = "http://127.0.0.1:1"
        response = yield self.post("/v1/chat/completions", {"model": "up"})
        self.assertEqual(response.code, 502)
        collector = _Chunks()
        response.deliverBody(collector)
        yield collector.done
        self.assertIsInstance(self.proxy.errors[0], UpstreamUnavailable)


class ChunkedBodyTests(SynchronousTestCase):
    """A large request body goes upstream a chunk per reactor turn, paused by the connection."""

    def test_small_body_at_once(self):
        from twisted.internet.task import Clock
        from llamaswap.proxy.stream import BytesProducer

        written = []

        class Consumer:
            write = written.append

        d = BytesProducer(b"abc", Clock()).startProducing(Consumer())
        self.assertEqual(written, [b"abc"])
        self.assertIsNone(self.successResultOf(d))

    def test_large_body_in_chunks_with_pause(self):
        from twisted.internet.task import Clock
        from llamaswap.proxy.stream import BytesProducer

        clock = Clock()
        body = bytes(range(256)) * (BytesProducer.CHUNK // 256) * 3 + b"tail"
        producer = BytesProducer(body, clock)
        written = []

        class Consumer:
            def write(self, data):
                written.append(data)
                if len(written) == 2:
                    producer.pauseProducing()  # the transport's buffer is full

        d = producer.startProducing(Consumer())
        self.assertEqual(written, [])  # nothing in the caller's turn
        clock.advance(0)
        self.assertEqual(len(written), 2)
        clock.advance(0)
        self.assertEqual(len(written), 2)  # paused: nothing more
        self.assertNoResult(d)
        producer.resumeProducing()
        for _ in range(5):
            clock.advance(0)
        self.assertEqual(b"".join(written), body)
        self.assertTrue(all(len(c) <= BytesProducer.CHUNK for c in written))
        self.assertIsNone(self.successResultOf(d))

    def test_stop_never_fires(self):
        from twisted.internet.task import Clock
        from llamaswap.proxy.stream import BytesProducer

        clock = Clock()
        producer = BytesProducer(b"x" * (BytesProducer.CHUNK * 2 + 1), clock)
        written = []

        class Consumer:
            def write(self, data):
                written.append(data)
                producer.stopProducing()  # the connection went away

        d = producer.startProducing(Consumer())
        for _ in range(5):
            clock.advance(0)
        self.assertEqual(len(written), 1)
        self.assertNoResult(d)

    def test_abandoned_request_writes_nothing_more(self):
        """Cancelling the request (client gone, header timeout) while a chunk is
        due must not write into the finished request (ExcessWrite from a timer)."""
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport
        from twisted.web.client import HTTP11ClientProtocol
        from twisted.web._newclient import Request
        from llamaswap.proxy.stream import BytesProducer

        class PausingTransport(StringTransport):
            def write(self, data):
                super().write(data)
                if self.producer is not None and len(data) > 65536:
                    self.producer.pauseProducing()

        clock = Clock()
        protocol = HTTP11ClientProtocol()
        transport = PausingTransport()
        protocol.makeConnection(transport)
        producer = BytesProducer(b"x" * (3 << 20), clock)
        d = protocol.request(Request(b"POST", b"/", Headers({b"host": [b"x"]}), producer, persistent=True))
        failures: list = []
        d.addErrback(failures.append)
        clock.advance(0)
        written = len(transport.value())
        producer.resumeProducing()  # the transport drained: a chunk is due
        d.cancel()
        clock.advance(0)  # raised ExcessWrite before the fix
        self.assertEqual(len(transport.value()), written)
        self.assertEqual(len(failures), 1)


class _FailingHeadResource(_ProxyResource):
    """Forwards, but its ``on_headers`` observer raises."""

    def render(self, request):
        def on_headers(response):
            raise ValueError("observer broke")

        body = request.content.read()
        headers = upstream_headers(request.requestHeaders, b"127.0.0.1", b"http", request.getHeader(b"host"))
        d = forward(self.agent, request, (self.upstream + request.uri.decode()).encode(), body, headers,
                    on_headers=on_headers, write_head=False)

        def failed(f):
            self.errors.append(f.value)
            request.setResponseCode(502)
            request.finish()

        d.addErrback(failed)
        return NOT_DONE_YET


class FailedHeadTests(TestCase):
    """A failure while the upstream's head is handled drops the upstream
    connection (through ``deliverBody``: a response has no public transport)."""

    timeout = 20

    def setUp(self):
        self.responder_site = build_site(ResponderOptions(id="up", tokens=50, token_delay=0.02, silent=True), reactor)
        self.upstream_port = reactor.listenTCP(0, self.responder_site, interface="127.0.0.1")
        self.addCleanup(self.upstream_port.stopListening)
        self.agent, self.pool = make_agent(reactor)
        self.addCleanup(self.pool.closeCachedConnections)
        self.proxy = _FailingHeadResource(self.agent, f"http://127.0.0.1:{self.upstream_port.getHost().port}")
        self.proxy_port = reactor.listenTCP(0, Site(self.proxy), interface="127.0.0.1")
        self.addCleanup(self.proxy_port.stopListening)
        self.client_pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = Agent(reactor, pool=self.client_pool)

    @defer.inlineCallbacks
    def test_upstream_dropped_and_failure_reported(self):
        from llamaswap.proxy.stream import BytesProducer

        url = f"http://127.0.0.1:{self.proxy_port.getHost().port}/v1/chat/completions".encode()
        response = yield self.client.request(b"POST", url, Headers({b"content-type": [b"application/json"]}),
                                             BytesProducer(json.dumps({"model": "up", "stream": True}).encode()))
        self.assertEqual(response.code, 502)
        collector = _Chunks()
        response.deliverBody(collector)
        yield collector.done
        self.assertEqual([type(e) for e in self.proxy.errors], [ValueError])
        responder = self.responder_site.responder
        # the upstream sees its client go away long before its 50 tokens are out
        yield wait_until(self, lambda: responder.cancelled >= 1, timeout=2)
        self.assertEqual(responder.cancelled, 1)
