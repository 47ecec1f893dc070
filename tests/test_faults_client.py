"""Client faults: misbehaving and hostile clients, and an activity store that cannot write.

Each test starts the real service in-process on a loopback port (``tests.test_e2e.Harness``)
with fake-upstream models as real children, does what a good client would not, and checks
that everyone else is still served promptly and that the proxy holds no unbounded memory.
The figures measured are printed.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sqlite3

import psutil
from twisted.internet import defer, reactor, task, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from llamaswap.activity.store import ActivityEntry, ActivityStore, _insert, _open
from llamaswap.config import ConfigError, load_config_text
from llamaswap.server.access import AccessLogSite
from tests.test_e2e import Harness, responder

MiB = 1024 * 1024
PROMPT = 2.0  # seconds a normal request may take while the faults go on


class RawClient(Protocol):
    """Writes ``payload`` once connected (then half-closes if asked) and keeps what comes back."""

    def __init__(self, payload: bytes = b"", close_after: bool = False):
        self.payload = payload
        self.close_after = close_after
        self.received = b""
        self.reason = None
        self._waiters: list = []

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)
        if self.close_after:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.reason = reason
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def when_lost(self, timeout: float) -> defer.Deferred:
        """Fires with True once the connection is closed, False if still open after ``timeout``."""
        d = defer.Deferred()
        if self.reason is not None:
            d.callback(True)
            return d
        inner = defer.Deferred()
        self._waiters.append(inner)
        timer = reactor.callLater(timeout, lambda: d.called or d.callback(False))

        def lost(_):
            if timer.active():
                timer.cancel()
            if not d.called:
                d.callback(True)

        inner.addCallback(lost)
        return d


def status_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


class ClientFaults(Harness):
    timeout = 40

    def start(self, yaml_text: str):
        service = super().start(yaml_text)
        self.port = int(self.base.rsplit(":", 1)[1])
        self.proxy_lines: list = []
        self.addCleanup(self.service.hub.proxy.subscribe(self.proxy_lines.append))
        self.raw_clients: list = []
        self.addCleanup(self.hang_up)  # before the service stops
        return service

    # -- raw connections -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def connect(self, payload: bytes = b"", close_after: bool = False):
        proto = RawClient(payload, close_after)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), proto)
        proto.local_port = proto.transport.getHost().port
        self.raw_clients.append(proto)
        return proto

    @defer.inlineCallbacks
    def hang_up(self):
        """Close the raw clients and wait (bounded) until the proxy's ends are gone as well."""
        for proto in self.raw_clients:
            if proto.reason is None:
                proto.transport.abortConnection()
        yield defer.gatherResults([proto.when_lost(5) for proto in self.raw_clients])
        ports = {proto.local_port for proto in self.raw_clients}
        yield self.wait_for(lambda: not ports & set(self.server_ends()), timeout=5)

    def server_end(self, client_port: int):
        """The proxy's transport of the connection from ``client_port`` (None once closed)."""
        return self.server_ends().get(client_port)

    @staticmethod
    def server_ends() -> dict:
        """The proxy's (and the responders') accepted connections by peer port."""
        return {s.getPeer().port: s for s in set(reactor.getReaders()) | set(reactor.getWriters())
                if isinstance(s, tcp.Server)}

    @staticmethod
    def buffered(transport) -> int:
        """Bytes waiting in a transport's user-space write buffer."""
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen

    @defer.inlineCallbacks
    def exchange(self, payload: bytes, timeout: float = 5.0):
        """Send ``payload`` on a fresh connection: (bytes received, whether the proxy closed it)."""
        proto = yield self.connect(payload)
        closed = yield proto.when_lost(timeout)
        return proto.received, closed

    # -- the others ----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def timed_chat(self, model: str = "A"):
        started = reactor.seconds()
        response, body = yield self.chat(model, max_tokens=3)
        return response.code, reactor.seconds() - started

    @defer.inlineCallbacks
    def assert_serving(self, rounds: int = 5, model: str = "A", parallel: int = 1):
        """``rounds`` x ``parallel`` chat requests all answer 200 within PROMPT s; their durations."""
        times = []
        for _ in range(rounds):
            results = yield defer.gatherResults([self.timed_chat(model) for _ in range(parallel)])
            for code, took in results:
                self.assertEqual(code, 200)
                self.assertLess(took, PROMPT)
                times.append(took)
        return times

    @defer.inlineCallbacks
    def upstream_stats(self, model: str = "A"):
        _, body = yield self.get(f"/upstream/{model}/__responder/stats")
        return json.loads(body)

    def relayed(self):
        """Response bytes relayed so far for the one request in flight (None: it ended)."""
        requests = self.service.inflight.snapshot().get("requests", [])
        return requests[0]["resp_bytes"] if len(requests) == 1 else None

    @defer.inlineCallbacks
    def settle(self, value, quiet: float = 0.5, timeout: float = 15.0):
        """Wait until ``value()`` stays the same for ``quiet`` seconds; returns it."""
        last, since = value(), reactor.seconds()
        give_up = since + timeout
        while reactor.seconds() < give_up:
            yield task.deferLater(reactor, 0.1, lambda: None)
            now = value()
            if now != last:
                last, since = now, reactor.seconds()
            elif reactor.seconds() - since >= quiet:
                return now
        self.fail(f"never settled (last value {last!r})")


