"""Prometheus exposition of the monitor's latest samples (llama-swap's ``/metrics``).

:class:`SystemCollector` is registered in a ``CollectorRegistry`` owned by the
service (never prometheus-client's global default registry).  It only reads
the monitor's rings, so ``collect`` is cheap and never blocks.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .monitor import PerfMonitor
from .sources import MB, GpuStat, SysStat

__all__ = ["CONTENT_TYPE", "GPU_METRICS", "NOT_AVAILABLE_BODY", "SystemCollector"]

#: llama-swap's ``/metrics`` content type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The 503 body when the performance monitor is disabled.
NOT_AVAILABLE_BODY = b"# performance monitor not available\n"

#: (name, help, value) for each per-GPU gauge, in exposition order.
GPU_METRICS: tuple[tuple[str, str, Callable[[GpuStat], float]], ...] = (
    ("llamaswap_gpu_temperature_celsius", "GPU temperature in Celsius", lambda g: g.temp_c),
    ("llamaswap_gpu_vram_temperature_celsius", "GPU VRAM temperature in Celsius", lambda g: g.vram_temp_c),
    ("llamaswap_gpu_util_percent", "GPU utilization percent (0-100)", lambda g: g.gpu_util_pct),
    ("llamaswap_gpu_memory_util_percent", "GPU memory utilization percent (0-100)", lambda g: g.mem_util_pct),
    ("llamaswap_gpu_memory_used_bytes", "GPU memory used in bytes", lambda g: g.mem_used_mb * MB),
    ("llamaswap_gpu_memory_total_bytes", "GPU memory total in bytes", lambda g: g.mem_total_mb * MB),
    ("llamaswap_gpu_fan_speed_percent", "GPU fan speed percent (0-100)", lambda g: g.fan_speed_pct),
    ("llamaswap_gpu_power_draw_watts", "GPU power draw in watts", lambda g: g.power_draw_w),
)

_SYS_GAUGES: tuple[tuple[str, str, Callable[[SysStat], int]], ...] = (
    ("llamaswap_memory_total_bytes", "Total memory in bytes", lambda s: s.mem_total_mb * MB),
    ("llamaswap_memory_used_bytes", "Used memory in bytes", lambda s: s.mem_used_mb * MB),
    ("llamaswap_memory_free_bytes", "Free memory in bytes", lambda s: s.mem_free_mb * MB),
    ("llamaswap_swap_total_bytes", "Total swap in bytes", lambda s: s.swap_total_mb * MB),
    ("llamaswap_swap_used_bytes", "Used swap in bytes", lambda s: s.swap_used_mb * MB),
)

_CPU = ("llamaswap_cpu_util_percent", "CPU utilization per core (0-100)")
_LOAD = ("llamaswap_load_average", "Load average")
# CounterMetricFamily drops a trailing "_total" from the family name and adds it
# back to the sample name, so this exposes exactly "llamaswap_network_bytes_total".
_NET = ("llamaswap_network_bytes_total", "Total network bytes transferred")


class SystemCollector(Collector):
    """
    Gauges (and the network counter) for the monitor's newest samples only.

    GPU gauges are labelled ``{id, name, uuid}``; ``uuid`` is left out for a
    GPU without one, as llama-swap does.  Nothing is exposed before the first
    sample.
    """

    def __init__(self, monitor: PerfMonitor) -> None:
        self.monitor = monitor

    def describe(self) -> Iterable[Metric]:
        """The families this collector exposes (for the registry's duplicate-name check)."""
        yield GaugeMetricFamily(*_CPU, labels=["core"])
        for name, doc, _ in _SYS_GAUGES:
            yield GaugeMetricFamily(name, doc)
        yield GaugeMetricFamily(*_LOAD, labels=["interval"])
        yield CounterMetricFamily(*_NET, labels=["interface", "direction"])
        for name, doc, _ in GPU_METRICS:
            yield GaugeMetricFamily(name, doc, labels=["id", "name", "uuid"])

    def collect(self) -> Iterator[Metric]:
        """Families for the latest system sample and the latest GPU poll."""
        stat: Optional[SysStat] = self.monitor.latest_sys()
        if stat is not None:
            yield from _system_families(stat)
        gpus = self.monitor.latest_gpus()
        if gpus:
            yield from _gpu_families(gpus)


def _system_families(stat: SysStat) -> Iterator[Metric]:
    cpu = GaugeMetricFamily(*_CPU, labels=["core"])
    for core, pct in enumerate(stat.cpu_util_per_core):
        cpu.add_metric([str(core)], pct)
    yield cpu
    for name, doc, value in _SYS_GAUGES:
        yield GaugeMetricFamily(name, doc, value=value(stat))
    load = GaugeMetricFamily(*_LOAD, labels=["interval"])
    for interval, average in (("1m", stat.load_avg_1), ("5m", stat.load_avg_5), ("15m", stat.load_avg_15)):
        load.add_metric([interval], average)
    yield load
    if stat.net_io:
        net = CounterMetricFamily(*_NET, labels=["interface", "direction"])
        for io in stat.net_io:
            net.add_metric([io.name, "recv"], io.bytes_recv)
            net.add_metric([io.name, "sent"], io.bytes_sent)
        yield net


def _gpu_families(gpus: Iterable[GpuStat]) -> Iterator[Metric]:
    ordered = sorted(gpus, key=lambda g: g.id)
    for name, doc, value in GPU_METRICS:
        family = GaugeMetricFamily(name, doc)
        for g in ordered:
            labels = {"id": str(g.id), "name": g.name}
            if g.uuid:
                labels["uuid"] = g.uuid
            family.add_sample(name, labels, float(value(g)))
        yield family
