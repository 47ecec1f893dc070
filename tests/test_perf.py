"""The performance monitor: sources, rings, ``/api/performance`` snapshots, ``/metrics``, dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections import namedtuple
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import psutil
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.perf import (
    AUTO,
    INVALID_AFTER,
    GpuSourceError,
    GpuStat,
    NetIOStat,
    NvidiaSmiSource,
    NvmlSource,
    PerfMonitor,
    SysStat,
    SystemCollector,
    SystemReader,
    detect_gpu_source,
    format_rfc3339,
    parse_after,
    parse_nvidia_smi,
    read_system,
    ring_capacity,
)

MB = 1024 * 1024
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return EPOCH + timedelta(seconds=seconds)


def run_sync(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
    """A synchronous stand-in for ``deferToThread``."""
    return defer.maybeDeferred(f, *args, **kwargs)


class ManualBlocking:
    """``run_blocking`` that holds each call until the test runs it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self, index: int = 0) -> None:
        f, args, d = self.calls.pop(index)
        try:
            result = f(*args)
        except Exception as e:  # noqa: BLE001 - hand it to the Deferred
            d.errback(e)
        else:
            d.callback(result)


class FakeReader:
    """A system reader returning numbered samples; ``fail_on`` call numbers raise."""

    def __init__(self, fail_on: tuple[int, ...] = ()) -> None:
        self.calls: list[datetime] = []
        self.fail_on = fail_on

    def __call__(self, timestamp: datetime) -> SysStat:
        self.calls.append(timestamp)
        n = len(self.calls)
        if n in self.fail_on:
            raise OSError("psutil exploded")
        return sys_sample(timestamp, mem_used_mb=n)


class FakeGpu:
    """A GPU source; ``pending`` holds samples until fired, ``fail`` makes them fail."""

    name = "fake"

    def __init__(self, gpus: int = 2) -> None:
        self.gpus = gpus
        self.fail: Exception | None = None
        self.hold = False
        self.pending: list[Deferred] = []
        self.samples: list[datetime] = []
        self.closed = 0

    def sample(self, timestamp: datetime) -> Deferred:
        self.samples.append(timestamp)
        if self.fail is not None:
            return defer.fail(self.fail)
        result = [gpu_sample(timestamp, i, util=len(self.samples)) for i in range(self.gpus)]
        if self.hold:
            d: Deferred = Deferred()
            d.addCallback(lambda _: result)
            self.pending.append(d)
            return d
        return defer.succeed(result)

    def close(self) -> Deferred:
        self.closed += 1
        return defer.succeed(None)


def sys_sample(timestamp: datetime, **overrides: Any) -> SysStat:
    values: dict[str, Any] = dict(
        timestamp=timestamp, cpu_util_per_core=(12.5, 50.0), mem_total_mb=32000, mem_used_mb=8000,
        mem_free_mb=20000, swap_total_mb=2048, swap_used_mb=16, load_avg_1=0.5, load_avg_5=0.25,
        load_avg_15=0.125, net_io=(NetIOStat("eth0", 1000, 2000), NetIOStat("wlan0", 30, 40)),
    )
    values.update(overrides)
    return SysStat(**values)


def gpu_sample(timestamp: datetime, index: int, util: float = 10.0, uuid: str | None = None) -> GpuStat:
    return GpuStat(
        timestamp=timestamp, id=index, name=f"NVIDIA Test {index}",
        uuid=f"GPU-{index:04d}" if uuid is None else uuid, temp_c=40 + index, vram_temp_c=50 + index,
        gpu_util_pct=util, mem_util_pct=25.0, mem_used_mb=1024 * (index + 1), mem_total_mb=4096 * (index + 1),
        fan_speed_pct=30.0 + index, power_draw_w=100.5 + index,
    )


def monitor(clock: Clock, every: float = 5.0, **kwargs: Any) -> PerfMonitor:
    kwargs.setdefault("system_reader", FakeReader())
    kwargs.setdefault("gpu_source", FakeGpu())
    kwargs.setdefault("run_blocking", run_sync)
    return PerfMonitor(clock, every, **kwargs)


# -- monitor -------------------------------------------------------------------------------------


class MonitorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_ticks_at_the_configured_period(self) -> None:
        reader, gpu = FakeReader(), FakeGpu()
        m = monitor(self.clock, 5.0, system_reader=reader, gpu_source=gpu)
        m.start()
        self.assertTrue(m.running)
        self.assertEqual(reader.calls, [])  # first sample one period in, like llama-swap's ticker
        self.clock.advance(4.9)
        self.assertEqual(reader.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(reader.calls, [at(5)])
        for _ in range(3):
            self.clock.advance(5)
        self.assertEqual(reader.calls, [at(5), at(10), at(15), at(20)])
        self.assertEqual(gpu.samples, reader.calls)
        self.assertEqual([s.timestamp for s in m.sys_stats()], reader.calls)
        self.assertEqual(m.latest_sys().timestamp, at(20))
        self.assertEqual([g.id for g in m.latest_gpus()], [0, 1])
        self.assertEqual(len(m.gpu_stats()), 8)
        self.successResultOf(m.stop())
        self.clock.advance(60)
        self.assertEqual(len(reader.calls), 4)
        self.assertFalse(m.running)
        self.assertEqual(gpu.closed, 1)

    def test_period_other_than_five(self) -> None:
        reader = FakeReader()
        m = monitor(self.clock, 12.5, system_reader=reader)
        m.start()
        self.clock.pump([12.5] * 3)
        self.assertEqual(reader.calls, [at(12.5), at(25), at(37.5)])
        self.assertEqual(m.capacity, 288)

    def test_ring_capacity(self) -> None:
        self.assertEqual(ring_capacity(5), 720)
        self.assertEqual(ring_capacity(1), 3600)
        self.assertEqual(ring_capacity(7200), 1)
        self.assertEqual(monitor(self.clock).capacity, 720)
        m = monitor(self.clock, capacity=3)
        m.start()
        self.clock.pump([5] * 5)
        self.assertEqual([s.timestamp for s in m.sys_stats()], [at(15), at(20), at(25)])
        self.assertEqual(sorted({g.timestamp for g in m.gpu_stats()}), [at(15), at(20), at(25)])
        self.assertRaises(ValueError, PerfMonitor, self.clock, 0)
        self.assertRaises(ValueError, PerfMonitor, self.clock, 5, capacity=0)

    def test_overlapping_tick_is_skipped(self) -> None:
        blocking = ManualBlocking()
        reader, gpu = FakeReader(), FakeGpu()
        gpu.hold = True
        m = monitor(self.clock, system_reader=reader, gpu_source=gpu, run_blocking=blocking)
        m.start()
        self.clock.advance(5)
        self.assertEqual(len(blocking.calls), 1)
        self.clock.advance(5)  # still sampling: skipped
        self.clock.advance(5)
        self.assertEqual(len(blocking.calls), 1)
        self.assertEqual(len(gpu.samples), 1)
        self.assertEqual(m.skipped_ticks, 2)
        blocking.run()
        self.assertEqual(m.sys_stats()[0].timestamp, at(5))
        self.clock.advance(5)  # GPU half still running: still skipped
        self.assertEqual(m.skipped_ticks, 3)
        gpu.pending.pop().callback(None)
        self.assertEqual(m.gpu_stats()[0].timestamp, at(5))
        self.clock.advance(5)
        self.assertEqual(len(blocking.calls), 1)
        self.assertEqual(reader.calls, [at(5)])
        blocking.run()
        gpu.pending.pop().callback(None)
        self.assertEqual([s.timestamp for s in m.sys_stats()], [at(5), at(25)])

    def test_stop_waits_for_a_running_sample(self) -> None:
        blocking = ManualBlocking()
        gpu = FakeGpu()
        m = monitor(self.clock, gpu_source=gpu, run_blocking=blocking)
        m.start()
        self.clock.advance(5)
        stopped = m.stop()
        self.assertNoResult(stopped)
        self.assertEqual(gpu.closed, 0)
        blocking.run()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(gpu.closed, 1)
        self.assertEqual(len(m.sys_stats()), 1)
        self.successResultOf(m.stop())  # idempotent
        m.start()  # restartable
        self.clock.advance(5)
        self.assertEqual(len(blocking.calls), 1)

    def test_failing_sources_do_not_stop_the_loop(self) -> None:
        events: list[dict[str, Any]] = []
        reader, gpu = FakeReader(fail_on=(2, 3, 4)), FakeGpu()
        gpu.fail = GpuSourceError("nvidia-smi exited with 9")
        m = monitor(self.clock, system_reader=reader, gpu_source=gpu)
        m.log = Logger(namespace="test", observer=events.append)
        m.start()
        self.clock.pump([5] * 6)
        self.assertTrue(m.running)
        self.assertEqual(len(reader.calls), 6)
        self.assertEqual([s.timestamp for s in m.sys_stats()], [at(5), at(25), at(30)])
        self.assertEqual(m.gpu_stats(), [])
        gpu.fail = None
        self.clock.advance(5)
        self.assertEqual(len(m.latest_gpus()), 2)
        failures = [e for e in events if "log_failure" in e]
        # one report per distinct error until it recovers; repeats go to debug
        self.assertEqual(sorted(f["kind"] for f in failures), ["gpu", "system"])
        self.assertEqual(sum(1 for e in events if e["log_level"] == LogLevel.debug and e.get("kind")), 7)
        recovered = [e["kind"] for e in events if e["log_level"] == LogLevel.info]
        self.assertEqual(recovered, ["system", "gpu"])

    def test_a_raising_tick_is_contained(self) -> None:
        events: list[dict[str, Any]] = []

        def broken(f: Callable[..., Any], *args: Any) -> Deferred:
            raise RuntimeError("no threads")

        m = monitor(self.clock, run_blocking=broken, gpu_source=None)
        m.log = Logger(namespace="test", observer=events.append)
        m.start()
        self.clock.pump([5] * 3)
        self.assertTrue(m.running)
        self.assertEqual(len([e for e in events if "log_failure" in e]), 1)

    def test_no_gpu_source(self) -> None:
        m = monitor(self.clock, gpu_source=None)
        m.start()
        self.clock.advance(5)
        self.assertEqual(len(m.sys_stats()), 1)
        self.assertEqual(m.latest_gpus(), [])
        self.assertEqual(m.snapshot()["gpu_stats"], [])
        self.successResultOf(m.stop())

    def test_auto_gpu_source_on_this_machine(self) -> None:
        if shutil.which("nvidia-smi") or NvmlSource().init():
            self.skipTest("this machine has NVIDIA GPU tooling")
        m = monitor(self.clock, gpu_source=AUTO)
        m.log = Logger(namespace="test", observer=lambda e: None)
        m.start()
        self.clock.advance(5)
        self.assertIsNone(m.gpu_source)
        self.assertEqual(len(m.sys_stats()), 1)
        self.clock.advance(5)
        self.assertEqual(len(m.sys_stats()), 2)

    def test_empty_monitor(self) -> None:
        m = monitor(self.clock)
        self.assertIsNone(m.latest_sys())
        self.assertEqual(m.latest_gpus(), [])
        self.assertEqual(m.snapshot(), {"enabled": True, "sys_stats": [], "gpu_stats": []})


class SnapshotTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.m = monitor(self.clock)
        self.m.start()
        self.clock.pump([5.123456, 5, 5])

    def test_everything_without_after(self) -> None:
        body = self.m.snapshot()
        self.assertIs(body["enabled"], True)
        self.assertEqual(len(body["sys_stats"]), 3)
        self.assertEqual(len(body["gpu_stats"]), 6)
        json.dumps(body)  # serialisable as is
        stamps = [parse_after(s["timestamp"]) for s in body["sys_stats"]]
        self.assertEqual(stamps, [s.timestamp for s in self.m.sys_stats()])
        self.assertEqual(set(body["sys_stats"][0]), {
            "timestamp", "cpu_util_per_core", "mem_total_mb", "mem_used_mb", "mem_free_mb",
            "swap_total_mb", "swap_used_mb", "load_avg_1", "load_avg_5", "load_avg_15", "net_io"})
        self.assertEqual(body["sys_stats"][0]["net_io"][0], {"name": "eth0", "bytes_recv": 1000, "bytes_sent": 2000})
        self.assertEqual(set(body["gpu_stats"][0]), {
            "timestamp", "id", "name", "uuid", "temp_c", "vram_temp_c", "gpu_util_pct", "mem_util_pct",
            "mem_used_mb", "mem_total_mb", "fan_speed_pct", "power_draw_w"})

    def test_strictly_after(self) -> None:
        stamps = [s.timestamp for s in self.m.sys_stats()]
        body = self.m.snapshot(stamps[1])
        self.assertEqual([parse_after(s["timestamp"]) for s in body["sys_stats"]], [stamps[2]])
        self.assertEqual([(g["id"], parse_after(g["timestamp"])) for g in body["gpu_stats"]],
                         [(0, stamps[2]), (1, stamps[2])])
        before = self.m.snapshot(stamps[0] - timedelta(microseconds=1))
        self.assertEqual(len(before["sys_stats"]), 3)
        self.assertEqual(self.m.snapshot(stamps[2]), {"enabled": True, "sys_stats": [], "gpu_stats": []})

    def test_round_trip_of_the_newest_timestamp_returns_nothing(self) -> None:
        newest = self.m.snapshot()["sys_stats"][-1]["timestamp"]
        self.assertIn(".123456", newest)
        self.assertEqual(self.m.snapshot(parse_after(newest))["sys_stats"], [])
        self.assertEqual(len(self.m.snapshot(parse_after(self.m.snapshot()["sys_stats"][0]["timestamp"]))
                             ["sys_stats"]), 2)

    def test_naive_after_is_utc(self) -> None:
        second = self.m.sys_stats()[1].timestamp
        body = self.m.snapshot(second.replace(tzinfo=None))
        self.assertEqual(len(body["sys_stats"]), 1)

    def test_other_offsets(self) -> None:
        second = self.m.sys_stats()[1].timestamp
        shifted = second.astimezone(timezone(timedelta(hours=-7)))
        text = shifted.strftime("%Y-%m-%dT%H:%M:%S.%f-07:00")
        self.assertEqual(len(self.m.snapshot(parse_after(text))["sys_stats"]), 1)


class ParseAfterTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertEqual(parse_after("2024-05-01T12:30:00Z"), datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc))
        self.assertEqual(parse_after("2024-05-01T14:30:00.25+02:00"),
                         datetime(2024, 5, 1, 12, 30, 0, 250000, tzinfo=timezone.utc))
        self.assertEqual(parse_after("2024-05-01T12:30:00.123456789Z").microsecond, 123456)

    def test_invalid(self) -> None:
        for text in ("", "yesterday", "2024-05-01", "2024-05-01T12:30:00", "2024-05-01 12:30:00Z",
                     "2024-13-01T00:00:00Z", "2024-05-01T25:00:00Z", "2024-05-01T12:30:00+24:00",
                     "1714566600"):
            self.assertRaises(ValueError, parse_after, text)
        self.assertEqual(INVALID_AFTER, "invalid 'after' timestamp, use RFC3339 format")

    def test_format_rfc3339(self) -> None:
        moment = datetime(2024, 5, 1, 12, 30, 0, 250000, tzinfo=timezone.utc)
        self.assertEqual(parse_after(format_rfc3339(moment)), moment)
        self.assertRegex(format_rfc3339(moment), r"^2024-05-0[12]T\d\d:\d\d:00\.25(Z|[+-]\d\d:\d\d)$")
        whole = moment.replace(microsecond=0)
        self.assertNotIn(".", format_rfc3339(whole))


