"""``GET /api/hardware``: what this machine is, read once (llama-swap's Hardware page).

:func:`read_hardware` is blocking (psutil, ``/proc``, NVML) and runs off the
reactor; :class:`HardwareInfo` takes the snapshot the first time it is asked
for and keeps it (like llama-swap's startup snapshot, but not paid for by
a server that never shows it).  Accelerators come from NVML (the same
``pynvml`` the performance monitor uses), else from ``nvidia-smi``; a
machine without either has none.  Nothing here raises: a part that can not
be read is left out and named in ``capture.errors``.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import psutil
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import __version__
from ..timefmt import format_rfc3339
from .sources import MB, _text

log = Logger(namespace="llamaswap.perf")

SCHEMA_VERSION = 1
SMI_TIMEOUT = 10.0  # seconds nvidia-smi may take before the snapshot goes without it
NVIDIA_SMI_HARDWARE = (
    "--query-gpu=index,name,uuid,driver_version,memory.total,power.limit,pci.bus_id",
    "--format=csv,noheader,nounits",
)


def version_info() -> dict[str, str]:
    """``GET /api/version``: llama-swap's ``{version, commit, build_date}``;
    commit and build date come from ``LLAMASWAP_COMMIT`` and
    ``LLAMASWAP_BUILD_DATE`` when a packager sets them (else "unknown")."""
    return {
        "version": __version__,
        "commit": os.environ.get("LLAMASWAP_COMMIT", "unknown"),
        "build_date": os.environ.get("LLAMASWAP_BUILD_DATE", "unknown"),
        "python": platform.python_version(),
    }


def _os_release() -> dict[str, str]:
    try:
        return platform.freedesktop_os_release()
    except (OSError, AttributeError):
        return {}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or ""


def _container() -> str:
    if os.path.exists("/.dockerenv"):
        return "docker"
    if os.path.exists("/run/.containerenv"):
        return "podman"
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    return ""


def _nvml_accelerators(nvml: Any) -> list[dict[str, Any]]:
    """Blocking: one entry per NVIDIA device through NVML (``[]`` without NVML)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return []
    try:
        def get(fn: Callable[[], Any], default: Any = None) -> Any:
            try:
                return fn()
            except nvml.NVMLError:
                return default

        driver = _text(get(nvml.nvmlSystemGetDriverVersion, ""))
        cuda = get(nvml.nvmlSystemGetCudaDriverVersion)
        out = []
        for index in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = get(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
            limit = get(lambda: nvml.nvmlDeviceGetPowerManagementLimit(h))
            pci = get(lambda: nvml.nvmlDeviceGetPciInfo(h))
            entry = {
                "index": index, "vendor": "NVIDIA", "name": _text(get(lambda: nvml.nvmlDeviceGetName(h), "")),
                "uuid": _text(get(lambda: nvml.nvmlDeviceGetUUID(h), "")),
                "memory_total_mb": int(memory.total) // MB if memory is not None else 0,
                "driver_version": driver, "power_limit_w": round(limit / 1000.0, 1) if limit else 0,
                "pci_bus_id": _text(getattr(pci, "busId", "")) if pci is not None else "", "source": "nvml",
            }
            if cuda:
                entry["cuda_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
            out.append(entry)
        return out
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def parse_nvidia_smi_hardware(text: str) -> list[dict[str, Any]]:
    """Accelerators from ``nvidia-smi`` with :data:`NVIDIA_SMI_HARDWARE`."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 7 or not cells[0].isdigit():
            continue

        def number(s: str) -> float:
            try:
                return float(s)
            except ValueError:
                return 0.0

        out.append({"index": int(cells[0]), "vendor": "NVIDIA", "name": cells[1], "uuid": cells[2],
                    "driver_version": cells[3], "memory_total_mb": int(number(cells[4])),
                    "power_limit_w": number(cells[5]), "pci_bus_id": cells[6], "source": "nvidia-smi"})
    return out


def read_hardware(nvml: Any = None, now: Optional[datetime] = None) -> dict[str, Any]:
    """Blocking: the ``/api/hardware`` document, accelerators from NVML only
    (``accelerators`` is ``[]`` without it; :class:`HardwareInfo` then asks
    ``nvidia-smi``)."""
    started = time.monotonic()
    errors: list[str] = []
    release = _os_release()
    uname = platform.uname()
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "captured_at": format_rfc3339(now or datetime.now(timezone.utc)),
        "architecture": uname.machine,
        "operating_system": {
            "name": release.get("PRETTY_NAME") or uname.system, "family": uname.system,
            "kernel": uname.release, "kernel_version": uname.version, "hostname": uname.node,
        },
        "environment": {
            "llamaswap": __version__, "python": platform.python_version(),
            "python_implementation": platform.python_implementation(), "executable": sys.executable,
            "container": _container(),
        },
    }
    try:
        freq = psutil.cpu_freq()
        doc["cpu"] = {"model": _cpu_model(), "physical_cores": psutil.cpu_count(logical=False) or 0,
                      "logical_cores": psutil.cpu_count() or 0,
                      "max_mhz": round(freq.max, 1) if freq and freq.max else 0}
    except (OSError, RuntimeError, AttributeError) as e:
        errors.append(f"cpu: {e}")
    try:
        vm, swap = psutil.virtual_memory(), psutil.swap_memory()
        doc["memory"] = {"total_mb": vm.total // MB, "available_mb": vm.available // MB,
                         "swap_total_mb": swap.total // MB}
    except (OSError, RuntimeError) as e:
        errors.append(f"memory: {e}")
    try:
        doc["accelerators"] = _nvml_accelerators(nvml)
    except Exception as e:  # a broken driver must not break the page
        errors.append(f"nvml: {e}")
        doc["accelerators"] = []
    doc["capture"] = {"duration_ms": int((time.monotonic() - started) * 1000),
                      "sources": ["platform", "psutil"] + (["nvml"] if doc["accelerators"] else []),
                      "errors": errors}
    return doc


class HardwareUnavailable(Exception):
    """The snapshot could not be taken (logged); ``/api/hardware`` answers 503."""


class HardwareInfo:
    """The hardware snapshot, taken once on first use (off the reactor)."""

    def __init__(self, reactor: Any = None, reader: Callable[[], dict] = read_hardware,
                 run_blocking: Callable[..., Deferred] = deferToThread,
                 which: Callable[[str], Optional[str]] = shutil.which):
        self._reactor = reactor
        self._reader = reader
        self._run_blocking = run_blocking
        self._which = which
        self._snapshot: Optional[dict] = None
        self._waiting: list[Deferred] = []

    def get(self) -> Deferred:
        """Fires with the snapshot (each caller gets its own Deferred), or fails with
        :class:`HardwareUnavailable` (the next call tries again)."""
        if self._snapshot is not None:
            return defer.succeed(self._snapshot)
        d: Deferred = Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:
            self._run_blocking(self._reader).addCallback(self._smi).addBoth(self._done)
        return d

    def _smi(self, doc: dict) -> Any:
        path = self._which("nvidia-smi") if not doc.get("accelerators") else None
        if path is None:
            return doc

        def parsed(result: tuple) -> dict:
            out, _err, code = result
            if code == 0:
                doc["accelerators"] = parse_nvidia_smi_hardware(out.decode("utf-8", "replace"))
                if doc["accelerators"]:
                    doc["capture"]["sources"].append("nvidia-smi")
            return doc

        def failed(f) -> dict:
            doc["capture"]["errors"].append(f"nvidia-smi: {f.getErrorMessage()}")
            return doc

        from twisted.internet import reactor as default_reactor
        reactor = self._reactor if self._reactor is not None else default_reactor
        running = getProcessOutputAndValue(path, NVIDIA_SMI_HARDWARE, env=dict(os.environ), reactor=reactor)
        return running.addTimeout(SMI_TIMEOUT, reactor).addCallbacks(parsed, failed)

    def _done(self, result: Any) -> None:
        waiting, self._waiting = self._waiting, []
        if isinstance(result, Failure):
            log.failure("hardware detection failed", result)
            result = Failure(HardwareUnavailable(result.getErrorMessage()))
        else:
            self._snapshot = result
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
