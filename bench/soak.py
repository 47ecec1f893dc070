"""llamaswap soak: mixed traffic for a long while, sampling the proxy for leaks.

Run from the repository root with the project's virtualenv::

    nice -n 10 python bench/soak.py --minutes 30 --csv /tmp/soak.csv

It starts llamaswap (``python -m llamaswap``) as a child process with three
fake upstreams (``llamaswap.testing.responder``) in one swap group, the
activity log in a sqlite file (``store.path``) and request captures on
(``captureBuffer``), then drives moderate mixed traffic (a few requests per
second by default):

* non-streaming and streaming chat completions across the three models: the
  workers follow a "hot" model that rotates every ``--rotate`` seconds and
  now and then ask for another one, so models swap all the time;
* clients that disconnect mid-stream, and clients that give up while their
  request still waits for a model to load;
* a few ``/v1/messages``, ``/v1/models``, ``/running``, ``/api/captures``,
  ``/api/captures/<id>`` and ``/metrics`` requests;
* ``/api/metrics/activity`` every 20 s, an ``/api/events`` subscriber that
  reads for a few seconds then leaves every 45 s;
* a config reload every ``--reload-every`` seconds (the file is rewritten with
  model ``c``'s command changed, then SIGHUP: ``c`` restarts once its requests
  in flight are done, ``a`` and ``b`` keep running).

Every ``--interval`` seconds it samples the llamaswap process (RSS, open file
descriptors, threads, CPU, its child processes), the store file (with its
``-wal`` and ``-shm``), the capture buffer, and the request/error counts.  At
the end it prints, per metric, the first sample after the warm-up, the last,
the maximum and the change in %, the least-squares slope after the warm-up,
and the counts; ``--csv`` writes every sample.  Not a test: nothing here
gates CI.
"""

from __future__ import annotations

import argparse
import base64
import collections
import csv
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llamaswap.proxy.stream import BytesProducer  # noqa: E402

PY = sys.executable
MODELS = ("a", "b", "c")
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega swap proxy model token stream reload capture store").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(n: int) -> int:
    """A port p with p .. p+n-1 all free right now (the models' startPort)."""
    for _ in range(200):
        p = random.randint(20000, 60000 - n)
        try:
            socks = []
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


# -- the proxy under test ---------------------------------------------------------------------------------


