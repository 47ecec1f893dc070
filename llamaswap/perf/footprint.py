"""Measured model footprints: the GPU memory of each model's process group.

Two parts:

* :class:`FootprintSampler` is the interface to the GPU: ``sample(pgid)``
  (the memory a process group uses now, per GPU) and ``holding(pids)``
  (which of these pids NVML still lists).  :class:`NvmlFootprintSampler` is
  the real one.  Its NVML and psutil calls *block*, so it runs them in a
  thread (``deferToThread``; injectable as ``run_blocking``).  Without NVML
  (no ``pynvml``, no driver, no GPU) it answers ``None`` and an empty set:
  measured footprints are then absent and no start waits for memory.
  ``llamaswap.testing.gpu.FakeGpu`` implements the same interface for tests.
* :class:`Footprints` keeps, for the models of one runtime, what they
  declare and the most they were measured to use.  A model is sampled as it
  turns ready and every ``FOOTPRINT_EVERY`` seconds while it stays ready.  The
  budget planner reads :attr:`Footprints.measured` (model -> resource ->
  amount, for ``vram`` = all GPUs and ``gpu<N>`` = GPU N, when those
  capacities are sizes).  After a model stops, :meth:`Footprints.released`
  makes the next start wait until NVML no longer lists the stopped
  processes, at most ``MEMORY_RELEASE_WAIT`` seconds from the stop, so a new
  model does not start into an out-of-memory failure while the driver still
  holds the old one's memory.

Footprints are measured only when ``resources.capacity`` is configured.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

import psutil
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from ..config import defaults as D
from ..config.fields import format_amount
from ..config.types import Config
from .sources import RunBlocking

__all__ = ["Footprints", "FootprintSampler", "GroupUsage", "NvmlFootprintSampler", "group_pids"]

_GPU = re.compile(r"gpu(\d+)")


@dataclass(frozen=True)
class GroupUsage:
    """What one process group holds on the GPUs: its pids (those found when
    sampled) and bytes per GPU index (GPUs it does not use are absent)."""

    pids: frozenset = frozenset()
    gpus: Mapping[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.gpus.values())


class FootprintSampler(Protocol):
    """Where measured footprints come from; nothing here blocks the reactor."""

    def sample(self, pgid: int) -> Deferred:
        """Fire with the :class:`GroupUsage` of process group ``pgid``, or
        None when GPU memory cannot be measured here."""

    def holding(self, pids: frozenset) -> Deferred:
        """Fire with the subset of ``pids`` the GPU driver still lists
        (their memory is not free yet); empty when it cannot tell."""


def group_pids(pgid: int) -> frozenset:
    """Blocking: every live pid in process group ``pgid`` (psutil's process
    table, ``os.getpgid`` for each)."""
    found = set()
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                found.add(pid)
        except OSError:  # gone meanwhile, or not ours to ask about
            continue
    return frozenset(found)


class NvmlFootprintSampler:
    """GPU memory per process group through NVML (``pynvml``, from nvidia-ml-py).

    Blocking work (``nvmlInit``, the per-device process lists, the psutil scan
    for a group's pids) runs through ``run_blocking``, ``deferToThread`` by
    default, never on the reactor.  The first failed ``nvmlInit`` (or a
    missing ``pynvml``) is remembered: NVML is then not asked again and every
    sample is None.  ``nvml`` is the pynvml module (injectable for tests).
    """

    log = Logger()
    name = "nvml"

    def __init__(self, nvml: Any = None, run_blocking: RunBlocking = deferToThread,
                 find_pids: Callable[[int], frozenset] = group_pids) -> None:
        self._nvml = nvml
        self._run_blocking = run_blocking
        self._find_pids = find_pids
        self._lock = threading.Lock()
        self._available: Optional[bool] = None

    # -- blocking: run these in a thread --------------------------------------------

    def init(self) -> bool:
        """Blocking: ``nvmlInit`` once; False (remembered) when NVML is unavailable."""
        with self._lock:
            if self._available is None:
                self._available = self._try_init()
            return self._available

    def _try_init(self) -> bool:
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except ImportError:
            return False
        except Exception as error:  # pynvml's NVMLError (library or driver missing, no GPU)
            self.log.info("GPU memory of models is not measured: NVML unavailable ({error})", error=error)
            return False
        return True

    def per_gpu(self, pids: frozenset) -> tuple[dict[int, int], frozenset]:
        """Blocking: ``({gpu index: bytes used by pids}, pids NVML lists)``.

        A process listed by both the compute and the graphics list of a GPU
        counts once; a process whose usage NVML does not report counts 0 bytes
        but is still listed."""
        nv = self._nvml
        error = getattr(nv, "NVMLError", Exception)
        unknown = getattr(nv, "NVML_VALUE_NOT_AVAILABLE_ulonglong", None)
        gpus: dict[int, int] = {}
        listed: set = set()
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            used: dict[int, int] = {}
            for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                fn = getattr(nv, getter, None)
                if fn is None:
                    continue
                try:
                    processes = fn(handle)
                except error:
                    continue
                for p in processes:
                    if p.pid not in pids:
                        continue
                    amount = getattr(p, "usedGpuMemory", None)
                    if amount is None or amount == unknown or amount < 0:
                        amount = 0
                    used[p.pid] = max(used.get(p.pid, 0), int(amount))
            if used:
                listed.update(used)
                gpus[index] = sum(used.values())
        return gpus, frozenset(listed)

    def read(self, pgid: int) -> Optional[GroupUsage]:
        """Blocking: the :class:`GroupUsage` of process group ``pgid`` (None without NVML)."""
        if not self.init():
            return None
        pids = self._find_pids(pgid) | {pgid}
        gpus, _ = self.per_gpu(pids)
        return GroupUsage(frozenset(pids), gpus)

    def still_listed(self, pids: frozenset) -> frozenset:
        """Blocking: the subset of ``pids`` NVML still lists (empty without NVML)."""
        if not pids or not self.init():
            return frozenset()
        return self.per_gpu(pids)[1]

    # -- the interface ------------------------------------------------------------------

    def sample(self, pgid: int) -> Deferred:
        """:meth:`read` in a thread."""
        if self._available is False:
            return defer.succeed(None)
        return self._run_blocking(self.read, pgid)

    def holding(self, pids: frozenset) -> Deferred:
        """:meth:`still_listed` in a thread."""
        if self._available is False or not pids:
            return defer.succeed(frozenset())
        return self._run_blocking(self.still_listed, frozenset(pids))


class Footprints:
    """Declared and measured footprints of one runtime's models.

    ``measured`` is the live mapping the scheduler reads on every decision:
    model -> capacity resource -> the most this model was measured to use
    (peak per GPU since this runtime began).  It only holds the resources
    measurement applies to: ``vram`` (sum over GPUs) and ``gpu<N>``, when
    their capacity is a size (bytes).
    """

    log = Logger()

    def __init__(self, clock: Any, config: Config, processes: Mapping[str, Any],
                 sampler: Optional[FootprintSampler] = None, *,
                 publish: Optional[Callable[[str, Any], None]] = None,
                 every: float = D.FOOTPRINT_EVERY,
                 release_wait: float = D.MEMORY_RELEASE_WAIT,
                 poll: float = D.MEMORY_RELEASE_POLL) -> None:
        self.clock = clock
        self.config = config
        self.processes = processes
        self.sampler = sampler
        self.publish = publish
        self.every = every
        self.release_wait = release_wait
        self.poll = poll
        self.measured: dict[str, dict[str, float]] = {}
        self.gpus: dict[str, dict[int, int]] = {}  # model -> GPU index -> peak bytes
        self._pids: dict[str, frozenset] = {}  # model -> pids found by its last sample
        self._releasing: list[tuple[str, frozenset, float]] = []  # (model, pids, give up at)
        self._waiters: list[Deferred] = []
        self._sampling: set[str] = set()  # models with a sample under way
        self._polling = False
        self._next_poll: Any = None  # the pending clock call of the release wait
        self._warned: set[tuple[str, str]] = set()
        self._loop: Optional[LoopingCall] = None
        self._closed = False
        self._unavailable = False  # the sampler said it cannot measure here (no NVML)

    @property
    def active(self) -> bool:
        """Measuring at all: a sampler that can measure, ``resources.capacity``
        configured, the runtime not shut down."""
        return (self.sampler is not None and bool(self.config.resources) and not self._closed
                and not self._unavailable)

    def reconfigure(self, config: Config, forget: Iterable[str] = ()) -> None:
        """A reload: recompute what applies to planning.  ``forget``: models
        removed, or whose process changed: what was measured of them no
        longer holds (the pids of an old process still running stay, so a
        start waits for its memory after it stopped)."""
        self.config = config
        for model in forget:
            self.gpus.pop(model, None)
            self.measured.pop(model, None)
            self._warned = {w for w in self._warned if w[0] != model}
        for model in list(self.gpus):
            self._derive(model)

    # -- what the rest of llamaswap reads ---------------------------------------------

    def declared(self, model: str) -> Mapping[str, float]:
        m = self.config.models.get(model)
        return m.resources if m is not None else {}

    def planned(self, model: str) -> dict[str, float]:
        """Per capacity resource: max(declared, measured)."""
        declared, measured = self.declared(model), self.measured.get(model, {})
        return {r: max(declared.get(r, 0), measured.get(r, 0)) for r in self.config.resources.capacity}

    def record(self, model: str) -> Optional[dict]:
        """The footprint for JSON (``/running``, ``/v1/models``, ``modelStatus``):
        ``declared`` and ``measured`` (``vram`` and ``gpu<N>``, absent until
        measured), ``planned`` (what the budget counts); None when no
        ``resources.capacity`` is configured.  Amounts as configured (bytes
        for sizes)."""
        if not self.config.resources:
            return None
        out: dict = {"declared": dict(self.declared(model)), "planned": self.planned(model)}
        gpus = self.gpus.get(model)
        if gpus is not None:
            measured = {"vram": sum(gpus.values())}
            measured.update((f"gpu{i}", amount) for i, amount in sorted(gpus.items()))
            out["measured"] = measured
        return out

    # -- process events (Runtime wires them) ------------------------------------------

    def ready(self, process: Any) -> None:
        """A model turned ready: sample it now, and keep sampling ready models."""
        if not self.active:
            return
        self._sample(process)
        if self._loop is None and self.active:
            self._loop = LoopingCall(self._sample_ready)
            self._loop.clock = self.clock
            self._loop.start(self.every, now=False).addErrback(
                lambda f: self.log.failure("footprint sampling stopped", f))

    def stopped(self, model: str) -> None:
        """A model's process group is gone: its GPU memory is being released."""
        pids = self._pids.pop(model, None)
        if pids and self.active:
            self._releasing.append((model, pids, self.clock.seconds() + self.release_wait))

    def released(self) -> Deferred:
        """Fires once NVML lists none of the processes of models stopped
        recently (at most ``release_wait`` seconds after each stop, and only
        as long as needed: at once when nothing is being released).  Each
        caller gets a Deferred of its own; cancelling it withdraws the caller."""
        self._expire()
        if not self._releasing or not self.active:
            self._releasing.clear()
            return defer.succeed(None)

        def withdraw(d: Deferred) -> None:
            if d in self._waiters:
                self._waiters.remove(d)
            if timer.active():
                timer.cancel()

        def give_up() -> None:  # NVML may never answer (a wedged driver): the bound holds anyway
            if d in self._waiters:
                self._waiters.remove(d)
                self.log.info("GPU memory release not confirmed within {wait:g}s; starting anyway",
                              wait=self.release_wait)
                d.callback(None)

        d: Deferred = Deferred(withdraw)
        timer = self.clock.callLater(self.release_wait, give_up)
        d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        self._waiters.append(d)
        if not self._polling:
            self._polling = True
            self._poll()
        return d

    def _stop_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def close(self) -> None:
        """The runtime is shutting down: stop sampling, release every waiter."""
        self._closed = True
        self._stop_loop()
        if self._next_poll is not None and self._next_poll.active():
            self._next_poll.cancel()
        self._next_poll = None
        self._polling = False
        self._releasing.clear()
        self._fire_waiters()

    # -- sampling -------------------------------------------------------------------------

    def _sample_ready(self) -> None:
        for process in list(self.processes.values()):
            if str(process.state) == "ready":
                self._sample(process)

    def _sample(self, process: Any) -> None:
        pid = process.pid
        if pid is None or self.sampler is None:
            return
        model = process.model.id
        if model in self._sampling:  # the last sample has not come back (a slow or hung driver)
            return
        try:
            d = self.sampler.sample(pid)
        except Exception:
            self.log.failure("sampling the GPU memory of {model} failed", model=model)
            return
        self._sampling.add(model)
        d.addBoth(lambda result: (self._sampling.discard(model), result)[1])
        d.addCallback(self._sampled, process, pid)
        d.addErrback(lambda f: self.log.failure("sampling the GPU memory of {model} failed", f, model=model))

    def _sampled(self, usage: Optional[GroupUsage], process: Any, pid: int) -> None:
        if self._closed:
            return
        if usage is None:  # no NVML here: nothing will ever be measured
            self._unavailable = True
            self._stop_loop()
            return
        model = process.model.id
        if process.pid == pid:  # still the same child: remember whom to wait for after its stop
            self._pids[model] = usage.pids
        if self.processes.get(model) is not process:  # a reload retired it: its peak is no longer the model's
            return
        peaks = self.gpus.setdefault(model, {})
        changed = model not in self.measured
        for index, amount in usage.gpus.items():
            if amount > peaks.get(index, 0):
                peaks[index] = amount
                changed = True
        self._derive(model)
        if changed and self.publish is not None:
            self.publish("footprint", {"id": model, "footprint": self.record(model)})

    def _derive(self, model: str) -> None:
        """``measured[model]`` from the GPU peaks, for the capacities measurement applies to."""
        resources = self.config.resources
        peaks = self.gpus.get(model, {})
        derived: dict[str, float] = {}
        for name in resources.capacity:
            if name not in resources.sized:
                continue
            if name == "vram":
                derived[name] = sum(peaks.values())
            else:
                m = _GPU.fullmatch(name)
                if m is not None:
                    derived[name] = peaks.get(int(m.group(1)), 0)
        self.measured[model] = derived
        declared = self.declared(model)
        for name, amount in derived.items():
            if amount > declared.get(name, 0) and (model, name) not in self._warned:
                self._warned.add((model, name))
                self.log.warn(
                    "{model} uses {measured} of {resource}, more than it declares ({declared}); "
                    "planning with the measured figure",
                    model=model, resource=name, measured=format_amount(amount, True),
                    declared=format_amount(declared.get(name, 0), True))

    # -- waiting for released memory ------------------------------------------------------

    def _expire(self) -> None:
        now = self.clock.seconds()
        for entry in [e for e in self._releasing if e[2] <= now + 1e-6]:
            self._releasing.remove(entry)
            self.log.info("{model}: GPU memory still listed {wait:g}s after its stop; starting anyway",
                          model=entry[0], wait=self.release_wait)

    def _poll(self) -> None:
        self._next_poll = None
        if self._closed:
            return
        self._expire()
        if not self._releasing:
            self._polling = False
            self._fire_waiters()
            return
        pids = frozenset().union(*(pids for _, pids, _ in self._releasing))
        try:
            d = self.sampler.holding(pids) if self.sampler is not None else defer.succeed(frozenset())
        except Exception as error:
            d = defer.fail(error)
        d.addCallbacks(self._held, self._hold_failed)

    def _held(self, listed: Iterable[int]) -> None:
        if self._closed:
            return
        listed = frozenset(listed)
        self._releasing = [(m, pids & listed, t) for m, pids, t in self._releasing if pids & listed]
        if not self._releasing:
            self._poll()
            return
        now = self.clock.seconds()
        delay = min(self.poll, max(0.0, min(t for _, _, t in self._releasing) - now))
        self._next_poll = self.clock.callLater(delay, self._poll)

    def _hold_failed(self, failure: Any) -> None:
        self.log.failure("asking NVML for released memory failed; starting anyway", failure)
        self._releasing.clear()
        self._poll()

    def _fire_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
