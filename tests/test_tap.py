"""Options parsing, the service tree, and the three entry points serving /health."""

from __future__ import annotations

import io
import os
import socket
import sys
import textwrap

import treq
from twisted.internet import defer, error, protocol, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from llamaswap.config import load_config_text
from llamaswap.listen import ListenError, to_endpoint
from llamaswap.service import ConfigWatcher, LlamaSwapService, build_service
from llamaswap.tap import Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "tests", "data", "demo.yaml")  # a copy of examples/demo.yaml: tests carry their own data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ListenTests(SynchronousTestCase):
    def test_forms(self):
        self.assertEqual(to_endpoint("127.0.0.1:8080"), "tcp:8080:interface=127.0.0.1")
        self.assertEqual(to_endpoint(":8080"), "tcp:8080")
        self.assertEqual(to_endpoint("[::1]:9"), "tcp:9:interface=\\:\\:1")
        self.assertEqual(to_endpoint("localhost:80"), "tcp:80:interface=localhost")
        self.assertEqual(to_endpoint("tcp:8080:interface=::"), "tcp:8080:interface=::")
        self.assertEqual(to_endpoint("unix:/run/x.sock"), "unix:/run/x.sock")
        self.assertEqual(to_endpoint("8080"), "tcp:8080")

    def test_bad(self):
        for value in ("", "foo bar", "1.2.3.4:99999"):
            self.assertRaises(ListenError, to_endpoint, value)


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options

    def failing(self, *argv):
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as ctx:
            self.parse(*argv)
        self.assertNotEqual(ctx.exception.code, 0)
        return stderr.getvalue()

    def test_defaults(self):
        options = self.parse("--config", DEMO)
        self.assertEqual(options["endpoints"], ["tcp:8080:interface=127.0.0.1"])
        self.assertFalse(options["watch-config"])
        self.assertEqual(sorted(options["loaded"].models), ["embedder", "llama-chat", "qwen-coder"])

    def test_repeatable_listen_and_flags(self):
        options = self.parse("--config", DEMO, "--listen", ":9001", "--listen", "unix:/tmp/x.sock",
                             "--watch-config")
        self.assertEqual(options["endpoints"], ["tcp:9001", "unix:/tmp/x.sock"])
        self.assertTrue(options["watch-config"])

    def test_tls(self):
        self.assertEqual(to_endpoint("127.0.0.1:8443", tls=("c.pem", "k.pem")),
                         "ssl:8443:interface=127.0.0.1:certKey=c.pem:privateKey=k.pem")
        self.assertEqual(to_endpoint("unix:/x", tls=("c.pem", "k.pem")), "unix:/x")
        text = self.failing("--config", DEMO, "--tls-cert-file", "missing.pem", "--tls-key-file", "k.pem")
        self.assertIn("missing.pem", text)

    def test_errors_are_one_line(self):
        for argv in (("--bogus",), (), ("--config", DEMO, "--listen", "foo bar"),
                     ("--config", DEMO, "--tls-cert-file", "x"), ("--config", DEMO, "--listen", "nope:1:2")):
            text = self.failing(*argv)
            self.assertEqual(text.count("\n"), 1, text)
            self.assertTrue(text.startswith("llamaswap: "), text)

    def test_bad_config_lists_every_error(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(textwrap.dedent("""\
                globalTTL: -1
                logToStdout: x
                startPort: 0
                models:
                  a: {cmd: srv, ttl: -9, proxy: "http://127.0.0.1:1"}
                  b: {cmd: "", proxy: "http://127.0.0.1:1"}
            """))
        text = self.failing("--config", path)
        self.assertIn("5 configuration errors", text)
        self.assertIn("models.a.ttl (line 5): must be >= -1", text)
        self.assertNotIn("Traceback", text)

    def test_version(self):
        self.patch(sys, "stdout", io.StringIO())
        with self.assertRaises(SystemExit) as ctx:
            self.parse("--version")
        self.assertEqual(ctx.exception.code, 0)


class WatcherTests(SynchronousTestCase):
    def test_reload_on_change_and_keep_on_error(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("models:\n  a: {cmd: 'x --port ${PORT}'}\n")
        clock = task.Clock()
        root = LlamaSwapService(clock, load_config_text(open(path).read()), path)
        root.running = True  # reloads only happen in a running service; nothing else needs starting here
        watcher = ConfigWatcher(root)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        with open(path, "w") as f:
            f.write("models:\n  a: {cmd: 'x --port ${PORT}'}\n  b: {cmd: 'y --port ${PORT}'}\n")
        clock.advance(2.1)
        self.assertEqual(sorted(root.config.models), ["a", "b"])
        with open(path, "w") as f:
            f.write("models:\n  a: {cmd: 'x --port ${PORT}', ttl: -5}\n")
        clock.advance(2.1)
        self.assertEqual(sorted(root.config.models), ["a", "b"])  # bad config: old one kept
        os.remove(path)
        clock.advance(2.1)
        self.assertEqual(sorted(root.config.models), ["a", "b"])  # a vanished file is ignored


class ServiceTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_health_on_every_listen(self):
        sock = os.path.join(self.mktemp() + "d")
        os.makedirs(sock)
        sock = os.path.join(sock, "s.sock")
        port = free_port()
        service = build_service(reactor, load_config_text("models: {}\n"),
                                [f"tcp:{port}:interface=127.0.0.1", f"unix:{sock}"])
        service.startService()
        self.addCleanup(service.stopService)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(f"http://127.0.0.1:{port}/health", pool=pool)
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.text()), "OK")

        class Collect(protocol.Protocol):
            def connectionMade(self):
                self.data = b""
                self.transport.write(b"GET /health HTTP/1.0\r\n\r\n")

            def dataReceived(self, data):
                self.data += data

            def connectionLost(self, reason):
                self.factory.done.callback(self.data)

        factory = protocol.ClientFactory.forProtocol(Collect)
        factory.done = defer.Deferred()
        reactor.connectUNIX(sock, factory)
        raw = yield factory.done
        self.assertTrue(raw.startswith(b"HTTP/1.0 200"))
        self.assertTrue(raw.endswith(b"OK"))


class _Child(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value)


class EntryPointTests(TestCase):
    """``twistd -n llamaswap``, ``llama-swap`` and ``python -m llamaswap`` all serve."""

    timeout = 30

    @defer.inlineCallbacks
    def serve(self, argv):
        port = free_port()
        child = _Child()
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = reactor.spawnProcess(child, sys.executable,
                                    [sys.executable, *argv, "--config", DEMO, "--listen", f"127.0.0.1:{port}"],
                                    env=env, path=ROOT)
        pool = HTTPConnectionPool(reactor, persistent=False)
        try:
            for _ in range(100):
                try:
                    response = yield treq.get(f"http://127.0.0.1:{port}/health", pool=pool, timeout=1)
                    body = yield response.text()
                    break
                except (error.ConnectError, error.ConnectionRefusedError, defer.CancelledError):
                    if child.ended.called:
                        self.fail("exited: " + child.output.decode(errors="replace"))
                    yield task.deferLater(reactor, 0.1, lambda: None)
            else:
                self.fail("never answered: " + child.output.decode(errors="replace"))
            self.assertEqual((response.code, body), (200, "OK"))
        finally:
            if not child.ended.called:
                proc.signalProcess("TERM")
            yield child.ended
        self.assertIn(b"model(s) configured", child.output)

    def test_twistd(self):
        return self.serve(["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "llamaswap"])

    def test_console_script_module(self):
        return self.serve(["-m", "llamaswap"])

    def test_cli_main(self):
        return self.serve(["-c", "from llamaswap.cli import main; main()"])
