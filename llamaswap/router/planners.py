"""Swap planners: pure functions ``(target, running) -> models to evict``.

A planner answers one question for the scheduler: to serve ``target`` while
``running`` models are up (starting, ready or stopping, plus the targets of
swaps under way), which of them must be stopped first?  The answer is a
:class:`Plan` that also says *why*, so the router can log each eviction.

Three planners share the :class:`Planner` interface:

* :class:`GroupPlanner` -- llama-swap's groups (``swap``, ``exclusive``,
  ``persistent``), including its one-way gotcha: loading from an
  ``exclusive: false`` group evicts nothing outside it, but loading from an
  exclusive group (the ``(default)`` group too) evicts a non-exclusive
  group's members.
* :class:`MatrixPlanner` -- llama-swap's matrix: pick the set alternative
  containing the target that is cheapest to reach (sum of evict costs of the
  running models outside it), ties by set order then alternative order.
* :class:`BudgetPlanner` -- wraps one of those two ("planners compose"):
  whatever it evicts, loading a target that is not running also evicts
  models until the target fits every ``resources.capacity``, least
  recently used first (see its docstring for the order).

Planners hold no state besides their configuration and do no I/O.  What a
budget decision needs beyond names (footprints measured so far, requests in
flight, recency) comes in a :class:`Usage` snapshot from the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import AbstractSet, Any, Iterable, Mapping, Optional, Protocol, Sequence

from llamaswap.config.fields import format_amount
from llamaswap.config.types import Config, Group, Matrix, Routing

__all__ = ["BudgetPlanner", "Plan", "Planner", "GroupPlanner", "MatrixPlanner", "Usage", "planner_for",
           "planner_for_config", "reachable", "replan"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _names(models: Iterable[str]) -> str:
    return ", ".join(repr(m) for m in sorted(models)) or "nothing"


@dataclass(frozen=True)
class Plan:
    """What loading ``target`` evicts, and why.

    ``reason`` sums the plan up in one line; ``reasons`` holds one line per
    evicted model (see :meth:`why`).  ``alternative`` and ``cost`` are set
    by the matrix planner: the chosen set alternative and its evict cost.
    """

    target: str
    evict: frozenset[str]
    reason: str
    reasons: tuple[tuple[str, str], ...] = ()
    alternative: Optional[frozenset[str]] = None
    alternative_of: Optional[str] = None  # the matrix set name
    cost: int = 0
    infeasible: str = ""  # set by the budget planner: why the target cannot run at all

    def why(self, model: str) -> str:
        """Why ``model`` is evicted by this plan ("" when it is not)."""
        for name, text in self.reasons:
            if name == model:
                return text
        return self.reason if model in self.evict else ""

    def explain(self) -> str:
        """A multi-line account of the plan, for logs."""
        lines = [self.reason]
        lines.extend(f"  evict {name!r}: {text}" for name, text in self.reasons)
        return "\n".join(lines)


class Planner(Protocol):
    """The interface the scheduler sees."""

    def plan(self, target: str, running: AbstractSet[str]) -> Plan:
        """The models to evict before ``target`` can be served."""

    def can_coexist(self, models: AbstractSet[str]) -> bool:
        """True when all of ``models`` may run at the same time."""


class _CoexistMixin:
    def can_coexist(self, models: AbstractSet[str]) -> bool:
        """True when no one of ``models``, if requested while all of them
        run, would evict another of them."""
        running = frozenset(models)
        return all(not (self.plan(m, running).evict & running)  # type: ignore[attr-defined]
                   for m in running)


class GroupPlanner(_CoexistMixin):
    """llama-swap's group swapper.

    For a target T in group G the evict set is: the running members of G
    other than T when ``G.swap``; plus, when ``G.exclusive``, the running
    members of every other group H that is not ``persistent`` (and running
    models that belong to no group).  A target in no group behaves as its
    own exclusive, swapping group of one.
    """

    def __init__(self, groups: Sequence[Group]) -> None:
        self.groups: tuple[Group, ...] = tuple(groups)
        self._group_of: dict[str, Group] = {}
        for group in self.groups:
            for member in group.members:
                self._group_of.setdefault(member, group)

    def group_of(self, model: str) -> Optional[Group]:
        return self._group_of.get(model)

    def plan(self, target: str, running: AbstractSet[str]) -> Plan:
        group = self._group_of.get(target)
        others = sorted(m for m in running if m != target)
        reasons: list[tuple[str, str]] = []
        if group is None:
            for m in others:
                owner = self._group_of.get(m)
                if owner is not None and owner.persistent:
                    continue
                reasons.append((m, f"{target!r} is in no group, so it runs alone"))
            label = f"{target!r} (no group)"
        else:
            for m in others:
                owner = self._group_of.get(m)
                if owner is group:
                    if group.swap:
                        reasons.append(
                            (m, f"group {group.name!r} swaps: {target!r} replaces {m!r}"))
                elif group.exclusive:
                    if owner is None:
                        reasons.append(
                            (m, f"group {group.name!r} of {target!r} is exclusive"))
                    elif not owner.persistent:
                        reasons.append(
                            (m, f"group {group.name!r} of {target!r} is exclusive; "
                                f"{m!r} is in group {owner.name!r}"))
            label = f"{target!r} (group {group.name!r})"
        evict = frozenset(m for m, _ in reasons)
        if evict:
            reason = f"loading {label} evicts {_names(evict)}"
        else:
            reason = f"loading {label} evicts nothing"
        return Plan(target, evict, reason, tuple(reasons))


class MatrixPlanner(_CoexistMixin):
    """llama-swap's matrix solver.

    A running target evicts nothing.  Otherwise every alternative (of every
    set, in definition order) that contains the target is scored with the
    summed evict cost of the running models outside it; the cheapest wins,
    ties going to the first found.  Only the target is started (subset
    semantics): the rest of the chosen alternative stays as it is.  A target
    in no set evicts every running model.
    """

    def __init__(self, matrix: Matrix) -> None:
        self.matrix = matrix

    def can_coexist(self, models: AbstractSet[str]) -> bool:
        """True when one alternative of some set holds all of ``models``."""
        wanted = frozenset(models)
        return any(wanted <= alternative
                   for mset in self.matrix.sets for alternative in mset.alternatives)

    def choose(self, target: str, running: AbstractSet[str]
               ) -> Optional[tuple[str, frozenset[str], int]]:
        """``(set name, alternative, cost)`` chosen for ``target``, or None
        when no set contains it."""
        best: Optional[tuple[str, frozenset[str], int]] = None
        for mset in self.matrix.sets:
            for alternative in mset.alternatives:
                if target not in alternative:
                    continue
                cost = sum(self.matrix.evict_cost(m) for m in running
                           if m not in alternative)
                if best is None or cost < best[2]:
                    best = (mset.name, alternative, cost)
        return best

    def plan(self, target: str, running: AbstractSet[str]) -> Plan:
        if target in running:
            return Plan(target, frozenset(), f"{target!r} is already running; evicts nothing")
        choice = self.choose(target, running)
        if choice is None:
            evict = frozenset(running)
            reasons = tuple((m, f"{target!r} is in no matrix set, so it runs alone")
                            for m in sorted(evict))
            return Plan(target, evict,
                        f"loading {target!r} (in no matrix set) evicts {_names(evict)}",
                        reasons, cost=sum(self.matrix.evict_cost(m) for m in evict))
        set_name, alternative, cost = choice
        evict = frozenset(m for m in running if m not in alternative)
        alt = " & ".join(sorted(alternative))
        reasons = tuple(
            (m, f"not in set {set_name!r} alternative ({alt}) chosen for {target!r} "
                f"(evict cost {cost})")
            for m in sorted(evict))
        reason = (f"loading {target!r} uses set {set_name!r} alternative ({alt}), "
                  f"evict cost {cost}: evicts {_names(evict)}")
        return Plan(target, evict, reason, reasons, alternative, set_name, cost)


@dataclass(frozen=True)
class Usage:
    """What a budget decision weighs besides model names: a snapshot the
    scheduler takes for one decision.

    ``in_flight``: requests being served, per model.  ``recency``: a sort
    key per model, larger for more recent use (a model missing from it was
    never used).  ``young``: the models loaded less than their
    ``minResident`` ago, with the seconds left until they may be evicted.
    ``measured``: model -> resource -> amount measured (NVML), used when it
    exceeds the declared amount.
    """

    in_flight: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    recency: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    young: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    measured: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: _EMPTY)


NO_USAGE = Usage()

# eviction tiers of the budget planner, in order
_IDLE, _WAIT, _PERSISTENT = 0, 1, 2


class BudgetPlanner:
    """Resource budgets, composed after another planner.

    ``inner`` (groups or matrix) decides first.  When the target is not
    running and the models that stay (running, less the inner plan's
    evictions) plus the target would exceed a capacity, more models go, one
    at a time in this order, until the target fits every capacity:

    1. idle models (no request in flight, loaded at least ``minResident``
       ago), least recently used first;
    2. models with requests in flight or within ``minResident`` (the
       scheduler waits for them before the swap starts), least recently
       used first;
    3. members of ``persistent`` groups, in the same order: only when
       nothing else frees enough.

    A candidate that frees nothing of a resource still over capacity is
    skipped.  This is least-recently-used order, not the cheapest set: the
    oldest idle model goes first even when a newer one alone would free
    enough.  A model's footprint is, per resource, the larger of what it
    declares and what was measured.  A target that alone exceeds a capacity
    gets a plan with ``infeasible`` set.  A target that is already running
    (starting, ready, or stopping and about to start again) evicts nothing
    more and is never infeasible: the budget decides loads; it does not
    refuse or reshuffle models already resident.
    """

    def __init__(self, inner: Planner, capacity: Mapping[str, float],
                 declared: Mapping[str, Mapping[str, float]],
                 persistent: AbstractSet[str] = frozenset(),
                 sized: AbstractSet[str] = frozenset()) -> None:
        """``capacity``: resource -> amount; ``declared``: model -> resource
        -> amount; ``persistent``: members of persistent groups; ``sized``:
        resources counted in bytes (for messages)."""
        self.inner = inner
        self.capacity = dict(capacity)
        self.declared = {m: dict(r) for m, r in declared.items()}
        self.persistent = frozenset(persistent)
        self.sized = frozenset(sized)

    def amount(self, resource: str, value: float) -> str:
        return format_amount(value, resource in self.sized)

    def footprint(self, model: str, usage: Usage = NO_USAGE) -> dict[str, float]:
        """Per capacity resource: max(declared, measured)."""
        declared = self.declared.get(model, _EMPTY)
        measured = usage.measured.get(model, _EMPTY)
        return {r: max(declared.get(r, 0), measured.get(r, 0)) for r in self.capacity}

    def used(self, models: Iterable[str], usage: Usage = NO_USAGE) -> dict[str, float]:
        """Per capacity resource: the summed footprints of ``models``."""
        total = {r: 0.0 for r in self.capacity}
        for m in models:
            for r, amount in self.footprint(m, usage).items():
                total[r] += amount
        return total

    def _tier(self, model: str, usage: Usage) -> int:
        if model in self.persistent:
            return _PERSISTENT
        if usage.in_flight.get(model, 0) > 0 or model in usage.young:
            return _WAIT
        return _IDLE

    def _order(self, models: Iterable[str], usage: Usage) -> list[str]:
        never = float("-inf")
        return sorted(models, key=lambda m: (self._tier(m, usage), usage.recency.get(m, never), m))

    def _over(self, used: Mapping[str, float]) -> list[str]:
        return [r for r in sorted(self.capacity) if used[r] > self.capacity[r]]

    def _describe(self, used: Mapping[str, float], resources: Iterable[str]) -> str:
        return ", ".join(f"{r} {self.amount(r, used[r])} > {self.amount(r, self.capacity[r])}"
                         for r in resources)

    def infeasible(self, target: str, usage: Usage = NO_USAGE) -> str:
        """Why ``target`` cannot run even alone ("" when it can)."""
        need = self.footprint(target, usage)
        for r in sorted(self.capacity):
            if need[r] > self.capacity[r]:
                declared = self.declared.get(target, _EMPTY).get(r, 0)
                what = "measured" if need[r] > declared else "declared"
                return (f"model {target!r} needs {self.amount(r, need[r])} of {r} ({what}), more than "
                        f"resources.capacity.{r} ({self.amount(r, self.capacity[r])})")
        return ""

    def plan(self, target: str, running: AbstractSet[str], usage: Usage = NO_USAGE) -> Plan:
        return self.apply(self.inner.plan(target, running), running, usage)

    def apply(self, plan: Plan, running: AbstractSet[str], usage: Usage = NO_USAGE) -> Plan:
        """``plan`` (the inner planner's) plus the evictions the budget needs."""
        target = plan.target
        if not self.capacity or target in running:
            return plan
        why_not = self.infeasible(target, usage)
        if why_not:
            return replace(plan, infeasible=why_not)
        staying = [m for m in running if m != target and m not in plan.evict]
        used = self.used([*staying, target], usage)
        over = self._over(used)
        if not over:
            return plan
        pressure = self._describe(used, over)
        chosen: list[tuple[str, str]] = []
        names, over = self._free_until_fits(self._order(staying, usage), used, usage)
        for m in names:
            tier = self._tier(m, usage)
            if tier == _IDLE:
                kind = "least recently used idle model"
            elif tier == _WAIT:
                kind = ("least recently used of the models in use or within minResident "
                        "(the load waits for it)")
            else:
                kind = "persistent group member, evicted because nothing else frees enough"
            chosen.append((m, f"makes room for {target!r} ({pressure}): {kind}"))
        if over:  # unreachable while the target alone fits; kept as a guard
            return replace(plan, infeasible=f"model {target!r} does not fit: {self._describe(used, over)}")
        names = [m for m, _ in chosen]
        reason = f"{plan.reason}; to fit resources.capacity ({pressure}) also evicts {_names(names)}"
        return replace(plan, evict=plan.evict | frozenset(names), reason=reason,
                       reasons=plan.reasons + tuple(chosen))

    def trim(self, running: AbstractSet[str], usage: Usage = NO_USAGE,
             keep: AbstractSet[str] = frozenset()) -> tuple[str, ...]:
        """Idle models to stop, least recently used first (persistent group
        members last), until ``running`` fits every capacity; models with
        requests in flight, within ``minResident`` or in ``keep`` count
        towards the use but are never chosen (for a capacity lowered by a
        reload: the next load evicts the rest)."""
        candidates = [m for m in self._order(running, usage)
                      if m not in keep and not usage.in_flight.get(m, 0) and not usage.young.get(m, 0) > 0]
        chosen, _ = self._free_until_fits(candidates, self.used(running, usage), usage)
        return tuple(chosen)

    def _free_until_fits(self, candidates: Iterable[str], used: dict, usage: Usage) -> tuple[list[str], list[str]]:
        """Take ``candidates`` in order, each only if it frees a resource that is
        over capacity, until none is (``used`` is updated); returns the models
        taken and the resources still over."""
        over = self._over(used)
        chosen: list[str] = []
        for m in candidates:
            if not over:
                break
            frees = self.footprint(m, usage)
            if not any(frees[r] > 0 for r in over):
                continue
            for r, amount in frees.items():
                used[r] -= amount
            over = self._over(used)
            chosen.append(m)
        return chosen, over

    def can_coexist(self, models: AbstractSet[str]) -> bool:
        """The inner planner lets ``models`` run together and their declared
        footprints fit every capacity."""
        return self.inner.can_coexist(models) and not self._over(self.used(models))


def reachable(planner: Planner, models: AbstractSet[str]) -> bool:
    """True when ``planner`` lets all of ``models`` run at once: some order of
    loading them, one by one from none, evicts none of them.  (Weaker than
    ``can_coexist``: with groups, a model of an ``exclusive: false`` group may
    join a model of an exclusive group, though not the other way round.)
    Found as :func:`replan` finds it (see :func:`_insert`)."""
    order: Optional[list] = []
    for model in sorted(models):
        order = _insert(planner, order, model)
        if order is None:
            return False
    return True


def _insert(planner: Planner, order: list, model: str) -> Optional[list]:
    """``order`` (a load order that evicts nothing) with ``model`` put where
    it still evicts nothing, last if it can be; None when no place fits.

    Polynomial (positions times loads), where trying every order of the
    models, or every subset, blows up with a few more than a dozen running
    models; a found order is always valid, so a model is never kept beside
    one it would evict."""
    for at in range(len(order), -1, -1):
        candidate = order[:at] + [model] + order[at:]
        if _loads_cleanly(planner, candidate):
            return candidate
    return None


def _loads_cleanly(planner: Planner, order: list) -> bool:
    loaded: set = set()
    for model in order:
        if planner.plan(model, frozenset(loaded)).evict & loaded:
            return False
        loaded.add(model)
    return True


def replan(planner: Planner, running: AbstractSet[str], usage: Usage = NO_USAGE,
           keep: AbstractSet[str] = frozenset()) -> tuple[str, ...]:
    """The running models to stop after a reload changed groups or the
    matrix, so that the rest may run together under ``planner`` (see
    :func:`reachable`).  Models with requests in flight and those in ``keep``
    always stay (a later swap waits for them as usual); the others are taken
    most recently used first, and each stays when it can run with those
    kept so far.  Returned least recently used first."""
    never = float("-inf")
    by_use = sorted(running, key=lambda m: (-usage.recency.get(m, never), m))
    pinned = [m for m in by_use if m in keep or usage.in_flight.get(m, 0) > 0]
    order: Optional[list] = []
    for model in sorted(pinned):  # they stay whatever; the others are kept only in a clean order with them
        order = _insert(planner, order, model) if order is not None else None
    stop: list[str] = []
    for model in by_use:
        if model in pinned:
            continue
        placed = _insert(planner, order, model) if order is not None else None
        if placed is not None:
            order = placed
        else:
            stop.append(model)
    return tuple(reversed(stop))


def planner_for(routing: Routing) -> Planner:
    """The planner ``routing.router`` names (``group`` or ``matrix``)."""
    if routing.router == "group":
        return GroupPlanner(routing.groups)
    if routing.router == "matrix":
        if routing.matrix is None:
            raise ValueError("routing.router is 'matrix' but no matrix is configured")
        return MatrixPlanner(routing.matrix)
    raise ValueError(f"unknown router {routing.router!r} (expected 'group' or 'matrix')")


def planner_for_config(config: Config) -> Planner:
    """``planner_for(config.routing)``, wrapped in a :class:`BudgetPlanner`
    when ``resources.capacity`` is set."""
    inner = planner_for(config.routing)
    if not config.resources:
        return inner
    routing = config.routing
    persistent = ({m for g in routing.groups if g.persistent for m in g.members}
                  if routing.router == "group" else set())
    declared = {mid: m.resources for mid, m in config.models.items() if m.resources}
    return BudgetPlanner(inner, config.resources.capacity, declared, persistent,
                         config.resources.sized)
