"""Performance monitor: system/GPU sampling, ``/api/performance`` rings and ``/metrics`` gauges.

psutil and NVML calls run off the reactor (``deferToThread``); ``nvidia-smi``
is spawned asynchronously.  See :class:`PerfMonitor` and :class:`SystemCollector`.
"""

from .monitor import AUTO, INVALID_AFTER, PerfMonitor, parse_after, ring_capacity
from .prometheus import CONTENT_TYPE, NOT_AVAILABLE_BODY, SystemCollector
from .sources import (
    GpuSource,
    GpuSourceError,
    GpuStat,
    NetIOStat,
    NvidiaSmiSource,
    NvmlSource,
    SysStat,
    SystemReader,
    detect_gpu_source,
    format_rfc3339,
    parse_nvidia_smi,
    read_system,
)

__all__ = [
    "AUTO",
    "CONTENT_TYPE",
    "INVALID_AFTER",
    "NOT_AVAILABLE_BODY",
    "GpuSource",
    "GpuSourceError",
    "GpuStat",
    "NetIOStat",
    "NvidiaSmiSource",
    "NvmlSource",
    "PerfMonitor",
    "SysStat",
    "SystemCollector",
    "SystemReader",
    "detect_gpu_source",
    "format_rfc3339",
    "parse_after",
    "parse_nvidia_smi",
    "read_system",
    "ring_capacity",
]
