"""systemd: ``Type=notify`` messages, socket activation and the shipped units.

The notifier is tested against real ``AF_UNIX`` datagram sockets; the
end-to-end tests run ``python -m llamaswap`` as a child with
``NOTIFY_SOCKET`` pointing at a socket read by the reactor, as systemd would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import time
import uuid

import psutil
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.test_e2e import free_port, free_run

from llamaswap.config import load_config
from llamaswap.process import ChildRegistry
from llamaswap.sdnotify import ListeningEndpoint, Notifier, ReadyNotifier
from llamaswap.service import build_service

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_dir(case) -> str:
    """A directory with a short path (``AF_UNIX`` paths stop at 108 bytes)."""
    path = tempfile.mkdtemp(prefix="lsn-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def parse(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines() if line)


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def config_text(*models: str) -> str:
    responder = f"{PY} -m llamaswap.testing.responder --port ${{PORT}} --id ${{MODEL_ID}} --silent"
    lines = [f"startPort: {free_run()}", "healthCheckTimeout: 15", "models:"]
    lines += [f'  {m}: {{cmd: "{responder}"}}' for m in models]
    return "\n".join(lines) + "\n"


class NotifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(short_dir(self), "notify")
        self.receiver = self.bind(self.path)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def bind(self, address: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(address)
        return sock

    def received(self, sock=None) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                out.append(parse((sock or self.receiver).recv(65536, socket.MSG_DONTWAIT)))
            except BlockingIOError:
                return out

    def warnings(self) -> list[dict]:
        return [e for e in self.events if getattr(e.get("log_level"), "name", None) == "warn"]

    def test_ready(self) -> None:
        notifier = Notifier(self.path)
        self.assertTrue(notifier.enabled)
        self.assertTrue(notifier.ready("listening on tcp:8080"))
        self.assertTrue(notifier.ready())  # the status is kept
        expected = {"READY": "1", "STATUS": "listening on tcp:8080", "MAINPID": str(os.getpid())}
        self.assertEqual(self.received(), [expected] * 2)

    def test_reloading_carries_monotonic_usec(self) -> None:
        before = monotonic_usec()
        Notifier(self.path).reloading()
        after = monotonic_usec()
        [message] = self.received()
        self.assertEqual((message["RELOADING"], message["STATUS"]), ("1", "reloading the config"))
        self.assertTrue(before <= int(message["MONOTONIC_USEC"]) <= after, (before, message, after))

    def test_stopping(self) -> None:
        Notifier(self.path).stopping()
        self.assertEqual(self.received(), [{"STOPPING": "1", "STATUS": "stopping"}])

    def test_status_stays_on_one_line(self) -> None:
        Notifier(self.path).ready("two\nlines")
        [message] = self.received()
        self.assertEqual(message["STATUS"], "two lines")

    def test_abstract_socket(self) -> None:
        name = f"llamaswap-test-{uuid.uuid4().hex}"
        receiver = self.bind("\0" + name)
        self.assertTrue(Notifier("@" + name).ready("x"))
        self.assertEqual(self.received(receiver)[0]["READY"], "1")

    def test_from_environ_removes_the_variable(self) -> None:
        env = {"NOTIFY_SOCKET": self.path, "OTHER": "1"}
        notifier = Notifier.from_environ(env)
        self.assertEqual((notifier.address, env), (self.path, {"OTHER": "1"}))
        # the real environment: children spawned afterwards do not inherit it
        os.environ["NOTIFY_SOCKET"] = self.path
        self.addCleanup(os.environ.pop, "NOTIFY_SOCKET", None)
        self.assertTrue(Notifier.from_environ().enabled)
        self.assertNotIn("NOTIFY_SOCKET", os.environ)
        self.assertFalse(Notifier.from_environ().enabled)

    def test_unset_is_a_no_op(self) -> None:
        notifier = Notifier(None)
        self.assertFalse(notifier.enabled)
        self.assertEqual((notifier.ready(), notifier.reloading(), notifier.stopping()), (False, False, False))
        self.assertEqual(self.warnings(), [])

    def test_unusable_address_is_ignored(self) -> None:
        notifier = Notifier("relative/socket")
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.ready())
        self.assertEqual(len(self.warnings()), 1)

    def test_no_listener_never_raises_and_warns_once(self) -> None:
        notifier = Notifier(os.path.join(os.path.dirname(self.path), "nobody"))
        self.assertFalse(notifier.ready())
        self.assertFalse(notifier.stopping())
        [warning] = self.warnings()
        self.assertEqual(warning["error"].__class__, FileNotFoundError)

    def test_full_queue_never_blocks(self) -> None:
        """A receiver that does not read: sends fail (EAGAIN) instead of blocking."""
        notifier = Notifier(self.path)
        for _ in range(100_000):
            if not notifier.ready("x" * 1000):
                break
        else:
            self.fail("the receiver's queue never filled")
        self.assertEqual(len(self.warnings()), 1)
        self.assertIsInstance(self.warnings()[0]["error"], BlockingIOError)


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[dict] = []

    def send(self, fields) -> bool:
        self.sent.append({k: str(v) for k, v in fields.items()})
        return True

    def kinds(self) -> list[str]:
        return [next(iter(m)) for m in self.sent]


class _Endpoint:
    """An endpoint whose listen fires when the test says so."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def listen(self, factory) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


class ReadyNotifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.notifier = RecordingNotifier()
        self.endpoints = [_Endpoint(), _Endpoint()]
        self.listeners = [ListeningEndpoint(e, f"tcp:{n}") for n, e in enumerate(self.endpoints)]
        self.service = ReadyNotifier(self.notifier, self.listeners)

    def test_ready_only_once_every_listener_listens(self) -> None:
        ports = [listener.listen(None) for listener in self.listeners]
        self.service.startService()
        self.endpoints[0].pending[0].callback("port 0")
        self.assertEqual(self.notifier.sent, [])
        self.endpoints[1].pending[0].callback("port 1")
        self.assertEqual(self.notifier.sent, [{"READY": "1", "STATUS": "listening on tcp:0, tcp:1",
                                               "MAINPID": str(os.getpid())}])
        self.assertEqual([self.successResultOf(p) for p in ports], ["port 0", "port 1"])  # passed through

    def test_already_listening(self) -> None:
        for listener, endpoint in zip(self.listeners, self.endpoints):
            listener.listen(None)
            endpoint.pending[0].callback(None)
        self.service.startService()
        self.assertEqual(self.notifier.kinds(), ["READY"])

    def test_failed_listen_is_passed_on_and_never_ready(self) -> None:
        ports = [listener.listen(None) for listener in self.listeners]
        self.service.startService()
        self.endpoints[0].pending[0].errback(OSError("address in use"))
        self.endpoints[1].pending[0].callback(None)
        self.failureResultOf(ports[0], OSError)
        self.assertEqual(self.notifier.sent, [])
        self.service.stopService()
        self.assertEqual(self.notifier.kinds(), ["STOPPING"])

    def test_stop_before_listening(self) -> None:
        ports = [listener.listen(None) for listener in self.listeners]
        self.service.startService()
        self.service.stopService()
        for endpoint in self.endpoints:
            endpoint.pending[0].callback(None)
        self.assertEqual(self.notifier.kinds(), ["STOPPING"])
        self.assertEqual([self.successResultOf(p) for p in ports], [None, None])