STREAM_MODEL = f"""
    models:
      A: {{cmd: "{responder()}", concurrencyLimit: 4}}
"""
# a stream this long would be about 300 MB if it were all generated
NEVER_READ_TOKENS = 2_000_000


def stuck_request(max_tokens: int = NEVER_READ_TOKENS) -> bytes:
    body = json.dumps({"model": "A", "stream": True, "messages": [], "max_tokens": max_tokens}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class NeverReadingClientTests(ClientFaults):
    def stuck_client(self) -> socket.socket:
        """A raw socket that sends a long streaming request, then never reads."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up quickly
        sock.connect(("127.0.0.1", self.port))  # loopback: the kernel completes it at once
        sock.sendall(stuck_request())  # a few hundred bytes: fits the socket buffer
        self.addCleanup(sock.close)
        return sock

    @defer.inlineCallbacks
    def test_backpressure_pauses_the_upstream(self):
        """A client that never reads a long stream: the upstream is paused, the proxy buffers
        only a bounded amount, and the model's other clients keep getting answers."""
        self.start(STREAM_MODEL)
        yield self.chat("A")
        rss_before = psutil.Process().memory_info().rss
        sock = self.stuck_client()
        yield self.wait_for(lambda: self.relayed())
        relayed = yield self.settle(self.relayed)
        self.assertIsNotNone(relayed, "the stream ended: the proxy took all of it")
        stats = yield self.upstream_stats()
        self.assertGreater(stats["paused"], 0)  # the responder saw its writes held back
        server_end = self.server_end(sock.getsockname()[1])
        self.assertIsNotNone(server_end)
        held = self.buffered(server_end)
        # Twisted pauses its producer once 64 KiB wait; at most one upstream read comes on top
        self.assertLess(held, 1 * MiB)
        self.assertLess(relayed, 32 * MiB)  # kernel socket buffers, not the ~300 MB stream

        times = yield self.assert_serving(rounds=5)
        times += yield self.assert_serving(rounds=3, parallel=3)  # the three slots left
        self.assertEqual(self.relayed(), relayed)  # still paused
        rss_growth = psutil.Process().memory_info().rss - rss_before
        self.assertLess(rss_growth, 64 * MiB)
        print(f"\nnever-reading client: {relayed / MiB:.2f} MiB relayed then paused, "
              f"{held / 1024:.0f} KiB held in the proxy's write buffer, responder paused "
              f"{stats['paused']}x, RSS growth {rss_growth / MiB:.1f} MiB (in-process), "
              f"other requests max {max(times) * 1000:.0f} ms")

        sock.close()  # the client goes away: the request ends, the upstream stops
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("A") == 0)
        yield self.wait_for(lambda: self.upstream_stats().addCallback(lambda s: s["cancelled"] >= 1))

    @defer.inlineCallbacks
    def test_send_timeout_drops_a_client_that_never_reads(self):
        """The model's only slot is not held for ever by a client that stopped reading."""
        self.patch(AccessLogSite, "send_timeout", 1.0)
        self.start(f"""
            models:
              A: {{cmd: "{responder()}", concurrencyLimit: 1}}
        """)
        yield self.chat("A")
        started = reactor.seconds()
        self.stuck_client()
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("A") == 1)
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("A") == 0, timeout=10)
        dropped = reactor.seconds() - started
        self.assertLess(dropped, 1.0 + 3.0)
        stats = yield self.wait_for(lambda: self.upstream_stats().addCallback(
            lambda s: s if s["cancelled"] >= 1 else None))
        self.assertGreater(stats["paused"], 0)
        code, _ = yield self.timed_chat()
        self.assertEqual(code, 200)
        self.assertTrue(any(b"took no data for 1s" in line for line in self.proxy_lines))
        print(f"\nsend timeout 1s: stalled client dropped after {dropped:.2f}s")


