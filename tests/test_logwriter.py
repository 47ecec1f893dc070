"""stdout that nobody reads never stalls the reactor (``llamaswap.logwriter``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import time

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from llamaswap.logs import LogHub
from llamaswap.logwriter import NonBlockingWriter, dropped_lines_marker

from .test_e2e import free_port, pid_alive

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeReactor:
    running = False

    def __init__(self) -> None:
        self.writers: list = []

    def addWriter(self, writer) -> None:
        self.writers.append(writer)

    def removeWriter(self, writer) -> None:
        self.writers.remove(writer)


def read_all(fd: int) -> bytes:
    out = []
    while True:
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            break
        if not data:
            break
        out.append(data)
    return b"".join(out)


class WriterTests(SynchronousTestCase):
    def close_later(self, fd: int) -> None:
        def close() -> None:
            try:
                os.close(fd)
            except OSError:
                pass
        self.addCleanup(close)

    def pipe(self, max_buffer: int = 4096):
        r, w = os.pipe()
        self.close_later(r)
        self.close_later(w)
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        fake = FakeReactor()
        return r, NonBlockingWriter(w, max_buffer=max_buffer, reactor=fake), fake

    def test_writes_go_straight_through(self):
        r, writer, fake = self.pipe()
        for i in range(100):
            writer.write(b"line %d\n" % i)
        self.assertEqual(read_all(r), b"".join(b"line %d\n" % i for i in range(100)))
        self.assertEqual((writer.buffered, writer.dropped_total, fake.writers), (0, 0, []))

    def test_full_pipe_buffers_then_drops_with_one_marker(self):
        r, writer, fake = self.pipe(max_buffer=4096)
        lines = [b"%05d %s\n" % (i, b"x" * 90) for i in range(2000)]  # ~190 KiB: far past pipe + buffer
        for line in lines:
            writer.write(line)  # never blocks, never raises
        self.assertLessEqual(writer.buffered, 4096 + 100)
        self.assertGreater(writer.dropped, 0)
        self.assertEqual(len(fake.writers), 1)  # the reactor watches for writability
        dropped = writer.dropped
        out = read_all(r)
        while fake.writers:  # the reader catches up: the reactor says writable
            fake.writers[0].doWrite()
            out += read_all(r)
        writer.write(b"after\n")
        out += read_all(r)
        kept = out.split(b"\n")[:-1]
        marker = dropped_lines_marker(dropped).rstrip(b"\n")
        self.assertIn(marker, kept)
        gap = kept.index(marker)
        self.assertEqual(kept[:gap], [line.rstrip(b"\n") for line in lines[:gap]])  # no line cut or reordered
        self.assertEqual(gap + dropped, len(lines))
        self.assertEqual(kept[gap + 1:], [b"after"])
        self.assertEqual(writer.dropped, 0)

    def test_reader_gone_discards_quietly(self):
        r, writer, fake = self.pipe()
        os.close(r)
        for _ in range(10):
            writer.write(b"x" * 1000 + b"\n")
        self.assertTrue(writer.broken)
        self.assertEqual((writer.buffered, fake.writers), (0, []))

    def test_close_is_bounded_and_flushes(self):
        r, writer, fake = self.pipe(max_buffer=1 << 20)
        for _ in range(200):
            writer.write(b"y" * 1000 + b"\n")  # 200 KB: more than the pipe holds
        self.assertGreater(writer.buffered, 0)
        started = time.monotonic()
        writer.close(timeout=0.2)  # nobody reads: gives up after the timeout
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertGreater(writer.buffered, 0)
        got = len(read_all(r))
        writer.close(timeout=5)  # the pipe has room again: everything goes
        got += len(read_all(r))
        while writer.buffered:
            writer.close(timeout=5)
            got += len(read_all(r))
        self.assertEqual(got, 200 * 1001)

    def test_modes(self):
        # a pipe: our own non-blocking description; the shared fd is left blocking
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        writer = NonBlockingWriter.for_fd(w)
        self.addCleanup(os.close, writer.fd)
        self.assertEqual(writer.mode, "nonblocking")
        self.assertNotEqual(writer.fd, w)
        self.assertTrue(os.get_blocking(w))
        self.assertFalse(os.get_blocking(writer.fd))
        writer.write(b"via pipe\n")
        self.assertEqual(os.read(r, 100), b"via pipe\n")
        # a terminal: reopened by name, the original description untouched
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        tty = NonBlockingWriter.for_fd(slave)
        self.addCleanup(os.close, tty.fd)
        self.assertEqual(tty.mode, "nonblocking")
        self.assertTrue(os.get_blocking(slave))
        # a socket: send(MSG_DONTWAIT), no flag changed
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        sock = NonBlockingWriter.for_fd(a.fileno())
        self.addCleanup(sock._sock.close)
        self.assertEqual(sock.mode, "socket")
        sock.write(b"via socket\n")
        self.assertEqual(b.recv(100), b"via socket\n")
        self.assertTrue(a.getblocking())
        # a regular file: plain writes
        path = self.mktemp()
        with open(path, "wb") as f:
            plain = NonBlockingWriter.for_fd(f.fileno())
            self.assertEqual(plain.mode, "blocking")
            plain.write(b"via file\n")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"via file\n")

    def test_hub_marker_uses_the_log_format(self):
        hub = LogHub("proxy")
        self.assertEqual(hub.dropped_marker(3), b"[WARN] 3 log lines dropped (stdout not keeping up)\n")


CHATTY = """
import os, sys
out = sys.stdout.buffer
for i in range(30000):
    out.write(b"chatty upstream line %06d %s\\n" % (i, b"z" * 80))
