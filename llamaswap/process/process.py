"""One supervised upstream server per local model: the ``Process`` state machine.

::

    STOPPED ──ensure_ready──▶ STARTING ──health 200──▶ READY
       ▲                        │  exit / timeout / stop    │ stop / TTL
       │                        ▼                           ▼
       └──────── child gone ── STOPPING ◀──────────────────┘
    shutdown: stop, then SHUTDOWN (terminal)

Every decision is taken inside the machine from its current state (never
from a caller's earlier read), all in reactor callbacks, without locks.
Each caller of :meth:`Process.ensure_ready`, :meth:`Process.stop` and
:meth:`Process.shutdown` gets a Deferred of its own.
"""

from __future__ import annotations

import enum
import os
import shlex
import signal
from functools import partial
from typing import Any, Callable, Mapping, Optional, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessProtocol
from twisted.internet.protocol import Protocol as _Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: F401  (type of self._pool)
from twisted.web.http_headers import Headers

from ..config.types import ModelConfig
from ..httpclient import quiet_pool, upstream_agent
from ..logmon import LogMonitor
from .command import build_env, resolve_executable, sanitize_command
from .errors import (
    CommandError,
    HealthCheckTimeoutError,
    PrematureExitError,
    ProcessError,
    ProcessShutdownError,
    StartAbortedError,
    StartError,
)
from .protocol import ExitStatus, UpstreamProtocol
from .registry import ChildRegistry
from .spawn import spawn_in_new_group

__all__ = ["ChildHandle", "Process", "ProcessState", "health_poll_delay", "http_status"]

#: Health polling: the first poll as soon as the child is spawned; after each
#: "not yet" (a refused connection, an answer other than 200) the next one
#: :func:`health_poll_delay` later: from HEALTH_POLL_MIN_INTERVAL, growing
#: with the time the start has taken (HEALTH_POLL_BACKOFF of it), up to
#: HEALTH_POLL_INTERVAL.
HEALTH_POLL_INTERVAL = 0.05
HEALTH_POLL_MIN_INTERVAL = 0.005
HEALTH_POLL_BACKOFF = 0.05
#: Bound on one health poll (connect + answer).
HEALTH_POLL_TIMEOUT = 1.0
#: Grace before SIGKILL when a start is given up (health check timeout).
START_KILL_GRACE = 5.0
#: After the child died, how long to wait for its pipes to drain before the
#: machine moves on anyway.
EXIT_DRAIN_TIMEOUT = 0.5
#: Output lines quoted in error messages.
ERROR_TAIL_LINES = 10


def health_poll_delay(elapsed: float) -> float:
    """
    How long after a "not yet" the next health poll comes, ``elapsed``
    seconds into a start: a twentieth of ``elapsed``, at least 5 ms and at
    most :data:`HEALTH_POLL_INTERVAL` (50 ms, from one second on).  A server
    that becomes healthy is thus seen at most ~5 % of its start time late
    (never more than 50 ms; a tiny model, healthy 0.1 s after exec, within
    5 ms), and a long load is polled no more often than at the fixed 50 ms
    before.
    """
    return min(HEALTH_POLL_INTERVAL, max(HEALTH_POLL_MIN_INTERVAL, elapsed * HEALTH_POLL_BACKOFF))


class ProcessState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    SHUTDOWN = "shutdown"

    def __str__(self) -> str:
        return self.value


class ChildHandle(Protocol):
    """What a spawner returns: a pid and a signal to the child's process group."""

    pid: int

    def signalProcess(self, signal: int) -> None:  # noqa: N802
        ...


#: ``spawner(protocol, argv, env) -> ChildHandle``; argv[0] is absolute.
Spawner = Callable[[IProcessProtocol, "list[str]", "dict[str, str]"], ChildHandle]
#: ``http_get(url, timeout) -> Deferred[status code]``.
HttpGet = Callable[[str, float], "Deferred[int]"]
StateObserver = Callable[["Process", ProcessState, ProcessState], None]

STOPPED = ProcessState.STOPPED
STARTING = ProcessState.STARTING
READY = ProcessState.READY
STOPPING = ProcessState.STOPPING
SHUTDOWN = ProcessState.SHUTDOWN