IDLE = 300


class IdleConnectionTests(ClientFaults):
    @defer.inlineCallbacks
    def test_idle_connections_do_not_slow_others(self):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = 2 * IDLE + 200  # both ends live in this process, plus the service's own
        if soft != resource.RLIM_INFINITY and soft < need:
            raise SkipTest(f"RLIMIT_NOFILE is {soft}, {need} descriptors needed")
        self.start(STREAM_MODEL)
        yield self.chat("A")
        started = reactor.seconds()
        # half send nothing at all, half a partial request line
        clients = yield defer.gatherResults([self.connect(b"GET /hea" if i % 2 else b"") for i in range(IDLE)])
        opened = reactor.seconds() - started
        yield self.wait_for(lambda: {c.local_port for c in clients} <= set(self.server_ends()))
        times = yield self.assert_serving(rounds=10)
        times += yield self.assert_serving(rounds=3, parallel=4)
        started = reactor.seconds()
        response, body = yield self.get("/health")
        health = reactor.seconds() - started
        self.assertEqual((response.code, body), (200, b"OK"))
        self.assertLess(health, PROMPT)
        self.assertEqual([c for c in clients if c.reason is not None], [])  # all still open
        print(f"\n{IDLE} idle connections opened in {opened:.2f}s; chat requests meanwhile: "
              f"max {max(times) * 1000:.0f} ms, mean {sum(times) / len(times) * 1000:.0f} ms; "
              f"/health {health * 1000:.0f} ms")


class HeaderLimitTests(ClientFaults):
    @defer.inlineCallbacks
    def test_oversized_headers_get_431(self):
        self.start(STREAM_MODEL)
        yield self.chat("A")
        one_line = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 200_000
                    + b"\r\nContent-Length: 2\r\n\r\n{}")
        many = (b"GET /health HTTP/1.1\r\nHost: x\r\n"
                + b"".join(b"X-H%d: %s\r\n" % (i, b"y" * 400) for i in range(500)) + b"\r\n")
        long_uri = b"GET /health?" + b"q" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        other = self.assert_serving(rounds=1, parallel=3)  # while the big ones arrive
        results = yield defer.gatherResults([self.exchange(p) for p in (one_line, many, long_uri)])
        yield other
        for data, closed in results:
            self.assertEqual(status_line(data), b"HTTP/1.1 431 Request Header Fields Too Large")
            self.assertIn(b"\r\nConnection: close\r\n", data)
            self.assertTrue(data.endswith(b"\r\n\r\n431 Request Header Fields Too Large"))
            self.assertTrue(closed)
        self.assertEqual(self.runtime.router.scheduler.in_flight("A"), 0)
        yield self.assert_serving(rounds=2)
        # just under the limit still passes
        response, _ = yield self.get("/health", headers={"X-Fine": "z" * 12000})
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_client_that_sends_all_first_reads_the_431(self):
        """Like curl or requests: the whole 8 MB head is sent before anything is read.
        The proxy answers early, then reads and drops the rest before closing, so the
        client is not reset while it sends (with Twisted's plain close it got EPIPE after
        ~4 MB, and whether the answer survived the reset was luck)."""
        self.start(STREAM_MODEL)
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 8_000_000 + b"\r\n\r\n"
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.connect(("127.0.0.1", self.port))
        sock.setblocking(False)
        sent, error = 0, None
        view = memoryview(head)
        for _ in range(2000):  # at most ~10 s
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                yield task.deferLater(reactor, 0.005, lambda: None)
            except OSError as e:
                error = e
                break
            if sent == len(head):
                break
        received = b""
        for _ in range(1000):
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                yield task.deferLater(reactor, 0.005, lambda: None)
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        print(f"\n8 MB head: {sent} bytes sent ({error or 'no error'}), answer {status_line(received)!r}")
        self.assertEqual((sent, error), (len(head), None))
        self.assertEqual(status_line(received), b"HTTP/1.1 431 Request Header Fields Too Large")
        yield self.assert_serving(rounds=1)


