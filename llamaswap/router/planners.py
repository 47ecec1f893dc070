"""Swap planners: pure functions ``(target, running) -> models to evict``.

A planner answers one question for the scheduler: to serve ``target`` while
``running`` models are up (starting, ready or stopping, plus the targets of
swaps under way), which of them must be stopped first?  The answer is a
:class:`Plan` that also says *why*, so the router can log each eviction.

Two planners share the :class:`Planner` interface:

* :class:`GroupPlanner` -- llama-swap's groups (``swap``, ``exclusive``,
  ``persistent``), including its one-way gotcha: loading from an
  ``exclusive: false`` group evicts nothing outside it, but loading from an
  exclusive group (the ``(default)`` group too) evicts a non-exclusive
  group's members.
* :class:`MatrixPlanner` -- llama-swap's matrix: pick the set alternative
  containing the target that is cheapest to reach (sum of evict costs of the
  running models outside it), ties by set order then alternative order.

Planners hold no state besides their configuration and do no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Iterable, Optional, Protocol, Sequence

from llamaswap.config.types import Group, Matrix, Routing

__all__ = ["Plan", "Planner", "GroupPlanner", "MatrixPlanner", "planner_for"]


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


def planner_for(routing: Routing) -> Planner:
    """The planner ``routing.router`` names (``group`` or ``matrix``)."""
    if routing.router == "group":
        return GroupPlanner(routing.groups)
    if routing.router == "matrix":
        if routing.matrix is None:
            raise ValueError("routing.router is 'matrix' but no matrix is configured")
        return MatrixPlanner(routing.matrix)
    raise ValueError(f"unknown router {routing.router!r} (expected 'group' or 'matrix')")