# -- system --------------------------------------------------------------------------------------


CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")


class FakePsutil:
    def __init__(self) -> None:
        self.times = [CpuTimes(10, 0, 10, 80, 0, 0, 0, 0, 0, 0), CpuTimes(50, 0, 0, 50, 0, 0, 0, 0, 0, 0)]
        self.swap_error = False

    def cpu_times(self, percpu: bool = False) -> list[CpuTimes]:
        return list(self.times)

    def virtual_memory(self) -> Any:
        return SimpleNamespace(total=16 * 1024 * MB, used=4 * 1024 * MB + 123, free=10 * 1024 * MB)

    def swap_memory(self) -> Any:
        if self.swap_error:
            raise OSError("no swap info")
        return SimpleNamespace(total=2048 * MB, used=5 * MB)

    def getloadavg(self) -> tuple[float, float, float]:
        return (1.5, 1.0, 0.5)

    def net_io_counters(self, pernic: bool = False) -> dict[str, Any]:
        return {"lo": SimpleNamespace(bytes_recv=9, bytes_sent=9),
                "eth0": SimpleNamespace(bytes_recv=100, bytes_sent=200),
                "docker0": SimpleNamespace(bytes_recv=1, bytes_sent=2)}


class SystemTests(SynchronousTestCase):
    def test_fake_psutil(self) -> None:
        ps = FakePsutil()
        reader = SystemReader(ps)
        first = reader(at(1))
        self.assertEqual(first.timestamp, at(1))
        self.assertEqual(first.cpu_util_per_core, (20.0, 50.0))  # since boot
        self.assertEqual((first.mem_total_mb, first.mem_used_mb, first.mem_free_mb), (16384, 4096, 10240))
        self.assertEqual((first.swap_total_mb, first.swap_used_mb), (2048, 5))
        self.assertEqual((first.load_avg_1, first.load_avg_5, first.load_avg_15), (1.5, 1.0, 0.5))
        self.assertEqual(first.net_io, (NetIOStat("eth0", 100, 200), NetIOStat("docker0", 1, 2)))
        ps.times = [CpuTimes(10, 0, 10, 180, 0, 0, 0, 0, 0, 0), CpuTimes(125, 0, 0, 75, 0, 0, 0, 0, 0, 0)]
        ps.swap_error = True
        second = reader(at(2))
        self.assertEqual(second.cpu_util_per_core, (0.0, 75.0))  # since the previous call
        self.assertEqual((second.swap_total_mb, second.swap_used_mb), (0, 0))
        second_again = reader(at(3))
        self.assertEqual(second_again.cpu_util_per_core, (0.0, 0.0))

    def test_real_read_system(self) -> None:
        stat = read_system()
        self.assertEqual(len(stat.cpu_util_per_core), psutil.cpu_count())
        for pct in stat.cpu_util_per_core:
            self.assertTrue(0.0 <= pct <= 100.0)
        self.assertGreater(stat.mem_total_mb, 0)
        self.assertLessEqual(stat.mem_used_mb, stat.mem_total_mb)
        self.assertLessEqual(stat.mem_free_mb, stat.mem_total_mb)
        self.assertNotIn("lo", [n.name for n in stat.net_io])
        self.assertIsNotNone(stat.timestamp.tzinfo)
        self.assertLess(abs((datetime.now(timezone.utc) - stat.timestamp).total_seconds()), 60)
        json.dumps(stat.to_json())
        self.assertEqual(read_system(at(7)).timestamp, at(7))