class _Discard(_Protocol):
    """Reads a response body to the end, keeping nothing."""

    def __init__(self, done: "Deferred[None]") -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(None)


def http_status(reactor: Any, agent: Agent, url: str, timeout: float) -> "Deferred[int]":
    """``GET url`` and fire with the status code once the body was read.

    The whole exchange is bounded by ``timeout`` and cancellable.
    """
    d: Deferred[Any] = agent.request(
        b"GET", url.encode("ascii"), Headers({b"user-agent": [b"llamaswap-health"]})
    )

    def got(response: Any) -> "Deferred[int]":
        proto: _Discard

        def cancel(_: Deferred[None]) -> None:
            if proto.transport is not None:
                proto.transport.stopProducing()

        done: Deferred[None] = Deferred(cancel)
        proto = _Discard(done)
        response.deliverBody(proto)
        return done.addCallback(lambda _: response.code)

    d.addCallback(got)
    d.addTimeout(timeout, reactor)
    return d


class Process:
    """The lifecycle of one local model's upstream server."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        model: ModelConfig,
        *,
        upstream_log: Optional[LogMonitor] = None,
        on_state: Optional[StateObserver] = None,
        spawner: Optional[Spawner] = None,
        http_get: Optional[HttpGet] = None,
        registry: Optional[ChildRegistry] = None,
        logmon: Optional[LogMonitor] = None,
        base_env: Optional[Mapping[str, str]] = None,
    ) -> None:
        """
        ``reactor`` provides ``callLater``/``seconds`` (and ``spawnProcess``
        for the default spawner).  ``logmon`` is this model's log monitor
        (a new one by default); ``upstream_log`` the shared one.
        ``base_env`` defaults to ``os.environ`` read at each spawn.
        ``registry`` (optional) records children for a later stale sweep.
        """
        self._reactor = reactor
        self.model = model
        self.logmon = logmon if logmon is not None else LogMonitor()
        self._upstream_log = upstream_log
        self._on_state = on_state
        self._spawner: Spawner = spawner or partial(spawn_in_new_group, reactor)
        self._http_get = http_get
        self._pool: Optional[HTTPConnectionPool] = None
        self._registry = registry
        self._base_env = base_env

        self._state = STOPPED
        self._start_waiters: list[Deferred[None]] = []
        self._stop_waiters: list[Deferred[None]] = []
        self._shutdown_waiters: list[Deferred[None]] = []
        self._shutting_down = False

        self._child: Optional[ChildHandle] = None  # set from spawn until gone
        self._proto: Optional[UpstreamProtocol] = None  # current or last child
        self._pid: Optional[int] = None
        self._exit_status: Optional[ExitStatus] = None
        self._crashed = False  # the server died while ready: STOPPING until its output drained
        self._started_at = 0.0
        self._health_url = ""

        self._health_deadline: Optional[IDelayedCall] = None
        self._poll_call: Optional[IDelayedCall] = None
        self._poll_d: Optional[Deferred[int]] = None
        self._poll_token: Optional[object] = None
        self._kill_call: Optional[IDelayedCall] = None
        self._stop_deadline: Optional[float] = None
        self._drain_call: Optional[IDelayedCall] = None
        self._ttl_call: Optional[IDelayedCall] = None
        self._stop_cmds: dict[UpstreamProtocol, tuple[ChildHandle, IDelayedCall]] = {}

        self._in_flight = 0
        self._last_finished = reactor.seconds()

    # -- read-only views ---------------------------------------------------

    @property
    def id(self) -> str:
        return self.model.id

    @property
    def state(self) -> ProcessState:
        return self._state

    @property
    def pid(self) -> Optional[int]:
        """The running child's pid (also its process group id), else None."""
        return self._pid

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def last_output_lines(self, n: Optional[int] = None) -> list[str]:
        """The last lines (up to 50) the current or last child printed."""
        return self._proto.last_lines(n) if self._proto is not None else []

    def __repr__(self) -> str:
        return f"<Process {self.model.id} {self._state.value} pid={self._pid}>"

    # -- public operations --------------------------------------------------

    def ensure_ready(self) -> "Deferred[None]":
        """
        Fires when the model is READY; starts it when needed.  READY: now;
        STOPPED: start; STARTING: join that start; STOPPING: wait for the
        stop, then start; SHUTDOWN: fails with ``ProcessShutdownError``.
        Cancelling the Deferred only withdraws this caller.
        """
        state = self._state
        if state is READY:
            return succeed(None)
        if state is SHUTDOWN or self._shutting_down:
            return fail(ProcessShutdownError(f"{self.model.id} is shutting down"))
        d: Deferred[None] = Deferred(partial(_withdraw, self._start_waiters))
        self._start_waiters.append(d)
        if state is STOPPED:
            self._start()
        return d

    def stop(self, grace: float) -> "Deferred[None]":
        """
        Fires once the child and its process group are gone.  SIGTERM to the
        group (or ``cmdStop``), SIGKILL after ``grace`` seconds.  A start in
        progress, or one queued during a stop, is aborted (its waiters fail
        with ``StartAbortedError``).  A shorter ``grace`` during a stop
        brings the SIGKILL forward.
        """
        state = self._state
        if state is STOPPED or state is SHUTDOWN:
            return succeed(None)
        d: Deferred[None] = Deferred(partial(_withdraw, self._stop_waiters))
        self._stop_waiters.append(d)
        aborted = self._take_start_waiters()
        if state is STOPPING:
            self._shorten_grace(grace)
        else:
            self._begin_stop(grace)
        _fail_all(aborted, StartAbortedError("aborted"))
        return d

    def shutdown(self, grace: float) -> "Deferred[None]":
        """Stop (like :meth:`stop`), then enter the terminal SHUTDOWN state."""
        if self._state is SHUTDOWN:
            return succeed(None)
        d: Deferred[None] = Deferred(partial(_withdraw, self._shutdown_waiters))
        self._shutdown_waiters.append(d)
        first = not self._shutting_down
        self._shutting_down = True
        state = self._state
        aborted = self._take_start_waiters()
        if state is STOPPED:
            self._enter_shutdown()
        elif state is STOPPING:
            self._shorten_grace(grace)
        elif first:
            self._begin_stop(grace)
        _fail_all(aborted, ProcessShutdownError(f"{self.model.id} is shutting down"))
        return d

    def update_model(self, model: ModelConfig) -> None:
        """A reload changed settings of this model that apply to the running
        child (TTL, unload timeout, filters, ...; see
        ``llamaswap.config.diff.PROCESS_FIELDS`` for those that do not):
        take them, restarting an idle TTL count with the new TTL."""
        if model.id != self.model.id:
            raise ValueError(f"{model.id!r} cannot take over the process of {self.model.id!r}")
        self.model = model
        if self._state is READY and not self._in_flight:
            self._schedule_ttl()

    # -- request accounting -------------------------------------------------

    def request_started(self) -> None:
        """A request was handed to the upstream (holds off the TTL)."""
        self._in_flight += 1
        self._cancel_ttl()

    def request_finished(self) -> None:
        """A request handed to the upstream has finished (any outcome)."""
        if self._in_flight <= 0:
            self.log.warn("{model} request_finished without request_started", model=self.model.id)
        else:
            self._in_flight -= 1
        self._last_finished = self._reactor.seconds()
        if self._in_flight == 0:
            self._schedule_ttl()

    # -- transitions ----------------------------------------------------------

    def _set_state(self, new: ProcessState) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        self.log.info("{model} {old} -> {new}", model=self.model.id, old=old.value, new=new.value)
        if self._on_state is not None:
            try:
                self._on_state(self, old, new)
            except Exception:
                self.log.failure("{model} on_state observer failed", model=self.model.id)

    def _take_start_waiters(self) -> list[Deferred[None]]:
        waiters, self._start_waiters = self._start_waiters, []
        return waiters

    def _start(self) -> None:
        self._set_state(STARTING)
        model = self.model
        base = os.environ if self._base_env is None else self._base_env
        try:
            argv = sanitize_command(model.cmd)
            env = build_env(base, model.env)
            argv[0] = resolve_executable(argv[0], env.get("PATH"))
        except CommandError as error:
            self._start_failed(StartError(f"failed to start command '{_one_line(model.cmd)}': {error}"))
            return

        proto = UpstreamProtocol(
            self._on_output_line,
            on_exited=lambda status: self._child_exited(proto, status),
            on_ended=lambda status: self._child_ended(proto, status),
        )
        self._proto = proto
        self._exit_status = None
        try:
            child = self._spawner(proto, argv, env)
        except Exception as error:
            self._start_failed(StartError(f"failed to start command '{shlex.join(argv)}': {error}"))
            return
        self._child = child
        self._pid = child.pid
        self._started_at = self._reactor.seconds()
        self.log.info(
            "{model} started pid {pid}: {command}", model=model.id, pid=child.pid, command=shlex.join(argv)
        )
        if self._registry is not None:
            self._registry.add(child.pid, model.id, argv)

        if model.health_check_disabled:
            self._became_ready()
            return
        endpoint = model.check_endpoint.strip()
        if not endpoint.startswith("/"):
            endpoint = "/" + endpoint
        self._health_url = model.proxy.rstrip("/") + endpoint
        if model.health_check_timeout > 0:
            self._health_deadline = self._reactor.callLater(
                model.health_check_timeout, self._health_timed_out
            )
        self._poll()

    def _start_failed(self, error: ProcessError) -> None:
        """The start failed before any child ran."""
        self.log.warn("{model} {error}", model=self.model.id, error=error.message)
        waiters = self._take_start_waiters()
        self._set_state(STOPPED)
        _fail_all(waiters, error)
        self._after_stopped()

    def _became_ready(self) -> None:
        self._set_state(READY)
        self._last_finished = self._reactor.seconds()
        self._schedule_ttl()
        for d in self._take_start_waiters():
            d.callback(None)

    # -- health ------------------------------------------------------------------

    def _get_http(self) -> HttpGet:
        if self._http_get is None:
            self._pool = quiet_pool(self._reactor, persistent=False)
            # not Agent's default endpoints: they report a refused connection 0.3 s late
            agent = upstream_agent(self._reactor, self._pool, HEALTH_POLL_TIMEOUT)
            self._http_get = partial(http_status, self._reactor, agent)
        return self._http_get

    def _poll(self) -> None:
        self._poll_call = None
        token = self._poll_token = object()
        try:
            d = self._get_http()(self._health_url, HEALTH_POLL_TIMEOUT)
        except Exception:
            d = fail()
        self._poll_d = d
        d.addCallbacks(self._poll_answered, self._poll_failed, callbackArgs=(token,), errbackArgs=(token,))

    def _current_poll(self, token: object) -> bool:
        """Is this the answer to the poll in progress (not a stale/cancelled one)?"""
        if token is not self._poll_token:
            return False
        self._poll_token = None
        self._poll_d = None
        return self._state is STARTING and self._child is not None and self._exit_status is None

    def _poll_answered(self, code: int, token: object) -> None:
        if not self._current_poll(token):
            return
        if code == 200:
            self._stop_health_checks()
            elapsed = self._reactor.seconds() - self._started_at
            self.log.info(
                "{model} health check passed on {url} after {elapsed:.3f}s",
                model=self.model.id,
                url=self._health_url,
                elapsed=elapsed,
            )
            self._became_ready()
        else:
            self._schedule_poll()

    def _poll_failed(self, failure: Failure, token: object) -> None:
        # Connection refused, timeouts, cancellation: all mean "not yet".
        if self._current_poll(token):
            self._schedule_poll()
        return None

    def _schedule_poll(self) -> None:
        """The last poll said "not yet": schedule the next."""
        elapsed = self._reactor.seconds() - self._started_at
        self._poll_call = self._reactor.callLater(health_poll_delay(elapsed), self._poll)

    def _stop_health_checks(self) -> None:
        self._health_deadline = _cancel(self._health_deadline)
        self._poll_call = _cancel(self._poll_call)
        self._poll_token = None
        d, self._poll_d = self._poll_d, None
        if d is not None:
            d.cancel()

    def _health_timed_out(self) -> None:
        self._health_deadline = None
        timeout = self.model.health_check_timeout
        error = HealthCheckTimeoutError(
            f"health check timed out after {timeout:g}s", self.last_output_lines(ERROR_TAIL_LINES)
        )
        self.log.warn("{model} {error}", model=self.model.id, error=error.message)
        waiters = self._take_start_waiters()
        self._begin_stop(START_KILL_GRACE)
        _fail_all(waiters, error)

    # -- stopping --------------------------------------------------------------

    def _begin_stop(self, grace: float) -> None:
        self._stop_health_checks()
        self._cancel_ttl()
        self._set_state(STOPPING)
        now = self._reactor.seconds()
        self._stop_deadline = now + max(grace, 0.0)
        if self._child is None or self._exit_status is not None:
            return  # already dead, its output is draining
        if grace <= 0:
            self._escalate()
            return
        if self.model.cmd_stop.strip():
            self._run_stop_command(grace)
        else:
            self._signal(signal.SIGTERM)
        self._kill_call = self._reactor.callLater(grace, self._escalate)

    def _shorten_grace(self, grace: float) -> None:
        if self._child is None or self._exit_status is not None:
            return
        deadline = self._reactor.seconds() + max(grace, 0.0)
        if self._stop_deadline is not None and deadline >= self._stop_deadline:
            return
        self._stop_deadline = deadline
        self._kill_call = _cancel(self._kill_call)
        if grace <= 0:
            self._escalate()
        else:
            self._kill_call = self._reactor.callLater(grace, self._escalate)

    def _escalate(self) -> None:
        self._kill_call = None
        self.log.warn(
            "{model} still running at the end of the grace period: SIGKILL to process group {pid}",
            model=self.model.id,
            pid=self._pid,
        )
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        child = self._child
        if child is None:
            return
        try:
            child.signalProcess(signum)
        except (ProcessExitedAlready, ProcessLookupError):
            pass
        except OSError as error:
            self.log.warn(
                "{model} cannot send signal {sig} to {pid}: {error}",
                model=self.model.id,
                sig=signum,
                pid=self._pid,
                error=error,
            )

    def _run_stop_command(self, grace: float) -> None:
        model = self.model
        command = model.cmd_stop.replace("${PID}", str(self._pid))
        base = os.environ if self._base_env is None else self._base_env
        try:
            argv = sanitize_command(command)
            env = build_env(base, model.env)
            argv[0] = resolve_executable(argv[0], env.get("PATH"))
            proto = UpstreamProtocol(
                self._on_output_line,
                on_ended=lambda status: self._stop_command_ended(proto, status),
            )
            handle = self._spawner(proto, argv, env)
        except Exception as error:
            self.log.warn(
                "{model} cmdStop '{command}' failed to start: {error}; sending SIGTERM instead",
                model=model.id,
                command=_one_line(command),
                error=error,
            )
            self._signal(signal.SIGTERM)
            return
        self.log.info("{model} running cmdStop: {command}", model=model.id, command=shlex.join(argv))
        timer = self._reactor.callLater(max(grace, 1.0), self._kill_stop_command, proto)
        self._stop_cmds[proto] = (handle, timer)

    def _stop_command_ended(self, proto: UpstreamProtocol, status: ExitStatus) -> None:
        entry = self._stop_cmds.pop(proto, None)
        if entry is not None:
            _cancel(entry[1])
        self.log.info("{model} cmdStop finished: {status}", model=self.model.id, status=str(status))

    def _kill_stop_command(self, proto: UpstreamProtocol) -> None:
        entry = self._stop_cmds.get(proto)
        if entry is None:
            return
        self.log.warn("{model} cmdStop still running: killing it", model=self.model.id)
        try:
            entry[0].signalProcess(signal.SIGKILL)
        except (ProcessExitedAlready, OSError):
            pass

    # -- child events ------------------------------------------------------------

    def _child_exited(self, proto: UpstreamProtocol, status: ExitStatus) -> None:
        """processExited: the leader died.  Kill the rest of its group so the
        pipes close, and give the output a moment to drain."""
        if proto is not self._proto or self._child is None or self._exit_status is not None:
            return
        self._exit_status = status
        self._kill_call = _cancel(self._kill_call)
        self._signal(signal.SIGKILL)
        self._drain_call = self._reactor.callLater(EXIT_DRAIN_TIMEOUT, self._child_gone, proto)
        if self._state is READY:
            # the server is gone: from now on nothing is granted to it, while its
            # output drains; the next request waits for the stop and starts it again
            self._crashed = True
            self._set_state(STOPPING)

    def _child_ended(self, proto: UpstreamProtocol, status: ExitStatus) -> None:
        """processEnded: the leader died and its output is all read."""
        if proto is not self._proto or self._child is None:
            return
        if self._exit_status is None:
            self._exit_status = status
        self._child_gone(proto)

    def _child_gone(self, proto: UpstreamProtocol) -> None:
        if proto is not self._proto or self._child is None:
            return
        self._drain_call = _cancel(self._drain_call)
        proto.flush()
        status = self._exit_status or ExitStatus(None)
        pid = self._pid
        self._child = None
        self._pid = None
        self._stop_deadline = None
        self._kill_call = _cancel(self._kill_call)
        self._stop_health_checks()
        self._cancel_ttl()
        if self._registry is not None and pid is not None:
            self._registry.remove(pid)

        state = self._state
        tail = proto.last_lines(ERROR_TAIL_LINES)
        if state is STARTING:
            error = PrematureExitError(f"upstream command exited prematurely ({status})", tail)
            self.log.warn("{model} {error}", model=self.model.id, error=error.message)
            waiters = self._take_start_waiters()
            self._set_state(STOPPED)
            _fail_all(waiters, error)
        elif state is READY or (state is STOPPING and self._crashed):
            self._crashed = False
            self.log.warn(
                "{model} upstream process exited unexpectedly ({status}); last output:\n{output}",
                model=self.model.id,
                status=str(status),
                output="\n".join(tail),
            )
            self._set_state(STOPPED)
            for d in self._stop_waiters[:]:
                self._stop_waiters.remove(d)
                d.callback(None)
        elif state is STOPPING:
            self.log.info("{model} stopped ({status})", model=self.model.id, status=str(status))
            self._set_state(STOPPED)
            for d in self._stop_waiters[:]:
                self._stop_waiters.remove(d)
                d.callback(None)
        self._after_stopped()

    def _after_stopped(self) -> None:
        """In STOPPED: finish a shutdown, or start for callers that queued."""
        if self._state is not STOPPED:
            return
        if self._shutting_down:
            self._enter_shutdown()
        elif self._start_waiters:
            self._start()

    def _enter_shutdown(self) -> None:
        self._cancel_ttl()
        self._set_state(SHUTDOWN)
        waiters, self._shutdown_waiters = self._shutdown_waiters, []
        done = self.close()

        def fire(_: object) -> None:
            for d in waiters:
                d.callback(None)

        done.addBoth(fire)

    def close(self) -> "Deferred[None]":
        """Close the health-check connection pool (shutdown does this)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        return pool.closeCachedConnections()

    # -- TTL -------------------------------------------------------------------------

    def _cancel_ttl(self) -> None:
        self._ttl_call = _cancel(self._ttl_call)

    def _schedule_ttl(self) -> None:
        self._cancel_ttl()
        ttl = self.model.ttl
        if ttl <= 0 or self._state is not READY or self._in_flight:
            return
        delay = max(0.0, self._last_finished + ttl - self._reactor.seconds())
        self._ttl_call = self._reactor.callLater(delay, self._ttl_check)

    def _ttl_check(self) -> None:
        self._ttl_call = None
        if self._state is not READY or self._in_flight:
            return
        ttl = self.model.ttl
        idle = self._reactor.seconds() - self._last_finished
        if idle < ttl - 1e-6:
            self._schedule_ttl()
            return
        self.log.info(
            "{model} unloading: idle for {idle:.1f}s, TTL is {ttl}s", model=self.model.id, idle=idle, ttl=ttl
        )
        self.stop(self.model.unload_timeout)

    # -- output ------------------------------------------------------------------------

    def _on_output_line(self, line: bytes) -> None:
        data = line + b"\n"
        self.logmon.write(data)
        if self._upstream_log is not None:
            self._upstream_log.write(data)


def _cancel(call: Optional[IDelayedCall]) -> Optional[IDelayedCall]:
    """Cancel a pending timer (None or already run/cancelled is fine); returns None."""
    if call is not None and call.active():
        call.cancel()
    return None


def _withdraw(waiters: list, d: Deferred) -> None:
    """Canceller: a waiter that gave up leaves the list."""
    try:
        waiters.remove(d)
    except ValueError:
        pass


def _fail_all(waiters: list, error: Exception) -> None:
    for d in waiters:
        d.errback(Failure(error))


def _one_line(command: str) -> str:
    return " ".join(command.split())
