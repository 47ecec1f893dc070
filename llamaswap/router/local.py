"""The local router: carries out the scheduler's decisions on real processes.

The scheduler decides (pure); this object acts.  A request becomes a
``Deferred`` that fires with a :class:`Grant` once the model is ready and the
scheduler lets it through, or fails with a :class:`RoutingError` (status,
message, headers).  Cancelling that Deferred (the client went away) tells the
scheduler, so no load is started for a dead caller.  Every grant must be
released exactly once with :meth:`LocalRouter.release`.
"""

from __future__ import annotations

import itertools
from typing import Callable, Hashable, Mapping, Optional

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
        self._gate: Optional[list] = None  # waiters while the previous config's models stop
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

    def apply_budgets(self, config: Config) -> frozenset:
        """A reload changed only budgets (``resources``, ``minResident``,
        ``swapPolicy``): plan with them from now on, keeping every model, the
        queue and the swaps under way; stop the idle models, least recently
        used first, that no longer fit a lowered capacity.  Returns those."""
        self.config = config
        self.scheduler.reconfigure(
            planner_for_config(config),
            min_resident={mid: m.min_resident for mid, m in config.models.items()},
            swap_policy=config.swap_policy)
        trimmed = self.scheduler.trim()
        for model in sorted(trimmed):
            reason = "resources.capacity was lowered by a reload and it is the least recently used idle model"
            self.log.info("{model} evicted: {reason}", model=model, reason=reason)
            self.events.publish("evict", {"model": model, "reason": reason})
            process = self.processes[model]
            d = self._stop(process, process.model.unload_timeout)
            d.addCallback(lambda _, m=model: self.scheduler.model_stopped(m))  # room for queued requests
            d.addErrback(lambda f, m=model: self.log.failure("stopping {model} failed", f, model=m))
        return trimmed

    def hold_starts_until(self, d: defer.Deferred) -> None:
        """No model starts before ``d`` fires (the previous config's models are
        still stopping: their ports and GPU memory are not free yet)."""
        self._gate = []

        def release(result):
            waiters, self._gate = self._gate or [], None
            for waiter in waiters:
                waiter.callback(None)
            return result

        d.addBoth(release)

    def _gate_open(self) -> defer.Deferred:
        if self._gate is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._gate.append(waiter)
        return waiter

    # -- state view given to the scheduler -----------------------------------------

    def _state(self, model: str) -> str:
        process = self.processes.get(model)
        if process is None:
            return "stopped"
        state = process.state
        return "stopped" if state in (ProcessState.STOPPED, ProcessState.SHUTDOWN) else state.value

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

    def release(self, grant: Grant) -> None:
        if self._granted.pop(grant.req_id, None) is not None:
            grant.process.request_finished()
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
        d = defer.gatherResults(stops, consumeErrors=True) if stops else defer.succeed(None)
        if self.footprints is not None:  # the GPU driver may still hold a stopped model's memory
            d.addCallback(lambda _: self.footprints.released())
        d.addCallback(lambda _: self._gate_open())
        d.addCallback(lambda _: self.processes[target].ensure_ready())

        def done(_):
            self.scheduler.swap_done(target)

        def failed(failure):
            failure = getattr(failure.value, "subFailure", failure)
            message = getattr(failure.value, "message", None) or failure.getErrorMessage()
            self.log.warn("{target} failed to start: {error}", target=target, error=message)
            self.scheduler.swap_done(target, message)

        d.addCallbacks(done, failed)

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
        return defer.gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)

    def shutdown(self, grace: float = 30.0) -> defer.Deferred:
        if not self.scheduler.closed:
            self.scheduler.shutdown()
        for req_id, d in list(self._waiting.items()):
            self._waiting.pop(req_id, None)
            d.errback(RoutingError(503, MSG_SHUTDOWN))
        stops = [p.shutdown(grace) for p in self.processes.values()]
        return defer.gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)