# -- nvidia-smi ----------------------------------------------------------------------------------

SMI_FIXTURE = """\
0, NVIDIA GeForce RTX 4090, GPU-11111111-2222-3333-4444-555555555555, 45, 12, 2048, 24564, 30, 85.50
1, NVIDIA H100 80GB HBM3, GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee, 38, 0, 20390, 81559, [N/A], [Not Supported]

"""


class NvidiaSmiParseTests(SynchronousTestCase):
    def test_two_gpus(self) -> None:
        when = at(42)
        gpus = parse_nvidia_smi(SMI_FIXTURE, when)
        self.assertEqual(gpus, [
            GpuStat(timestamp=when, id=0, name="NVIDIA GeForce RTX 4090",
                    uuid="GPU-11111111-2222-3333-4444-555555555555", temp_c=45, vram_temp_c=0,
                    gpu_util_pct=12.0, mem_util_pct=2048 / 24564 * 100, mem_used_mb=2048,
                    mem_total_mb=24564, fan_speed_pct=30.0, power_draw_w=85.5),
            GpuStat(timestamp=when, id=1, name="NVIDIA H100 80GB HBM3",
                    uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", temp_c=38, vram_temp_c=0,
                    gpu_util_pct=0.0, mem_util_pct=20390 / 81559 * 100, mem_used_mb=20390,
                    mem_total_mb=81559, fan_speed_pct=0.0, power_draw_w=0.0),
        ])

    def test_not_available_memory_and_junk(self) -> None:
        text = ("No devices were found\n"
                "x, bad, GPU-x, 1, 2, 3, 4, 5, 6\n"
                "0, NVIDIA GB10, [N/A], [N/A], 3, [N/A], [N/A], [N/A], 11.25\n"
                "1, NVIDIA A100-SXM4-40GB, GPU-z, 33, 7, 100\n"
                "2, Tesla, Model, X, GPU-c, 50, 1, 10, 100, 20, 60.0\n")
        gpus = parse_nvidia_smi(text, at(1))
        self.assertEqual([(g.id, g.name, g.uuid) for g in gpus],
                         [(0, "NVIDIA GB10", ""), (2, "Tesla, Model, X", "GPU-c")])
        gb10 = gpus[0]
        self.assertEqual((gb10.temp_c, gb10.mem_used_mb, gb10.mem_total_mb, gb10.mem_util_pct),
                         (0, 0, 0, 0.0))
        self.assertEqual((gb10.gpu_util_pct, gb10.power_draw_w), (3.0, 11.25))
        self.assertEqual(gpus[1].mem_util_pct, 10.0)
        self.assertEqual(parse_nvidia_smi("", at(1)), [])


