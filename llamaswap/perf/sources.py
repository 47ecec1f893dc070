"""System and GPU samples for the performance monitor (llama-swap's ``internal/perf``).

Everything that touches psutil or NVML is *blocking*: :func:`read_system`,
:meth:`NvmlSource.read` and :meth:`NvmlSource.init` must run off the reactor
(the monitor and :meth:`NvmlSource.sample` use ``deferToThread``).
``nvidia-smi`` is spawned one-shot per poll with ``reactor.spawnProcess``, so
it never blocks either.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar

import psutil
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..timefmt import format_rfc3339

__all__ = [
    "MB",
    "NVIDIA_SMI_ARGS",
    "GpuSource",
    "GpuSourceError",
    "GpuStat",
    "NetIOStat",
    "NvidiaSmiSource",
    "NvmlSource",
    "RunBlocking",
    "SysStat",
    "SystemReader",
    "detect_gpu_source",
    "format_rfc3339",
    "parse_nvidia_smi",
    "read_system",
]

log = Logger(namespace="llamaswap.perf")

MB = 1024 * 1024

NVIDIA_SMI_ARGS: tuple[str, ...] = (
    "--query-gpu=index,name,uuid,temperature.gpu,utilization.gpu,"
    "memory.used,memory.total,fan.speed,power.draw",
    "--format=csv,noheader,nounits",
)

T = TypeVar("T")

#: ``run_blocking(f, *args)`` runs blocking ``f`` off the reactor and returns a
#: Deferred; ``deferToThread`` in production, a synchronous shim in tests.
RunBlocking = Callable[..., Deferred]



def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetIOStat:
    """Cumulative byte counters of one network interface."""

    name: str
    bytes_recv: int
    bytes_sent: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bytes_recv": self.bytes_recv, "bytes_sent": self.bytes_sent}


@dataclass(frozen=True)
class SysStat:
    """One system sample; sizes in MiB (integer), like llama-swap's ``SysStat``."""

    timestamp: datetime
    cpu_util_per_core: tuple[float, ...] = ()
    mem_total_mb: int = 0
    mem_used_mb: int = 0
    mem_free_mb: int = 0
    swap_total_mb: int = 0
    swap_used_mb: int = 0
    load_avg_1: float = 0.0
    load_avg_5: float = 0.0
    load_avg_15: float = 0.0
    net_io: tuple[NetIOStat, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """The ``/api/performance`` ``sys_stats[]`` element."""
        return {
            "timestamp": format_rfc3339(self.timestamp),
            "cpu_util_per_core": list(self.cpu_util_per_core),
            "mem_total_mb": self.mem_total_mb,
            "mem_used_mb": self.mem_used_mb,
            "mem_free_mb": self.mem_free_mb,
            "swap_total_mb": self.swap_total_mb,
            "swap_used_mb": self.swap_used_mb,
            "load_avg_1": self.load_avg_1,
            "load_avg_5": self.load_avg_5,
            "load_avg_15": self.load_avg_15,
            "net_io": [n.to_json() for n in self.net_io],
        }


@dataclass(frozen=True)
class GpuStat:
    """One GPU in one poll; ``mem_util_pct`` is used/total×100 (not NVML's bandwidth figure)."""

    timestamp: datetime
    id: int
    name: str = ""
    uuid: str = ""
    temp_c: int = 0
    vram_temp_c: int = 0
    gpu_util_pct: float = 0.0
    mem_util_pct: float = 0.0
    mem_used_mb: int = 0
    mem_total_mb: int = 0
    fan_speed_pct: float = 0.0
    power_draw_w: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The ``/api/performance`` ``gpu_stats[]`` element."""
        return {
            "timestamp": format_rfc3339(self.timestamp),
            "id": self.id,
            "name": self.name,
            "uuid": self.uuid,
            "temp_c": self.temp_c,
            "vram_temp_c": self.vram_temp_c,
            "gpu_util_pct": self.gpu_util_pct,
            "mem_util_pct": self.mem_util_pct,
            "mem_used_mb": self.mem_used_mb,
            "mem_total_mb": self.mem_total_mb,
            "fan_speed_pct": self.fan_speed_pct,
            "power_draw_w": self.power_draw_w,
        }


def _mem_util(used_mb: int, total_mb: int) -> float:
    return used_mb / total_mb * 100 if total_mb > 0 else 0.0


# -- system ----------------------------------------------------------------------------------


class SystemReader:
    """
    Blocking psutil sampler; call it off the reactor (``deferToThread``).

    Per-core CPU utilisation is the busy share of CPU time since the previous
    call on this reader (since boot on the first call).  It keeps its own
    previous times because ``psutil.cpu_percent`` keeps them per calling
    thread, which a thread pool makes meaningless.
    """

    def __init__(self, psutil_module: Any = psutil) -> None:
        self._psutil = psutil_module
        self._lock = threading.Lock()
        self._previous: Optional[list[tuple[float, float]]] = None

    def _cpu_percent(self) -> list[float]:
        current = [_busy_total(t) for t in self._psutil.cpu_times(percpu=True)]
        with self._lock:
            previous, self._previous = self._previous, current
        if previous is None or len(previous) != len(current):
            previous = [(0.0, 0.0)] * len(current)
        result = []
        for (busy0, total0), (busy1, total1) in zip(previous, current):
            d_total = total1 - total0
            pct = (busy1 - busy0) / d_total * 100 if d_total > 0 else 0.0
            result.append(round(min(max(pct, 0.0), 100.0), 2))
        return result

    def __call__(self, timestamp: Optional[datetime] = None) -> SysStat:
        """Sample now (blocking); ``timestamp`` defaults to the current UTC time."""
        ps = self._psutil
        cpu = self._cpu_percent()
        vm = ps.virtual_memory()
        swap_total = swap_used = 0
        try:
            swap = ps.swap_memory()
            swap_total, swap_used = swap.total // MB, swap.used // MB
        except (OSError, RuntimeError):
            pass
        load: tuple[float, ...] = (0.0, 0.0, 0.0)
        try:
            load = tuple(float(x) for x in ps.getloadavg())
        except (OSError, AttributeError, RuntimeError):
            pass
        net: list[NetIOStat] = []
        try:
            for name, counters in ps.net_io_counters(pernic=True).items():
                if name != "lo":
                    net.append(NetIOStat(name, int(counters.bytes_recv), int(counters.bytes_sent)))
        except (OSError, RuntimeError):
            pass
        return SysStat(
            timestamp=timestamp or _utcnow(),
            cpu_util_per_core=tuple(cpu),
            mem_total_mb=vm.total // MB,
            mem_used_mb=vm.used // MB,
            mem_free_mb=vm.free // MB,
            swap_total_mb=swap_total,
            swap_used_mb=swap_used,
            load_avg_1=load[0],
            load_avg_5=load[1],
            load_avg_15=load[2],
            net_io=tuple(net),
        )


def _busy_total(times: Any) -> tuple[float, float]:
    """(busy, total) seconds of one CPU's ``cpu_times`` (guest time is inside user/nice)."""
    fields = times._asdict()
    total = sum(fields.values())
    if sys.platform.startswith("linux"):
        total -= fields.get("guest", 0.0) + fields.get("guest_nice", 0.0)
    idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
    return total - idle, total


_default_reader = SystemReader()


def read_system(timestamp: Optional[datetime] = None) -> SysStat:
    """Blocking psutil sample of CPU, memory, swap, load and network; run via ``deferToThread``."""
    return _default_reader(timestamp)


# -- GPU sources -----------------------------------------------------------------------------


class GpuSourceError(Exception):
    """A GPU poll failed (tool missing, non-zero exit, timeout, NVML unavailable)."""


class GpuSource(Protocol):
    """Where GPU samples come from; ``sample`` never blocks the reactor."""

    name: str

    def sample(self, timestamp: datetime) -> Deferred:
        """Fire with ``list[GpuStat]`` for every GPU, stamped ``timestamp``."""

    def close(self) -> Deferred:
        """Release resources (a later ``sample`` may reopen them); fire with ``None``."""


_NA = {"", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]", "[gpu is lost]"}


def _smi_float(text: str) -> float:
    text = text.strip()
    if text.lower() in _NA:
        return 0.0
    try:
        return float(text)
    except ValueError:
        return 0.0


def _smi_int(text: str) -> int:
    value = _smi_float(text)
    return int(value) if value == value and abs(value) != float("inf") else 0


def parse_nvidia_smi(text: str, timestamp: datetime) -> list[GpuStat]:
    """
    Parse ``nvidia-smi --query-gpu=… --format=csv,noheader,nounits`` output.

    One GPU per line; ``[N/A]``/``[Not Supported]`` and other unparsable values
    become 0; lines without 9 fields or an integer index are skipped.  A name
    containing commas is rejoined.
    """
    stats: list[GpuStat] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 9:
            continue
        if len(parts) > 9:  # commas inside the name
            extra = len(parts) - 9
            parts = [parts[0], ", ".join(parts[1 : 2 + extra]), *parts[2 + extra :]]
        try:
            index = int(parts[0])
        except ValueError:
            continue
        used, total = _smi_int(parts[5]), _smi_int(parts[6])
        stats.append(GpuStat(
            timestamp=timestamp,
            id=index,
            name=parts[1],
            uuid="" if parts[2].lower() in _NA else parts[2],
            temp_c=_smi_int(parts[3]),
            gpu_util_pct=_smi_float(parts[4]),
            mem_used_mb=used,
            mem_total_mb=total,
            mem_util_pct=_mem_util(used, total),
            fan_speed_pct=_smi_float(parts[7]),
            power_draw_w=_smi_float(parts[8]),
        ))
    return stats


class _Capture(ProcessProtocol):
    """Collects a one-shot child's stdout/stderr; fires ``(out, err, exit_code, signal)``."""

    def __init__(self, finished: Deferred) -> None:
        self.finished = finished
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if not self.finished.called:
            self.finished.callback((b"".join(self.out), b"".join(self.err), code, sig))


class NvidiaSmiSource:
    """
    GPU samples from one ``nvidia-smi --query-gpu`` run per poll.

    The child is spawned with ``reactor.spawnProcess`` (never blocking); a run
    longer than ``timeout`` seconds is killed and the poll fails.
    """

    name = "nvidia-smi"

    def __init__(self, reactor: Any, executable: str = "nvidia-smi", timeout: float = 5.0,
                 args: Sequence[str] = NVIDIA_SMI_ARGS) -> None:
        self._reactor = reactor
        self.executable = executable
        self.timeout = timeout
        self.args = tuple(args)
        self._running: set[Any] = set()

    def sample(self, timestamp: datetime) -> Deferred:
        """Run nvidia-smi once; fire with the parsed GPUs or fail with :class:`GpuSourceError`."""
        transport: list[Any] = []

        def cancel(_: Deferred) -> None:
            for t in transport:
                _kill(t)

        finished: Deferred = Deferred(cancel)
        proto = _Capture(finished)
        try:
            t = self._reactor.spawnProcess(proto, self.executable, [self.executable, *self.args],
                                           env=dict(os.environ))
        except OSError as error:
            return defer.fail(GpuSourceError(f"cannot run {self.executable}: {error}"))
        transport.append(t)
        self._running.add(t)
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            _kill(t)

        timer = self._reactor.callLater(self.timeout, expire)

        def done(result: Any) -> Any:
            self._running.discard(t)
            if timer.active():
                timer.cancel()
            return result

        def parse(result: tuple[bytes, bytes, Optional[int], Optional[int]]) -> list[GpuStat]:
            out, err, code, sig = result
            if code != 0:
                why = f"killed by signal {sig}" if sig is not None else f"exited with {code}"
                if timed_out:
                    why = f"timed out after {self.timeout:g}s"
                detail = (err or out).decode("utf-8", "replace").strip()[:300]
                raise GpuSourceError(f"nvidia-smi {why}" + (f": {detail}" if detail else ""))
            return parse_nvidia_smi(out.decode("utf-8", "replace"), timestamp)

        finished.addBoth(done)
        finished.addCallback(parse)
        return finished

    def close(self) -> Deferred:
        """Kill any nvidia-smi still running."""
        for t in list(self._running):
            _kill(t)
        return defer.succeed(None)


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except (ProcessExitedAlready, OSError):
        pass


class NvmlSource:
    """
    GPU samples through NVML (``pynvml``, from nvidia-ml-py).

    :meth:`init` and :meth:`read` are blocking; :meth:`sample` and
    :meth:`close` run them via ``run_blocking`` (``deferToThread``).  NVML is
    initialised lazily; an ``NVMLError`` then means "not available".  Fields a
    GPU does not support (fan on passive cards, memory temperature, power…)
    read as 0.  ``nvml`` is the pynvml module (injectable for tests).
    """

    name = "nvml"

    def __init__(self, nvml: Any = None,
                 run_blocking: RunBlocking = deferToThread) -> None:
        self._nvml: Any = nvml
        self._run_blocking = run_blocking
        self._lock = threading.Lock()
        self._initialized = False

    def _module(self) -> Any:
        if self._nvml is None:
            import pynvml  # deferred: loading it is cheap, but keep import side-effect free

            self._nvml = pynvml
        return self._nvml

    def init(self) -> bool:
        """Blocking: ``nvmlInit`` once; ``False`` (not raised) when NVML is unavailable."""
        with self._lock:
            if self._initialized:
                return True
            try:
                nv = self._module()
            except ImportError:
                return False
            try:
                nv.nvmlInit()
            except nv.NVMLError as error:
                log.debug("NVML not available: {error}", error=error)
                return False
            self._initialized = True
            return True

    def shutdown(self) -> None:
        """Blocking: ``nvmlShutdown`` if initialised (a later read initialises again)."""
        with self._lock:
            if not self._initialized:
                return
            self._initialized = False
            nv = self._module()
            try:
                nv.nvmlShutdown()
            except nv.NVMLError as error:
                log.debug("nvmlShutdown failed: {error}", error=error)

    def _tolerated(self) -> tuple[type[BaseException], ...]:
        nv = self._nvml
        names = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound", "NVMLError_NoPermission")
        return tuple(c for c in (getattr(nv, n, None) for n in names) if isinstance(c, type))

    def read(self, timestamp: Optional[datetime] = None) -> list[GpuStat]:
        """Blocking: one :class:`GpuStat` per device; raises :class:`GpuSourceError` if NVML is unavailable."""
        if not self.init():
            raise GpuSourceError("NVML not available")
        nv = self._nvml
        tolerated = self._tolerated()
        when = timestamp or _utcnow()

        def get(fn: Callable[[], T], default: T) -> T:
            try:
                return fn()
            except tolerated:
                return default

        stats = []
        for index in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(index)
            used = total = 0
            memory = get(lambda: nv.nvmlDeviceGetMemoryInfo(h), None)
            if memory is not None:
                used, total = int(memory.used) // MB, int(memory.total) // MB
            rates = get(lambda: nv.nvmlDeviceGetUtilizationRates(h), None)
            stats.append(GpuStat(
                timestamp=when,
                id=index,
                name=_text(get(lambda: nv.nvmlDeviceGetName(h), "")),
                uuid=_text(get(lambda: nv.nvmlDeviceGetUUID(h), "")),
                temp_c=int(get(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU), 0)),
                vram_temp_c=self._vram_temp(h),
                gpu_util_pct=float(rates.gpu) if rates is not None else 0.0,
                mem_used_mb=used,
                mem_total_mb=total,
                mem_util_pct=_mem_util(used, total),
                fan_speed_pct=float(get(lambda: nv.nvmlDeviceGetFanSpeed(h), 0)),
                power_draw_w=float(get(lambda: nv.nvmlDeviceGetPowerUsage(h), 0)) / 1000.0,
            ))
        return stats

    def _vram_temp(self, handle: Any) -> int:
        """Memory temperature from the ``NVML_FI_DEV_MEMORY_TEMP`` field; 0 when unavailable."""
        nv = self._nvml
        field_id = getattr(nv, "NVML_FI_DEV_MEMORY_TEMP", None)
        getter = getattr(nv, "nvmlDeviceGetFieldValues", None)
        if field_id is None or getter is None:
            return 0
        try:
            value = getter(handle, [field_id])[0]
        except (nv.NVMLError, IndexError, TypeError):
            return 0
        if getattr(value, "nvmlReturn", 1) != getattr(nv, "NVML_SUCCESS", 0):
            return 0
        kinds = {
            getattr(nv, "NVML_VALUE_TYPE_DOUBLE", 0): "dVal",
            getattr(nv, "NVML_VALUE_TYPE_UNSIGNED_INT", 1): "uiVal",
            getattr(nv, "NVML_VALUE_TYPE_UNSIGNED_LONG", 2): "ulVal",
            getattr(nv, "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", 3): "ullVal",
            getattr(nv, "NVML_VALUE_TYPE_SIGNED_LONG_LONG", 4): "sllVal",
            getattr(nv, "NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal",
        }
        raw = getattr(value.value, kinds.get(getattr(value, "valueType", None), "uiVal"), 0)
        try:
            return max(int(raw), 0)
        except (TypeError, ValueError):
            return 0

    def sample(self, timestamp: datetime) -> Deferred:
        """:meth:`read` off the reactor (``run_blocking``, i.e. ``deferToThread``)."""
        return self._run_blocking(self.read, timestamp)

    def close(self) -> Deferred:
        """:meth:`shutdown` off the reactor."""
        if not self._initialized:
            return defer.succeed(None)
        return self._run_blocking(self.shutdown)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def detect_gpu_source(reactor: Any, *, nvml: Any = None,
                      which: Callable[[str], Optional[str]] = shutil.which,
                      run_blocking: RunBlocking = deferToThread) -> Deferred:
    """
    Pick a GPU source off the reactor: NVML if ``nvmlInit`` works, else
    ``nvidia-smi`` if it is on ``PATH``, else ``None``.  Fires with the source.
    """

    def probe() -> Optional[GpuSource]:
        source = NvmlSource(nvml, run_blocking)
        if source.init():
            return source
        path = which("nvidia-smi")
        if path:
            return NvidiaSmiSource(reactor, path)
        return None

    return run_blocking(probe)
