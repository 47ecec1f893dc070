"""Selectors: virtual model ids that pick a concrete target per request.

``selectors.<id>: {strategy, targets, settings.spillover}`` (reference §1.6,
§4).  A profile pin may name a selector; a selector's targets are local
models, aliases or peer models, never selectors.  Strategies:

* ``pin``: the first target.
* ``warm``: the first target that is ready, else the first one starting,
  else the first (it will be started).
* ``spillover``: each target holds up to ``settings.spillover`` requests of
  this selector before the next one is started.  Targets are *active*
  (a local model ready or starting, or with requests of this selector in
  flight; a peer model with requests in flight) or *cold* (a stopped local
  model, an idle peer model); a stopping local model and an unavailable peer
  (its health check fails) are skipped.  No active target: the first cold
  one.  The least-busy active target while it holds fewer than
  ``spillover``; else the first cold target; else the least-busy active one.
  Ties go round-robin.
* ``failover`` (llamaswap addition): every target in order, unavailable
  peers left out; the pipeline tries the next one while a target fails
  before any byte of its answer reached the client.

Everything here is pure (no reactor): the caller passes what it knows of
process states and peer health, and keeps one :class:`SpilloverCounts`.
"""

from __future__ import annotations

import json
from typing import Callable, Optional, Sequence

from ..config import Selector
from ..process import ProcessState
from .peers import Target

StateOf = Callable[[str], Optional[ProcessState]]  # a local model id -> its state
Available = Callable[[str], bool]  # a peer id -> not failing its health check


class NoTarget(Exception):
    """No target of the selector can serve this request (503)."""


class SpilloverCounts:
    """Requests each spillover selector has in flight per target (by
    ``Target.label``), and its round-robin position for ties."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._turn: dict[str, int] = {}

    def count(self, selector_id: str, label: str) -> int:
        return self._counts.get((selector_id, label), 0)

    def reserve(self, selector_id: str, label: str) -> Callable[[], None]:
        """Count one more request; returns its release (call it exactly once)."""
        key = (selector_id, label)
        self._counts[key] = self._counts.get(key, 0) + 1

        def release() -> None:
            left = self._counts.get(key, 0) - 1
            if left > 0:
                self._counts[key] = left
            else:
                self._counts.pop(key, None)

        return release

    def least_busy(self, selector_id: str, candidates: Sequence[Target]) -> Target:
        """The candidate with the fewest requests in flight; ties in turn."""
        fewest = min(self.count(selector_id, t.label) for t in candidates)
        tied = [t for t in candidates if self.count(selector_id, t.label) == fewest]
        turn = self._turn.get(selector_id, 0)
        self._turn[selector_id] = turn + 1
        return tied[turn % len(tied)]


def choose(selector: Selector, targets: Sequence[Target], state_of: StateOf, available: Available,
           counts: SpilloverCounts) -> tuple[list[Target], Optional[Callable[[], None]]]:
    """What a request for ``selector`` is served by: ``(targets to try in
    order, release)``.  ``targets`` are the selector's targets that resolve,
    in order.  Only ``failover`` returns more than one; only ``spillover``
    reserves (``release`` must then be called once the request is done).
    Raises :class:`NoTarget` when nothing can serve."""
    if not targets:
        raise NoTarget(f"selector {_q(selector.id)} has no targets")
    strategy = selector.strategy
    if strategy == "pin":
        return [targets[0]], None
    if strategy == "warm":
        return [_warmest(targets, state_of)], None
    if strategy == "spillover":
        target = _spill(selector, targets, state_of, available, counts)
        return [target], counts.reserve(selector.id, target.label)
    if strategy == "failover":
        usable = [t for t in targets if t.peer is None or available(t.peer.peer)]
        if not usable:
            raise NoTarget(f"selector {_q(selector.id)} has no available targets")
        return usable, None
    raise NoTarget(f"unknown selector strategy {_q(strategy)}")


def _warmest(targets: Sequence[Target], state_of: StateOf) -> Target:
    for wanted in (ProcessState.READY, ProcessState.STARTING):
        for target in targets:
            if target.model_id is not None and state_of(target.model_id) is wanted:
                return target
    return targets[0]


def _spill(selector: Selector, targets: Sequence[Target], state_of: StateOf, available: Available,
           counts: SpilloverCounts) -> Target:
    active: list[Target] = []
    cold: list[Target] = []
    for target in targets:
        busy = counts.count(selector.id, target.label) > 0
        if target.peer is not None:
            if available(target.peer.peer):
                (active if busy else cold).append(target)
            continue
        state = state_of(target.model_id)
        if state in (ProcessState.STOPPING, ProcessState.SHUTDOWN):
            continue
        if state in (ProcessState.READY, ProcessState.STARTING) or busy:
            active.append(target)
        else:
            cold.append(target)
    if not active:
        if not cold:
            raise NoTarget(f"selector {_q(selector.id)} has no available spillover targets")
        return cold[0]
    if min(counts.count(selector.id, t.label) for t in active) < selector.spillover or not cold:
        return counts.least_busy(selector.id, active)
    return cold[0]


def _q(text: str) -> str:
    """``text`` quoted as Go's ``%q`` quotes it (llama-swap's messages: ``selector "x" ...``)."""
    return json.dumps(text, ensure_ascii=False)


def selector_targets(selector: Selector, resolve: Callable[[str], Optional[Target]]) -> list[Target]:
    """The selector's targets that resolve (the loader warned about the others), in order."""
    out = []
    for name in selector.targets:
        target = resolve(name)
        if target is not None:
            out.append(target)
    return out