class NvidiaSmiProcessTests(TestCase):
    """``NvidiaSmiSource`` against a fake ``nvidia-smi`` script (a real child, spawned asynchronously)."""

    def script(self, body: str) -> str:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "nvidia-smi")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body)
        os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
        return path

    @defer.inlineCallbacks
    def test_sample(self) -> Any:
        path = self.script('echo "$@" > "$(dirname "$0")/args"\ncat <<"EOF"\n' + SMI_FIXTURE + "EOF\n")
        source = NvidiaSmiSource(reactor, path)
        gpus = yield source.sample(at(3))
        self.assertEqual([g.id for g in gpus], [0, 1])
        self.assertEqual(gpus[0].timestamp, at(3))
        args = Path(path).with_name("args").read_text().split()
        self.assertEqual(args, [
            "--query-gpu=index,name,uuid,temperature.gpu,utilization.gpu,memory.used,memory.total,"
            "fan.speed,power.draw", "--format=csv,noheader,nounits"])
        yield source.close()

    @defer.inlineCallbacks
    def test_failure_exit(self) -> Any:
        source = NvidiaSmiSource(reactor, self.script('echo "NVIDIA-SMI has failed" >&2\nexit 9\n'))
        with self.assertRaises(GpuSourceError) as caught:
            yield source.sample(at(3))
        self.assertIn("exited with 9", str(caught.exception))
        self.assertIn("NVIDIA-SMI has failed", str(caught.exception))

    @defer.inlineCallbacks
    def test_timeout_kills(self) -> Any:
        source = NvidiaSmiSource(reactor, self.script("exec sleep 30\n"), timeout=0.2)
        with self.assertRaises(GpuSourceError) as caught:
            yield source.sample(at(3))
        self.assertIn("timed out", str(caught.exception))

    @defer.inlineCallbacks
    def test_missing_executable(self) -> Any:
        source = NvidiaSmiSource(reactor, "/nonexistent/nvidia-smi")
        with self.assertRaises(GpuSourceError):
            yield source.sample(at(3))


# -- NVML ----------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    def __init__(self, value: int = 999) -> None:
        super().__init__(value)
        self.value = value


class FakeNotSupported(FakeNVMLError):
    def __init__(self) -> None:
        super().__init__(3)


