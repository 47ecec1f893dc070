"""Upstream faults and the ``timeouts`` keys, end to end.

The real service on a loopback port; upstreams are real responder children
(crashes, stalls, hangs, ``kill -9``) or in-process loopback servers where a
test must look at the upstream's side of the connection (pooled connections,
socket options, a TLS server that never answers, ``Expect: 100-continue``).
Every wait is bounded; no test sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers

from llamaswap.httpclient import raw_socket
from llamaswap.proxy.stream import BytesProducer, ContinueBody, UpstreamBodyIdle, _Relay
from llamaswap.testing.responder import ResponderOptions, build_site

from .test_e2e import Harness, responder

SLEEPER = "sleep 120"  # a model process for in-process upstreams (checkEndpoint: none)


class _Body(Protocol):
    """Collects a response body; ``first`` fires on the first bytes, ``done`` with the end's reason."""

    def __init__(self):
        self.chunks: list[bytes] = []
        self.first = defer.Deferred()
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.chunks.append(data)
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason):
        self.reason = reason
        self.done.callback(self)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class _Silent(Protocol):
    """Accepts a connection and never says anything (a TLS server that never answers the ClientHello)."""

    def connectionMade(self):
        self.factory.opened += 1

    def connectionLost(self, reason):
        self.factory.closed += 1


class _ExpectServer(Protocol):
    """Raw HTTP/1.1: records how long after the request head its body came, answers 200 JSON.

    With ``factory.send_continue`` it answers ``100 Continue`` to the head at once."""

    def connectionMade(self):
        self.buf = b""
        self.head = None

    def dataReceived(self, data):
        self.buf += data
        now = reactor.seconds()
        while True:
            if self.head is None:
                if b"\r\n\r\n" not in self.buf:
                    return
                self.head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                self.head_at = now
                self.body_at = now if self.buf else None
                self.length = int(re.search(rb"(?im)^content-length:\s*(\d+)", self.head).group(1))
                if self.factory.send_continue:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if self.buf and self.body_at is None:
                self.body_at = now
            if len(self.buf) < self.length:
                return
            expect = re.search(rb"(?im)^expect:\s*100-continue", self.head) is not None
            self.factory.seen.append((expect, self.body_at - self.head_at))
            self.buf = self.buf[self.length:]
            self.head = None
            body = b'{"ok":true}'
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class FaultHarness(Harness):
    timeout = 20

    def listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def responder_site(self, ident: str, **options):
        """An in-process responder on its own loopback port: ``(site, port)``."""
        site = build_site(ResponderOptions(id=ident, silent=True, **options), reactor)
        return site, self.listen(site)

    @defer.inlineCallbacks
    def open_stream(self, model, **extra):
        """POST a streaming chat; returns (response, _Body) once the head is in."""
        agent = Agent(reactor, pool=self.pool)
        body = json.dumps(dict({"model": model, "messages": [], "stream": True}, **extra)).encode()
        response = yield agent.request(b"POST", (self.base + "/v1/chat/completions").encode(),
                                       Headers({b"content-type": [b"application/json"]}), BytesProducer(body))
        collector = _Body()
        response.deliverBody(collector)
        return response, collector

    @defer.inlineCallbacks
    def activity(self, model, predicate):
        """The activity rows of ``model`` once one satisfies ``predicate``."""
        def rows():
            return self.get(f"/api/metrics/activity?model={model}").addCallback(
                lambda rb: [r for r in json.loads(rb[1])["data"] if predicate(r)])

        found = yield self.wait_for(rows)
        return found

    def in_flight(self, model) -> int:
        return self.runtime.router.scheduler.in_flight(model)

    def assertIncomplete(self, reason):
        self.assertFalse(reason.check(ResponseDone), f"response ended complete: {reason}")