class Proxy:
    def __init__(self, workdir: str, capture_mb: int, tokens: int, token_delay: float, max_wait: float,
                 tracemalloc_path: str | None = None):
        self.tracemalloc_path = tracemalloc_path
        self.dir = workdir
        self.port = free_port()
        self.start_port = free_port_run(len(MODELS))
        self.path = os.path.join(workdir, "config.yaml")
        self.store = os.path.join(workdir, "activity.db")
        self.log_path = os.path.join(workdir, "llamaswap.log")
        self.capture_mb, self.tokens, self.token_delay, self.max_wait = capture_mb, tokens, token_delay, max_wait
        self.generation = 0
        self.write_config()
        self.proc = None
        self.ps = None

    def config_text(self) -> str:
        # each reload changes model c's token count, so the reload really has a change to apply
        lines = [f"# soak config, generation {self.generation}",
                 "healthCheckTimeout: 30",
                 "logLevel: info",
                 f"startPort: {self.start_port}",
                 f"captureBuffer: {self.capture_mb}",
                 "store:",
                 f"  path: {self.store}",
                 "models:"]
        for name in MODELS:
            tokens = self.tokens + (self.generation % 2 if name == "c" else 0)
            lines += [f"  {name}:",
                      f"    cmd: \"{PY} -m llamaswap.testing.responder --port ${{PORT}} --id ${{MODEL_ID}} --silent"
                      f" --tokens {tokens} --token-delay {self.token_delay}\""]
        lines += ["routing:",
                  "  router:",
                  "    use: group",
                  "    settings:",
                  "      groups:",
                  "        soak:",
                  "          swap: true",
                  "          exclusive: true",
                  f"          members: [{', '.join(MODELS)}]",
                  "  scheduler:",
                  "    settings:",
                  f"      fifo: {{maxWait: {self.max_wait}}}"]
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.config_text())
        os.replace(tmp, self.path)

    def reload(self) -> None:
        self.generation += 1
        self.write_config()
        self.proc.send_signal(signal.SIGHUP)

    @defer.inlineCallbacks
    def start(self, client: "Client"):
        self.logfile = open(self.log_path, "wb")
        command = [PY, "-m", "llamaswap"]
        if self.tracemalloc_path:
            command = [PY, os.path.abspath(__file__), CHILD_TRACEMALLOC, self.tracemalloc_path]
        self.proc = subprocess.Popen(command + ["--config", self.path, "--listen", f"127.0.0.1:{self.port}"],
                                     cwd=ROOT, stdout=self.logfile, stderr=subprocess.STDOUT)
        for _ in range(400):
            if self.proc.poll() is not None:
                raise RuntimeError(f"llamaswap exited with {self.proc.returncode}; see {self.log_path}")
            try:
                code, body = yield client.get(self.url + "/health")
                if code == 200:
                    break
            except Exception:
                pass
            yield sleep(0.05)
        else:
            raise RuntimeError("llamaswap did not become healthy")
        self.ps = psutil.Process(self.proc.pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def trace_snapshot(self) -> None:
        """With ``--tracemalloc``: the first call takes the baseline, later ones write what grew since."""
        if self.tracemalloc_path:
            self.proc.send_signal(signal.SIGUSR2)

    def store_bytes(self, suffix: str = "") -> int:
        try:
            return os.path.getsize(self.store + suffix)
        except OSError:
            return 0

    def stop(self) -> tuple[int | None, list[int]]:
        """SIGTERM, wait; returns (exit code, pids of upstreams still alive afterwards)."""
        children = []
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        time.sleep(0.5)
        left = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.logfile.close()
        return code, left


# -- HTTP client ------------------------------------------------------------------------------------------


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class _Body(Protocol):
    """Collects a response body; optionally leaves (closes the connection) after ``leave_after`` chunks
    or ``leave_at`` seconds."""

    def __init__(self, done: defer.Deferred, leave_after: int | None = None, keep: int = 1 << 20,
                 needle: bytes | None = None):
        self.done, self.leave_after, self.keep, self.needle = done, leave_after, keep, needle
        self.chunks, self.size, self.data, self.left, self.found = 0, 0, [], False, False
        self._tail = b""

    def dataReceived(self, data):
        self.chunks += 1
        self.size += len(data)
        if self.needle is not None and not self.found:
            self.found = self.needle in self._tail + data
            self._tail = data[-len(self.needle):]
        if self.size <= self.keep:
            self.data.append(data)
        else:
            self.data = [(b"".join(self.data) + data)[-256:]]
        if self.leave_after is not None and self.chunks >= self.leave_after and not self.left:
            self.leave()

    def leave(self):
        if not self.left:
            self.left = True
            self.transport.stopProducing()  # closes the TCP connection: the client is gone

    def connectionLost(self, reason):
        if self.left or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.data))
        else:
            self.done.errback(reason)


class Client:
    def __init__(self, persistent: bool = True, per_host: int = 8):
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.pool.maxPersistentPerHost = per_host
        self.pool.retryAutomatically = False
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=10)

    def request(self, method: bytes, url: str, obj=None, timeout: float = 120):
        headers = Headers({b"content-type": [b"application/json"]}) if obj is not None else None
        body = BytesProducer(json.dumps(obj).encode()) if obj is not None else None
        d = self.agent.request(method, url.encode(), headers, body)
        d.addTimeout(timeout, reactor)
        return d

    @defer.inlineCallbacks
    def get(self, url: str, timeout: float = 30):
        response = yield self.request(b"GET", url, timeout=timeout)
        body = yield read_body(response, timeout=timeout)
        return response.code, body