class ServiceWiringTests(TestCase):
    """The real service tree in this process: which message when."""

    timeout = 20

    def setUp(self) -> None:
        self.config_path = os.path.abspath(self.mktemp())
        with open(self.config_path, "w") as f:
            f.write(config_text("A"))
        self.notifier = RecordingNotifier()
        self.service = build_service(reactor, load_config(self.config_path), ["tcp:0:interface=127.0.0.1"],
                                     config_path=self.config_path,
                                     registry=ChildRegistry(os.path.abspath(self.mktemp())), notify=self.notifier)

    @defer.inlineCallbacks
    def test_ready_reload_stop(self):
        self.service.privilegedStartService()
        self.service.startService()
        stopped = False
        try:
            [message] = self.notifier.sent
            self.assertEqual(message["READY"], "1")
            self.assertEqual(message["STATUS"], "listening on tcp:0:interface=127.0.0.1")
            self.assertTrue(self.service.reload())
            self.assertEqual(self.notifier.kinds(), ["READY", "RELOADING", "READY"])
            with open(self.config_path, "w") as f:
                f.write("models: [not a map]\n")
            self.assertFalse(self.service.reload())  # rejected: the old config serves, READY again
            self.assertEqual(self.notifier.kinds(), ["READY", "RELOADING", "READY", "RELOADING", "READY"])
            stopping = self.service.stopService()
            stopped = True
            self.assertEqual(self.notifier.kinds()[-1], "STOPPING")  # sent as shutdown begins
            yield stopping
        finally:
            if not stopped:
                yield self.service.stopService()
        self.assertEqual(self.notifier.kinds(), ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"])


class NotifySocket(DatagramProtocol):
    """What systemd would receive on ``$NOTIFY_SOCKET``, read by the reactor."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self._cursor = 0
        self._waiter = None

    def datagramReceived(self, datagram, address) -> None:
        self.messages.append(parse(datagram))
        self._check()

    def _check(self) -> None:
        if self._waiter is None:
            return
        key, d = self._waiter
        while self._cursor < len(self.messages):
            message = self.messages[self._cursor]
            self._cursor += 1
            if key in message:
                self._waiter = None
                d.callback(message)
                return

    def next_with(self, key: str, timeout: float = 30) -> defer.Deferred:
        """The next message (after those already returned) that has ``key``."""
        d: defer.Deferred = defer.Deferred(lambda _: setattr(self, "_waiter", None))
        self._waiter = (key, d)
        self._check()
        return d.addTimeout(timeout, reactor)


class _Child(protocol.ProcessProtocol):
    LIMIT = 64 * 1024

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-self.LIMIT:]

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


class ChildProcessTests(TestCase):
    """``python -m llamaswap`` as systemd runs it."""

    timeout = 60

    def setUp(self) -> None:
        self.tmp = short_dir(self)
        self.config = os.path.join(self.tmp, "config.yaml")
        with open(self.config, "w") as f:
            f.write(config_text("A"))
        self.notify = NotifySocket()
        port = reactor.listenUNIXDatagram(os.path.join(self.tmp, "notify"), self.notify)
        self.addCleanup(port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        env.update(PYTHONPATH=ROOT, XDG_RUNTIME_DIR=self.tmp, NOTIFY_SOCKET=os.path.join(self.tmp, "notify"))
        env.update(extra)
        return env

    def spawn(self, argv: list[str], env: dict[str, str], child_fds=None):
        self.child = _Child()
        self.proc = reactor.spawnProcess(self.child, argv[0], argv, env=env, path=ROOT,
                                         childFDs=child_fds or {0: "w", 1: "r", 2: "r"})
        self.addCleanup(self.stop_child)
        return self.proc

    @defer.inlineCallbacks
    def stop_child(self):
        if self.child.ended.called:
            return
        self.proc.signalProcess("TERM")
        try:
            yield self.child.ended.addTimeout(40, reactor)
        except defer.TimeoutError:
            self.proc.signalProcess("KILL")
            yield self.child.ended

    def explain(self) -> str:
        return f"messages: {self.notify.messages}\noutput:\n{self.child.output.decode(errors='replace')}"

    @defer.inlineCallbacks
    def ready(self):
        try:
            message = yield self.notify.next_with("READY")
        except defer.TimeoutError:
            self.fail("no READY=1: " + self.explain())
        return message

    @defer.inlineCallbacks
    def get(self, port: int, path: str):
        response = yield treq.get(f"http://127.0.0.1:{port}{path}", pool=self.pool, timeout=10)
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def assert_models_do_not_inherit(self, port: int, *names: str):
        response = yield treq.post(f"http://127.0.0.1:{port}/v1/chat/completions", pool=self.pool, timeout=20,
                                   data=json.dumps({"model": "A", "messages": []}).encode(),
                                   headers={"Content-Type": "application/json"})
        yield response.content()
        self.assertEqual(response.code, 200)
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.assertTrue(children)
        for child in children:
            inherited = {n for n in child.environ() if n in names}
            self.assertEqual(inherited, set(), f"{child.cmdline()} inherited {inherited}")

    @defer.inlineCallbacks
    def test_ready_reload_stop(self):
        port = free_port()
        self.spawn([PY, "-m", "llamaswap", "--config", self.config, "--listen", f"127.0.0.1:{port}"], self.env())
        ready = yield self.ready()
        # READY comes once the port accepts: the very first connection attempt succeeds
        connected = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(
            protocol.Factory.forProtocol(protocol.Protocol))
        connected.transport.loseConnection()
        self.assertEqual(self.notify.messages, [ready], "READY=1 must be the first message")
        self.assertEqual(ready, {"READY": "1", "STATUS": f"listening on tcp:{port}:interface=127.0.0.1",
                                 "MAINPID": str(self.proc.pid)})
        self.assertEqual((yield self.get(port, "/health")), (200, b"OK"))
        yield self.assert_models_do_not_inherit(port, "NOTIFY_SOCKET")

        with open(self.config, "w") as f:
            f.write(config_text("A", "B"))
        before = monotonic_usec()
        self.proc.signalProcess("HUP")
        reloading = yield self.notify.next_with("RELOADING")
        self.assertTrue(before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec(), reloading)
        yield self.notify.next_with("READY")
        _, body = yield self.get(port, "/v1/models")
        self.assertEqual(sorted(m["id"] for m in json.loads(body)["data"]), ["A", "B"])  # the reload was applied

        self.proc.signalProcess("TERM")
        stopping = yield self.notify.next_with("STOPPING")
        self.assertEqual(stopping["STOPPING"], "1")
        status = yield self.child.ended.addTimeout(40, reactor)
        # twistd ends by re-raising the signal that stopped it; systemd counts
        # a SIGTERM death as a clean exit (no Restart=on-failure)
        self.assertEqual((status.exitCode, status.signal), (None, signal.SIGTERM), self.explain())
        self.assertEqual([next(iter(m)) for m in self.notify.messages], ["READY", "RELOADING", "READY", "STOPPING"])

    @defer.inlineCallbacks
    def test_socket_activation(self):
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        listening.set_inheritable(True)
        port = listening.getsockname()[1]
        # as systemd (>= 227) does: LISTEN_FDS and LISTEN_FDNAMES (Twisted wants
        # both), LISTEN_PID the pid of the process that gets the socket; exec
        # keeps the pid, so a wrapper sets it and execs llamaswap
        wrapper = ("import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
                   "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
        argv = [PY, "-c", wrapper, "-m", "llamaswap", "--config", self.config,
                "--listen", "systemd:domain=INET:index=0"]
        env = self.env(LISTEN_FDS="1", LISTEN_FDNAMES="llamaswap.socket")
        self.spawn(argv, env, {0: "w", 1: "r", 2: "r", 3: listening.fileno()})
        listening.close()  # only the child holds it now
        ready = yield self.ready()
        self.assertEqual(ready["MAINPID"], str(self.proc.pid))
        self.assertEqual(ready["STATUS"], "listening on systemd:domain=INET:index=0")
        self.assertEqual((yield self.get(port, "/health")), (200, b"OK"))
        yield self.assert_models_do_not_inherit(port, "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")
        self.proc.signalProcess("TERM")
        yield self.notify.next_with("STOPPING")
        yield self.child.ended.addTimeout(40, reactor)


def literal_block_after(text: str, phrase: str) -> str:
    """The reST literal block (after ``::``) that follows ``phrase``."""
    start = text.index("::\n\n", text.index(phrase)) + 4
    lines = []
    for line in text[start:].splitlines():
        if line and not line.startswith(" "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines)).strip("\n") + "\n"


class UnitFileTests(SynchronousTestCase):
    def read(self, *path: str) -> str:
        with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
            return f.read()

    def test_readme_shows_the_shipped_units(self) -> None:
        readme = self.read("README.rst")
        section = readme[readme.index("Under systemd\n====="):]
        self.assertEqual(literal_block_after(section, "``examples/llamaswap.service``"),
                         self.read("examples", "llamaswap.service"))
        self.assertEqual(literal_block_after(section, "``examples/llamaswap.socket``"),
                         self.read("examples", "llamaswap.socket"))

    def test_service_unit(self) -> None:
        unit = self.read("examples", "llamaswap.service").splitlines()
        for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID",
                     "KillMode=control-group", "Restart=on-failure", "User=llamaswap"):
            self.assertIn(line, unit)
        [exec_start] = [line for line in unit if line.startswith("ExecStart=")]
        self.assertTrue(exec_start.startswith("ExecStart=/opt/llamaswap/.venv/bin/llama-swap "))
        [stop] = [line for line in unit if line.startswith("TimeoutStopSec=")]
        # drain (30 s) plus TERM→KILL grace (30 s) must fit before systemd's own SIGKILL
        self.assertGreater(int(stop.split("=")[1]), 60)
