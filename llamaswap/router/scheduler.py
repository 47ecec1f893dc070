"""The swap scheduler: a pure state machine for the local router.

The router calls the scheduler from reactor callbacks; every method returns at
once.  The scheduler decides, and reports its decisions through an
:class:`Effects` object; the router carries them out (stops and starts
processes, proxies requests) and reports back with :meth:`Scheduler.swap_done`,
:meth:`Scheduler.serve_done` and :meth:`Scheduler.model_stopped`.  Process
states are read through a ``state(model)`` callable on every decision and
never cached here.

Every request ends in exactly one of: granted now, joined a swap under way,
queued, started a swap, or failed.  Queued requests and swap waiters always
end later in a grant or a failure (or the caller cancels them).

Decision tree for a request for model M (llama-swap §4, plus starvation
control):

1. shut down -> 503; M unknown -> 404; M already has ``limit`` admitted and
   unfinished requests (queued + waiting for a load + serving) -> 429 with
   ``Retry-After``; otherwise the request is admitted.
2. A swap for M is under way -> join its waiters.
3. Plan the swap: ``planner.plan(M, running)`` where ``running`` is every
   model whose state is not "stopped", plus the targets of swaps under way
   (so starting and stopping models count until their process is gone).  A
   :class:`~llamaswap.router.planners.BudgetPlanner` also gets a
   :class:`~llamaswap.router.planners.Usage` snapshot (in-flight counts,
   recency, models within ``minResident``, measured footprints).  A plan
   marked infeasible (M alone exceeds a capacity) -> 503 naming the resource.
4. M ready, nothing to evict, no collision -> grant now (fast path).
5. Collides with a swap under way (our evict set holds its target, its evict
   set holds M, or the evict sets overlap) -> queue.
6. A model to evict was loaded less than its ``minResident`` ago (no
   thrash) -> with ``swap_policy`` "refuse", 503 with ``Retry-After`` (the
   seconds until it may go); else queue, and a clock call re-evaluates the
   queue when it may go.  An overdue request (see below) ignores
   ``minResident``: the wait is bounded by ``max_wait``.
7. A model to evict has requests in flight -> queue (eviction never cuts a
   running request short).
8. Otherwise start a swap (disjoint swaps run in parallel).

A request that must be queued while ``max_queue`` requests are queued fails
with 503 and ``Retry-After`` instead.

Queue order: per-model priority, higher first, FIFO among equals (a request is
inserted before the first non-overdue entry of strictly lower priority).  The
queue is drained in order after every ``swap_done``, after ``serve_done`` when a
model's in-flight count drops to 0, after ``cancel``, ``unload`` and
``model_stopped``, and when a request becomes overdue; entries still blocked
keep their order.  Queue positions (1-based) are re-broadcast to every entry
whose position changed.

Collation falls out of steps 2 and 4: while A is loading or ready, new A
requests join its swap or take the fast path even when B requests are queued,
so A B A B A B costs two loads, not six.

Starvation control (llama-swap has none).  A queued request becomes *overdue*
``max_wait`` seconds (by the injected clock) after it arrived; a clock call at
that deadline marks it and re-evaluates the queue.  Then:

* Overdue entries move to the head of the queue, oldest first, ahead of every
  non-overdue entry whatever its priority (a new request never goes ahead of
  one).
* An overdue entry G that is still blocked *guards* every request evaluated
  after it: every new request, and every queue entry behind it.  While G is
  guarded against, with ``P`` = the models G's own swap would evict now,
  a guarded request is not granted (fast path or drain) and does not join a
  swap for a model in ``P``; and it does not start a swap that would collide
  with G's swap, as planned with the new target running (its target in G's
  evict set, G's target in its evict set, overlapping evict sets, or the same
  target).  It is queued instead.
* So the models G needs gone take no new work: their in-flight requests run
  to completion, the last ``serve_done`` drains the queue, and G, at the head,
  starts its swap.  G waits at most ``max_wait`` plus the longest request in
  flight on those models (plus one load, if a swap it collides with was
  already under way when it became overdue).  The head overdue entry is never
  guarded against, so overdue entries cannot block each other.

Starvation control is off when no clock is given or ``max_wait`` is None.

Reloads (:meth:`Scheduler.apply`): the models that stay keep their queue,
swaps, in-flight counts, recency and load times; a removed model's queued
requests and load waiters fail with 404, its requests in flight are counted
until done; :meth:`Scheduler.replan` names the running models that may no
longer run together under new groups or a new matrix.

Contract with the router: ``start_swap`` is answered by exactly one
``swap_done(target, error)``, also for a swap whose target was unloaded
meanwhile; ``grant`` is answered by exactly one ``serve_done`` (or ``cancel``).
Effects are delivered after the scheduler's state is settled, in order; an
effect that calls back into the scheduler is safe (its own effects are queued
behind the ones being delivered).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import (AbstractSet, Any, Callable, Hashable, Iterable, Mapping, Optional,
                    Protocol)

from llamaswap.config import defaults
from llamaswap.router.planners import BudgetPlanner, Plan, Planner, Usage, replan

__all__ = [
    "Scheduler", "Effects", "Outcome", "QueueEntry", "SwapInfo",
    "STOPPED", "STARTING", "READY", "STOPPING",
    "MSG_NOT_FOUND", "MSG_TOO_MANY", "MSG_QUEUE_FULL", "MSG_UNLOADED", "MSG_SHUTDOWN",
    "MSG_MIN_RESIDENT",
]

STOPPED, STARTING, READY, STOPPING = "stopped", "starting", "ready", "stopping"

MSG_NOT_FOUND = "no local server found for requested model"
MSG_TOO_MANY = "Too many requests"
MSG_QUEUE_FULL = "request queue is full"
MSG_UNLOADED = "model unloaded"
MSG_SHUTDOWN = "llamaswap is shutting down"
MSG_MIN_RESIDENT = "swap refused (swapPolicy: refuse)"
RETRY_AFTER = {"Retry-After": "1"}

# where a request is
_QUEUED, _WAITING, _GRANTED = "queued", "waiting", "granted"


class Effects(Protocol):
    """What the scheduler asks the router to do.  ``evicting(model, reason)``
    is an optional extra hook, called before ``start_swap`` for each model
    the swap evicts."""

    def start_swap(self, target: str, evict: frozenset[str], reason: str) -> None:
        """Stop ``evict``, then ``ensure_ready(target)``; answer with ``swap_done``."""

    def grant(self, req_id: Hashable, model: str) -> None:
        """The request may now be proxied to ``model``; answer with ``serve_done``."""

    def fail(self, req_id: Hashable, status: int, message: str,
             headers: Optional[dict[str, str]]) -> None:
        """The request ends with this HTTP error."""

    def queue_position(self, req_id: Hashable, position: int) -> None:
        """The queued request's 1-based position changed."""