out.flush()
os.execv(sys.executable, [sys.executable, "-m", "llamaswap.testing.responder", "--port", sys.argv[1],
                          "--id", "chatty", "--silent"])
"""


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


class StalledStdoutTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_unread_stdout_does_not_stall_the_reactor(self):
        """llama-swap's stdout is a pipe nobody reads while ~3 MB of log lines
        go to it: /health still answers at once, and once the pipe is read the
        dropped-lines marker is there."""
        port, model_port = free_port(), free_port()
        state = os.path.abspath(self.mktemp())
        os.makedirs(state)
        script = os.path.join(state, "chatty.py")
        with open(script, "w") as f:
            f.write(CHATTY)
        config = os.path.join(state, "config.yaml")
        with open(config, "w") as f:
            f.write(textwrap.dedent(f"""
                logToStdout: both
                healthCheckTimeout: 30
                models:
                  chatty: {{cmd: "{PY} {script} {model_port}", proxy: "http://127.0.0.1:{model_port}"}}
            """))
        child = _Child()
        transport = reactor.spawnProcess(
            child, PY, [PY, "-m", "llamaswap", "--config", config, "--listen", f"127.0.0.1:{port}"],
            env=dict(os.environ, XDG_RUNTIME_DIR=state), path=ROOT)
        transport.pauseProducing()  # nobody reads the child's stdout: its pipe fills up
        pool = HTTPConnectionPool(reactor, persistent=False)
        base = f"http://127.0.0.1:{port}"

        def stop():
            transport.resumeProducing()
            if pid_alive(transport.pid):
                os.kill(transport.pid, signal.SIGTERM)
            return child.ended
        self.addCleanup(stop)

        @defer.inlineCallbacks
        def health():
            started = time.monotonic()
            response = yield treq.get(base + "/health", pool=pool, timeout=5)
            yield response.content()
            return time.monotonic() - started

        for _ in range(400):  # up (twistd start-up takes a second or two)
            try:
                yield health()
                break
            except Exception:
                yield task.deferLater(reactor, 0.05, lambda: None)
        chat = treq.post(base + "/v1/chat/completions", json.dumps({"model": "chatty", "messages": []}).encode(),
                         headers={"Content-Type": "application/json"}, pool=pool, timeout=30)
        latencies = []
        chat_started = time.monotonic()
        answered: list = []
        chat.addBoth(lambda result: answered.append(True) or result)
        while not answered:
            latencies.append((yield health()))
            yield task.deferLater(reactor, 0.02, lambda: None)
        response = yield chat
        during, chat_seconds = len(latencies), time.monotonic() - chat_started
        self.assertEqual(response.code, 200)
        yield response.content()
        for _ in range(10):
            latencies.append((yield health()))
        print(f"\n/health while stdout was not read: {len(latencies)} probes ({during} during the "
              f"{chat_seconds:.2f} s model start), max {max(latencies) * 1000:.1f} ms")
        self.assertLess(max(latencies), 0.5)

        transport.resumeProducing()  # the reader catches up: the marker follows
        for _ in range(400):
            if b"log lines dropped (stdout not keeping up)" in b"".join(child.output):
                break
            yield task.deferLater(reactor, 0.025, lambda: None)
        output = b"".join(child.output)
        self.assertIn(b"log lines dropped (stdout not keeping up)", output)
        self.assertIn(b"chatty upstream line 000000", output)  # what fitted came through whole
        yield pool.closeCachedConnections()
