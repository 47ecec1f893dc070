"""Integration tests of llamaswap.process with real children: the fake
upstream ``llamaswap.testing.responder`` on 127.0.0.1.

No sleeping: every wait is a Deferred with a timeout, or bounded polling
with ``deferLater``.  Every test kills what it started (process groups) and
leaves the reactor clean.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import socket
import sys
import textwrap
from typing import Any, Callable, Optional, TypeVar

import psutil
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

import llamaswap
from llamaswap.config.types import ModelConfig
from llamaswap.logmon import LogMonitor
from llamaswap.process import (
    ChildRegistry,
    HealthCheckTimeoutError,
    PrematureExitError,
    Process,
    ProcessState,
    UpstreamProtocol,
    spawn_in_new_group,
    sweep_stale,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(llamaswap.__file__)))
PY = shlex.quote(sys.executable)
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def responder(name: str, *flags: str, env: tuple[str, ...] = (), **kw: Any) -> ModelConfig:
    """A model running the fake upstream on a free port.  ``PYTHONPATH`` is a
    model env entry because trial runs in ``_trial_temp``."""
    port = free_port()
    cmd = f"{PY} -m llamaswap.testing.responder --port {port} --id {name} --silent " + " ".join(flags)
    kw.setdefault("health_check_timeout", 15)
    return ModelConfig(
        id=name,
        cmd=cmd,
        proxy=f"http://127.0.0.1:{port}",
        env=(f"PYTHONPATH={ROOT}", *env),
        **kw,
    )


def gone(pid: int) -> bool:
    """Dead, or a zombie nobody reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_group(pid: Optional[int]) -> None:
    if pid is None:
        return
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError as error:
            if error.errno not in (errno.ESRCH, errno.EPERM):
                raise


async def poll_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() >= deadline:
            return False
        await deferLater(reactor, interval)
    return True


def within(d: "Deferred[T]", seconds: float) -> "Deferred[T]":
    return d.addTimeout(seconds, reactor)


class ProcessIntegrationTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.transitions: list[tuple[float, str, ProcessState]] = []
        self.state_waiters: list[tuple[ProcessState, Deferred[float]]] = []
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    # -- helpers ------------------------------------------------------------

    def _on_state(self, proc: Process, old: ProcessState, new: ProcessState) -> None:
        now = reactor.seconds()
        self.transitions.append((now, proc.id, new))
        for item in self.state_waiters[:]:
            if item[0] is new:
                self.state_waiters.remove(item)
                item[1].callback(now)

    def next_state(self, state: ProcessState, timeout: float = 10) -> "Deferred[float]":
        """Fires with the time of the next transition into ``state``."""
        d: Deferred[float] = Deferred()
        self.state_waiters.append((state, d))
        return within(d, timeout)

    def process(self, model: ModelConfig, **kw: Any) -> Process:
        proc = Process(reactor, model, on_state=self._on_state, **kw)
        self.addCleanup(self._shutdown, proc)
        return proc

    def _shutdown(self, proc: Process) -> "Deferred[None]":
        async def run() -> None:
            pid = proc.pid
            try:
                await within(proc.shutdown(0.5), 10)
            finally:
                kill_group(pid)

        return ensureDeferred(run())

    def http_client(self) -> HTTPClient:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        return HTTPClient(Agent(reactor, pool=pool))

    def spawn(self, argv: list[str], env: Optional[dict[str, str]] = None) -> tuple[Any, UpstreamProtocol, list[bytes]]:
        """Spawn through the launcher, with cleanup (kill group, await processEnded)."""
        lines: list[bytes] = []
        proto = UpstreamProtocol(lines.append)
        child = spawn_in_new_group(reactor, proto, argv, env or {**os.environ, "PYTHONPATH": ROOT})

        def cleanup() -> "Deferred[Any]":
            kill_group(child.pid)
            return within(proto.when_ended(), 10)

        self.addCleanup(cleanup)
        return child, proto, lines

    # -- tests ----------------------------------------------------------------

    async def test_start_health_stop(self) -> None:
        proc = self.process(responder("basic"))
        started = reactor.seconds()
        await within(proc.ensure_ready(), 15)
        print(f"\n    responder start to READY: {reactor.seconds() - started:.3f}s", end=" ")
        self.assertIs(proc.state, ProcessState.READY)
        pid = proc.pid
        assert pid is not None
        self.assertFalse(gone(pid))
        self.assertEqual(os.getpgid(pid), pid)  # the launcher made it a group leader
        self.assertEqual(os.getsid(pid), pid)
        self.assertEqual(psutil.Process(pid).ppid(), os.getpid())  # exec'd in place
        self.assertIn(b"responder basic listening on", proc.logmon.history())
        self.assertTrue([e for e in self.events if "health check passed" in e.get("log_format", "")])
        await within(proc.stop(5), 10)
        self.assertIs(proc.state, ProcessState.STOPPED)
        self.assertTrue(gone(pid))
        self.assertEqual(
            [s for _, _, s in self.transitions],
            [ProcessState.STARTING, ProcessState.READY, ProcessState.STOPPING, ProcessState.STOPPED],
        )

    async def test_ignore_sigterm_killed_after_grace(self) -> None:
        proc = self.process(responder("stubborn", "--ignore-sigterm"))
        await within(proc.ensure_ready(), 15)
        pid = proc.pid
        assert pid is not None
        grace = 1.0
        started = reactor.seconds()
        await within(proc.stop(grace), 10)
        elapsed = reactor.seconds() - started
        print(f"\n    SIGTERM-ignoring child stopped in {elapsed:.3f}s (grace {grace}s)", end=" ")
        self.assertTrue(gone(pid))
        self.assertGreaterEqual(elapsed, grace)
        self.assertLess(elapsed, grace + 1.0)

    async def test_fork_grandchild_leaves_nothing(self) -> None:
        proc = self.process(responder("forker", "--fork-grandchild"))
        await within(proc.ensure_ready(), 15)
        pid = proc.pid
        match = re.search(rb"grandchild pid (\d+)", proc.logmon.history())
        assert match is not None and pid is not None
        grandchild = int(match.group(1))
        self.addCleanup(kill_group, grandchild)
        self.assertFalse(gone(grandchild))
        self.assertEqual(os.getpgid(grandchild), pid)
        await within(proc.stop(5), 10)
        self.assertTrue(gone(pid))
        self.assertTrue(await poll_until(lambda: gone(grandchild), 2))

    async def test_crash_then_restart(self) -> None:
        proc = self.process(responder("crashy", "--fork-grandchild"))
        await within(proc.ensure_ready(), 15)
        pid = proc.pid
        assert pid is not None
        match = re.search(rb"grandchild pid (\d+)", proc.logmon.history())
        assert match is not None
        grandchild = int(match.group(1))
        self.addCleanup(kill_group, grandchild)
        stopped = self.next_state(ProcessState.STOPPED, 5)
        os.kill(pid, signal.SIGKILL)  # the leader only
        await stopped
        crash_events = [e for e in self.events if "exited unexpectedly" in e.get("log_format", "")]
        self.assertEqual(len(crash_events), 1)
        self.assertIn("SIGKILL", crash_events[0]["status"])
        # the grandchild did not survive its leader
        self.assertTrue(await poll_until(lambda: gone(grandchild), 2))
        await within(proc.ensure_ready(), 15)
        self.assertIs(proc.state, ProcessState.READY)
        self.assertNotEqual(proc.pid, pid)

    async def test_exit_during_start(self) -> None:
        proc = self.process(responder("quitter", "--exit-at-start", "3"))
        started = reactor.seconds()
        with self.assertRaises(PrematureExitError) as caught:
            await within(proc.ensure_ready(), 15)
        message = str(caught.exception)
        self.assertTrue(message.startswith("upstream command exited prematurely (exit code 3)"), message)
        self.assertIn("responder: exiting at start with code 3", message)
        self.assertIs(proc.state, ProcessState.STOPPED)
        self.assertLess(reactor.seconds() - started, 5)

    async def test_health_timeout(self) -> None:
        proc = self.process(responder("slow", "--health-delay", "30", health_check_timeout=2))
        started = reactor.seconds()
        with self.assertRaises(HealthCheckTimeoutError) as caught:
            await within(proc.ensure_ready(), 10)
        elapsed = reactor.seconds() - started
        self.assertTrue(str(caught.exception).startswith("health check timed out after 2s"))
        self.assertGreaterEqual(elapsed, 2)
        self.assertLess(elapsed, 3)
        if proc.state is not ProcessState.STOPPED:
            await self.next_state(ProcessState.STOPPED, 10)
        self.assertIsNone(proc.pid)

    async def test_env_appended(self) -> None:
        proc = self.process(responder("envy", env=("LLAMASWAP_TEST_VAR=hello world", "HOME=/nowhere")))
        await within(proc.ensure_ready(), 15)
        client = self.http_client()
        response = await within(client.get(proc.model.proxy + "/env"), 5)
        env = json.loads(await response.content())
        self.assertEqual(env["LLAMASWAP_TEST_VAR"], "hello world")
        self.assertEqual(env["HOME"], "/nowhere")
        self.assertEqual(env["PATH"], os.environ["PATH"])
        self.assertEqual(env["PYTHONPATH"], ROOT)

    async def test_readiness_detection_delay(self) -> None:
        delay = 1.0
        proc = self.process(responder("timed", "--health-delay", str(delay)))
        listening: list[float] = []

        def watch(data: bytes) -> None:
            if b"listening on" in data and not listening:
                listening.append(reactor.seconds())

        proc.logmon.subscribe(watch)
        await within(proc.ensure_ready(), 15)
        ready_at = [t for t, _, s in self.transitions if s is ProcessState.READY][0]
        # The responder starts its health delay just before it prints the
        # listening line, so this slightly underestimates (by the pipe latency).
        detection = ready_at - (listening[0] + delay)
        print(f"\n    readiness detected {detection * 1000:.1f} ms after the health flip", end=" ")
        self.assertLess(detection, 0.3)
        self.assertGreater(detection, -0.05)

    async def test_sigkilled_proxy_leaves_no_child(self) -> None:
        state_dir = os.path.abspath(self.mktemp())
        model = responder("orphan", "--fork-grandchild")
        script = os.path.abspath(self.mktemp() + ".py")
        with open(script, "w") as f:
            f.write(HELPER)
        helper, helper_proto, helper_lines = self.spawn(
            [sys.executable, script, state_dir, json.dumps({"id": model.id, "cmd": model.cmd, "proxy": model.proxy, "env": list(model.env)})]
        )
        found = await poll_until(lambda: any(l.startswith(b"grandchild ") for l in helper_lines), 15)
        self.assertTrue(found, helper_lines)
        pids = dict(l.decode().split() for l in helper_lines if l.split()[0] in (b"child", b"grandchild"))
        child, grandchild = int(pids["child"]), int(pids["grandchild"])
        self.addCleanup(kill_group, child)
        self.addCleanup(kill_group, grandchild)
        self.assertFalse(gone(child))
        self.assertEqual(len(os.listdir(state_dir)), 1)

        started = reactor.seconds()
        os.kill(helper.pid, signal.SIGKILL)
        await within(helper_proto.when_ended(), 5)
        self.assertTrue(await poll_until(lambda: gone(child), 5), "the child outlived the killed proxy")
        print(f"\n    child gone {reactor.seconds() - started:.3f}s after the proxy was SIGKILLed", end=" ")
        # PR_SET_PDEATHSIG does not reach the grandchild; the stale sweep does.
        self.assertFalse(gone(grandchild))
        swept = sweep_stale(state_dir)
        self.assertEqual([r.pid for r in swept], [child])
        self.assertTrue(await poll_until(lambda: gone(grandchild), 5))
        self.assertEqual(os.listdir(state_dir), [])

    async def test_stale_registry_sweep_kills_leftover(self) -> None:
        model = responder("leftover")
        argv = shlex.split(model.cmd)
        child, proto, lines = self.spawn(argv)
        self.assertTrue(await poll_until(lambda: any(b"listening on" in l for l in lines), 15))
        stale_dir = os.path.abspath(self.mktemp())
        live_dir = os.path.abspath(self.mktemp())
        # recorded by a llamaswap that is gone (its pid now has another start time) ...
        ChildRegistry(stale_dir).add(child.pid, model.id, argv, owner=(os.getpid(), 1.0))
        # ... and by one that is alive: that record must be left alone
        ChildRegistry(live_dir).add(child.pid, model.id, argv)
        self.assertEqual(sweep_stale(live_dir), [])
        self.assertEqual(len(os.listdir(live_dir)), 1)
        self.assertFalse(gone(child.pid))
        [record] = sweep_stale(stale_dir)
        self.assertEqual((record.pid, record.pgid, record.model), (child.pid, child.pid, "leftover"))
        status = await within(proto.when_ended(), 5)
        self.assertEqual(status.signal, signal.SIGKILL)
        self.assertEqual(os.listdir(stale_dir), [])

    async def test_registry_records_while_running(self) -> None:
        state_dir = os.path.abspath(self.mktemp())
        registry = ChildRegistry(state_dir)
        proc = self.process(responder("recorded"), registry=registry, upstream_log=LogMonitor())
        await within(proc.ensure_ready(), 15)
        [record] = registry.records()
        self.assertEqual((record.pid, record.model, record.owner_pid), (proc.pid, "recorded", os.getpid()))
        await within(proc.stop(5), 10)
        self.assertEqual(registry.records(), [])


HELPER = textwrap.dedent(
    """
    # A stand-in llamaswap: starts one model, prints its pids, runs until killed.
    import json, re, sys
    from twisted.internet import reactor
    from llamaswap.config.types import ModelConfig
    from llamaswap.process import ChildRegistry, Process

    state_dir, spec = sys.argv[1], json.loads(sys.argv[2])
    spec["env"] = tuple(spec["env"])
    proc = Process(reactor, ModelConfig(**spec), registry=ChildRegistry(state_dir))

    def ready(_):
        print("child", proc.pid, flush=True)
        match = re.search(rb"grandchild pid (\\d+)", proc.logmon.history())
        print("grandchild", int(match.group(1)), flush=True)

    def failed(f):
        print("failed", f.getErrorMessage(), flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: proc.ensure_ready().addCallbacks(ready, failed))
    reactor.run()
    """
)