class FakeNvml:
    """Just enough of pynvml's module interface."""

    NVMLError = FakeNVMLError
    NVMLError_NotSupported = FakeNotSupported
    NVML_TEMPERATURE_GPU = 0
    NVML_FI_DEV_MEMORY_TEMP = 82
    NVML_SUCCESS = 0
    NVML_VALUE_TYPE_UNSIGNED_INT = 1

    def __init__(self, devices: list[dict[str, Any]], init_error: Exception | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0
        self.live = False

    def _get(self, handle: int, key: str) -> Any:
        value = self.devices[handle].get(key, FakeNotSupported)
        if isinstance(value, type) and issubclass(value, Exception):
            raise value()
        if isinstance(value, Exception):
            raise value
        return value

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error
        self.live = True

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdown_calls += 1
        self.live = False

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        assert self.live
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetName(self, h: int) -> Any:  # noqa: N802
        return self._get(h, "name")

    def nvmlDeviceGetUUID(self, h: int) -> Any:  # noqa: N802
        return self._get(h, "uuid")

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:  # noqa: N802
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._get(h, "temp")

    def nvmlDeviceGetFieldValues(self, h: int, fields: list[int]) -> list[Any]:  # noqa: N802
        assert fields == [self.NVML_FI_DEV_MEMORY_TEMP]
        vram = self.devices[h].get("vram_temp")
        if vram is None:
            return [SimpleNamespace(nvmlReturn=3, valueType=1, value=SimpleNamespace(uiVal=0))]
        return [SimpleNamespace(nvmlReturn=0, valueType=1, value=SimpleNamespace(uiVal=vram))]

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=self._get(h, "util"), memory=99)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:  # noqa: N802
        used, total = self._get(h, "memory")
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetFanSpeed(self, h: int) -> int:  # noqa: N802
        return self._get(h, "fan")

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:  # noqa: N802
        return self._get(h, "power_mw")


FULL_GPU = dict(name="NVIDIA GeForce RTX 3090", uuid="GPU-3090", temp=61, vram_temp=72, util=87,
                memory=(12 * 1024 * MB, 24 * 1024 * MB), fan=55, power_mw=312_345)
# A passive datacenter card: no fan, no memory temperature, power and memory not supported.
SPARSE_GPU = dict(name=b"NVIDIA A2", uuid=b"GPU-a2", temp=40, util=3)


class NvmlTests(SynchronousTestCase):
    def test_read(self) -> None:
        nv = FakeNvml([FULL_GPU, SPARSE_GPU])
        source = NvmlSource(nv, run_blocking=run_sync)
        self.assertEqual(nv.init_calls, 0)  # lazy
        gpus = self.successResultOf(source.sample(at(9)))
        self.assertEqual(gpus, [
            GpuStat(timestamp=at(9), id=0, name="NVIDIA GeForce RTX 3090", uuid="GPU-3090", temp_c=61,
                    vram_temp_c=72, gpu_util_pct=87.0, mem_util_pct=50.0, mem_used_mb=12288,
                    mem_total_mb=24576, fan_speed_pct=55.0, power_draw_w=312.345),
            GpuStat(timestamp=at(9), id=1, name="NVIDIA A2", uuid="GPU-a2", temp_c=40, vram_temp_c=0,
                    gpu_util_pct=3.0, mem_util_pct=0.0, mem_used_mb=0, mem_total_mb=0,
                    fan_speed_pct=0.0, power_draw_w=0.0),
        ])
        self.successResultOf(source.sample(at(10)))
        self.assertEqual(nv.init_calls, 1)
        self.successResultOf(source.close())
        self.assertEqual(nv.shutdown_calls, 1)
        self.successResultOf(source.sample(at(11)))  # initialised again after close
        self.assertEqual(nv.init_calls, 2)

    def test_goes_through_run_blocking(self) -> None:
        blocking = ManualBlocking()
        source = NvmlSource(FakeNvml([FULL_GPU]), run_blocking=blocking)
        d = source.sample(at(1))
        self.assertNoResult(d)
        self.assertEqual(blocking.calls[0][0], source.read)
        blocking.run()
        self.assertEqual(len(self.successResultOf(d)), 1)

    def test_init_failure_means_unavailable(self) -> None:
        nv = FakeNvml([FULL_GPU], init_error=FakeNVMLError(12))
        source = NvmlSource(nv, run_blocking=run_sync)
        self.assertFalse(source.init())
        self.failureResultOf(source.sample(at(1)), GpuSourceError)
        self.assertEqual(nv.init_calls, 2)
        self.successResultOf(source.close())
        self.assertEqual(nv.shutdown_calls, 0)

    def test_unexpected_errors_propagate(self) -> None:
        lost = dict(FULL_GPU, util=FakeNVMLError(15))  # GPU is lost: not a missing feature
        source = NvmlSource(FakeNvml([lost]), run_blocking=run_sync)
        self.failureResultOf(source.sample(at(1)), FakeNVMLError)

    def test_no_devices(self) -> None:
        source = NvmlSource(FakeNvml([]), run_blocking=run_sync)
        self.assertEqual(self.successResultOf(source.sample(at(1))), [])