class DelayedCall(Protocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class Clock(Protocol):
    """The part of ``IReactorTime`` the scheduler uses."""

    def seconds(self) -> float: ...
    def callLater(self, delay: float, f: Callable[..., Any], *args: Any,
                  **kw: Any) -> DelayedCall: ...


class Outcome(str, Enum):
    """What :meth:`Scheduler.request` did with a request."""

    GRANTED = "granted"
    JOINED = "joined"
    QUEUED = "queued"
    STARTED = "started"
    FAILED = "failed"


@dataclass(frozen=True)
class QueueEntry:
    req_id: Hashable
    model: str
    priority: int
    position: int
    enqueued_at: float
    overdue: bool
    blocked_by: str


@dataclass(frozen=True)
class SwapInfo:
    target: str
    evict: frozenset[str]
    reason: str
    waiters: tuple[Hashable, ...]
    cancelled: bool


class _Swap:
    __slots__ = ("target", "evict", "reason", "waiters", "cancelled")

    def __init__(self, target: str, evict: frozenset[str], reason: str) -> None:
        self.target = target
        self.evict = evict
        self.reason = reason
        self.waiters: dict[Hashable, _Req] = {}
        self.cancelled = False


class _Req:
    __slots__ = ("id", "model", "priority", "arrived", "deadline", "overdue", "where",
                 "timer", "position", "blocked", "swap")

    def __init__(self, req_id: Hashable, model: str, priority: int, arrived: float) -> None:
        self.id = req_id
        self.model = model
        self.priority = priority
        self.arrived = arrived
        self.deadline: Optional[float] = None
        self.overdue = False
        self.where = ""
        self.timer: Optional[DelayedCall] = None
        self.position = 0
        self.blocked = ""
        self.swap: Optional[_Swap] = None


def _collides(t1: str, e1: AbstractSet[str], t2: str, e2: AbstractSet[str]) -> bool:
    return t2 in e1 or t1 in e2 or not e1.isdisjoint(e2)


def _names(models: Iterable[str]) -> str:
    return ", ".join(repr(m) for m in sorted(models))


class Scheduler:
    """Queue, collation, priorities, starvation bound and in-flight counts
    for one local router.  See the module docstring for the rules."""

    def __init__(self, planner: Planner, effects: Effects, state: Callable[[str], str],
                 limits: Mapping[str, int], *,
                 priorities: Optional[Mapping[str, int]] = None,
                 max_wait: Optional[float] = defaults.MAX_WAIT,
                 max_queue: int = defaults.MAX_QUEUE,
                 clock: Optional[Clock] = None,
                 min_resident: Optional[Mapping[str, float]] = None,
                 swap_policy: str = defaults.SWAP_POLICY,
                 measured: Optional[Mapping[str, Mapping[str, float]]] = None) -> None:
        """``limits`` maps every local model to its concurrency limit (0 or
        less: unlimited); ``priorities`` maps models to queue priorities
        (default 0); ``min_resident`` maps models to the seconds after a load
        during which they are not evicted (needs ``clock``); ``swap_policy``
        is "wait" or "refuse" (see rule 6); ``measured`` is a live mapping
        model -> resource -> measured footprint, read on every decision."""
        self._planner = planner
        self._budget = planner if isinstance(planner, BudgetPlanner) else None
        self._inner: Planner = planner.inner if isinstance(planner, BudgetPlanner) else planner
        self._min_resident = {m: s for m, s in (min_resident or {}).items() if s > 0}
        self._swap_policy = swap_policy
        self._measured: Mapping[str, Mapping[str, float]] = measured if measured is not None else {}
        self._recency: dict[str, int] = {}
        self._uses = itertools.count(1)
        self._loaded_at: dict[str, float] = {}
        self._wake: Optional[DelayedCall] = None
        self._wake_time = math.inf
        self._effects = effects
        self._state = state
        self._limits = dict(limits)
        self._priorities = dict(priorities or {})
        self._max_wait = max_wait
        self._max_queue = max_queue
        self._clock = clock
        self._requests: dict[Hashable, _Req] = {}
        self._queue: list[_Req] = []
        self._swaps: dict[str, _Swap] = {}
        self._in_flight: dict[str, int] = {m: 0 for m in self._limits}
        self._admitted: dict[str, int] = {m: 0 for m in self._limits}
        self._outbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._flushing = False
        self._closed = False
        self._plans: dict[tuple[str, frozenset[str]], Plan] = {}

    # -- inputs -------------------------------------------------------------

    def request(self, req_id: Hashable, model: str, now: Optional[float] = None) -> Outcome:
        """A request for ``model`` arrived (at ``now``, default the clock's
        time).  Returns what was done with it; effects follow."""
        if req_id in self._requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        try:
            if self._closed:
                self._emit(self._effects.fail, req_id, 503, MSG_SHUTDOWN, None)
                return Outcome.FAILED
            limit = self._limits.get(model)
            if limit is None:
                self._emit(self._effects.fail, req_id, 404, MSG_NOT_FOUND, None)
                return Outcome.FAILED
            if 0 < limit <= self._admitted[model]:
                self._emit(self._effects.fail, req_id, 429, MSG_TOO_MANY, dict(RETRY_AFTER))
                return Outcome.FAILED
            req = _Req(req_id, model, self._priorities.get(model, defaults.PRIORITY),
                       self._now() if now is None else now)
            self._requests[req_id] = req
            self._admitted[model] += 1
            outcome, why = self._dispatch(req, [r for r in self._queue if r.overdue])
            if outcome is not None:
                return outcome
            if len(self._queue) >= self._max_queue:
                self._fail(req, 503, MSG_QUEUE_FULL, dict(RETRY_AFTER))
                return Outcome.FAILED
            self._enqueue(req, why)
            return Outcome.QUEUED
        finally:
            self._settle()

    def cancel(self, req_id: Hashable) -> None:
        """The caller went away.  Queued or waiting: forget it; granted: as
        :meth:`serve_done`.  Unknown ids are ignored."""
        req = self._requests.get(req_id)
        if req is None:
            return
        if req.where == _GRANTED:
            self.serve_done(req_id)
            return
        self._forget(req)
        self._drain()
        self._settle()

    def swap_done(self, target: str, error: Optional[str] = None) -> None:
        """The swap for ``target`` finished: grant its waiters, or fail them
        with 500 when ``error`` is set; then drain the queue."""
        swap = self._swaps.pop(target, None)
        if error is None and swap is not None and not swap.cancelled:
            self._loaded_at.setdefault(target, self._now())
        if swap is not None and not swap.cancelled:
            for req in list(swap.waiters.values()):
                if error is None:
                    self._grant(req)
                else:
                    self._fail(req, 500, f"unspecific error: {error}")
        self._drain()
        self._settle()

    def serve_done(self, req_id: Hashable) -> None:
        """A granted request finished (or its client disconnected).  Ids not
        granted are treated as :meth:`cancel`; unknown ids are ignored."""
        req = self._requests.get(req_id)
        if req is None:
            return
        if req.where != _GRANTED:
            self.cancel(req_id)
            return
        del self._requests[req_id]
        self._admitted[req.model] -= 1
        self._in_flight[req.model] -= 1
        if req.model not in self._limits:  # removed by a reload while in flight
            self._prune(req.model)
        else:
            self._recency[req.model] = next(self._uses)
        if self._in_flight.get(req.model, 0) == 0:
            self._drain()
        self._settle()

    def model_stopped(self, model: str) -> None:
        """A process stopped by itself (TTL, crash): re-evaluate the queue."""
        self._drain()
        self._settle()

    def unload(self, models: Iterable[str]) -> frozenset[str]:
        """Fail the waiters and queued requests of ``models`` with 500; return
        the models the router must stop (requests in flight are not waited for)."""
        targets = frozenset(m for m in models if m in self._limits)
        for model in sorted(targets):
            swap = self._swaps.get(model)
            if swap is not None and not swap.cancelled:
                swap.cancelled = True
                for req in list(swap.waiters.values()):
                    self._fail(req, 500, MSG_UNLOADED)
        for req in list(self._queue):
            if req.model in targets:
                self._fail(req, 500, MSG_UNLOADED)
        stop = frozenset(m for m in targets
                         if m in self._swaps or self._state(m) != STOPPED)
        self._drain()
        self._settle()
        return stop

    def shutdown(self) -> None:
        """Fail every waiter and queued request with 503, cancel every clock
        call; later requests fail the same way."""
        self._closed = True
        for swap in list(self._swaps.values()):
            for req in list(swap.waiters.values()):
                self._fail(req, 503, MSG_SHUTDOWN)
        self._swaps.clear()
        for req in list(self._queue):
            self._fail(req, 503, MSG_SHUTDOWN)
        self._cancel_wake()
        self._settle()

    def apply(self, planner: Planner, limits: Mapping[str, int], *,
              priorities: Optional[Mapping[str, int]] = None,
              max_wait: Optional[float] = defaults.MAX_WAIT,
              max_queue: int = defaults.MAX_QUEUE,
              min_resident: Optional[Mapping[str, float]] = None,
              swap_policy: str = defaults.SWAP_POLICY,
              removed: Callable[[str], str] = lambda model: MSG_NOT_FOUND) -> None:
        """A reload: plan with ``planner`` and serve the models of ``limits``
        (as in ``__init__``) from now on, keeping the queue, the swaps under
        way, in-flight counts, recency and load times of the models that
        stay; then drain.  A model no longer in ``limits``: its queued
        requests and the waiters of its load fail with 404 and
        ``removed(model)``; its requests in flight finish and are counted
        until they do.  Queued requests keep their priority and deadline."""
        for model in sorted(set(self._limits) - set(limits)):
            message = removed(model)
            swap = self._swaps.get(model)
            if swap is not None and not swap.cancelled:
                swap.cancelled = True
                for req in list(swap.waiters.values()):
                    self._fail(req, 404, message)
            for req in list(self._queue):
                if req.model == model:
                    self._fail(req, 404, message)
            self._loaded_at.pop(model, None)
            self._recency.pop(model, None)
        self._limits = dict(limits)
        for model in self._limits:
            self._in_flight.setdefault(model, 0)
            self._admitted.setdefault(model, 0)
        for model in [m for m in self._admitted if m not in self._limits]:
            self._prune(model)
        self._priorities = dict(priorities or {})
        self._max_wait = max_wait
        self._max_queue = max_queue
        self._planner = planner
        self._budget = planner if isinstance(planner, BudgetPlanner) else None
        self._inner = planner.inner if isinstance(planner, BudgetPlanner) else planner
        self._min_resident = {m: s for m, s in (min_resident or {}).items() if s > 0}
        self._swap_policy = swap_policy
        self._plans.clear()
        self._drain()
        self._settle()

    def replan(self) -> frozenset[str]:
        """After :meth:`apply` changed groups or the matrix: the running
        models to stop so that the others may run together under the new
        planner (:func:`~llamaswap.router.planners.replan`); models with
        requests in flight, swap targets and models a swap is evicting stay,
        models already stopping are left to it.  The router stops what this
        returns."""
        if self._closed:
            return frozenset()
        running = frozenset(m for m in self._running() if self._state(m) != STOPPING or m in self._swaps)
        return frozenset(replan(self._inner, running, self._usage(), keep=self._swap_bound()))

    def trim(self, gone: AbstractSet[str] = frozenset()) -> frozenset[str]:
        """The idle models to stop so that the running ones (less ``gone``,
        being stopped already) fit every capacity (after a reload lowered
        one), least recently used first; models with requests in flight or
        within ``minResident``, swap targets and models a swap is evicting
        are left alone (but counted).  The router stops what this returns."""
        if self._budget is None or self._closed:
            return frozenset()
        return frozenset(self._budget.trim(self._running() - gone, self._usage(), keep=self._swap_bound()))

    def _swap_bound(self) -> set[str]:
        """Swap targets and the models swaps are evicting."""
        busy = set(self._swaps)
        for swap in self._swaps.values():
            busy |= swap.evict
        return busy

    # -- introspection ------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def models(self) -> tuple[str, ...]:
        return tuple(self._limits)

    def in_flight(self, model: str) -> int:
        """Requests granted for ``model`` and not yet done."""
        return self._in_flight.get(model, 0)

    def admitted(self, model: str) -> int:
        """Requests for ``model`` admitted and not finished (the 429 count)."""
        return self._admitted.get(model, 0)

    def queue_snapshot(self) -> tuple[QueueEntry, ...]:
        """The queue, in order."""
        return tuple(QueueEntry(r.id, r.model, r.priority, i, r.arrived, r.overdue, r.blocked)
                     for i, r in enumerate(self._queue, 1))

    def active_swaps(self) -> dict[str, SwapInfo]:
        """Swaps under way, by target."""
        return {t: SwapInfo(t, s.evict, s.reason, tuple(s.waiters), s.cancelled)
                for t, s in self._swaps.items()}

    # -- decisions ----------------------------------------------------------

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else 0.0

    def _running(self) -> frozenset[str]:
        up = {m for m in self._limits if self._state(m) not in (STOPPED, "shutdown")}
        up.update(self._swaps)
        for model in [m for m in self._loaded_at if m not in up]:
            del self._loaded_at[model]  # stopped: the next load starts its minResident afresh
        return frozenset(up)

    def _young(self) -> dict[str, float]:
        """Models within their ``minResident``: seconds until they may go."""
        if self._clock is None or not self._loaded_at:
            return {}
        now = self._clock.seconds()
        out = {}
        for model, at in self._loaded_at.items():
            left = at + self._min_resident.get(model, 0.0) - now
            if left > 1e-6:  # not float dust at the very deadline
                out[model] = left
        return out

    def _usage(self) -> Usage:
        return Usage(self._in_flight, self._recency, self._young(), self._measured)

    def _plan(self, target: str, running: frozenset[str]) -> Plan:
        """The inner planner's plan (a pure function of its arguments, so
        cached), then the budget's additions (they depend on usage)."""
        key = (target, running)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 4096:
                self._plans.clear()
            plan = self._plans[key] = self._inner.plan(target, running)
        if self._budget is not None:
            plan = self._budget.apply(plan, running, self._usage())
        return plan

    def _reserved_by(self, req: _Req, guards: list[_Req],
                     running: frozenset[str]) -> Optional[_Req]:
        for guard in guards:
            if guard is not req and req.model in self._plan(guard.model, running).evict:
                return guard
        return None

    def _dispatch(self, req: _Req, guards: list[_Req]) -> tuple[Optional[Outcome], str]:
        """Join, grant or start a swap for ``req`` if the rules allow; else
        ``(None, why it must wait)``."""
        model = req.model
        running = self._running()
        swap = self._swaps.get(model)
        if swap is not None:
            if swap.cancelled:
                return None, f"the load of {model!r} is being unloaded"
            guard = self._reserved_by(req, guards, running)
            if guard is not None:
                return None, f"{model!r} is reserved for overdue request {guard.id!r}"
            swap.waiters[req.id] = req
            req.where, req.swap = _WAITING, swap
            return Outcome.JOINED, ""
        plan = self._plan(model, running)
        if plan.infeasible:
            self._fail(req, 503, plan.infeasible)
            return Outcome.FAILED, ""
        evict = plan.evict - {model}
        for other in self._swaps.values():
            if _collides(model, evict, other.target, other.evict):
                return None, f"collides with the load of {other.target!r}"
        if not evict and self._state(model) == READY:
            guard = self._reserved_by(req, guards, running)
            if guard is not None:
                return None, f"{model!r} is reserved for overdue request {guard.id!r}"
            self._grant(req)
            return Outcome.GRANTED, ""
        if not req.overdue and self._min_resident:
            young = {m: left for m, left in self._young().items() if m in evict}
            if young:
                names = _names(young)
                if self._swap_policy == "refuse":
                    retry = str(max(1, math.ceil(max(young.values()))))
                    self._fail(req, 503, f"{MSG_MIN_RESIDENT}: loading {model!r} would evict {names}, "
                                         f"loaded less than minResident ago; retry in {retry}s",
                               {"Retry-After": retry})
                    return Outcome.FAILED, ""
                self._wake_in(min(young.values()))
                return None, (f"waits for minResident of {names} "
                              f"({max(young.values()):.1f}s left)")
        busy = [m for m in evict if self._in_flight.get(m, 0) > 0]
        if busy:
            return None, f"waits for requests in flight on {_names(busy)}"
        with_target = running | {model}
        for guard in guards:
            if guard is req:
                continue
            g_evict = self._plan(guard.model, with_target).evict - {guard.model}
            if guard.model == model or _collides(model, evict, guard.model, g_evict):
                return None, f"would delay overdue request {guard.id!r}"
        if self._state(model) != READY:
            self._loaded_at.pop(model, None)  # its minResident starts when this load is done
        swap = self._swaps[model] = _Swap(model, evict, plan.reason)
        swap.waiters[req.id] = req
        req.where, req.swap = _WAITING, swap
        evicting = getattr(self._effects, "evicting", None)
        if evicting is not None:
            for m in sorted(evict):
                self._emit(evicting, m, plan.why(m))
        self._emit(self._effects.start_swap, model, evict, plan.reason)
        return Outcome.STARTED, ""

    def _drain(self) -> None:
        if self._closed:
            return
        guards: list[_Req] = []
        for req in list(self._queue):
            if req.where != _QUEUED:
                continue
            outcome, why = self._dispatch(req, guards)
            if outcome is None:
                req.blocked = why
                if req.overdue:
                    guards.append(req)
            elif outcome is not Outcome.FAILED:  # a failed request has left the queue already
                self._unqueue(req)

    # -- bookkeeping --------------------------------------------------------

    def _grant(self, req: _Req) -> None:
        req.where, req.swap = _GRANTED, None
        self._recency[req.model] = next(self._uses)
        self._in_flight[req.model] += 1
        self._emit(self._effects.grant, req.id, req.model)

    def _fail(self, req: _Req, status: int, message: str,
              headers: Optional[dict[str, str]] = None) -> None:
        self._forget(req)
        self._emit(self._effects.fail, req.id, status, message, headers)

    def _forget(self, req: _Req) -> None:
        """Remove a request that was not granted, releasing its admission."""
        if req.where == _QUEUED:
            self._unqueue(req)
        elif req.where == _WAITING and req.swap is not None:
            req.swap.waiters.pop(req.id, None)
            req.swap = None
        self._requests.pop(req.id, None)
        self._admitted[req.model] -= 1
        if req.model not in self._limits:
            self._prune(req.model)

    def _prune(self, model: str) -> None:
        """Forget the counts of a model a reload removed, once nothing of it is left."""
        if not self._admitted.get(model, 0) and not self._in_flight.get(model, 0):
            self._admitted.pop(model, None)
            self._in_flight.pop(model, None)

    def _enqueue(self, req: _Req, why: str) -> None:
        req.where, req.blocked = _QUEUED, why
        if self._clock is not None and self._max_wait is not None:
            req.deadline = req.arrived + self._max_wait
            delay = req.deadline - self._clock.seconds()
            if delay <= 0:
                req.overdue = True
            else:
                req.timer = self._clock.callLater(delay, self._on_deadline, req.id)
        self._insert(req)

    def _insert(self, req: _Req) -> None:
        queue = self._queue
        i = 0
        if req.overdue:
            assert req.deadline is not None
            while i < len(queue) and queue[i].overdue and queue[i].deadline <= req.deadline:
                i += 1
        else:
            while i < len(queue) and (queue[i].overdue or queue[i].priority >= req.priority):
                i += 1
        queue.insert(i, req)

    def _unqueue(self, req: _Req) -> None:
        self._queue.remove(req)
        if req.timer is not None:
            if req.timer.active():
                req.timer.cancel()
            req.timer = None

    def _on_deadline(self, req_id: Hashable) -> None:
        req = self._requests.get(req_id)
        if req is None or req.where != _QUEUED or req.overdue:
            return
        req.timer = None
        self._queue.remove(req)
        req.overdue = True
        self._insert(req)
        self._drain()
        self._settle()

    def _wake_in(self, delay: float) -> None:
        """Re-evaluate the queue ``delay`` seconds from now (the earliest
        such call wins; one timer at a time)."""
        if self._clock is None:
            return
        when = self._clock.seconds() + delay
        if self._wake is not None and self._wake.active() and self._wake_time <= when:
            return
        self._cancel_wake()
        self._wake_time = when
        self._wake = self._clock.callLater(delay, self._on_wake)

    def _cancel_wake(self) -> None:
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake, self._wake_time = None, math.inf

    def _on_wake(self) -> None:
        self._wake, self._wake_time = None, math.inf
        self._drain()
        self._settle()

    def _emit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._outbox.append((fn, args))

    def _settle(self) -> None:
        """Broadcast changed queue positions, then deliver queued effects."""
        for position, req in enumerate(self._queue, 1):
            if req.position != position:
                req.position = position
                self._emit(self._effects.queue_position, req.id, position)
        if self._flushing:
            return
        self._flushing = True
        first: Optional[Exception] = None
        try:
            while self._outbox:
                fn, args = self._outbox.popleft()
                try:
                    fn(*args)
                except Exception as e:  # deliver the rest, then re-raise
                    if first is None:
                        first = e
        finally:
            self._flushing = False
        if first is not None:
            raise first
