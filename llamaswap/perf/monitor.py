"""The performance monitor: periodic system/GPU samples kept in one-hour rings.

Sampling never blocks the reactor: the system reader (psutil) runs through
``run_blocking`` (``deferToThread``), GPU sources are asynchronous themselves.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..activity.query import parse_rfc3339
from .sources import GpuSource, GpuStat, RunBlocking, SysStat, detect_gpu_source, read_system

__all__ = ["AUTO", "INVALID_AFTER", "PerfMonitor", "parse_after", "ring_capacity"]

#: ``gpu_source=AUTO`` picks NVML, then nvidia-smi, then none, on the first tick.
AUTO: Any = object()

#: The 400 message for a bad ``?after=``.
INVALID_AFTER = "invalid 'after' timestamp, use RFC3339 format"


def ring_capacity(every: float) -> int:
    """One hour of samples: ``int(3600 / every)`` (720 at 5 s), at least 1."""
    return max(1, int(3600 / every))


def parse_after(text: str) -> datetime:
    """Parse ``?after=`` (RFC 3339); ``ValueError`` means answer 400 :data:`INVALID_AFTER`."""
    return parse_rfc3339(text.strip())


class PerfMonitor:
    """
    Samples the system and the GPUs every ``every`` seconds into ring buffers.

    A tick whose predecessor is still sampling is skipped (counted in
    :attr:`skipped_ticks`); a failing reader or source is logged (once per
    distinct error until it recovers) and the loop goes on.

    :param reactor: provides ``seconds``/``callLater`` (a ``Clock`` in tests).
    :param system_reader: blocking ``(timestamp) -> SysStat``, run via ``run_blocking``.
    :param gpu_source: a :class:`GpuSource`, ``None`` for no GPUs, or :data:`AUTO`.
    :param capacity: ring length for both rings; default :func:`ring_capacity`.
    :param run_blocking: runs blocking calls off the reactor (``deferToThread``).
    """

    log = Logger(namespace="llamaswap.perf")

    def __init__(self, reactor: Any, every: float,
                 system_reader: Callable[[datetime], SysStat] = read_system,
                 gpu_source: Union[GpuSource, None, Any] = AUTO,
                 capacity: Optional[int] = None,
                 run_blocking: RunBlocking = deferToThread) -> None:
        if not every > 0:
            raise ValueError(f"every must be positive, not {every!r}")
        self._reactor = reactor
        self.every = float(every)
        self.capacity = capacity if capacity is not None else ring_capacity(self.every)
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity!r}")
        self._system_reader = system_reader
        self._gpu_source = gpu_source
        self._run_blocking = run_blocking
        self._sys: deque[SysStat] = deque(maxlen=self.capacity)
        self._gpu: deque[tuple[GpuStat, ...]] = deque(maxlen=self.capacity)
        self._loop: Optional[LoopingCall] = None
        self._busy: Optional[Deferred] = None
        self._errors: dict[str, str] = {}
        self.skipped_ticks = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    @property
    def gpu_source(self) -> Optional[GpuSource]:
        """The GPU source in use (``None`` while :data:`AUTO` is undecided or none was found)."""
        return None if self._gpu_source is AUTO else self._gpu_source

    def start(self) -> None:
        """Start ticking; the first sample is taken one period from now (as llama-swap's ticker)."""
        if self.running:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self.every, now=False)

    def stop(self) -> Deferred:
        """Stop ticking; fires once a sample in progress has finished and the GPU source is closed."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        waiting: Deferred = Deferred()
        if self._busy is None:
            waiting.callback(None)
        else:
            def release(result: Any) -> Any:
                waiting.callback(None)
                return result

            self._busy.addBoth(release)
        return waiting.addCallback(lambda _: self._close_source())

    def _close_source(self) -> Deferred:
        source = self.gpu_source
        if source is None:
            return defer.succeed(None)
        d = defer.maybeDeferred(source.close)
        d.addErrback(lambda f: self.log.failure("closing GPU source {name} failed", f, name=source.name))
        return d

    # -- sampling ----------------------------------------------------------------------------

    def _tick(self) -> None:
        if self._busy is not None:
            self.skipped_ticks += 1
            self.log.debug("performance sample still running; tick skipped")
            return
        try:
            when = datetime.fromtimestamp(self._reactor.seconds(), timezone.utc)
            d = self._sample(when)
        except Exception:  # a LoopingCall stops on an exception: never let one out
            self.log.failure("performance tick failed")
            return
        if d.called:
            return
        self._busy = d

        def clear(result: Any) -> None:
            self._busy = None

        d.addBoth(clear)

    def _sample(self, when: datetime) -> Deferred:
        sys_d = defer.maybeDeferred(self._run_blocking, self._system_reader, when)
        sys_d.addCallback(self._record_sys)
        sys_d.addErrback(self._failed, "system")
        gpu_d = self._resolve_source()
        gpu_d.addCallback(lambda source: None if source is None else source.sample(when))
        gpu_d.addCallback(self._record_gpu)
        gpu_d.addErrback(self._failed, "gpu")
        return defer.DeferredList([sys_d, gpu_d], consumeErrors=True)

    def _resolve_source(self) -> Deferred:
        if self._gpu_source is not AUTO:
            return defer.succeed(self._gpu_source)

        def chosen(source: Optional[GpuSource]) -> Optional[GpuSource]:
            self._gpu_source = source
            if source is None:
                self.log.info("GPU monitoring not available: no NVML and no nvidia-smi")
            else:
                self.log.info("using {name} for GPU monitoring", name=source.name)
            return source

        def failed(f: Failure) -> None:
            self._gpu_source = None
            self.log.failure("GPU detection failed; GPU monitoring disabled", f)

        return detect_gpu_source(self._reactor, run_blocking=self._run_blocking).addCallbacks(chosen, failed)

    def _record_sys(self, stat: SysStat) -> None:
        self._sys.append(stat)
        self._recovered("system")

    def _record_gpu(self, stats: Optional[list[GpuStat]]) -> None:
        if stats is None:
            return
        if stats:
            self._gpu.append(tuple(sorted(stats, key=lambda g: g.id)))
        self._recovered("gpu")

    def _failed(self, failure: Failure, kind: str) -> None:
        message = failure.getErrorMessage()
        if self._errors.get(kind) == message:
            self.log.debug("{kind} sample failed again: {error}", kind=kind, error=message)
            return
        self._errors[kind] = message
        self.log.failure("{kind} sample failed (repeats are logged at debug level)", failure, kind=kind)

    def _recovered(self, kind: str) -> None:
        if self._errors.pop(kind, None) is not None:
            self.log.info("{kind} sampling recovered", kind=kind)

    # -- reading -----------------------------------------------------------------------------

    def latest_sys(self) -> Optional[SysStat]:
        """The newest system sample, or ``None``."""
        return self._sys[-1] if self._sys else None

    def latest_gpus(self) -> list[GpuStat]:
        """The newest GPU poll (one entry per GPU, by id), or ``[]``."""
        return list(self._gpu[-1]) if self._gpu else []

    def sys_stats(self) -> list[SysStat]:
        """All system samples in the ring, oldest first."""
        return list(self._sys)

    def gpu_stats(self) -> list[GpuStat]:
        """All GPU samples in the ring, flattened, oldest poll first."""
        return [g for poll in self._gpu for g in poll]

    def snapshot(self, after: Optional[datetime] = None) -> dict[str, Any]:
        """The ``/api/performance`` body; with ``after``, only samples strictly newer than it."""
        if after is not None and after.tzinfo is None:
            after = after.replace(tzinfo=timezone.utc)
        sys_stats = [s for s in self._sys if after is None or s.timestamp > after]
        gpu_stats = [g for poll in self._gpu for g in poll if after is None or g.timestamp > after]
        return {
            "enabled": True,
            "sys_stats": [s.to_json() for s in sys_stats],
            "gpu_stats": [g.to_json() for g in gpu_stats],
        }