class DetectTests(SynchronousTestCase):
    def test_prefers_nvml(self) -> None:
        nv = FakeNvml([FULL_GPU])
        source = self.successResultOf(detect_gpu_source(Clock(), nvml=nv, which=lambda _: "/x/nvidia-smi",
                                                        run_blocking=run_sync))
        self.assertIsInstance(source, NvmlSource)
        self.assertEqual(nv.init_calls, 1)
        self.successResultOf(source.sample(at(1)))
        self.assertEqual(nv.init_calls, 1)

    def test_then_nvidia_smi(self) -> None:
        nv = FakeNvml([], init_error=FakeNVMLError(12))
        source = self.successResultOf(detect_gpu_source(Clock(), nvml=nv, which=lambda _: "/x/nvidia-smi",
                                                        run_blocking=run_sync))
        self.assertIsInstance(source, NvidiaSmiSource)
        self.assertEqual(source.executable, "/x/nvidia-smi")

    def test_then_none(self) -> None:
        nv = FakeNvml([], init_error=FakeNVMLError(12))
        self.assertIsNone(self.successResultOf(
            detect_gpu_source(Clock(), nvml=nv, which=lambda _: None, run_blocking=run_sync)))


class DetectOnThisMachineTests(TestCase):
    @defer.inlineCallbacks
    def test_this_machine_has_no_gpu_tooling(self) -> Any:
        if shutil.which("nvidia-smi"):
            self.skipTest("nvidia-smi is installed here")
        source = yield detect_gpu_source(reactor)  # the real pynvml, through deferToThread
        if isinstance(source, NvmlSource):
            yield source.close()
            self.skipTest("NVML works here")
        self.assertIsNone(source)


# -- Prometheus ----------------------------------------------------------------------------------


def scrape(m: PerfMonitor) -> tuple[str, dict[str, Any], dict[tuple[str, frozenset], float]]:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SystemCollector(m))
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    return text, families, samples


def key(metric: str, /, **labels: str) -> tuple[str, frozenset]:
    return (metric, frozenset(labels.items()))


class PrometheusTests(SynchronousTestCase):
    def test_exact_names_labels_and_values(self) -> None:
        clock = Clock()
        reader_calls: list[int] = []

        def reader(when: datetime) -> SysStat:
            reader_calls.append(1)
            return sys_sample(when, mem_used_mb=8000 + len(reader_calls))

        m = monitor(clock, system_reader=reader, gpu_source=FakeGpu(2))
        m.start()
        clock.pump([5, 5])  # only the latest sample is exposed
        text, families, samples = scrape(m)
        gpu = {"0": ("NVIDIA Test 0", "GPU-0000"), "1": ("NVIDIA Test 1", "GPU-0001")}
        expected = {
            key("llamaswap_cpu_util_percent", core="0"): 12.5,
            key("llamaswap_cpu_util_percent", core="1"): 50.0,
            key("llamaswap_memory_total_bytes"): 32000 * MB,
            key("llamaswap_memory_used_bytes"): 8002 * MB,
            key("llamaswap_memory_free_bytes"): 20000 * MB,
            key("llamaswap_swap_total_bytes"): 2048 * MB,
            key("llamaswap_swap_used_bytes"): 16 * MB,
            key("llamaswap_load_average", interval="1m"): 0.5,
            key("llamaswap_load_average", interval="5m"): 0.25,
            key("llamaswap_load_average", interval="15m"): 0.125,
            key("llamaswap_network_bytes_total", interface="eth0", direction="recv"): 1000,
            key("llamaswap_network_bytes_total", interface="eth0", direction="sent"): 2000,
            key("llamaswap_network_bytes_total", interface="wlan0", direction="recv"): 30,
            key("llamaswap_network_bytes_total", interface="wlan0", direction="sent"): 40,
        }
        for i, (name, uuid) in gpu.items():
            n = int(i)
            labels = dict(id=i, name=name, uuid=uuid)
            expected.update({
                key("llamaswap_gpu_temperature_celsius", **labels): 40 + n,
                key("llamaswap_gpu_vram_temperature_celsius", **labels): 50 + n,
                key("llamaswap_gpu_util_percent", **labels): 2.0,
                key("llamaswap_gpu_memory_util_percent", **labels): 25.0,
                key("llamaswap_gpu_memory_used_bytes", **labels): 1024 * (n + 1) * MB,
                key("llamaswap_gpu_memory_total_bytes", **labels): 4096 * (n + 1) * MB,
                key("llamaswap_gpu_fan_speed_percent", **labels): 30.0 + n,
                key("llamaswap_gpu_power_draw_watts", **labels): 100.5 + n,
            })
        self.assertEqual(samples, expected)
        types = {name: f.type for name, f in families.items()}
        self.assertEqual(types.pop("llamaswap_network_bytes"), "counter")  # the parser drops _total
        self.assertEqual(set(types.values()), {"gauge"})
        self.assertIn("# TYPE llamaswap_network_bytes_total counter\n", text)
        self.assertNotIn("_created", text)
        self.assertNotIn("llamaswap_network_bytes_total_total", text)

    def test_gpu_without_uuid_and_no_network(self) -> None:
        class NoUuid(FakeGpu):
            def sample(self, timestamp: datetime) -> Deferred:
                return defer.succeed([gpu_sample(timestamp, 0, uuid="")])

        clock = Clock()
        m = monitor(clock, system_reader=lambda when: sys_sample(when, net_io=()), gpu_source=NoUuid())
        m.start()
        clock.advance(5)
        text, families, samples = scrape(m)
        self.assertIn(key("llamaswap_gpu_util_percent", id="0", name="NVIDIA Test 0"), samples)
        self.assertNotIn("llamaswap_network_bytes", families)

    def test_nothing_before_the_first_sample(self) -> None:
        text, families, samples = scrape(monitor(Clock()))
        self.assertEqual(families, {})

    def test_not_in_the_global_registry(self) -> None:
        SystemCollector(monitor(Clock()))
        self.assertNotIn("llamaswap_cpu_util_percent", getattr(REGISTRY, "_names_to_collectors", {}))

    def test_label_escaping(self) -> None:
        class Odd(FakeGpu):
            def sample(self, timestamp: datetime) -> Deferred:
                return defer.succeed([GpuStat(timestamp, 0, name='A "quoted"\\name', uuid="u")])

        clock = Clock()
        m = monitor(clock, gpu_source=Odd())
        m.start()
        clock.advance(5)
        _, _, samples = scrape(m)
        self.assertIn(key("llamaswap_gpu_power_draw_watts", id="0", name='A "quoted"\\name', uuid="u"), samples)


