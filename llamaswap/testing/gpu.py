"""A fake GPU for tests and demos: a ``FootprintSampler`` without NVML.

``FakeGpu(usage)`` answers ``sample(pgid)`` with ``usage(pgid)``, a mapping
GPU index -> bytes (or None: "cannot measure"), as the real
:class:`~llamaswap.perf.footprint.NvmlFootprintSampler` would for that
process group.  A sampled group stays "listed" by the fake driver for
``linger`` calls of ``holding`` after it is first asked about, so the wait
for released memory can be exercised; everything is synchronous.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred

from ..perf.footprint import GroupUsage

__all__ = ["FakeGpu"]


class FakeGpu:
    def __init__(self, usage: Callable[[int], Optional[Mapping[int, int]]], linger: int = 0) -> None:
        self.usage = usage
        self.linger = linger
        self.samples: list[int] = []  # pgids sampled, in order
        self.holding_calls: list[frozenset] = []
        self._listed: dict[int, int] = {}  # pid -> holding calls left before it is released

    def sample(self, pgid: int) -> Deferred:
        self.samples.append(pgid)
        gpus = self.usage(pgid)
        if gpus is None:
            return defer.succeed(None)
        if any(gpus.values()):
            self._listed.setdefault(pgid, self.linger)
        return defer.succeed(GroupUsage(frozenset([pgid]), dict(gpus)))

    def holding(self, pids: frozenset) -> Deferred:
        self.holding_calls.append(frozenset(pids))
        still = set()
        for pid in pids:
            left = self._listed.get(pid)
            if left is None:
                continue
            if left <= 0:
                del self._listed[pid]
                continue
            self._listed[pid] = left - 1
            still.add(pid)
        return defer.succeed(frozenset(still))
