"""The local router: carries out the scheduler's decisions on real processes.

The scheduler decides (pure); this object acts.  A request becomes a
``Deferred`` that fires with a :class:`Grant` once the model is ready and the
scheduler lets it through, or fails with a :class:`RoutingError` (status,
message, headers).  Cancelling that Deferred (the client went away) tells the
scheduler, so no load is started for a dead caller.  Every grant must be
released exactly once with :meth:`LocalRouter.release`.

A reload hands the router new processes with :meth:`LocalRouter.apply`; the
old processes of changed or removed models *retire*: they finish the
requests granted to them, then shut down, and no process of the same model
(or on the same upstream address) starts before they are gone.
"""

from __future__ import annotations

import itertools
from typing import Callable, Hashable, Iterable, Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger

from ..config import Config, ModelConfig
from ..events import EventBus
from ..process import Process, ProcessState
from .planners import planner_for_config
from .scheduler import MSG_SHUTDOWN, Scheduler


class RoutingError(Exception):
    """A request the router could not serve: HTTP status, message, headers."""

    def __init__(self, status: int, message: str, headers: Optional[Mapping[str, str]] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        self.code = code


class Grant:
    """Permission to proxy one request to a ready model."""

    def __init__(self, router: "LocalRouter", req_id: Hashable, process: Process):
        self.router = router
        self.req_id = req_id
        self.process = process
        self.released = False

    @property
    def model(self) -> ModelConfig:
        return self.process.model

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.router.release(self)


class _Retiring:
    """A process a reload took out of service: its grace, whether its
    shutdown began, and who waits for it to be gone."""

    __slots__ = ("grace", "stopping", "waiters")

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.stopping = False
        self.waiters: list[defer.Deferred] = []


def _overlap(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether a process of ``new`` must wait for one of ``old`` to be gone:
    the same model (its port, its GPU memory), or the same upstream address."""
    return old.id == new.id or (bool(old.proxy) and old.proxy == new.proxy)


class LocalRouter:
    """Routes requests for the local models of one config."""

    log = Logger()

    def __init__(self, reactor, config: Config, processes: Mapping[str, Process],
                 events: Optional[EventBus] = None, footprints=None):
        """``footprints`` (a ``llamaswap.perf.footprint.Footprints``, optional):
        measured footprints for the budget planner, and the wait for GPU
        memory released by stopped models before a start."""
        self.reactor = reactor
        self.config = config
        self.processes = dict(processes)
        self.events = events if events is not None else EventBus()
        self.footprints = footprints
        self._evict_reasons: dict[str, str] = {}
        self._waiting: dict[Hashable, defer.Deferred] = {}
        self._granted: dict[Hashable, Grant] = {}
        self._positions: dict[Hashable, Callable[[int], None]] = {}
        self._ids = itertools.count(1)
        self._stopping: dict[str, defer.Deferred] = {}
        # old processes of models a reload changed or removed: draining, then stopping
        self._retiring: dict[Process, _Retiring] = {}
        self.scheduler = Scheduler(
            planner_for_config(config),
            self,
            self._state,
            {mid: m.concurrency_limit for mid, m in config.models.items()},
            priorities=dict(config.routing.priority),
            max_wait=config.routing.max_wait,
            max_queue=config.routing.max_queue,
            clock=reactor,
            min_resident={mid: m.min_resident for mid, m in config.models.items()},
            swap_policy=config.swap_policy,
            measured=footprints.measured if footprints is not None else None,
        )

    def apply(self, config: Config, processes: Mapping[str, Process],
              retire: Iterable[Process] = (), grace: float = 30.0) -> frozenset:
        """A reload: route the models of ``config`` to ``processes`` from now
        on, keeping the queue, swaps, in-flight counts and every process that
        stays.  ``retire``: the old processes of models the reload changed or
        removed; each finishes its requests in flight, then is shut down
        (SIGKILL ``grace`` seconds after SIGTERM); a newer process of the same
        model, or on the same port, starts only once it is gone.  Queued
        requests for a changed model wait for its new process; those for a
        removed one fail with 404.  When groups or the matrix changed, the
        running models that may no longer run together are stopped (idle
        ones, least recently used first); when a capacity was lowered, the
        idle models that no longer fit.  Returns the models stopped so."""
        routing_changed = config.routing != self.config.routing
        self.config = config
        self.processes = dict(processes)
        retire = [p for p in retire if p not in self._retiring and p.state is not ProcessState.SHUTDOWN]
        for process in retire:  # first known as retiring: starts that must wait for them see them
            self._retiring[process] = _Retiring(grace)
        self.scheduler.apply(
            planner_for_config(config),
            {mid: m.concurrency_limit for mid, m in config.models.items()},
            priorities=dict(config.routing.priority),
            max_wait=config.routing.max_wait,
            max_queue=config.routing.max_queue,
            min_resident={mid: m.min_resident for mid, m in config.models.items()},
            swap_policy=config.swap_policy,
            removed=lambda model: f"model {model!r} was removed from the config")
        for process in retire:  # then stopped, when idle (waiters of their loads are settled by now)
            if process.in_flight == 0:
                self._end_retirement(process)
        replanned = self.scheduler.replan() if routing_changed else frozenset()
        self._evict(replanned, "groups or the matrix changed in a reload and it may no longer run "
                               "with the models kept")
        trimmed = self.scheduler.trim(gone=replanned)
        self._evict(trimmed, "resources.capacity was lowered by a reload and it is the least recently "
                             "used idle model")
        return replanned | trimmed

    def _evict(self, models: Iterable[str], reason: str) -> None:
        for model in sorted(models):
            self.log.info("{model} evicted: {reason}", model=model, reason=reason)
            self.events.publish("evict", {"model": model, "reason": reason})
            process = self.processes[model]
            d = self._stop(process, process.model.unload_timeout)
            d.addCallback(lambda _, m=model: self.scheduler.model_stopped(m))  # room for queued requests
            d.addErrback(lambda f, m=model: self.log.failure("stopping {model} failed", f, model=m))

    # -- retiring processes (a reload changed or removed their model) ----------------

    def _end_retirement(self, process: Process, grace: Optional[float] = None) -> defer.Deferred:
        """Shut a retiring process down now (at once, or with a shorter grace)."""
        entry = self._retiring[process]
        d = process.shutdown(entry.grace if grace is None else min(grace, entry.grace))
        if not entry.stopping:
            entry.stopping = True

            def gone(result):
                self._retiring.pop(process, None)
                for waiter in entry.waiters:
                    waiter.callback(None)
                entry.waiters.clear()
                if not self.scheduler.closed:
                    self.scheduler.model_stopped(process.model.id)  # its state view changed
                return result

            d.addErrback(lambda f: self.log.failure("stopping the old process of {model} failed", f,
                                                    model=process.model.id))
            d.addBoth(gone)
        return d

    def retiring(self, model: str) -> "list[Process]":
        """The old processes of ``model`` still draining or stopping."""
        return [p for p in self._retiring if p.model.id == model]

    def _gone(self, process: Process) -> defer.Deferred:
        """Fires once the retiring ``process`` is gone (a Deferred of its own)."""
        waiter: defer.Deferred = defer.Deferred()
        self._retiring[process].waiters.append(waiter)
        return waiter

    def retired(self, process: Process) -> defer.Deferred:
        """Fires once every retiring process that ``process`` must not overlap
        is gone: those of the same model or on the same upstream address.
        Each caller gets a Deferred of its own."""
        waits = [self._gone(old) for old in self._retiring if _overlap(old.model, process.model)]
        if not waits:
            return defer.succeed(None)
        return defer.gatherResults(waits).addCallback(lambda _: None)

    # -- state view given to the scheduler -----------------------------------------

    def _state(self, model: str) -> str:
        process = self.processes.get(model)
        if process is None:
            return "stopped"
        state = process.state
        if state in (ProcessState.STOPPED, ProcessState.SHUTDOWN):
            # the old process of a model a reload changed still runs: the model is on its way down
            return "stopping" if any(p.model.id == model for p in self._retiring) else "stopped"
        return state.value

    def process_state_changed(self, process: Process, old, new) -> None:
        """Wire this to every process's ``on_state``: a process that stops on its
        own (TTL, crash) frees its slot for queued requests."""
        if new in (ProcessState.STOPPED,) and process.model.id not in self._stopping:
            if not self.scheduler.closed:
                self.scheduler.model_stopped(process.model.id)

    # -- requests ---------------------------------------------------------------------

    def request(self, model_id: str, on_position: Optional[Callable[[int], None]] = None) -> defer.Deferred:
        """A Deferred that fires with a :class:`Grant` (or fails with RoutingError)."""
        req_id = next(self._ids)

        def cancel(_d: defer.Deferred) -> None:
            self._waiting.pop(req_id, None)
            self._positions.pop(req_id, None)
            self.scheduler.cancel(req_id)

        d = defer.Deferred(cancel)
        self._waiting[req_id] = d
        if on_position is not None:
            self._positions[req_id] = on_position
        self.scheduler.request(req_id, model_id)
        return d

    def serving(self) -> int:
        """Requests granted and not yet released: on the current processes,
        and on old ones a reload retired."""
        return len(self._granted)

    def release(self, grant: Grant) -> None:
        if self._granted.pop(grant.req_id, None) is not None:
            process = grant.process
            process.request_finished()
            entry = self._retiring.get(process)
            if entry is not None and not entry.stopping and process.in_flight == 0:
                self._end_retirement(process)
            self.scheduler.serve_done(grant.req_id)

    # -- Effects (called by the scheduler) ----------------------------------------------

    def grant(self, req_id: Hashable, model: str) -> None:
        self._positions.pop(req_id, None)
        d = self._waiting.pop(req_id, None)
        if d is None:  # the caller is gone: hand the slot straight back
            self.scheduler.serve_done(req_id)
            return
        process = self.processes[model]
        grant = Grant(self, req_id, process)
        self._granted[req_id] = grant
        process.request_started()
        d.callback(grant)

    def fail(self, req_id: Hashable, status: int, message: str, headers=None) -> None:
        self._positions.pop(req_id, None)
        d = self._waiting.pop(req_id, None)
        if d is not None:
            code = "concurrency_limit" if status == 429 else None
            d.errback(RoutingError(status, message, headers, code))

    def queue_position(self, req_id: Hashable, position: int) -> None:
        self.events.publish("queuePosition", {"request": req_id, "position": position})
        callback = self._positions.get(req_id)
        if callback is not None:
            callback(position)

    def evicting(self, model: str, reason: str) -> None:
        self.log.info("{model} evicted: {reason}", model=model, reason=reason)
        self._evict_reasons[model] = reason  # the swap event that follows carries it too
        self.events.publish("evict", {"model": model, "reason": reason})

    def start_swap(self, target: str, evict: frozenset, reason: str) -> None:
        self.log.info("swap to {target}: {reason}", target=target, reason=reason or "load")
        reasons = {m: self._evict_reasons.pop(m, reason) for m in sorted(evict)}
        self.events.publish("swap", {"target": target, "evict": sorted(evict), "reason": reason,
                                     "reasons": reasons})
        stops = [self._stop(self.processes[m], self.processes[m].model.health_check_timeout)
                 for m in sorted(evict) if m in self.processes]
        # an evicted model a reload restarted may still have its old process (the scheduler saw
        # no request in flight on the model, so it is stopping): the target starts once it is gone
        stops.extend(self._gone(p) for m in sorted(evict) for p in self.retiring(m))
        d = defer.gatherResults(stops, consumeErrors=True) if stops else defer.succeed(None)
        d.addCallback(lambda _: self._start(target))

        def done(_):
            self.scheduler.swap_done(target)

        def failed(failure):
            failure = getattr(failure.value, "subFailure", failure)
            message = getattr(failure.value, "message", None) or failure.getErrorMessage()
            self.log.warn("{target} failed to start: {error}", target=target, error=message)
            self.scheduler.swap_done(target, message)

        d.addCallbacks(done, failed)

    def _start(self, model: str) -> defer.Deferred:
        """``ensure_ready()`` on the current process of ``model``, once the
        old processes it must not overlap are gone (and, after stops, the GPU
        driver let go of their memory).  A reload that redefines ``model``
        meanwhile moves the start to the new process; one that removes it
        fails the start."""
        process = self.processes.get(model)
        if process is None:
            return defer.fail(RoutingError(404, f"model {model!r} was removed from the config"))
        d = self.retired(process)
        if self.footprints is not None:  # the GPU driver may still hold a stopped model's memory
            d.addCallback(lambda _: self.footprints.released())
        d.addCallback(lambda _: process.ensure_ready() if self.processes.get(model) is process else None)

        def redefined(result):
            if self.processes.get(model) is not process:
                return self._start(model)
            return result

        return d.addBoth(redefined)

    # -- unload / shutdown ---------------------------------------------------------------

    def _stop(self, process: Process, grace: float) -> defer.Deferred:
        model = process.model.id
        d = process.stop(grace)
        self._stopping[model] = d

        def forget(result):
            if self._stopping.get(model) is d:
                del self._stopping[model]
            return result

        return d.addBoth(forget)

    def unload(self, models=None) -> defer.Deferred:
        """Stop the given models (default: all), failing their waiters."""
        targets = set(self.processes if models is None else models)
        self.scheduler.unload(targets)
        stops = [self._stop(self.processes[m], self.processes[m].model.unload_timeout)
                 for m in sorted(targets) if m in self.processes]
        # old processes a reload left draining: unloading does not wait for requests in flight
        stops.extend(self._end_retirement(p, p.model.unload_timeout)
                     for p in list(self._retiring) if models is None or p.model.id in targets)
        return defer.gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)

    def shutdown(self, grace: float = 30.0) -> defer.Deferred:
        if not self.scheduler.closed:
            self.scheduler.shutdown()
        for req_id, d in list(self._waiting.items()):
            self._waiting.pop(req_id, None)
            d.errback(RoutingError(503, MSG_SHUTDOWN))
        stops = [p.shutdown(grace) for p in self.processes.values()]
        stops.extend(self._end_retirement(p, grace) for p in list(self._retiring))
        return defer.gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)