# -- Grafana dashboard ---------------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana-dashboard.json"

PERF_GAUGES = {
    "llamaswap_cpu_util_percent", "llamaswap_memory_total_bytes", "llamaswap_memory_used_bytes",
    "llamaswap_memory_free_bytes", "llamaswap_swap_total_bytes", "llamaswap_swap_used_bytes",
    "llamaswap_load_average", "llamaswap_gpu_temperature_celsius", "llamaswap_gpu_vram_temperature_celsius",
    "llamaswap_gpu_util_percent", "llamaswap_gpu_memory_util_percent", "llamaswap_gpu_memory_used_bytes",
    "llamaswap_gpu_memory_total_bytes", "llamaswap_gpu_fan_speed_percent", "llamaswap_gpu_power_draw_watts",
}
INFERENCE_GAUGES = {"llamaswap_model_state", "llamaswap_queue_depth", "llamaswap_inflight_requests"}
COUNTERS = {"llamaswap_network_bytes_total", "llamaswap_requests_total", "llamaswap_tokens_total",
            "llamaswap_model_loads_total", "llamaswap_swaps_total"}
HISTOGRAMS = {"llamaswap_request_duration_seconds", "llamaswap_time_to_first_byte_seconds",
              "llamaswap_model_load_duration_seconds", "llamaswap_queue_wait_seconds"}
ALLOWED = PERF_GAUGES | INFERENCE_GAUGES | COUNTERS | {
    h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))
    return out


class DashboardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dashboard = json.loads(DASHBOARD.read_text())
        self.panels = all_panels(self.dashboard["panels"])
        self.exprs = [t["expr"] for p in self.panels for t in p.get("targets", [])]

    def test_shape(self) -> None:
        d = self.dashboard
        self.assertGreaterEqual(d["schemaVersion"], 36)
        self.assertEqual([i["name"] for i in d["__inputs"]], ["DS_PROMETHEUS"])
        self.assertEqual(d["__inputs"][0]["pluginId"], "prometheus")
        ids = [p["id"] for p in self.panels]
        self.assertEqual(len(ids), len(set(ids)))
        for p in self.panels:
            self.assertEqual(set(p["gridPos"]), {"h", "w", "x", "y"})
            self.assertLessEqual(p["gridPos"]["x"] + p["gridPos"]["w"], 24)
            if p["type"] != "row":
                self.assertEqual(p["datasource"], {"type": "prometheus", "uid": "${DS_PROMETHEUS}"})
                self.assertTrue(p["targets"])
                for t in p["targets"]:
                    self.assertEqual(t["datasource"]["uid"], "${DS_PROMETHEUS}")

    def test_expressions_use_only_known_metrics(self) -> None:
        variables = [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                     for v in self.dashboard["templating"]["list"]]
        used: set[str] = set()
        for expr in self.exprs + variables:
            self.assertEqual(expr.count("("), expr.count(")"), expr)
            self.assertEqual(expr.count("{"), expr.count("}"), expr)
            names = set(re.findall(r"\bllamaswap_[a-z0-9_]+", expr))
            self.assertTrue(names, expr)
            self.assertLessEqual(names, ALLOWED, expr)
            used |= names
        # every metric family appears somewhere
        for family in PERF_GAUGES | INFERENCE_GAUGES | COUNTERS:
            self.assertIn(family, used)
        for h in HISTOGRAMS:
            self.assertIn(h + "_bucket", used)

    def test_rates_and_quantiles(self) -> None:
        joined = "\n".join(self.exprs)
        self.assertIn("rate(llamaswap_network_bytes_total", joined)
        self.assertIn("sum by (model) (rate(llamaswap_requests_total", joined)
        self.assertIn("sum by (model, kind) (rate(llamaswap_tokens_total", joined)
        for h in HISTOGRAMS:
            for quantile in ("0.5", "0.95"):
                self.assertIn(f"histogram_quantile({quantile}, sum by (model, le) (rate({h}_bucket", joined)
