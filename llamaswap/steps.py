"""Long work cut into steps, so the reactor is never held for long.

Work on a big body (tens of MiB) is written as a generator that ``yield``\\ s
between pieces of at most a few milliseconds each and ``return``\\ s its result.
:func:`run_in_slices` runs such a generator on the reactor a slice at a time:
pieces until about ``SLICE`` seconds have gone, then the rest of the reactor's
work (I/O, timers) before the next slice.  :func:`drive` runs one to the end at
once (small inputs, tests, call sites that must stay synchronous).

The first slice runs at once, inside the call: work that fits in one slice
(nearly all of it) costs no extra reactor turn.  Threads are no help here:
``json.loads`` and friends hold the GIL throughout, so a worker thread would
stall the reactor thread just the same.
"""

from __future__ import annotations

import time
from typing import Generator, TypeVar

from twisted.internet import defer

__all__ = ["SLICE", "Steps", "drive", "run_in_slices"]

T = TypeVar("T")
Steps = Generator[None, None, T]

#: Reactor time one slice may take (seconds); a piece between yields stays well below it.
SLICE = 0.005


def drive(steps: "Steps[T]") -> T:
    """Run ``steps`` to the end now and return its result."""
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value


def run_in_slices(steps: "Steps[T]", clock, budget: float = SLICE) -> "defer.Deferred[T]":
    """Run ``steps`` in slices of about ``budget`` seconds, one per reactor turn.

    Fires with the generator's return value (or its exception).  Cancelling
    the Deferred closes the generator; no further piece runs."""
    pending: list = []

    def cancel(_d) -> None:
        for call in pending:
            if call.active():
                call.cancel()
        pending.clear()
        steps.close()

    d: defer.Deferred = defer.Deferred(cancel)

    def run_slice() -> None:
        pending.clear()
        deadline = time.perf_counter() + budget
        try:
            while True:
                next(steps)
                if time.perf_counter() >= deadline:
                    break
        except StopIteration as done:
            d.callback(done.value)
            return
        except BaseException:
            d.errback()
            return
        pending.append(clock.callLater(0, run_slice))

    run_slice()
    return d