def read_body(response, leave_after: int | None = None, timeout: float = 120, keep: int = 1 << 20):
    done = defer.Deferred()
    protocol = _Body(done, leave_after, keep)
    response.deliverBody(protocol)
    done.addTimeout(timeout, reactor, onTimeoutCancel=lambda *_: protocol.leave())
    return done


# -- traffic ----------------------------------------------------------------------------------------------


class Traffic:
    """Counts per action: sent, ok, errors (with reasons)."""

    def __init__(self, proxy: Proxy, args, rng: random.Random):
        self.proxy, self.args, self.rng = proxy, args, rng
        self.client = Client(per_host=args.workers + 4)
        self.sent = collections.Counter()
        self.ok = collections.Counter()
        self.errors = collections.Counter()
        self.at_reload = collections.Counter()  # failed while a reload happened: llama-swap cuts those
        self.reasons = collections.Counter()
        self.reload_times: list[float] = []
        self.hot = MODELS[0]
        self.stopping = False
        self.last_ids: collections.deque = collections.deque(maxlen=20)
        self.latencies: list[float] = []

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    def error(self, action: str, reason: str, started: float) -> None:
        # llama-swap's reload stops every model of the old config: queued requests get 503 "shutting down"
        # and proxied ones are cut when their upstream dies.  Those are counted apart, not as errors.
        now = time.monotonic()
        if any(started - 0.5 <= t <= now + 0.5 for t in self.reload_times):
            self.at_reload[action] += 1
            self.reasons[f"(at a reload) {action}: {reason}"[:160]] += 1
        else:
            self.errors[action] += 1
            self.reasons[f"{action}: {reason}"[:160]] += 1

    def model(self) -> str:
        if self.rng.random() < self.args.stray:
            return self.rng.choice([m for m in MODELS if m != self.hot])
        return self.hot

    def prompt(self) -> list:
        n = self.rng.randint(20, 300)
        text = " ".join(self.rng.choice(WORDS) for _ in range(n))
        # an incompressible attachment, so the capture buffer fills (and starts evicting) within the warm-up
        blob = base64.b64encode(self.rng.randbytes(self.rng.randint(*self.args.blob) * 3 // 4)).decode()
        text += "\n<attachment>" + blob + "</attachment>"
        msgs = [{"role": "system", "content": "You are a soak test."}, {"role": "user", "content": text}]
        if self.rng.random() < 0.3:
            msgs += [{"role": "assistant", "content": "ok " * self.rng.randint(1, 40)},
                     {"role": "user", "content": "and " + self.rng.choice(WORDS)}]
        return msgs

    def rotate(self) -> None:
        self.hot = MODELS[(MODELS.index(self.hot) + 1) % len(MODELS)]

    # each action returns a Deferred; failures are recorded by run_action

    @defer.inlineCallbacks
    def chat(self):
        body = {"model": self.model(), "messages": self.prompt(), "max_tokens": self.rng.randint(3, 30)}
        response = yield self.client.request(b"POST", self.proxy.url + "/v1/chat/completions", body)
        data = yield read_body(response)
        if response.code != 200:
            raise Failed(f"status {response.code}: {data[:80]!r}")
        obj = json.loads(data)
        if not obj.get("choices"):
            raise Failed(f"no choices: {data[:80]!r}")

    @defer.inlineCallbacks
    def stream(self):
        body = {"model": self.model(), "messages": self.prompt(), "stream": True,
                "stream_options": {"include_usage": True}}
        response = yield self.client.request(b"POST", self.proxy.url + "/v1/chat/completions", body)
        data = yield read_body(response, keep=4096)
        if response.code != 200:
            raise Failed(f"status {response.code}: {data[:80]!r}")
        if not data.rstrip().endswith(b"data: [DONE]"):
            raise Failed(f"stream not complete: ...{data[-80:]!r}")

    @defer.inlineCallbacks
    def leave_mid_stream(self):
        body = {"model": self.model(), "messages": self.prompt(), "stream": True}
        response = yield self.client.request(b"POST", self.proxy.url + "/v1/chat/completions", body)
        if response.code != 200:
            data = yield read_body(response)
            raise Failed(f"status {response.code}: {data[:80]!r}")
        yield read_body(response, leave_after=self.rng.randint(1, 4))

    @defer.inlineCallbacks
    def give_up_waiting(self):
        # ask for a model that is not the hot one (it has to be loaded), then leave before any answer
        others = [m for m in MODELS if m != self.hot]
        body = {"model": self.rng.choice(others), "messages": self.prompt()}
        d = self.client.request(b"POST", self.proxy.url + "/v1/chat/completions", body)
        reactor.callLater(self.rng.uniform(0.05, 0.5), d.cancel)
        try:
            response = yield d
        except defer.CancelledError:
            return
        except ResponseNeverReceived as e:
            if all(r.check(defer.CancelledError) for r in e.reasons):
                return
            raise
        yield read_body(response)  # answered before we gave up: fine

    @defer.inlineCallbacks
    def messages(self):
        body = {"model": self.model(), "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                "stream": self.rng.random() < 0.5}
        response = yield self.client.request(b"POST", self.proxy.url + "/v1/messages", body)
        data = yield read_body(response, keep=4096)
        if response.code != 200:
            raise Failed(f"status {response.code}: {data[:80]!r}")

    @defer.inlineCallbacks
    def reads(self):
        path = self.rng.choice(["/v1/models", "/running", "/api/captures", "/metrics", "capture"])
        if path == "capture":
            page = yield self.client.get(self.proxy.url + "/api/metrics/activity?limit=5")
            rows = json.loads(page[1]).get("data") or []
            with_capture = [r["id"] for r in rows if r.get("has_capture")]
            if not with_capture:
                return
            path = f"/api/captures/{with_capture[0]}"
        code, data = yield self.client.get(self.proxy.url + path)
        if code != 200:
            raise Failed(f"{path} status {code}: {data[:80]!r}")

    @defer.inlineCallbacks
    def activity(self):
        page = self.rng.randint(1, 3)
        code, data = yield self.client.get(self.proxy.url + f"/api/metrics/activity?limit=50&page={page}")
        if code != 200:
            raise Failed(f"status {code}: {data[:80]!r}")
        json.loads(data)
        code, data = yield self.client.get(self.proxy.url + "/api/metrics/stats")
        if code != 200:
            raise Failed(f"stats status {code}: {data[:80]!r}")

    @defer.inlineCallbacks
    def events(self):
        client = Client(persistent=False)
        response = yield client.request(b"GET", self.proxy.url + "/api/events", timeout=30)
        if response.code != 200:
            raise Failed(f"status {response.code}")
        done = defer.Deferred()
        protocol = _Body(done, keep=4096, needle=b"modelStatus")
        response.deliverBody(protocol)
        reactor.callLater(self.rng.uniform(2, 6), protocol.leave)
        yield done
        if not protocol.found:
            raise Failed(f"no modelStatus event in {protocol.size} bytes")

    @defer.inlineCallbacks
    def run_action(self, name: str):
        self.sent[name] += 1
        started = time.monotonic()
        try:
            yield getattr(self, name)()
        except Failed as e:
            self.error(name, str(e), started)
        except Exception as e:
            reason = type(e).__name__
            inner = getattr(e, "reasons", None)
            if inner:
                reason += "(" + ", ".join(r.type.__name__ for r in inner) + ")"
            self.error(name, reason, started)
        else:
            self.ok[name] += 1
            if name in ("chat", "stream"):
                self.latencies.append(time.monotonic() - started)

    MIX = (("chat", 40), ("stream", 33), ("leave_mid_stream", 12), ("give_up_waiting", 3), ("messages", 6),
           ("reads", 6))

    @defer.inlineCallbacks
    def worker(self, index: int):
        names = [n for n, _ in self.MIX]
        weights = [w for _, w in self.MIX]
        yield sleep(index * 0.3)
        while not self.stopping:
            yield self.run_action(self.rng.choices(names, weights)[0])
            yield sleep(self.rng.uniform(*self.args.think))

    @defer.inlineCallbacks
    def every(self, seconds: float, name: str, offset: float = 0.0):
        yield sleep(offset)
        while not self.stopping:
            yield self.run_action(name)
            yield sleep(seconds)


class Failed(Exception):
    pass


# -- sampling and the report ------------------------------------------------------------------------------


FIELDS = ("t_s", "rss_mib", "fds", "threads", "children", "cpu_pct", "db_mib", "wal_mib", "captures",
          "captures_mib", "requests", "errors", "req_per_s", "reloads")
TRACKED = (("rss_mib", "RSS (MiB)"), ("fds", "open fds"), ("threads", "threads"), ("children", "child processes"),
           ("db_mib", "store file (MiB)"), ("wal_mib", "store -wal (MiB)"), ("captures_mib", "capture buffer (MiB)"),
           ("captures", "captures kept"))


class Sampler:
    def __init__(self, proxy: Proxy, traffic: Traffic, started: float):
        self.proxy, self.traffic, self.started = proxy, traffic, started
        self.samples: list[dict] = []
        self.reloads = 0
        self._last = None

    @defer.inlineCallbacks
    def sample(self):
        ps = self.proxy.ps
        now = time.monotonic()
        cpu = ps.cpu_times()
        cpu_s = cpu.user + cpu.system
        try:
            children = len(ps.children(recursive=True))
        except psutil.Error:
            children = -1
        captures = {}
        try:
            code, data = yield self.traffic.client.get(self.proxy.url + "/api/captures")
            captures = json.loads(data) if code == 200 else {}
        except Exception:
            pass
        requests = self.traffic.total
        if self._last is None:
            cpu_pct, rate = 0.0, 0.0
        else:
            t0, c0, r0 = self._last
            cpu_pct = 100 * (cpu_s - c0) / max(now - t0, 1e-6)
            rate = (requests - r0) / max(now - t0, 1e-6)
        self._last = (now, cpu_s, requests)
        row = {"t_s": round(now - self.started, 1), "rss_mib": round(ps.memory_info().rss / 1048576, 2),
               "fds": ps.num_fds(), "threads": ps.num_threads(), "children": children,
               "cpu_pct": round(cpu_pct, 1), "db_mib": round(self.proxy.store_bytes() / 1048576, 3),
               "wal_mib": round((self.proxy.store_bytes("-wal") + self.proxy.store_bytes("-shm")) / 1048576, 3),
               "captures": captures.get("count", -1),
               "captures_mib": round(captures.get("stored_bytes", 0) / 1048576, 3),
               "requests": requests, "errors": self.traffic.total_errors, "req_per_s": round(rate, 2),
               "reloads": self.reloads}
        self.samples.append(row)
        print("  " + "  ".join(f"{k}={row[k]}" for k in FIELDS), flush=True)


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points)
    return 0.0 if den == 0 else 3600 * sum((p[0] - mx) * (p[1] - my) for p in points) / den


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def report(sampler: Sampler, traffic: Traffic, warmup_s: float, elapsed: float, stop_result, log_path: str,
           machine: str, window: int):
    samples = sampler.samples[:-1] or sampler.samples  # the last one is taken after the traffic stopped
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples[-1:]
    window = max(1, min(window, len(after) // 2 or 1))
    first, last = after[0], after[-1]
    print()
    print(f"soak: {elapsed / 60:.1f} min, {machine}; warm-up {warmup_s / 60:.1f} min, "
          f"{len(samples)} samples ({len(after)} after the warm-up); start/end = median of the first/last "
          f"{window} samples after the warm-up, max = largest sample after it")
    print(f"  {'metric':<22} {'start':>10} {'end':>10} {'max':>10} {'change':>9} {'slope/h':>10}   verdict")
    for key, label in TRACKED:
        start = median([s[key] for s in after[:window]])
        end = median([s[key] for s in after[-window:]])
        top = max(s[key] for s in after)
        change = (100 * (end - start) / start) if start else 0.0
        slope = slope_per_hour([(s["t_s"], s[key]) for s in after])
        verdict = ""
        if key in ("rss_mib", "fds", "threads"):
            verdict = "flat (within 10 %)" if abs(change) <= 10 else "NOT FLAT"
        elif key == "children":
            verdict = "ok" if top <= 2 else "leaked upstream processes?"
        elif key == "db_mib":
            per = (end - start) * 1048576 / max(last["requests"] - first["requests"], 1)
            verdict = f"{per:.0f} B per request (a store file is never pruned)"
        print(f"  {label:<22} {start:>10g} {end:>10g} {top:>10g} {change:>8.1f}% {slope:>10.2f}   {verdict}")
    requests = last["requests"] - first["requests"]
    rss0 = median([s["rss_mib"] for s in after[:window]])
    rss1 = median([s["rss_mib"] for s in after[-window:]])
    per_req = (rss1 - rss0) * 1048576 / max(requests, 1)
    print(f"  RSS change per request after the warm-up: {per_req:.1f} bytes over {requests} requests")
    cpu = [s["cpu_pct"] for s in after]
    print(f"  llamaswap CPU: mean {sum(cpu) / len(cpu):.1f} %, max {max(cpu):.1f} % of one core")
    print(f"  requests: {traffic.total} sent, {sum(traffic.ok.values())} ok, {traffic.total_errors} errors, "
          f"{sum(traffic.at_reload.values())} cut by a config reload, {sampler.reloads} reloads, "
          f"{traffic.total / elapsed:.2f} req/s")
    for name, _ in traffic.MIX + (("activity", 0), ("events", 0)):
        print(f"    {name:<18} sent {traffic.sent[name]:>6}  ok {traffic.ok[name]:>6}  errors {traffic.errors[name]:>4}"
              f"  cut by reload {traffic.at_reload[name]:>3}")
    if traffic.latencies:
        lat = sorted(traffic.latencies)
        print(f"  chat/stream latency p50 {lat[len(lat) // 2]:.2f} s, p99 {lat[int(len(lat) * 0.99)]:.2f} s, "
              f"max {lat[-1]:.2f} s (includes waits for swaps)")
    for reason, count in traffic.reasons.most_common(15):
        print(f"    error x{count}: {reason}")
    code, left = stop_result
    problems = scan_log(log_path)
    clean = "clean shutdown" if problems["shut_down"] else "NO 'Server Shut Down' in its log"
    # twistd's runner re-raises the signal it stopped on, so -15 is the normal status here
    print(f"  llamaswap after SIGTERM: status {code}, {clean}; upstreams left running: {left or 'none'}")
    print(f"  llamaswap log: {problems['lines']} lines, {problems['traceback']} tracebacks, "
          f"{problems['unhandled']} 'Unhandled', {problems['error']} error-level lines, "
          f"{problems['warn']} warnings; {problems['swaps']} swaps, {problems['reloaded']} reloads applied")
    for line in problems["samples"]:
        print(f"    | {line}")


def scan_log(path: str) -> dict:
    out = {"lines": 0, "traceback": 0, "unhandled": 0, "error": 0, "warn": 0, "shut_down": False, "samples": [],
           "swaps": 0, "reloaded": 0}
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace").rstrip()
                out["lines"] += 1
                low = line.lower()
                hit = False
                if line.startswith("Traceback"):
                    out["traceback"] += 1
                    hit = True
                if "unhandled" in low:
                    out["unhandled"] += 1
                    hit = True
                if "[error]" in low or " error " in low[:40]:
                    out["error"] += 1
                    hit = True
                if low.startswith("[warn"):
                    out["warn"] += 1
                    hit = True
                if "] swap to " in line:
                    out["swaps"] += 1
                if "] config reloaded:" in line:
                    out["reloaded"] += 1
                if "Server Shut Down" in line:
                    out["shut_down"] = True
                if hit and len(out["samples"]) < 10:
                    out["samples"].append(line[:200])
    except OSError:
        pass
    return out


# -- main -------------------------------------------------------------------------------------------------


@defer.inlineCallbacks
def soak(args):
    rng = random.Random(args.seed)
    random.seed(args.seed)
    workdir = tempfile.mkdtemp(prefix="llamaswap-soak-")
    proxy = Proxy(workdir, args.capture_mb, args.tokens, args.token_delay, args.max_wait, args.tracemalloc)
    machine = f"{os.cpu_count()} cores, python {sys.version.split()[0]}"
    duration = args.minutes * 60
    warmup = min(args.warmup * 60, duration / 2)
    print(f"soak: {args.minutes} min ({machine}); workdir {workdir}", flush=True)
    if args.tracemalloc:
        print("  --tracemalloc: llamaswap's RSS and CPU include tracemalloc's own cost; read the report "
              f"in {args.tracemalloc}, not the RSS figures", flush=True)
    traffic = Traffic(proxy, args, rng)
    yield proxy.start(traffic.client)
    started = time.monotonic()
    sampler = Sampler(proxy, traffic, started)
    loops = []
    try:
        yield sampler.sample()
        sample_loop = task.LoopingCall(sampler.sample)
        sample_loop.start(args.interval, now=False)
        loops.append(sample_loop)

        rotate_loop = task.LoopingCall(traffic.rotate)
        rotate_loop.start(args.rotate, now=False)
        loops.append(rotate_loop)

        def reload():
            traffic.reload_times.append(time.monotonic())
            proxy.reload()
            sampler.reloads += 1
            print(f"  -- config reload #{sampler.reloads} (SIGHUP)", flush=True)

        reload_loop = task.LoopingCall(reload)
        reload_loop.start(args.reload_every, now=False)
        loops.append(reload_loop)

        if args.tracemalloc:
            reactor.callLater(warmup, proxy.trace_snapshot)  # the baseline
            snapshots = task.LoopingCall(proxy.trace_snapshot)
            snapshots.start(args.trace_every * 60, now=False)
            loops.append(snapshots)

        running = [traffic.worker(i) for i in range(args.workers)]
        running.append(traffic.every(20, "activity", 5))
        running.append(traffic.every(45, "events", 10))
        yield sleep(duration)
        traffic.stopping = True
        for loop in loops:
            loop.stop()
        loops = []
        yield defer.DeferredList(running)
        proxy.trace_snapshot()
        yield sleep(2)
        yield sampler.sample()
        yield traffic.client.pool.closeCachedConnections()
    finally:
        for loop in loops:
            loop.stop()
        elapsed = time.monotonic() - started
        stop_result = proxy.stop()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(sampler.samples)
    report(sampler, traffic, warmup, elapsed, stop_result, proxy.log_path, machine, args.window)
    if args.csv:
        print(f"  samples: {args.csv}")
    if args.keep:
        print(f"  kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long to drive traffic (default 30)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="minutes before the 'start' sample (default 2, at most half the run)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--window", type=int, default=6,
                   help="samples whose median is the start (and the end) figure (default 6: a minute)")
    p.add_argument("--csv", help="write the samples to this CSV file")
    p.add_argument("--workers", type=int, default=3, help="concurrent clients (default 3)")
    p.add_argument("--think", type=float, nargs=2, default=(0.3, 1.0), metavar=("MIN", "MAX"),
                   help="pause of each client between requests, seconds (default 0.3 1.0)")
    p.add_argument("--rotate", type=float, default=20.0, help="seconds before the hot model changes (default 20)")
    p.add_argument("--stray", type=float, default=0.03,
                   help="share of requests for a model other than the hot one (default 0.03)")
    p.add_argument("--reload-every", type=float, default=240.0, help="seconds between config reloads (default 240)")
    p.add_argument("--capture-mb", type=int, default=1, help="captureBuffer in MiB (default 1)")
    p.add_argument("--blob", type=int, nargs=2, default=(3000, 8000), metavar=("MIN", "MAX"),
                   help="bytes of random base64 in every prompt (default 3000 8000)")
    p.add_argument("--tokens", type=int, default=20, help="tokens per response of the fake models (default 20)")
    p.add_argument("--token-delay", type=float, default=0.02, help="seconds per token (default 0.02)")
    p.add_argument("--max-wait", type=float, default=5.0,
                   help="routing.scheduler.settings.fifo.maxWait: how long a stray request waits (default 5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tracemalloc", metavar="PATH",
                   help="run llamaswap under tracemalloc: baseline after the warm-up, then every --trace-every "
                        "minutes and at the end append the allocation sites that grew most to PATH (slow: each report "
                        "stalls llamaswap for seconds; RSS figures then include tracemalloc itself)")
    p.add_argument("--trace-every", type=float, default=5.0, help="minutes between tracemalloc reports (default 5)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (config, store, llamaswap log)")
    return p.parse_args(argv)


CHILD_TRACEMALLOC = "--child-tracemalloc"


def child_tracemalloc(path: str, argv: list) -> None:
    """Run llamaswap's CLI under tracemalloc; SIGUSR2 takes a snapshot (see ``--tracemalloc``)."""
    import linecache
    import tracemalloc

    tracemalloc.start(10)
    state = {"base": None, "t0": time.monotonic()}

    def on_signal(signum, frame):
        # linecache: the source lines this very report reads (traceback.format) and caches
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__),
                                                          tracemalloc.Filter(False, linecache.__file__),
                                                          tracemalloc.Filter(False, "<unknown>")])
        with open(path, "a") as out:
            elapsed = time.monotonic() - state["t0"]
            if state["base"] is None:
                state["base"] = snap
                total = sum(s.size for s in snap.statistics("filename"))
                out.write(f"== baseline at {elapsed:.0f} s: {total / 1048576:.2f} MiB traced\n")
                return
            diff = snap.compare_to(state["base"], "lineno")
            grown = sum(d.size_diff for d in diff)
            out.write(f"== at {elapsed:.0f} s: {grown / 1048576:+.3f} MiB traced since the baseline; top sites\n")
            for d in diff[:25]:
                out.write(f"  {d.size_diff / 1024:+9.1f} KiB {d.count_diff:+7d} blocks  {d.traceback[0]}\n")
            out.write("  -- largest growth by traceback:\n")
            for d in snap.compare_to(state["base"], "traceback")[:4]:
                out.write(f"  {d.size_diff / 1024:+9.1f} KiB {d.count_diff:+7d} blocks\n")
                for line in d.traceback.format()[-16:]:
                    out.write(f"      {line}\n")

    signal.signal(signal.SIGUSR2, on_signal)
    sys.argv = ["llamaswap"] + argv
    from llamaswap.cli import main as llamaswap_main

    llamaswap_main()


def main(argv=None):
    if len(sys.argv) > 2 and sys.argv[1] == CHILD_TRACEMALLOC:
        child_tracemalloc(sys.argv[2], sys.argv[3:])
        return 0
    args = parse_args(argv)
    failure = []

    def run():
        d = soak(args)
        d.addErrback(lambda f: (failure.append(f), f.printTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