class UpstreamFaultTests(FaultHarness):
    @defer.inlineCallbacks
    def test_upstream_dies_mid_stream(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--die-after-tokens 3 --tokens 50 --token-delay 0.02')}"}}
        """)
        response, body = yield self.open_stream("A")
        self.assertEqual(response.code, 200)
        old_pid = self.runtime.processes["A"].pid
        started = reactor.seconds()
        yield body.done.addTimeout(5, reactor)
        self.assertLess(reactor.seconds() - started, 3)
        self.assertIncomplete(body.reason)
        self.assertIn(b"chat.completion.chunk", body.data)  # some tokens came through
        self.assertNotIn(b"[DONE]", body.data)
        yield self.wait_for(lambda: self.in_flight("A") == 0)
        rows = yield self.activity("A", lambda r: r["resp_status_code"] == 502)
        self.assertIn("upstream response failed", rows[0]["error_msg"])
        # the next request starts the model again
        response, body = yield self.chat("A")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["responseMessage"], "A")
        self.assertNotEqual(self.runtime.processes["A"].pid, old_pid)
        self.assertEqual(self.starts, ["A", "A"])

    @defer.inlineCallbacks
    def test_upstream_hangs_before_headers(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--hang-before-headers')}", timeouts: {{responseHeader: 1}}}}
        """)
        started = reactor.seconds()
        response, body = yield self.chat("A")  # the first request also waits for the start
        self.assertEqual(response.code, 504)
        self.assertIn("upstream timed out", json.loads(body)["error"]["message"])
        started = reactor.seconds()
        response, body = yield self.chat("A")
        self.assertEqual(response.code, 504)
        self.assertTrue(0.9 <= reactor.seconds() - started < 2.5)
        self.assertEqual(self.in_flight("A"), 0)
        # the upstream saw both requests and both connections dropped
        _, stats = yield self.get("/upstream/A/__responder/stats")
        self.assertEqual(json.loads(stats)["cancelled"], 2)

    @defer.inlineCallbacks
    def test_stall_mid_body_with_body_idle(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--stall-after 2 --tokens 50')}", timeouts: {{bodyIdle: 1}}}}
        """)
        response, body = yield self.open_stream("A")
        self.assertEqual(response.code, 200)
        yield body.first
        started = reactor.seconds()
        yield body.done.addTimeout(5, reactor)
        self.assertLess(reactor.seconds() - started, 2.0)  # bodyIdle + 1 s
        self.assertIncomplete(body.reason)
        self.assertIn(b"chat.completion.chunk", body.data)
        yield self.wait_for(lambda: self.in_flight("A") == 0)
        self.assertEqual(self.service.inflight.entries, {})
        rows = yield self.activity("A", lambda r: r["resp_status_code"] == 504)
        self.assertIn("timeouts.bodyIdle", rows[0]["error_msg"])
        _, metrics = yield self.get("/metrics")
        self.assertRegex(metrics.decode(), r'llamaswap_requests_total\{[^}]*status="504"[^}]*\} 1')
        # the upstream's connection was dropped, the model still serves
        _, stats = yield self.get("/upstream/A/__responder/stats")
        self.assertEqual(json.loads(stats)["cancelled"], 1)
        response, body = yield self.chat("A")
        self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "A"))
        self.assertEqual(self.starts, ["A"])

    @defer.inlineCallbacks
    def test_body_idle_before_the_first_byte_is_504(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--stall-after 0')}", timeouts: {{bodyIdle: 1}}}}
        """)
        yield self.chat("A")  # started (non-streaming requests are not cut)
        started = reactor.seconds()
        response, body = yield self.post("/v1/chat/completions", {"model": "A", "stream": True})
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertEqual(response.code, 504)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        # none of the upstream's headers (they were copied before it stalled) on our own error
        self.assertIsNone(response.headers.getRawHeaders("x-accel-buffering"))
        self.assertIsNone(response.headers.getRawHeaders("cache-control"))
        self.assertIn("timeouts.bodyIdle", json.loads(body)["error"]["message"])
        rows = yield self.activity("A", lambda r: r["resp_status_code"] == 504)
        self.assertIn("timeouts.bodyIdle", rows[0]["error_msg"])
        self.assertEqual(self.in_flight("A"), 0)

    @defer.inlineCallbacks
    def test_body_idle_off_by_default(self):
        """Without bodyIdle a slow token (here 1.2 s) is simply waited for."""
        self.start(f"""
            models:
              A: {{cmd: "{responder('--tokens 2 --token-delay 0.6')}"}}
        """)
        response, body = yield self.open_stream("A")
        yield body.done.addTimeout(10, reactor)
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertIn(b"[DONE]", body.data)

    @defer.inlineCallbacks
    def test_kill_9_under_load(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--tokens 500 --token-delay 0.02')}"}}
        """)
        streams = []
        for _ in range(4):
            streams.append((yield self.open_stream("A")))
        yield defer.gatherResults([body.first for _, body in streams]).addTimeout(5, reactor)
        self.assertEqual(self.in_flight("A"), 4)
        old_pid = self.runtime.processes["A"].pid
        os.killpg(old_pid, signal.SIGKILL)
        started = reactor.seconds()
        yield defer.gatherResults([body.done for _, body in streams]).addTimeout(5, reactor)
        self.assertLess(reactor.seconds() - started, 3)
        for _, body in streams:
            self.assertIncomplete(body.reason)
        yield self.wait_for(lambda: self.in_flight("A") == 0)
        self.assertEqual(self.service.inflight.entries, {})
        rows = yield self.activity("A", lambda r: r["resp_status_code"] == 502)
        if len(rows) < 4:  # rows are stored asynchronously
            yield self.wait_for(lambda: self.activity("A", lambda r: r["resp_status_code"] == 502).addCallback(
                lambda found: len(found) == 4))
        response, body = yield self.chat("A")
        self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "A"))
        self.assertNotEqual(self.runtime.processes["A"].pid, old_pid)


class TimeoutKeyTests(FaultHarness):
    """Every ``timeouts`` key has an effect."""

    @defer.inlineCallbacks
    def test_idle_conn_closes_pooled_connections(self):
        site_a, port_a = self.responder_site("A")
        site_b, port_b = self.responder_site("B")
        self.start(f"""
            models:
              A: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_a}", checkEndpoint: none,
                  timeouts: {{idleConn: 1}}}}
              B: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_b}", checkEndpoint: none,
                  timeouts: {{idleConn: 60}}}}
            groups:
              both: {{swap: false, members: [A, B]}}
        """)
        for model in ("A", "B"):
            response, _ = yield self.chat(model)
            self.assertEqual(response.code, 200)
        self.assertEqual((site_a.responder.connections, site_b.responder.connections), (1, 1))  # pooled
        self.assertEqual(len(self.runtime.pools), 2)  # one per distinct setting
        started = reactor.seconds()
        yield self.wait_for(lambda: site_a.responder.connections == 0, timeout=5)
        self.assertGreater(reactor.seconds() - started, 0.7)
        self.assertEqual(site_b.responder.connections, 1)
        # a later request simply opens a new connection
        response, _ = yield self.chat("A")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_keepalive_sets_tcp_keepalive_on_upstream_sockets(self):
        _, port_a = self.responder_site("A")
        _, port_b = self.responder_site("B")
        self.start(f"""
            models:
              A: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_a}", checkEndpoint: none,
                  timeouts: {{keepalive: 7}}}}
              B: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_b}", checkEndpoint: none,
                  timeouts: {{keepalive: 0}}}}
            groups:
              both: {{swap: false, members: [A, B]}}
        """)
        for model in ("A", "B"):
            yield self.chat(model)

        def upstream_socket(model):
            t = self.runtime.config.models[model].timeouts
            pool = self.runtime.pools[(True, t.idle_conn, t.keepalive, t.tls_handshake)]  # plain http: lean
            [connection] = pool.parked()
            return raw_socket(connection.transport)

        a, b = upstream_socket("A"), upstream_socket("B")
        self.assertEqual(a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            self.assertEqual(a.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 7)
        if hasattr(socket, "TCP_KEEPINTVL"):
            self.assertEqual(a.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), 7)
        self.assertEqual(b.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)

    @defer.inlineCallbacks
    def test_tls_handshake_bound(self):
        silent = Factory.forProtocol(_Silent)
        silent.opened = silent.closed = 0
        port = self.listen(silent)
        self.start(f"""
            models:
              A: {{cmd: "{SLEEPER}", proxy: "https://127.0.0.1:{port}", checkEndpoint: none,
                  timeouts: {{tlsHandshake: 1}}}}
        """)
        started = reactor.seconds()
        response, body = yield self.chat("A")
        elapsed = reactor.seconds() - started
        self.assertIn(response.code, (502, 504))
        self.assertIn("upstream", json.loads(body)["error"]["message"])
        self.assertTrue(0.9 <= elapsed < 2.5, elapsed)
        yield self.wait_for(lambda: silent.closed == silent.opened == 1)
        self.assertEqual(self.in_flight("A"), 0)

    @defer.inlineCallbacks
    def test_expect_continue(self):
        def server(send_continue):
            factory = Factory.forProtocol(_ExpectServer)
            factory.send_continue, factory.seen = send_continue, []
            return factory, self.listen(factory)

        waits, port_w = server(False)
        answers, port_a = server(True)
        off, port_o = server(False)
        self.start(f"""
            models:
              W: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_w}", checkEndpoint: none,
                  timeouts: {{expectContinue: 1}}}}
              C: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_a}", checkEndpoint: none,
                  timeouts: {{expectContinue: 10}}}}
              O: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_o}", checkEndpoint: none,
                  timeouts: {{expectContinue: 0}}}}
            groups:
              all: {{swap: false, members: [W, C, O]}}
        """)
        expect = {"Expect": "100-continue"}
        for model in ("W", "C", "O"):
            response, body = yield self.post("/v1/chat/completions", {"model": model}, headers=dict(expect))
            self.assertEqual((response.code, json.loads(body)), (200, {"ok": True}))
        # no 100 Continue from the upstream: the body waited expectContinue
        [(sent, waited)] = waits.seen
        self.assertTrue(sent)
        self.assertTrue(0.9 <= waited < 2.0, waited)
        # the upstream said 100 Continue: the body went at once
        [(sent, waited)] = answers.seen
        self.assertTrue(sent)
        self.assertLess(waited, 0.5)
        # expectContinue 0: the body goes with the head
        [(sent, waited)] = off.seen
        self.assertLess(waited, 0.5)
        # a request without Expect never waits
        response, _ = yield self.post("/v1/chat/completions", {"model": "W"})
        sent, waited = waits.seen[1]
        self.assertFalse(sent)
        self.assertLess(waited, 0.5)

    @defer.inlineCallbacks
    def test_connect_timeout(self):
        """A listener whose accept queue is full drops SYNs: the connect is bounded by ``connect``."""
        if not sys.platform.startswith("linux"):
            raise SkipTest("relies on Linux dropping SYNs to a full accept queue")
        full = socket.socket()
        self.addCleanup(full.close)
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(full.getsockname())
            fillers.append(s)
            self.addCleanup(s.close)
        self.start(f"""
            models:
              A: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{full.getsockname()[1]}", checkEndpoint: none,
                  timeouts: {{connect: 1}}}}
        """)
        started = reactor.seconds()
        response, body = yield self.chat("A")
        elapsed = reactor.seconds() - started
        self.assertEqual(response.code, 502)
        self.assertIn("upstream not reachable", json.loads(body)["error"]["message"])
        self.assertTrue(0.9 <= elapsed < 2.5, elapsed)


class _FakeRequest:
    channel = object()

    def __init__(self):
        self.written: list[bytes] = []

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.written.append(data)


class _FakeTransport:
    def __init__(self):
        self.calls: list[str] = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


class RelayIdleTests(SynchronousTestCase):
    """bodyIdle in the relay, on a Clock."""

    def relay(self, idle):
        clock, done = task.Clock(), defer.Deferred()
        relay = _Relay(_FakeRequest(), done, None, clock, idle)
        transport = _FakeTransport()
        relay.makeConnection(transport)
        return clock, done, relay, transport

    def test_silence_drops_the_upstream_and_fails(self):
        clock, done, relay, transport = self.relay(2)
        clock.advance(1.5)
        relay.dataReceived(b"x")  # a byte restarts the wait
        clock.advance(1.5)
        self.assertEqual(transport.calls, [])
        clock.advance(0.5)
        self.assertEqual(transport.calls, ["stop"])
        relay.connectionLost(None)
        self.failureResultOf(done, UpstreamBodyIdle)

    def test_a_slow_client_is_not_an_idle_upstream(self):
        clock, done, relay, transport = self.relay(2)
        relay.pauseProducing()
        clock.advance(60)
        self.assertEqual(transport.calls, ["pause"])
        relay.resumeProducing()
        clock.advance(1.9)
        self.assertEqual(transport.calls, ["pause", "resume"])
        clock.advance(0.1)
        self.assertEqual(transport.calls, ["pause", "resume", "stop"])

    def test_off_by_default(self):
        clock, done, relay, transport = self.relay(0)
        clock.advance(3600)
        self.assertEqual((transport.calls, clock.getDelayedCalls()), ([], []))
        relay.connectionLost(None)
        self.assertEqual(self.successResultOf(done), 0)


class _Consumer:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


class ContinueBodyTests(SynchronousTestCase):
    """expectContinue: the body waits for the upstream's first answer or the timeout."""

    def test_timeout_sends_the_body(self):
        clock, consumer = task.Clock(), _Consumer()
        d = ContinueBody(b"body", clock, 1).startProducing(consumer)
        clock.advance(0.9)
        self.assertEqual(consumer.data, b"")
        clock.advance(0.1)
        self.assertEqual(consumer.data, b"body")
        self.successResultOf(d)

    def test_first_upstream_bytes_send_the_body(self):
        clock, consumer = task.Clock(), _Consumer()
        protocol = type("P", (), {"on_first_data": None})()
        body = ContinueBody(b"body", clock, 5)
        body.bind_protocol(protocol)
        d = body.startProducing(consumer)
        protocol.on_first_data()
        self.assertEqual(consumer.data, b"body")
        self.successResultOf(d)
        self.assertEqual((protocol.on_first_data, clock.getDelayedCalls()), (None, []))

    def test_stopped_never_writes(self):
        clock, consumer = task.Clock(), _Consumer()
        body = ContinueBody(b"body", clock, 1)
        d = body.startProducing(consumer)
        body.stopProducing()
        clock.advance(5)
        self.assertEqual(consumer.data, b"")
        self.assertNoResult(d)