class GarbageTests(ClientFaults):
    @defer.inlineCallbacks
    def test_garbage_gets_400_or_a_closed_connection(self):
        self.start(STREAM_MODEL + "    maxRequestBodyBytes: 100000\n")
        yield self.chat("A")
        post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        cases = {
            "random bytes": bytes(range(256)) * 4 + b"\r\n\r\n",
            "random bytes, no line end": os.urandom(20_000).replace(b"\n", b"."),
            "invalid request line": b"HELLO THERE\r\n\r\n",
            "bad method token": b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
            "bad version": b"GET / HTTP/9\r\nHost: x\r\n\r\n",
            "header without colon": b"GET /health HTTP/1.1\r\nHost x\r\n\r\n",
            "NUL in a header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
            "non-numeric Content-Length": post + b"Content-Length: abc\r\n\r\n{}",
            "negative Content-Length": post + b"Content-Length: -1\r\n\r\n{}",
            "two Content-Lengths": post + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            "Content-Length with chunked": post + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "bad chunk size": post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            "chunk size line too long": post + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 2000 + b"\r\n",
        }
        results = yield defer.gatherResults([self.exchange(p) for p in cases.values()])
        for name, (data, closed) in zip(cases, results):
            self.assertTrue(closed, name)
            if data:
                self.assertIn(status_line(data), (b"HTTP/1.1 400 Bad Request",
                                                  b"HTTP/1.1 431 Request Header Fields Too Large"), name)
        print("\n" + "\n".join(f"{name}: {status_line(data).decode('latin-1') or 'closed'}"
                               for name, (data, _) in zip(cases, results)))
        # a chunk size beyond 64 bits: refused as it is read, nothing of it stored
        huge = yield self.connect(post + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\n")
        huge.transport.write(b"x" * 200_000)
        self.assertTrue((yield huge.when_lost(5)))
        self.assertEqual(status_line(huge.received), b"HTTP/1.1 400 Bad Request")
        # a big chunk size: refused (413) as soon as the body passes maxRequestBodyBytes, not stored,
        # and the connection closes after a lingering close (the client need not send the rest)
        big = yield self.connect(post + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFF\r\n")
        big.transport.write(b"x" * 200_000)
        self.assertTrue((yield big.when_lost(5)))
        self.assertEqual(status_line(big.received), b"HTTP/1.1 413 Request Entity Too Large")
        self.assertIn(b"request body too large", big.received)
        yield self.assert_serving(rounds=1)
        # a truncated body, then the client disconnects
        truncated = yield self.connect(post + b"Content-Length: 5000\r\n\r\n{\"model\": \"A\"", close_after=True)
        self.assertTrue((yield truncated.when_lost(5)))
        yield self.assert_serving(rounds=3, parallel=2)
        self.assertEqual(self.runtime.router.scheduler.in_flight("A"), 0)
        self.assertEqual(self.service.inflight.snapshot(), {"operation": "snapshot"})


class ActivityStoreFaultTests(ClientFaults):
    def recording_errors(self) -> list:
        return [line for line in self.proxy_lines if b"recording activity failed" in line]

    @defer.inlineCallbacks
    def serve_despite_the_store(self, rounds: int = 20):
        yield self.assert_serving(rounds=rounds // 2, parallel=2)
        errors = yield self.wait_for(self.recording_errors)
        # one report, not a traceback per request (a store that did not open says so once, at start)
        self.assertEqual(len(errors), 1, errors)
        tracebacks = [line for line in self.proxy_lines if b"Traceback" in line]
        self.assertLessEqual(len(tracebacks), 1)
        self.assertTrue(all(line.startswith(b"[ERROR] cannot open the activity store") for line in tracebacks))
        return errors[0]

    @defer.inlineCallbacks
    def assert_store_unavailable(self):
        for path in ("/api/metrics/activity", "/api/metrics/stats"):
            response, body = yield self.get(path)
            self.assertEqual(response.code, 503)
            self.assertIn("activity store unavailable", json.loads(body)["error"]["message"])

    def before_store_opens(self, action) -> None:
        real = ActivityStore.start
        self.patch(ActivityStore, "start", lambda store: (action(), real(store))[1])

    @defer.inlineCallbacks
    def test_store_directory_gone(self):
        """The store's directory is replaced by a plain file after the config was read
        (this fails for root too): the store cannot open, requests are still served."""
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        with self.assertRaises(ConfigError):  # refused up front when the config is read
            load_config_text(f"store: {{path: {__file__}/activity.db}}\n")

        def replace_directory() -> None:
            os.rmdir(directory)
            with open(directory, "w") as f:
                f.write("not a directory")

        self.before_store_opens(replace_directory)
        self.start(STREAM_MODEL + f"    store: {{path: {directory}/activity.db}}\n")
        error = yield self.serve_despite_the_store()
        self.assertIn(b"activity store is not running", error)
        yield self.assert_store_unavailable()
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.Error)), 1)  # "cannot open the activity store"
        print(f"\nstore directory gone: {error.decode().strip()}")

    @defer.inlineCallbacks
    def test_store_file_that_is_not_a_database(self):
        """A corrupt store file (fails for root too): as a store that cannot be opened."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(b"this is not an sqlite database" * 100)
        self.start(STREAM_MODEL + f"    store: {{path: {path}}}\n")
        error = yield self.serve_despite_the_store()
        self.assertIn(b"activity store is not running", error)
        yield self.assert_store_unavailable()
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.Error)), 1)

    @defer.inlineCallbacks
    def test_store_on_a_full_filesystem(self):
        """A real full disk: the store on a 1 MiB tmpfs, filled up once the store is open
        (needs root and mount rights; skipped elsewhere, see StoreFullTests)."""
        mountpoint = os.path.abspath(self.mktemp())
        os.mkdir(mountpoint)
        out, err, code = yield getProcessOutputAndValue(
            "mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", mountpoint], env=dict(os.environ))
        if code != 0:
            raise SkipTest(f"cannot mount a tmpfs: {err.decode(errors='replace').strip()}")
        self.addCleanup(getProcessOutputAndValue, "umount", ["-l", mountpoint], env=dict(os.environ))
        self.start(STREAM_MODEL + f"    store: {{path: {mountpoint}/activity.db}}\n")
        yield self.chat("A")
        rows = yield self.wait_for(lambda: self.get("/api/metrics/activity").addCallback(
            lambda rb: json.loads(rb[1])["data"] if rb[0].code == 200 else None))
        self.assertEqual(len(rows), 1)  # recorded while there was room
        fd = os.open(os.path.join(mountpoint, "filler"), os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: the disk is full
            pass
        finally:
            os.close(fd)
        error = yield self.serve_despite_the_store()
        self.assertIn(b"database or disk is full", error)
        _, body = yield self.get("/api/metrics/activity")  # reading still works
        self.assertEqual(len(json.loads(body)["data"]), 1)
        os.unlink(os.path.join(mountpoint, "filler"))  # room again: recording goes on
        yield self.chat("A")
        yield self.wait_for(lambda: self.get("/api/metrics/activity").addCallback(
            lambda rb: len(json.loads(rb[1])["data"]) == 2))
        print(f"\nfull tmpfs: {error.decode().strip()}")


class StoreFullTests(SynchronousTestCase):
    """What sqlite says when the store is full, simulated with ``PRAGMA max_page_count``
    (the same SQLITE_FULL a full disk gives), for machines without mount rights."""

    def test_full_store_reports_full_and_recovers(self):
        conn = _open(os.path.abspath(self.mktemp()))
        self.addCleanup(conn.close)
        row = ActivityEntry(model="A", req_path="/v1/chat/completions", resp_status_code=200).to_row()
        _insert(conn, row, None)
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")
        with self.assertRaises(sqlite3.OperationalError) as ctx:
            for _ in range(10_000):
                _insert(conn, row, None)
        # the real error, not "cannot rollback - no transaction is active"
        self.assertEqual(str(ctx.exception), "database or disk is full")
        conn.execute("PRAGMA max_page_count = 1000000")
        self.assertGreater(_insert(conn, row, None), 1)  # space again: recording goes on


class BacklogTests(SynchronousTestCase):
    """Listeners get a backlog that takes a burst (see IdleConnectionTests)."""

    def test_with_backlog(self):
        from llamaswap.listen import BACKLOG, with_backlog

        self.assertEqual(with_backlog("tcp:8080:interface=127.0.0.1"),
                         f"tcp:8080:interface=127.0.0.1:backlog={BACKLOG}")
        self.assertEqual(with_backlog("unix:/run/x.sock"), f"unix:/run/x.sock:backlog={BACKLOG}")
        self.assertEqual(with_backlog("tcp:8080:backlog=7"), "tcp:8080:backlog=7")  # the user's choice
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")
