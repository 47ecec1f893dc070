"""Pure state-machine tests of llamaswap.process.Process: a Clock, a fake
spawner whose children record signals and whose exits the test drives, and
a fake health GET whose Deferreds the test fires."""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionRefusedError, ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config.types import ModelConfig
from llamaswap.logmon import LogMonitor
from llamaswap.process import (
    HealthCheckTimeoutError,
    PrematureExitError,
    Process,
    ProcessShutdownError,
    ProcessState,
    StartAbortedError,
    StartError,
)
from llamaswap.process.process import (
    EXIT_DRAIN_TIMEOUT,
    HEALTH_POLL_INTERVAL,
    HEALTH_POLL_MIN_INTERVAL,
    START_KILL_GRACE,
    health_poll_delay,
)

STOPPED = ProcessState.STOPPED
STARTING = ProcessState.STARTING
READY = ProcessState.READY
STOPPING = ProcessState.STOPPING
SHUTDOWN = ProcessState.SHUTDOWN
TERM = signal.SIGTERM
KILL = signal.SIGKILL
PY = sys.executable
BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/x"}


class FakeChild:
    """A spawned child: records signals; the test makes it print and exit."""

    def __init__(self, pid: int, proto: Any, argv: list[str], env: dict[str, str]) -> None:
        self.pid = pid
        self.proto = proto
        self.argv = argv
        self.env = env
        self.signals: list[int] = []
        self.stdin_closed = False

    # the bits of a transport the protocol uses
    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, sig: int) -> None:
        self.signals.append(sig)

    def output(self, data: bytes, fd: int = 1) -> None:
        self.proto.childDataReceived(fd, data)

    def exited(self, code: Optional[int] = 0, sig: Optional[int] = None) -> Failure:
        if code == 0 and sig is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(exitCode=code, signal=sig))
        self.proto.processExited(reason)
        return reason

    def ended(self, reason: Failure) -> None:
        self.proto.processEnded(reason)

    def exit(self, code: Optional[int] = 0, sig: Optional[int] = None) -> None:
        self.ended(self.exited(code, sig))


class FakeSpawner:
    def __init__(self) -> None:
        self.children: list[FakeChild] = []
        self.error: Optional[Exception] = None
        self._next_pid = 1000

    def __call__(self, proto: Any, argv: list[str], env: dict[str, str]) -> FakeChild:
        if self.error is not None:
            raise self.error
        self._next_pid += 1
        child = FakeChild(self._next_pid, proto, argv, env)
        proto.makeConnection(child)
        self.children.append(child)
        return child

    @property
    def last(self) -> FakeChild:
        return self.children[-1]


class FakeHttp:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, Deferred[int]]] = []
        self.cancelled = 0

    def _cancel(self, d: Deferred[int]) -> None:
        self.cancelled += 1

    def __call__(self, url: str, timeout: float) -> Deferred[int]:
        d: Deferred[int] = Deferred(self._cancel)
        self.calls.append((url, timeout, d))
        return d

    def answer(self, code: int) -> None:
        self.calls[-1][2].callback(code)

    def refuse(self) -> None:
        self.calls[-1][2].errback(ConnectionRefusedError())


class FakeRegistry:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def add(self, pid: int, model: str, argv: list[str]) -> None:
        self.events.append(("add", pid))

    def remove(self, pid: int) -> None:
        self.events.append(("remove", pid))


def model(**kw: Any) -> ModelConfig:
    defaults: dict[str, Any] = dict(
        id="m",
        cmd=f"{PY} -m server --port 9999",
        proxy="http://127.0.0.1:9999",
        health_check_timeout=30,
        unload_timeout=7,
    )
    defaults.update(kw)
    return ModelConfig(**defaults)


class MachineTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.http = FakeHttp()
        self.transitions: list[tuple[ProcessState, ProcessState]] = []
        self.upstream = LogMonitor()
        self.registry = FakeRegistry()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def make(self, **kw: Any) -> Process:
        return Process(
            self.clock,
            model(**kw),
            upstream_log=self.upstream,
            on_state=lambda p, old, new: self.transitions.append((old, new)),
            spawner=self.spawner,
            http_get=self.http,
            registry=self.registry,  # type: ignore[arg-type]
            base_env=BASE_ENV,
        )

    def ready(self, **kw: Any) -> Process:
        proc = self.make(**kw)
        d = proc.ensure_ready()
        self.http.answer(200)
        self.successResultOf(d)
        self.assertIs(proc.state, READY)
        self.transitions.clear()
        return proc

    def logged(self, text: str) -> list[dict]:
        return [e for e in self.events if text in e.get("log_format", "")]


class StartTests(MachineTestCase):
    def test_start_polls_until_200(self) -> None:
        proc = self.make()
        self.assertIs(proc.state, STOPPED)
        d = proc.ensure_ready()
        self.assertIs(proc.state, STARTING)
        child = self.spawner.last
        self.assertEqual(child.argv, [PY, "-m", "server", "--port", "9999"])
        self.assertEqual(child.env, BASE_ENV)
        self.assertTrue(child.stdin_closed)
        self.assertEqual(proc.pid, child.pid)
        # the first poll is immediate
        self.assertEqual(len(self.http.calls), 1)
        self.assertEqual(self.http.calls[0][0], "http://127.0.0.1:9999/health")
        self.http.answer(503)
        self.clock.advance(HEALTH_POLL_MIN_INTERVAL * 0.9)
        self.assertEqual(len(self.http.calls), 1)
        self.clock.advance(HEALTH_POLL_MIN_INTERVAL * 0.1)
        self.assertEqual(len(self.http.calls), 2)
        self.http.refuse()  # connection refused: just "not yet"
        self.clock.advance(HEALTH_POLL_MIN_INTERVAL)
        self.assertEqual(len(self.http.calls), 3)
        self.assertNoResult(d)
        self.http.answer(200)
        self.assertIsNone(self.successResultOf(d))
        self.assertIs(proc.state, READY)
        self.assertEqual(self.transitions, [(STOPPED, STARTING), (STARTING, READY)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.registry.events, [("add", child.pid)])
        self.assertTrue(self.logged("health check passed"))

    def test_model_env_appended(self) -> None:
        proc = self.make(env=("CUDA_VISIBLE_DEVICES=1", "HOME=/models"))
        proc.ensure_ready()
        self.assertEqual(
            self.spawner.last.env,
            {"PATH": "/usr/bin:/bin", "HOME": "/models", "CUDA_VISIBLE_DEVICES": "1"},
        )

    def test_check_endpoint_without_slash(self) -> None:
        proc = self.make(check_endpoint="v1/models", proxy="http://h:1/")
        proc.ensure_ready()
        self.assertEqual(self.http.calls[0][0], "http://h:1/v1/models")

    def test_check_endpoint_none_ready_at_spawn(self) -> None:
        proc = self.make(check_endpoint=" none ")
        self.successResultOf(proc.ensure_ready())
        self.assertIs(proc.state, READY)
        self.assertEqual(self.http.calls, [])
        self.assertEqual(self.transitions, [(STOPPED, STARTING), (STARTING, READY)])

    def test_ready_fires_now(self) -> None:
        proc = self.ready()
        self.successResultOf(proc.ensure_ready())
        self.assertEqual(len(self.spawner.children), 1)
        self.assertEqual(self.transitions, [])

    def test_concurrent_callers_get_their_own_deferred(self) -> None:
        proc = self.make()
        ds = [proc.ensure_ready() for _ in range(3)]
        self.assertEqual(len({id(d) for d in ds}), 3)
        self.assertEqual(len(self.spawner.children), 1)
        ds[0].addCallback(lambda _: "changed by the first caller")
        self.http.answer(200)
        self.assertEqual(self.successResultOf(ds[0]), "changed by the first caller")
        self.assertIsNone(self.successResultOf(ds[1]))
        self.assertIsNone(self.successResultOf(ds[2]))

    def test_concurrent_callers_each_get_the_failure(self) -> None:
        proc = self.make()
        ds = [proc.ensure_ready() for _ in range(3)]
        ds[0].addErrback(lambda f: "handled")
        self.spawner.last.exit(2)
        self.assertEqual(self.successResultOf(ds[0]), "handled")
        for d in ds[1:]:
            self.failureResultOf(d, PrematureExitError)

    def test_cancelled_waiter_withdraws_only_itself(self) -> None:
        proc = self.make()
        d1, d2 = proc.ensure_ready(), proc.ensure_ready()
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.assertIs(proc.state, STARTING)
        self.http.answer(200)
        self.successResultOf(d2)

    def test_exit_during_start(self) -> None:
        proc = self.make()
        d = proc.ensure_ready()
        child = self.spawner.last
        child.output(b"loading model\n")
        child.output(b"error: cannot open /m.gguf\n", fd=2)
        child.output(b"partial last line")
        child.exit(1)
        error = self.failureResultOf(d, PrematureExitError).value
        self.assertTrue(str(error).startswith("upstream command exited prematurely (exit code 1)"))
        self.assertIn("error: cannot open /m.gguf", str(error))
        self.assertIn("partial last line", str(error))
        self.assertEqual(error.output[-1], "partial last line")
        self.assertIs(proc.state, STOPPED)
        self.assertIsNone(proc.pid)
        self.assertEqual(self.transitions, [(STOPPED, STARTING), (STARTING, STOPPED)])
        # the rest of its process group is killed when the leader exits
        self.assertEqual(child.signals, [KILL])
        self.assertEqual(self.registry.events, [("add", child.pid), ("remove", child.pid)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # the next caller starts it again
        d2 = proc.ensure_ready()
        self.assertEqual(len(self.spawner.children), 2)
        self.http.answer(200)
        self.successResultOf(d2)

    def test_exit_during_start_waits_for_output_drain_bounded(self) -> None:
        proc = self.make()
        d = proc.ensure_ready()
        child = self.spawner.last
        reason = child.exited(3)
        # processExited: not decided yet, the output may still be in the pipes
        self.assertIs(proc.state, STARTING)
        self.assertNoResult(d)
        child.output(b"late line\n")
        self.clock.advance(EXIT_DRAIN_TIMEOUT)
        self.assertIn("late line", str(self.failureResultOf(d, PrematureExitError).value))
        self.assertIs(proc.state, STOPPED)
        # a processEnded arriving later is ignored
        child.ended(reason)
        self.assertIs(proc.state, STOPPED)

    def test_health_answer_after_exit_is_ignored(self) -> None:
        proc = self.make()
        d = proc.ensure_ready()
        self.spawner.last.exited(1)
        self.http.answer(200)
        self.assertIs(proc.state, STARTING)
        self.clock.advance(EXIT_DRAIN_TIMEOUT)
        self.failureResultOf(d, PrematureExitError)

    def test_health_timeout(self) -> None:
        proc = self.make(health_check_timeout=3)
        d = proc.ensure_ready()
        child = self.spawner.last
        child.output(b"still loading\n")
        for _ in range(59):
            self.http.answer(503)
            self.clock.advance(HEALTH_POLL_INTERVAL)
        self.assertNoResult(d)
        self.clock.advance(3 - self.clock.seconds() + 1e-9)
        error = self.failureResultOf(d, HealthCheckTimeoutError).value
        self.assertTrue(str(error).startswith("health check timed out after 3s"))
        self.assertIn("still loading", str(error))
        self.assertIs(proc.state, STOPPING)
        self.assertEqual(child.signals, [TERM])
        polls = len(self.http.calls)
        self.clock.advance(START_KILL_GRACE)
        self.assertEqual(child.signals, [TERM, KILL])
        self.assertEqual(len(self.http.calls), polls)  # no polling while stopping
        child.exit(None, KILL)
        self.assertIs(proc.state, STOPPED)
        self.assertEqual(
            self.transitions,
            [(STOPPED, STARTING), (STARTING, STOPPING), (STOPPING, STOPPED)],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])
        proc.ensure_ready()
        self.assertEqual(len(self.spawner.children), 2)

    def test_retry_after_health_timeout_waits_for_stop(self) -> None:
        proc = self.make(health_check_timeout=1)
        d = proc.ensure_ready()
        retried: list[Deferred[None]] = []
        d.addErrback(lambda f: retried.append(proc.ensure_ready()))
        self.clock.advance(1)
        self.assertIs(proc.state, STOPPING)
        self.assertNoResult(retried[0])
        self.spawner.last.exit(0)
        self.assertIs(proc.state, STARTING)
        self.assertEqual(len(self.spawner.children), 2)
        self.http.answer(200)
        self.successResultOf(retried[0])

    def test_spawn_failure(self) -> None:
        proc = self.make()
        self.spawner.error = OSError(13, "Permission denied")
        d = proc.ensure_ready()
        error = self.failureResultOf(d, StartError).value
        self.assertEqual(
            str(error), f"failed to start command '{PY} -m server --port 9999': [Errno 13] Permission denied"
        )
        self.assertIs(proc.state, STOPPED)
        self.assertEqual(self.transitions, [(STOPPED, STARTING), (STARTING, STOPPED)])
        self.spawner.error = None
        d = proc.ensure_ready()
        self.http.answer(200)
        self.successResultOf(d)

    def test_command_errors(self) -> None:
        for cmd, text in [
            ("# nothing\n", "empty command"),
            ("no-such-server-binary --x", "'no-such-server-binary' not found in PATH"),
        ]:
            proc = self.make(cmd=cmd)
            error = self.failureResultOf(proc.ensure_ready(), StartError).value
            self.assertTrue(str(error).startswith("failed to start command '"), str(error))
            self.assertIn(text, str(error))
            self.assertIs(proc.state, STOPPED)
        self.assertEqual(self.spawner.children, [])


class StopTests(MachineTestCase):
    def test_stop_ready(self) -> None:
        proc = self.ready()
        child = self.spawner.last
        d = proc.stop(10)
        self.assertIs(proc.state, STOPPING)
        self.assertEqual(child.signals, [TERM])
        self.assertNoResult(d)
        child.exit(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertIs(proc.state, STOPPED)
        self.assertEqual(child.signals, [TERM, KILL])  # KILL: the rest of the group
        self.assertEqual(self.transitions, [(READY, STOPPING), (STOPPING, STOPPED)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_term_then_kill_after_grace(self) -> None:
        proc = self.ready()
        child = self.spawner.last
        d = proc.stop(10)
        self.clock.advance(9.9)
        self.assertEqual(child.signals, [TERM])
        self.clock.advance(0.1)
        self.assertEqual(child.signals, [TERM, KILL])
        self.assertNoResult(d)
        child.exit(None, KILL)
        self.successResultOf(d)

    def test_stop_grace_zero_kills_at_once(self) -> None:
        proc = self.ready()
        proc.stop(0)
        self.assertEqual(self.spawner.last.signals, [KILL])

    def test_stop_when_stopped(self) -> None:
        proc = self.make()
        self.successResultOf(proc.stop(5))
        self.assertEqual(self.transitions, [])

    def test_stop_while_stopping_waits_and_shorter_grace_wins(self) -> None:
        proc = self.ready()
        child = self.spawner.last
        d1 = proc.stop(30)
        self.clock.advance(1)
        d2 = proc.stop(2)
        d3 = proc.stop(60)  # a longer grace does not delay the kill
        self.assertEqual(child.signals, [TERM])
        self.clock.advance(2)
        self.assertEqual(child.signals, [TERM, KILL])
        child.exit(None, KILL)
        for d in (d1, d2, d3):
            self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_during_starting_aborts_start(self) -> None:
        proc = self.make()
        starting = [proc.ensure_ready(), proc.ensure_ready()]
        d = proc.stop(5)
        for s in starting:
            self.assertEqual(str(self.failureResultOf(s, StartAbortedError).value), "aborted")
        self.assertEqual(self.http.cancelled, 1)  # the poll in flight is cancelled
        self.assertIs(proc.state, STOPPING)
        self.assertEqual(self.spawner.last.signals, [TERM])
        self.clock.advance(5)
        self.assertEqual(self.spawner.last.signals, [TERM, KILL])
        self.spawner.last.exit(None, KILL)
        self.successResultOf(d)
        self.assertIs(proc.state, STOPPED)
        self.assertEqual(
            self.transitions, [(STOPPED, STARTING), (STARTING, STOPPING), (STOPPING, STOPPED)]
        )
        self.assertEqual(len(self.http.calls), 1)

    def test_ensure_ready_during_stopping_waits_then_restarts(self) -> None:
        proc = self.ready()
        first = self.spawner.last
        stopped = proc.stop(10)
        order: list[str] = []
        stopped.addCallback(lambda _: order.append("stopped"))
        d = proc.ensure_ready()
        d.addCallback(lambda _: order.append("ready"))
        self.assertIs(proc.state, STOPPING)
        self.assertEqual(len(self.spawner.children), 1)
        first.exit(0)
        self.assertEqual(order, ["stopped"])
        self.assertIs(proc.state, STARTING)
        self.assertEqual(len(self.spawner.children), 2)
        self.http.answer(200)
        self.assertEqual(order, ["stopped", "ready"])
        self.assertIs(proc.state, READY)
        self.assertEqual(proc.pid, self.spawner.last.pid)
        self.assertEqual(
            self.transitions,
            [(READY, STOPPING), (STOPPING, STOPPED), (STOPPED, STARTING), (STARTING, READY)],
        )

    def test_stop_after_queued_start_aborts_it(self) -> None:
        proc = self.ready()
        proc.stop(10)
        queued = proc.ensure_ready()
        again = proc.stop(10)
        self.failureResultOf(queued, StartAbortedError)
        self.spawner.last.exit(0)
        self.successResultOf(again)
        self.assertIs(proc.state, STOPPED)
        self.assertEqual(len(self.spawner.children), 1)

    def test_stop_waiter_may_start_again(self) -> None:
        proc = self.ready()
        later: list[Deferred[None]] = []
        proc.stop(1).addCallback(lambda _: later.append(proc.ensure_ready()))
        queued = proc.ensure_ready()
        self.spawner.last.exit(0)
        self.assertEqual(len(self.spawner.children), 2)  # one start serves both
        self.http.answer(200)
        self.successResultOf(later[0])
        self.successResultOf(queued)

    def test_cmd_stop_with_pid(self) -> None:
        proc = self.ready(cmd_stop=f"{PY} stopper.py \\\n  --pid ${{PID}}", env=("A=1",))
        child = self.spawner.last
        d = proc.stop(4)
        self.assertEqual(len(self.spawner.children), 2)
        stopper = self.spawner.last
        self.assertEqual(stopper.argv, [PY, "stopper.py", "--pid", str(child.pid)])
        self.assertEqual(stopper.env["A"], "1")
        self.assertEqual(child.signals, [])  # no SIGTERM when cmdStop is set
        stopper.output(b"stopping server\n")
        stopper.exit(0)
        self.assertIn(b"stopping server\n", proc.logmon.history())
        self.clock.advance(4)
        self.assertEqual(child.signals, [KILL])  # still escalates after grace
        child.exit(None, KILL)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cmd_stop_that_hangs_is_killed(self) -> None:
        proc = self.ready(cmd_stop=f"{PY} stopper.py ${{PID}}")
        child = self.spawner.last
        proc.stop(3)
        stopper = self.spawner.last
        child.exit(0)
        self.clock.advance(3)
        self.assertEqual(stopper.signals, [KILL])
        stopper.exit(None, KILL)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cmd_stop_unusable_falls_back_to_sigterm(self) -> None:
        proc = self.ready(cmd_stop="no-such-stop-tool ${PID}")
        proc.stop(3)
        self.assertEqual(self.spawner.last.signals, [TERM])
        self.assertTrue(self.logged("cmdStop"))


class CrashTests(MachineTestCase):
    def test_crash_while_ready_then_restart(self) -> None:
        proc = self.ready()
        child = self.spawner.last
        child.output(b"CUDA error: out of memory\n")
        child.exit(None, signal.SIGSEGV)
        self.assertIs(proc.state, STOPPED)
        self.assertIsNone(proc.pid)
        # STOPPING from the leader's exit (nothing is granted to a dead server
        # while its output drains), STOPPED once it has
        self.assertEqual(self.transitions, [(READY, STOPPING), (STOPPING, STOPPED)])
        [event] = self.logged("exited unexpectedly")
        self.assertEqual(event["model"], "m")
        self.assertIn("SIGSEGV", event["status"])
        self.assertIn("CUDA error: out of memory", event["output"])
        self.assertEqual(proc.last_output_lines(), ["CUDA error: out of memory"])
        d = proc.ensure_ready()
        self.assertEqual(len(self.spawner.children), 2)
        self.http.answer(200)
        self.successResultOf(d)


class TTLTests(MachineTestCase):
    def test_ttl_unloads_after_idle(self) -> None:
        proc = self.ready(ttl=5)
        self.clock.advance(4.9)
        self.assertIs(proc.state, READY)
        self.clock.advance(0.1)
        self.assertIs(proc.state, STOPPING)
        self.assertEqual(self.spawner.last.signals, [TERM])
        self.clock.advance(7)  # unload_timeout is the grace
        self.assertEqual(self.spawner.last.signals, [TERM, KILL])
        self.spawner.last.exit(None, KILL)
        self.assertIs(proc.state, STOPPED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ttl_counts_from_last_finished_request(self) -> None:
        proc = self.ready(ttl=5)
        self.clock.advance(3)
        proc.request_started()
        proc.request_finished()
        self.clock.advance(4)
        self.assertIs(proc.state, READY)
        self.clock.advance(1)
        self.assertIs(proc.state, STOPPING)

    def test_long_request_is_not_cut(self) -> None:
        proc = self.ready(ttl=5)
        proc.request_started()
        proc.request_started()
        self.assertEqual(proc.in_flight, 2)
        self.clock.advance(100)
        self.assertIs(proc.state, READY)
        proc.request_finished()
        self.clock.advance(100)
        self.assertIs(proc.state, READY)
        proc.request_finished()
        self.assertEqual(proc.in_flight, 0)
        self.clock.advance(4.9)
        self.assertIs(proc.state, READY)
        self.clock.advance(0.1)
        self.assertIs(proc.state, STOPPING)

    def test_ttl_zero_never_unloads(self) -> None:
        proc = self.ready(ttl=0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10**6)
        self.assertIs(proc.state, READY)

    def test_request_arriving_during_ttl_stop_restarts(self) -> None:
        proc = self.ready(ttl=1)
        self.clock.advance(1)
        self.assertIs(proc.state, STOPPING)
        d = proc.ensure_ready()
        self.spawner.last.exit(0)
        self.assertIs(proc.state, STARTING)
        self.http.answer(200)
        self.successResultOf(d)
        # and the TTL applies again to the new child
        self.clock.advance(1)
        self.assertIs(proc.state, STOPPING)


class ShutdownTests(MachineTestCase):
    def test_shutdown_from_ready_is_terminal(self) -> None:
        proc = self.ready()
        d = proc.shutdown(5)
        self.assertIs(proc.state, STOPPING)
        self.assertEqual(self.spawner.last.signals, [TERM])
        self.failureResultOf(proc.ensure_ready(), ProcessShutdownError)
        self.spawner.last.exit(0)
        self.successResultOf(d)
        self.assertIs(proc.state, SHUTDOWN)
        self.assertEqual(
            self.transitions, [(READY, STOPPING), (STOPPING, STOPPED), (STOPPED, SHUTDOWN)]
        )
        self.failureResultOf(proc.ensure_ready(), ProcessShutdownError)
        self.successResultOf(proc.stop(1))
        self.successResultOf(proc.shutdown(1))
        self.assertEqual(len(self.spawner.children), 1)

    def test_shutdown_from_stopped(self) -> None:
        proc = self.make()
        self.successResultOf(proc.shutdown(5))
        self.assertIs(proc.state, SHUTDOWN)
        self.assertEqual(self.transitions, [(STOPPED, SHUTDOWN)])

    def test_shutdown_during_start(self) -> None:
        proc = self.make()
        starting = proc.ensure_ready()
        d = proc.shutdown(5)
        self.failureResultOf(starting, ProcessShutdownError)
        self.spawner.last.exit(0)
        self.successResultOf(d)
        self.assertIs(proc.state, SHUTDOWN)

    def test_shutdown_during_stop_fails_queued_starts(self) -> None:
        proc = self.ready()
        stopped = proc.stop(10)
        queued = proc.ensure_ready()
        d1 = proc.shutdown(1)
        d2 = proc.shutdown(1)
        self.failureResultOf(queued, ProcessShutdownError)
        self.clock.advance(1)
        self.assertEqual(self.spawner.last.signals, [TERM, KILL])
        self.spawner.last.exit(None, KILL)
        self.successResultOf(stopped)
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertIs(proc.state, SHUTDOWN)
        self.assertEqual(len(self.spawner.children), 1)


class MiscTests(MachineTestCase):
    def test_output_goes_to_model_and_upstream_logs(self) -> None:
        proc = self.make()
        proc.ensure_ready()
        self.spawner.last.output(b"hello\nwor")
        self.spawner.last.output(b"ld\n")
        self.spawner.last.output(b"on stderr\n", fd=2)
        self.assertEqual(proc.logmon.history(), b"hello\nworld\non stderr\n")
        self.assertEqual(self.upstream.history(), b"hello\nworld\non stderr\n")
        self.assertEqual(proc.last_output_lines(), ["hello", "world", "on stderr"])
        self.assertEqual(proc.last_output_lines(1), ["on stderr"])

    def test_stdout_and_stderr_lines_do_not_mix(self) -> None:
        proc = self.make()
        proc.ensure_ready()
        self.spawner.last.output(b"out-")
        self.spawner.last.output(b"err line\n", fd=2)
        self.spawner.last.output(b"line\n")
        self.assertEqual(proc.last_output_lines(), ["err line", "out-line"])

    def test_last_output_lines_bounded(self) -> None:
        proc = self.make()
        proc.ensure_ready()
        for i in range(200):
            self.spawner.last.output(b"line %d\n" % i)
        lines = proc.last_output_lines()
        self.assertEqual(len(lines), 50)
        self.assertEqual(lines[-1], "line 199")

    def test_request_accounting_never_negative(self) -> None:
        proc = self.ready()
        proc.request_finished()
        self.assertEqual(proc.in_flight, 0)

    def test_on_state_observer_failure_does_not_break_the_machine(self) -> None:
        def bad(p: Process, old: ProcessState, new: ProcessState) -> None:
            raise RuntimeError("observer bug")

        proc = Process(self.clock, model(), on_state=bad, spawner=self.spawner, http_get=self.http, base_env=BASE_ENV)
        d = proc.ensure_ready()
        self.http.answer(200)
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_repr_and_id(self) -> None:
        proc = self.make()
        self.assertEqual(proc.id, "m")
        self.assertIn("stopped", repr(proc))

    def test_state_values(self) -> None:
        self.assertEqual([s.value for s in ProcessState], ["stopped", "starting", "ready", "stopping", "shutdown"])

    def test_model_replace_keeps_cmd(self) -> None:
        # sanity for the helper used above
        self.assertEqual(replace(model(), ttl=3).ttl, 3)


class HealthPollScheduleTests(MachineTestCase):
    """The health polling schedule on the Clock: the first poll at spawn, then
    every 5 ms, backing off with the time the start has taken to the 50 ms
    interval."""

    def make_upstream(self, healthy_at: float, **kw: Any) -> Process:
        """A process whose upstream answers every poll at once: 503 before
        ``healthy_at`` (clock time), 200 from then on."""
        self.times: list[float] = []

        def http_get(url: str, timeout: float) -> Deferred[int]:
            self.times.append(self.clock.seconds())
            return succeed(200 if self.clock.seconds() >= healthy_at else 503)

        kw.setdefault("health_check_timeout", 600)
        return Process(self.clock, model(**kw), spawner=self.spawner, http_get=http_get, base_env=BASE_ENV)

    def run_until(self, until: float) -> None:
        """Advance the clock from one delayed call to the next, up to ``until``."""
        while self.clock.seconds() < until:
            times = [c.getTime() for c in self.clock.getDelayedCalls()]
            step = min([t for t in times if t <= until] or [until]) - self.clock.seconds()
            self.clock.advance(max(step, 0.0))

    def ready_at(self, proc: Process) -> list[float]:
        when: list[float] = []
        proc.ensure_ready().addCallback(lambda _: when.append(self.clock.seconds()))
        return when

    def test_delay_grows_from_5_ms_to_the_interval(self) -> None:
        self.assertEqual((HEALTH_POLL_MIN_INTERVAL, HEALTH_POLL_INTERVAL), (0.005, 0.05))
        self.assertEqual(health_poll_delay(0.0), 0.005)
        self.assertAlmostEqual(health_poll_delay(0.1), 0.005)
        self.assertAlmostEqual(health_poll_delay(0.2), 0.01)
        self.assertAlmostEqual(health_poll_delay(0.5), 0.025)
        self.assertEqual(health_poll_delay(1.0), 0.05)
        self.assertEqual(health_poll_delay(600.0), 0.05)
        grid = [i / 100 for i in range(300)]
        delays = [health_poll_delay(t) for t in grid]
        self.assertEqual(delays, sorted(delays))

    def test_first_poll_at_spawn_then_backoff(self) -> None:
        proc = self.make_upstream(healthy_at=5.0)
        when = self.ready_at(proc)
        self.assertEqual(self.times, [0.0])
        self.run_until(5.1)
        self.assertEqual(when, [self.times[-1]])
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        self.assertAlmostEqual(gaps[0], HEALTH_POLL_MIN_INTERVAL)
        for gap, later in zip(gaps, gaps[1:]):
            self.assertLessEqual(gap, later + 1e-9)
        self.assertGreaterEqual(len([t for t in self.times if t < 0.1]), 20)  # every 5 ms at first
        for t, gap in zip(self.times, gaps):
            if t >= 1.0:  # from one second on, the fixed 50 ms interval of before
                self.assertAlmostEqual(gap, HEALTH_POLL_INTERVAL)
        self.assertIs(proc.state, READY)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_healthy_server_is_seen_within_one_delay(self) -> None:
        for healthy_at in (0.003, 0.03, 0.09, 0.3, 1.0, 2.5, 20.0):
            proc = self.make_upstream(healthy_at)
            when = self.ready_at(proc)
            self.run_until(healthy_at + 1.0)
            late = when[0] - healthy_at
            self.assertGreaterEqual(late, 0.0)
            self.assertLessEqual(late, health_poll_delay(healthy_at) + 1e-9, healthy_at)
            self.clock = Clock()

    def test_output_does_not_change_the_schedule(self) -> None:
        proc = self.make_upstream(healthy_at=100.0)
        proc.ensure_ready()
        self.run_until(2.0)
        [call] = [c for c in self.clock.getDelayedCalls() if c.getTime() < 10]
        due = call.getTime()
        for _ in range(50):  # a server that logs every health request, say
            self.spawner.last.output(b"GET /health 503\n")
        self.assertEqual(call.getTime(), due)
