"""llamaswap benchmarks: the proxy against the same upstream reached directly.

Run from the repository root with the project's virtualenv::

    python bench/run.py            # every benchmark
    python bench/run.py latency throughput streaming swap scheduling memory

Each benchmark starts llamaswap (``python -m llamaswap``) as a child process
with the project's fake upstream as its model, then measures, interleaved in
the same run, requests sent straight to that upstream and through the proxy.
Not a test: nothing here gates CI.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time

import psutil
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llamaswap.proxy.stream import BytesProducer  # noqa: E402

PY = sys.executable
RESULTS: list[tuple[str, str, str, str]] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(name: str, direct: str, proxy: str, verdict: str) -> None:
    RESULTS.append((name, direct, proxy, verdict))
    print(f"  {name:<44} {direct:>14} {proxy:>14}   {verdict}", flush=True)


class _Collect(Protocol):
    def __init__(self, done, first=None, chunks=None):
        self.done, self.first, self.chunks = done, first, chunks
        self.n = 0

    def dataReceived(self, data):
        if self.n == 0 and self.first is not None:
            self.first.callback(time.perf_counter())
        self.n += 1

    def connectionLost(self, reason):
        if self.chunks is not None:
            self.chunks.append(self.n)
        self.done.callback(None) if reason.check(ResponseDone) else self.done.errback(reason)


class Client:
    def __init__(self, per_host: int = 64):
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = per_host
        self.agent = Agent(reactor, pool=self.pool)

    @defer.inlineCallbacks
    def post(self, url: str, obj: dict, first: bool = False, chunks: list | None = None):
        started = time.perf_counter()
        response = yield self.agent.request(b"POST", url.encode(), Headers({b"content-type": [b"application/json"]}),
                                            BytesProducer(json.dumps(obj).encode()))
        done, first_d = defer.Deferred(), defer.Deferred() if first else None
        response.deliverBody(_Collect(done, first_d, chunks))
        first_at = (yield first_d) if first else None
        yield done
        end = time.perf_counter()
        return (end - started, (first_at - started) if first else None, response.code)


class Proxy:
    """llamaswap in a child process, with the given YAML config."""

    def __init__(self, config: str):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="llamaswap-bench-")
        self.path = os.path.join(self.dir, "config.yaml")
        with open(self.path, "w") as f:
            f.write(config)
        self.proc = None

    @defer.inlineCallbacks
    def start(self):
        import subprocess  # the benchmark driver, not the reactor, owns this child

        self.proc = subprocess.Popen([PY, "-m", "llamaswap", "--config", self.path, "--listen",
                                      f"127.0.0.1:{self.port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        client = Client()
        for _ in range(200):
            try:
                text = yield _get(client, f"http://127.0.0.1:{self.port}/health")
                if text == "OK":
                    break
            except Exception:
                pass
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield client.pool.closeCachedConnections()
        self.ps = psutil.Process(self.proc.pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 1048576

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=40)


class Bare:
    """A bare forwarder (``bench/bare_*.py``) in a child process, in front of the upstream on ``port``."""

    def __init__(self, script: str, upstream_port: int):
        import subprocess  # the benchmark driver, not the reactor, owns this child

        self.port = free_port()
        self.proc = subprocess.Popen([PY, os.path.join(ROOT, "bench", script), str(self.port),
                                      f"http://127.0.0.1:{upstream_port}"], cwd=ROOT)
        self.ps = psutil.Process(self.proc.pid)
        self.url = f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def responder_config(start_port: int, extra: str = "", models: str = "m", capture_mb: int = 0) -> str:
    lines = [f"startPort: {start_port}", f"captureBuffer: {capture_mb}", "models:"]
    for name in models.split(","):
        lines.append(f"  {name}:")
        lines.append(f"    cmd: \"{PY} -m llamaswap.testing.responder --port ${{PORT}} --id {name} --silent {extra}\"")
    return "\n".join(lines) + "\n"


def pct(values, p):
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


@defer.inlineCallbacks
def warm(proxy: Proxy, model: str = "m"):
    client = Client()
    yield client.post(proxy.url + "/v1/chat/completions", {"model": model})
    yield client.pool.closeCachedConnections()


@defer.inlineCallbacks
def bench_latency(n: int = 1000):
    print("1. non-streaming latency, sequential, keep-alive", flush=True)
    port = free_port()
    proxy = Proxy(responder_config(port))
    yield proxy.start()
    yield warm(proxy)
    direct_url = f"http://127.0.0.1:{port}/v1/chat/completions"
    bares = {name: Bare(name, port) for name in ("bare_fast.py", "bare_proxy.py")}
    yield task.deferLater(reactor, 1.5, lambda: None)
    client = Client(per_host=2)
    times = {"direct": [], "proxy": [], "bare_fast.py": [], "bare_proxy.py": []}
    urls = {"direct": direct_url, "proxy": proxy.url + "/v1/chat/completions"}
    urls.update((name, bare.url + "/v1/chat/completions") for name, bare in bares.items())
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for i in range(n):
        for label, url in urls.items():
            t, _, _ = yield client.post(url, body)
            if i >= 50:
                times[label].append(t)
    for bare in bares.values():
        bare.stop()
    direct, through = times["direct"], times["proxy"]
    added50 = (pct(through, 50) - pct(direct, 50)) * 1000
    added99 = (pct(through, 99) - pct(direct, 99)) * 1000
    report("p50 latency (ms)", f"{pct(direct, 50) * 1000:.3f}", f"{pct(through, 50) * 1000:.3f}",
           f"added {added50:.3f} ms (target <= 0.35 ms)")
    report("p99 latency (ms)", f"{pct(direct, 99) * 1000:.3f}", f"{pct(through, 99) * 1000:.3f}",
           f"added {added99:.3f} ms (target <= 1 ms)")
    for name, what in (("bare_fast.py", "httptools forwarder (floor)"), ("bare_proxy.py", "Site + Agent forwarder")):
        b = times[name]
        report(f"  {what} p50", f"{pct(direct, 50) * 1000:.3f}", f"{pct(b, 50) * 1000:.3f}",
               f"adds {(pct(b, 50) - pct(direct, 50)) * 1000:.3f} ms; llamaswap "
               f"{(pct(through, 50) - pct(b, 50)) * 1000:+.3f} ms beyond it")
    yield client.pool.closeCachedConnections()
    proxy.stop()


@defer.inlineCallbacks
def bench_throughput(total: int = 3000):
    print("2. throughput with concurrent clients", flush=True)
    port = free_port()
    proxy = Proxy(responder_config(port).replace("models:", "models:", 1) + "    concurrencyLimit: 200\n")
    yield proxy.start()
    yield warm(proxy)
    body = {"model": "m"}
    floor = Bare("bare_fast.py", port)
    yield task.deferLater(reactor, 1.5, lambda: None)
    cpu_ms = {"proxy": [], "floor": []}
    for clients in (16, 64):
        rates = {}
        for label, url in (("direct", f"http://127.0.0.1:{port}/v1/chat/completions"),
                           ("proxy", proxy.url + "/v1/chat/completions"),
                           ("floor", floor.url + "/v1/chat/completions"),
                           ("direct2", f"http://127.0.0.1:{port}/v1/chat/completions"),
                           ("proxy2", proxy.url + "/v1/chat/completions"),
                           ("floor2", floor.url + "/v1/chat/completions")):
            client = Client(per_host=clients)
            remaining = [total // 2]

            @defer.inlineCallbacks
            def worker():
                while remaining[0] > 0:
                    remaining[0] -= 1
                    yield client.post(url, body)

            owner = {"proxy": proxy, "floor": floor}.get(label.rstrip("2"))
            cpu0 = owner.cpu() if owner is not None else 0.0
            started = time.perf_counter()
            yield defer.gatherResults([worker() for _ in range(clients)])
            rates[label] = (total // 2) / (time.perf_counter() - started)
            if owner is not None:
                cpu_ms[label.rstrip("2")].append((owner.cpu() - cpu0) / (total // 2) * 1000)
            yield client.pool.closeCachedConnections()
        direct = (rates["direct"] + rates["direct2"]) / 2
        through = (rates["proxy"] + rates["proxy2"]) / 2
        bare = (rates["floor"] + rates["floor2"]) / 2
        report(f"{clients} clients (req/s)", f"{direct:.0f}", f"{through:.0f}",
               f"ratio {through / direct:.2f} (target >= 0.9); floor forwarder {bare / direct:.2f}")
    report("proxy CPU per request (ms)", "", f"{statistics.median(cpu_ms['proxy']):.3f}",
           f"target <= 0.3; floor forwarder {statistics.median(cpu_ms['floor']):.3f}")
    floor.stop()
    proxy.stop()


@defer.inlineCallbacks
def _stream_rounds(proxy: Proxy, port: int, rounds: int, tokens: int):
    """Interleaved direct/proxy streaming requests: (ttfb, chunks/s, proxy CPU s per 1,000 chunks)."""
    body = {"model": "m", "stream": True}
    client = Client(per_host=2)
    ttfb = {"direct": [], "proxy": []}
    rate = {"direct": [], "proxy": []}
    cpu_per_k = []
    for _ in range(rounds):
        for label, url in (("direct", f"http://127.0.0.1:{port}/v1/chat/completions"),
                           ("proxy", proxy.url + "/v1/chat/completions")):
            cpu0 = proxy.cpu()
            elapsed, first, _ = yield client.post(url, body, first=True)
            ttfb[label].append(first)
            rate[label].append(tokens / elapsed)
            if label == "proxy":
                cpu_per_k.append((proxy.cpu() - cpu0) / (tokens / 1000))
    yield client.pool.closeCachedConnections()
    return ttfb, rate, cpu_per_k


@defer.inlineCallbacks
def bench_streaming(rounds: int = 10):
    print("3. streaming: time to first byte (tokens every 5 ms) and relay rate (2,000-chunk burst)", flush=True)
    port = free_port()
    proxy = Proxy(responder_config(port, "--tokens 20 --token-delay 0.005"))
    yield proxy.start()
    yield warm(proxy)
    ttfb, _, _ = yield _stream_rounds(proxy, port, rounds, 20)
    d, p = statistics.median(ttfb["direct"]), statistics.median(ttfb["proxy"])
    report("time to first byte (ms, median)", f"{d * 1000:.2f}", f"{p * 1000:.2f}",
           f"added {(p - d) * 1000:.2f} ms (target <= 0.5 ms)")
    proxy.stop()
    port = free_port()
    proxy = Proxy(responder_config(port, "--tokens 2000"))
    yield proxy.start()
    yield warm(proxy)
    ttfb, rate, cpu_per_k = yield _stream_rounds(proxy, port, rounds, 2000)
    d, p = statistics.median(rate["direct"]), statistics.median(rate["proxy"])
    report("relay rate (chunks/s, median)", f"{d:.0f}", f"{p:.0f}", f"ratio {p / d:.2f} (target >= 0.95)")
    d, p = statistics.median(ttfb["direct"]), statistics.median(ttfb["proxy"])
    report("  first byte of that burst (ms, median)", f"{d * 1000:.2f}", f"{p * 1000:.2f}",
           "the proxy relays the first read's whole burst before the socket flushes")
    # summed over the rounds: one burst takes less CPU than the counters' 10 ms resolution
    report("proxy CPU ms per 1,000 chunks", "-", f"{sum(cpu_per_k) / len(cpu_per_k) * 1000:.2f}",
           "mean over the rounds")
    proxy.stop()


@defer.inlineCallbacks
def bench_swap(rounds: int = 5):
    print("4. swap: cold request to first byte, minus the upstream's own start-to-healthy", flush=True)
    port = free_port()
    proxy = Proxy(responder_config(port, "--health-delay 0.5", models="a,b"))
    yield proxy.start()
    client = Client(per_host=2)
    cold, swaps = [], []
    for i in range(rounds):
        yield client.post(proxy.url + "/api/models/unload", {})  # nothing to evict: a pure cold start
        _, first, _ = yield client.post(proxy.url + "/v1/chat/completions", {"model": "a", "stream": True},
                                        first=True)
        cold.append(first)
        _, first, _ = yield client.post(proxy.url + "/v1/chat/completions", {"model": "b", "stream": True},
                                        first=True)  # a is running: stop it, then start b
        swaps.append(first)
    # the upstream's own start-to-healthy: spawn it directly and poll /health every 5 ms
    own = []
    for _ in range(rounds):
        p = free_port()
        import subprocess

        started = time.perf_counter()
        child = subprocess.Popen([PY, "-m", "llamaswap.testing.responder", "--port", str(p), "--id", "x",
                                  "--silent", "--health-delay", "0.5"], cwd=ROOT, stdout=subprocess.DEVNULL)
        probe = Client(per_host=1)
        while True:
            try:
                r = yield probe.agent.request(b"GET", f"http://127.0.0.1:{p}/health".encode())
                if r.code == 200:
                    break
            except Exception:
                pass
            yield task.deferLater(reactor, 0.005, lambda: None)
        own.append(time.perf_counter() - started)
        yield probe.pool.closeCachedConnections()
        child.terminate()
        child.wait()
    overhead = statistics.median(cold) - statistics.median(own)
    report("cold start to first byte (ms, median)", f"{statistics.median(own) * 1000:.0f}",
           f"{statistics.median(cold) * 1000:.0f}", f"costs {overhead * 1000:.0f} ms beyond healthy (target < 100 ms)")
    overhead = statistics.median(swaps) - statistics.median(own)
    report("swap b for a to first byte (ms, median)", f"{statistics.median(own) * 1000:.0f}",
           f"{statistics.median(swaps) * 1000:.0f}", f"stop a + start b: {overhead * 1000:.0f} ms beyond healthy")
    yield client.pool.closeCachedConnections()
    proxy.stop()


@defer.inlineCallbacks
def bench_scheduling():
    print("5. scheduling: interleaved models, collation and the starvation bound", flush=True)
    port = free_port()
    config = responder_config(port, models="a,b,c") + (
        "routing:\n  scheduler:\n    settings:\n      fifo: {maxWait: 2}\n")
    proxy = Proxy(config.replace("models:", "models:"))
    yield proxy.start()
    client = Client(per_host=64)
    starts_before = 0
    waits = []

    @defer.inlineCallbacks
    def one(model):
        elapsed, _, _ = yield client.post(proxy.url + "/v1/chat/completions?wait=0.05", {"model": model})
        waits.append(elapsed)

    yield defer.gatherResults([one(m) for m in "abc" * 20])
    metrics = yield _get(client, proxy.url + "/metrics")
    loads = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("llamaswap_model_loads_total{"))
    report("3 models x 20 interleaved: loads", "-", f"{loads - starts_before:.0f}", "llama-swap: 3 (FIFO would be 60)")
    report("  wait p50 / max (s)", "-", f"{pct(waits, 50):.2f} / {max(waits):.2f}", "")
    # steady stream of a; one b request must wait about maxWait, not for ever
    stop = []

    @defer.inlineCallbacks
    def stream_of_a(offset):
        yield task.deferLater(reactor, offset, lambda: None)
        while not stop:
            yield client.post(proxy.url + "/v1/chat/completions?wait=0.3", {"model": "a"})

    workers = [stream_of_a(i * 0.1) for i in range(3)]
    yield task.deferLater(reactor, 1.0, lambda: None)
    elapsed, _, _ = yield client.post(proxy.url + "/v1/chat/completions", {"model": "b"})
    stop.append(True)
    yield defer.gatherResults(workers)
    report("b under a steady stream of a: wait (s)", "-", f"{elapsed:.2f}", "bound: maxWait 2 s + one a request 0.3 s + load")
    yield client.pool.closeCachedConnections()
    proxy.stop()


@defer.inlineCallbacks
def _get(client, url):
    response = yield client.agent.request(b"GET", url.encode())
    chunks = []

    class C(Protocol):
        def dataReceived(self, data):
            chunks.append(data)

        def connectionLost(self, reason):
            done.callback(None)

    done = defer.Deferred()
    response.deliverBody(C())
    yield done
    return b"".join(chunks).decode()


@defer.inlineCallbacks
def bench_memory(requests: int = 10000):
    print("6. memory: proxy RSS", flush=True)
    port = free_port()
    proxy = Proxy(responder_config(port, "--tokens 200 --token-delay 0.01", capture_mb=5) + "    concurrencyLimit: 100\n")
    yield proxy.start()
    yield warm(proxy)
    idle = proxy.rss_mb()
    client = Client(per_host=64)
    streams = [client.post(proxy.url + "/v1/chat/completions", {"model": "m", "stream": True}) for _ in range(64)]
    yield task.deferLater(reactor, 1.0, lambda: None)
    busy = proxy.rss_mb()
    yield defer.gatherResults(streams)
    remaining = [requests]
    samples = []

    @defer.inlineCallbacks
    def worker():
        while remaining[0] > 0:
            remaining[0] -= 1
            yield client.post(proxy.url + "/v1/chat/completions",
                              {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 2000}]})
            if remaining[0] % 1000 == 0:
                samples.append(proxy.rss_mb())

    yield defer.gatherResults([worker() for _ in range(16)])
    report("RSS idle / 64 streams (MiB)", "-", f"{idle:.1f} / {busy:.1f}", "")
    report(f"RSS after {requests} captured requests (MiB)", "-",
           f"{samples[0]:.1f} -> {samples[-1]:.1f}", "flat" if samples[-1] - samples[0] < 20 else "GROWING")
    yield client.pool.closeCachedConnections()
    proxy.stop()


BENCHES = {
    "latency": bench_latency, "throughput": bench_throughput, "streaming": bench_streaming,
    "swap": bench_swap, "scheduling": bench_scheduling, "memory": bench_memory,
}


@defer.inlineCallbacks
def main(names):
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"  {'measure':<44} {'direct':>14} {'proxy':>14}")
    try:
        for name in names:
            yield BENCHES[name]()
    finally:
        if reactor.running:
            reactor.stop()


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(BENCHES)
    reactor.callWhenRunning(main, chosen)
    reactor.run()
