"""End to end: the real service on a loopback port, fake upstreams as real children."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import sys
import textwrap

import treq
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from llamaswap.config import load_config_text
from llamaswap.process import ChildRegistry
from llamaswap.service import build_service

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_run(n: int = 6) -> int:
    """A port p with p .. p+n-1 all free now (models take ${PORT} from
    startPort upwards), picked below the kernel's ephemeral range, so no
    outgoing connection of a test can take one of them before the model
    server binds it."""
    rng = random.Random()
    for _ in range(50):
        start = rng.randrange(20000, 30000 - n)
        sockets = []
        try:
            for port in range(start, start + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    return free_port()


def responder(extra: str = "") -> str:
    return f"{PY} -m llamaswap.testing.responder --port ${{PORT}} --id ${{MODEL_ID}} --silent {extra}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@defer.inlineCallbacks
def wait_until(test: TestCase, predicate, timeout: float = 10.0, explain=lambda: ""):
    """Poll ``predicate`` (which may return a Deferred) every 50 ms until it is
    true (its value is the result), failing ``test`` after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if isinstance(value, defer.Deferred):
            value = yield value
        if value:
            return value
        if reactor.seconds() >= deadline:
            test.fail("condition not reached" + explain())
        yield task.deferLater(reactor, 0.05, lambda: None)


def start_service(test: TestCase, yaml_text: str, port: int):
    """The real service, started, on 127.0.0.1:``port``: ``yaml_text``
    (dedented) after a fresh start port, so parallel runs do not share
    upstream ports; its state in a directory of ``test``'s."""
    text = f"startPort: {free_run()}\n" + textwrap.dedent(yaml_text).lstrip("\n")
    config = load_config_text(text, environ=dict(os.environ))
    service = build_service(reactor, config, [f"tcp:{port}:interface=127.0.0.1"],
                            registry=ChildRegistry(test.mktemp()))
    service.startService()
    return service


class Harness(TestCase):
    timeout = 40

    def start(self, yaml_text: str):
        port = free_port()
        self.service = start_service(self, yaml_text, port)
        self.addCleanup(self.service.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.base = f"http://127.0.0.1:{port}"
        self.starts = []
        self.service.runtime.on_state = lambda m, old, new: self.starts.append(m) if new == "starting" else None
        return self.service

    @property
    def runtime(self):
        return self.service.runtime

    def request(self, method, path, **kw):
        kw.setdefault("pool", self.pool)
        return treq.request(method, self.base + path, **kw)

    @defer.inlineCallbacks
    def post(self, path, obj, **kw):
        headers = kw.pop("headers", {})
        headers.setdefault("Content-Type", "application/json")
        response = yield self.request("POST", path, data=json.dumps(obj).encode(), headers=headers, **kw)
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def get(self, path, **kw):
        response = yield self.request("GET", path, **kw)
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def chat(self, model, **extra):
        response, body = yield self.post("/v1/chat/completions", dict({"model": model, "messages": []}, **extra))
        return response, body

    @defer.inlineCallbacks
    def put_active(self, name):
        """PUT /api/profiles/active: ``(status, decoded body)``."""
        response = yield self.request("PUT", "/api/profiles/active", data=json.dumps({"name": name}).encode(),
                                      headers={"Content-Type": "application/json"})
        body = yield response.content()
        return response.code, json.loads(body)

    @defer.inlineCallbacks
    def running(self):
        _, body = yield self.get("/running")
        return {r["model"]: r["state"] for r in json.loads(body)["running"]}

    def wait_for(self, predicate, timeout=10.0):
        return wait_until(self, predicate, timeout)

    def config_file(self, yaml_text: str) -> str:
        """Where ``service.reload()`` reads from (one file per test): ``yaml_text``,
        dedented, after the running start port (so unchanged models keep their
        ``${PORT}``).  Returns its path."""
        path = getattr(self, "_config_path", None) or os.path.abspath(self.mktemp())
        self._config_path = path
        with open(path, "w") as f:
            f.write(f"startPort: {self.service.config.start_port}\n" + textwrap.dedent(yaml_text).lstrip("\n"))
        self.service.config_path = path
        return path

    def log_events(self) -> list:
        """Every log event from now to the end of the test."""
        logged: list = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        return logged


AB = f"""
    healthCheckTimeout: 15
    models:
      A: {{cmd: "{responder('--respond A')}", aliases: [a1]}}
      B: {{cmd: "{responder('--respond B')}"}}
"""


class SwapTests(Harness):
    @defer.inlineCallbacks
    def test_swap_on_demand(self):
        self.start(AB)
        response, body = yield self.chat("A")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["responseMessage"], "A")
        pid_a = self.runtime.processes["A"].pid
        response, body = yield self.chat("B")
        self.assertEqual(json.loads(body)["responseMessage"], "B")
        self.assertEqual((yield self.running()), {"B": "ready"})
        self.assertFalse(pid_alive(pid_a))

    @defer.inlineCallbacks
    def test_routing_errors(self):
        self.start(AB)
        response, body = yield self.chat("nope")
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body), {"src": "llama-swap", "error": {
            "message": "no router for requested model", "type": "invalid_request_error",
            "param": None, "code": "not_found"}})
        response, body = yield self.post("/v1/chat/completions", {"messages": []})
        self.assertEqual((response.code, json.loads(body)["error"]["message"]),
                         (404, "no model id could be identified"))
        response, body = yield self.post("/v1/chat/completions", {"x": 1}, headers={"Accept": "text/plain"})
        self.assertEqual(body, b"llama-swap: no model id could be identified")
        response, _ = yield self.get("/v1/chat/completions")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["POST"])
        response, body = yield self.get("/no/such/path")
        self.assertEqual((response.code, body), (404, b"404 page not found"))
        self.assertEqual(self.starts, [])

    @defer.inlineCallbacks
    def test_aliases_and_filters(self):
        self.start(f"""
            models:
              A:
                cmd: "{responder()}"
                aliases: [a1]
                useModelName: up
                filters:
                  stripParams: temperature
                  setParams: {{top_k: 5}}
                  setParamsByID: {{"A:hi": {{x: 1}}}}
        """)
        response, body = yield self.post("/v1/chat/completions", {"model": "a1", "temperature": 1})
        sent = json.loads(json.loads(body)["request_body"])
        self.assertEqual(sent, {"model": "up", "top_k": 5})
        self.assertEqual(json.loads(body)["h_content_length"], len(json.loads(body)["request_body"]))
        response, body = yield self.post("/v1/chat/completions", {"model": "A:hi"})
        self.assertEqual(json.loads(json.loads(body)["request_body"]), {"model": "up", "top_k": 5, "x": 1})
        echo = json.loads(body)["echo"]
        self.assertEqual(echo["headers"]["x-forwarded-for"], "127.0.0.1")

    @defer.inlineCallbacks
    def test_models_list(self):
        self.start(f"""
            includeAliasesInList: true
            models:
              B: {{cmd: "{responder()}", name: Bee, metadata: {{port: "${{PORT}}"}}, aliases: [b1],
                  capabilities: {{in: [text, image], out: [text], tools: true, context: 4096}}}}
              A: {{cmd: "{responder()}", aliases: [a1]}}
              H: {{cmd: "{responder()}", unlisted: true}}
            peers:
              p: {{proxy: "http://127.0.0.1:9", models: [m]}}
        """)
        _, body = yield self.get("/v1/models")
        data = json.loads(body)
        self.assertEqual(data["object"], "list")
        ids = [r["id"] for r in data["data"]]
        self.assertEqual(ids, ["A", "B", "a1", "b1", "p/m"])
        a, b, alias, b_alias, peer = data["data"]
        # an alias record has the model's own fields (llama-swap: "same fields")
        self.assertEqual((b_alias["name"], b_alias["context_length"], b_alias["meta"]["n_ctx"]), ("Bee", 4096, 4096))
        self.assertEqual(b_alias["capabilities"], b["capabilities"])
        self.assertEqual((a["owned_by"], a["status"]["value"]), ("llama-swap", "unloaded"))
        self.assertEqual(a["meta"]["llamaswap"], {"type": "model", "aliases": ["a1"]})
        self.assertEqual(alias["meta"]["llamaswap"], {"type": "alias", "modelID": "A"})
        self.assertEqual(b["name"], "Bee")
        self.assertEqual(b["capabilities"], {"vision": True, "function_calling": True})
        self.assertEqual(b["architecture"]["modality"], "text+image->text")
        self.assertEqual((b["context_length"], b["meta"]["n_ctx"]), (4096, 4096))
        self.assertIsInstance(b["meta"]["llamaswap"]["port"], int)
        self.assertEqual(peer["meta"]["llamaswap"], {"type": "peer", "peerID": "p"})
        yield self.chat("A")
        _, body = yield self.get("/models")
        self.assertEqual(json.loads(body)["data"][0]["status"]["value"], "loaded")


class AuthCorsTests(Harness):
    @defer.inlineCallbacks
    def test_api_keys(self):
        self.start(AB + "    apiKeys: [k]\n")
        response, body = yield self.chat("A")
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Basic realm="llama-swap"'])
        self.assertEqual(json.loads(body)["error"]["type"], "authentication_error")
        basic = "Basic " + base64.b64encode(b"anyone:k").decode()
        for headers in ({"Authorization": "Bearer k"}, {"x-api-key": "k"}, {"Authorization": basic}):
            response, _ = yield self.post("/v1/chat/completions", {"model": "A"}, headers=headers)
            self.assertEqual(response.code, 200, headers)
        response, _ = yield self.get("/health")
        self.assertEqual(response.code, 200)
        response = yield self.request("OPTIONS", "/v1/chat/completions",
                                      headers={"Access-Control-Request-Headers": "X-Custom, Bad Header"})
        self.assertEqual(response.code, 204)
        self.assertEqual(response.headers.getRawHeaders("access-control-allow-origin"), ["*"])
        self.assertEqual(response.headers.getRawHeaders("access-control-max-age"), ["86400"])
        self.assertEqual(response.headers.getRawHeaders("access-control-allow-headers"), ["X-Custom"])
        yield response.content()


class SchedulingTests(Harness):
    @defer.inlineCallbacks
    def test_concurrency_limit(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder()}", concurrencyLimit: 1}}
        """)
        first = self.post("/v1/chat/completions?wait=1s", {"model": "A"})
        yield self.wait_for(lambda: self.runtime.router.scheduler.admitted("A") == 1)
        response, body = yield self.post("/v1/chat/completions?wait=1s", {"model": "A"})
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(json.loads(body)["error"]["code"], "concurrency_limit")
        self.assertEqual(json.loads(body)["error"]["type"], "rate_limit_error")
        response, _ = yield first
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_eviction_waits_for_streaming_request(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--tokens 20 --token-delay 0.05')}"}}
              B: {{cmd: "{responder()}"}}
        """)
        yield self.chat("A")
        streaming = self.post("/v1/chat/completions", {"model": "A", "stream": True})
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("A") == 1)
        b = self.chat("B")
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(b.called)
        response, body = yield streaming
        self.assertEqual(response.code, 200)
        self.assertIn(b"data: [DONE]", body)
        response, body = yield b
        self.assertEqual(response.code, 200)
        self.assertEqual((yield self.running()), {"B": "ready"})

    @defer.inlineCallbacks
    def test_collation(self):
        self.start(AB)
        events = []
        self.service.events.subscribe(lambda kind, data: events.append((kind, data)))
        results = yield defer.gatherResults([self.chat(m) for m in "ABAB"])
        self.assertEqual([json.loads(body)["responseMessage"] for _, body in results], list("ABAB"))
        self.assertEqual(len(self.starts), 2)
        swaps = [data["target"] for kind, data in events if kind == "swap"]
        self.assertEqual(sorted(swaps), ["A", "B"])
        evicted = [data for kind, data in events if kind == "evict"]
        self.assertEqual(len(evicted), 1)
        self.assertIn("reason", evicted[0])

    @defer.inlineCallbacks
    def test_body_too_large(self):
        self.start(AB + "    maxRequestBodyBytes: 100\n")
        response, body = yield self.post("/v1/chat/completions", {"model": "A", "pad": "x" * 200})
        self.assertEqual(response.code, 413)
        self.assertEqual(self.starts, [])

    @defer.inlineCallbacks
    def test_three_models_interleaved(self):
        self.start(AB + f"      C: {{cmd: \"{responder('--respond C')}\"}}\n")
        requests = [self.post("/v1/chat/completions?wait=0.05", {"model": m}) for m in "ABC" * 10]
        results = yield defer.gatherResults(requests)
        self.assertTrue(all(r.code == 200 for r, _ in results))
        self.assertEqual(len(self.starts), 3)

    @defer.inlineCallbacks
    def test_client_disconnect_frees_model(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--tokens 200 --token-delay 0.02')}"}}
              B: {{cmd: "{responder()}"}}
        """)
        yield self.chat("A")
        d = self.post("/v1/chat/completions", {"model": "A", "stream": True})
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("A") == 1)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("A") == 0)
        response, body = yield self.chat("B")
        self.assertEqual((response.code, json.loads(body).get("responseMessage")), (200, "B"), body)

    @defer.inlineCallbacks
    def test_burst_of_fifty(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder()}", concurrencyLimit: 60}}
        """)
        results = yield defer.gatherResults([self.chat("A") for _ in range(50)])
        self.assertEqual([r.code for r, _ in results], [200] * 50)
        self.assertEqual(len(self.starts), 1)


class LifecycleTests(Harness):
    @defer.inlineCallbacks
    def test_ttl(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder()}", ttl: 1}}
        """)
        yield self.chat("A")
        self.assertEqual((yield self.running()), {"A": "ready"})
        yield self.wait_for(lambda: self.running().addCallback(lambda r: r == {}), timeout=5)

    @defer.inlineCallbacks
    def test_start_failure(self):
        self.start(f"""
            healthCheckTimeout: 15
            models:
              bad: {{cmd: "{PY} -c 'import sys; sys.exit(1)'", proxy: "http://127.0.0.1:1"}}
        """)
        response, body = yield self.chat("bad")
        self.assertEqual(response.code, 500)
        self.assertIn("unspecific error: upstream command exited prematurely", json.loads(body)["error"]["message"])
        self.assertEqual(str(self.runtime.processes["bad"].state), "stopped")

    @defer.inlineCallbacks
    def test_crash_then_restart(self):
        self.start(AB)
        yield self.chat("A")
        os.killpg(self.runtime.processes["A"].pid, signal.SIGKILL)
        yield self.wait_for(lambda: str(self.runtime.processes["A"].state) == "stopped")
        response, body = yield self.chat("A")
        self.assertEqual(json.loads(body)["responseMessage"], "A")

    @defer.inlineCallbacks
    def test_loading_state(self):
        self.start(f"""
            sendLoadingState: true
            models:
              A: {{cmd: "{responder('--health-delay 0.3')}"}}
        """)
        response, body = yield self.post("/v1/chat/completions?stream=true",
                                         {"model": "A", "stream": True, "messages": []})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        text = body.decode()
        self.assertTrue(text.startswith('data: {"choices":[{"delta":{"reasoning_content":"━━━━━"}}]}'))
        self.assertIn("llama-swap loading model: A", text)
        self.assertIn("Done! (", text)
        self.assertTrue(text.rstrip().endswith("data: [DONE]"))

    @defer.inlineCallbacks
    def test_upstream_passthrough(self):
        self.start(AB)
        response, body = yield self.get("/upstream/A/test")
        self.assertEqual((response.code, body), (200, b"A"))
        response = yield self.request("GET", "/upstream/A", allow_redirects=False)
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/upstream/A/"])
        yield response.content()
        response, body = yield self.get("/upstream/B/x.js")
        self.assertEqual(response.code, 409)
        self.assertNotIn("B", (yield self.running()))
        response, body = yield self.get("/upstream/zzz/")
        self.assertEqual((response.code, json.loads(body)["error"]["message"]), (404, "model not found"))

    @defer.inlineCallbacks
    def test_unload_apis(self):
        self.start(AB)
        yield self.chat("A")
        response, body = yield self.post("/api/models/unload", {})
        self.assertEqual(json.loads(body), {"msg": "ok"})
        self.assertEqual((yield self.running()), {})
        yield self.chat("A")
        response, body = yield self.post("/api/models/unload/a1", {})
        self.assertEqual((response.code, body), (200, b"OK"))
        self.assertEqual((yield self.running()), {})
        response, body = yield self.post("/api/models/unload/nope", {})
        self.assertEqual(response.code, 404)
        response, body = yield self.get("/unload")
        self.assertEqual((response.code, body), (200, b"OK"))

    @defer.inlineCallbacks
    def test_groups(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder()}"}}
              B: {{cmd: "{responder()}"}}
              C: {{cmd: "{responder()}"}}
            groups:
              g: {{swap: false, exclusive: false, members: [A, B]}}
        """)
        yield self.chat("A")
        yield self.chat("B")
        self.assertEqual((yield self.running()), {"A": "ready", "B": "ready"})
        yield self.chat("C")
        self.assertEqual((yield self.running()), {"C": "ready"})

    @defer.inlineCallbacks
    def test_no_child_left_after_stop(self):
        self.start(AB)
        yield self.chat("A")
        pid = self.runtime.processes["A"].pid
        yield self.service.stopService()
        self.assertFalse(pid_alive(pid))


class StarvationTests(Harness):
    @defer.inlineCallbacks
    def test_max_wait_bounds_a_starved_request(self):
        """Under a steady stream of A requests, B waits about maxWait, not for ever."""
        self.start(AB + """
    routing:
      scheduler:
        settings:
          fifo: {maxWait: 1.0}
""")
        yield self.chat("A")
        stop = []

        @defer.inlineCallbacks
        def stream_of_a(offset):
            yield task.deferLater(reactor, offset, lambda: None)
            while not stop:
                yield self.post("/v1/chat/completions?wait=0.3", {"model": "A"})

        # staggered, so A always has a request in flight
        workers = [stream_of_a(i * 0.1) for i in range(3)]
        yield task.deferLater(reactor, 0.4, lambda: None)
        started = reactor.seconds()
        response, body = yield self.chat("B")
        waited = reactor.seconds() - started
        stop.append(True)
        yield defer.gatherResults(workers)
        self.assertEqual(json.loads(body)["responseMessage"], "B")
        # maxWait + one A request in flight + B's load, with slack for a loaded machine
        self.assertGreater(waited, 0.9)  # A kept the model busy until B was overdue
        self.assertLess(waited, 1.0 + 0.3 + 2.0)
        print(f"\nstarved B waited {waited:.2f}s (maxWait 1.0s, A requests 0.3s)")


class RouteTests(Harness):
    @defer.inlineCallbacks
    def test_preload(self):
        self.start(AB + """
    hooks:
      on_startup:
        preload: [a1]
""")
        yield self.wait_for(lambda: self.running().addCallback(lambda r: r == {"A": "ready"}))

    @defer.inlineCallbacks
    def test_model_from_query_and_multipart(self):
        self.start(f"""
            models:
              W: {{cmd: "{responder()}", useModelName: whisper-1}}
        """)
        response, body = yield self.get("/v1/audio/voices?model=W")
        self.assertEqual((response.code, json.loads(body)["voices"]), (200, ["voice1"]))
        response = yield self.request("POST", "/v1/audio/transcriptions", pool=self.pool,
                                      data={"model": "W"}, files={"file": ("a.wav", b"12345")})
        body = json.loads((yield response.content()))
        self.assertEqual(body["text"], "The length of the file is 5 bytes")
        self.assertEqual(body["model"], "whisper-1")

    @defer.inlineCallbacks
    def test_versionless_and_audioapi_paths(self):
        self.start(AB)
        response, body = yield self.post("/v/chat/completions", {"model": "A"})
        self.assertEqual(json.loads(body)["path"], "/chat/completions")  # forwarded without /v
        response, body = yield self.post("/audioapi/v1/tasks/run", {"model": "A"})
        self.assertEqual(json.loads(body)["path"], "/v1/tasks/run")
        response, body = yield self.post("/v/nothing", {"model": "A"})
        self.assertEqual(response.code, 404)


class ReloadTests(Harness):
    @defer.inlineCallbacks
    def test_watch_config_reload(self):
        from llamaswap.service import ConfigWatcher

        path = self.mktemp()
        self.start(AB)
        text = f"startPort: {self.service.config.start_port}\n" + textwrap.dedent(AB)
        with open(path, "w") as f:
            f.write(text)
        self.service.config_path = path
        watcher = ConfigWatcher(self.service, interval=0.2)
        watcher.setServiceParent(self.service)
        yield self.chat("A")
        pid = self.runtime.processes["A"].pid
        with open(path, "w") as f:
            f.write(text + f"  C: {{cmd: \"{responder('--respond C')}\"}}\n")
        yield self.wait_for(lambda: "C" in self.service.config.models)
        _, body = yield self.get("/v1/models")
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["A", "B", "C"])
        self.assertEqual((yield self.running()), {"A": "ready"})  # unchanged: kept running (unlike llama-swap)
        self.assertEqual(self.runtime.processes["A"].pid, pid)
        response, body = yield self.chat("C")
        self.assertEqual(json.loads(body)["responseMessage"], "C")

    @defer.inlineCallbacks
    def test_reload_starts_new_models_after_old_ones_stopped(self):
        path = self.mktemp()
        self.start(AB)
        # A changed, on the same port: its new process may start only once the old one is gone
        self.service.config_path = path
        with open(path, "w") as f:
            f.write(f"startPort: {self.service.config.models['A'].port}\n"
                    + textwrap.dedent(AB).replace("--respond A", "--respond A2"))
        yield self.chat("A")
        old_pid = self.runtime.processes["A"].pid
        self.assertTrue(self.service.reload())
        response, body = yield self.get("/upstream/A/__responder/stats")
        self.assertEqual(response.code, 200)
        self.assertFalse(pid_alive(old_pid))
        self.assertEqual(json.loads(body)["pid"], self.runtime.processes["A"].pid)
        self.assertNotEqual(json.loads(body)["pid"], old_pid)


    @defer.inlineCallbacks
    def test_quick_reloads_never_overlap_generations(self):
        """Three reloads in quick succession with a SIGTERM-ignoring upstream on
        one fixed port: the newest model may start only once every older
        generation's process is gone (not just the previous generation's)."""
        import llamaswap.service

        self.patch(llamaswap.service, "SHUTDOWN_GRACE", 2.0)  # SIGKILL the old generations after 2 s, not 30
        port = free_port()
        path = self.mktemp()

        def write(generation: int) -> None:
            cmd = (f"{PY} -m llamaswap.testing.responder --port {port} --id A --silent --ignore-sigterm"
                   f" --respond gen{generation}")
            with open(path, "w") as f:
                f.write(textwrap.dedent(f"""
                    healthCheckTimeout: 15
                    hooks: {{on_startup: {{preload: [A]}}}}
                    models:
                      A: {{cmd: "{cmd}", proxy: "http://127.0.0.1:{port}"}}
                """))

        write(1)
        with open(path) as f:
            self.start(f.read())
        self.service.config_path = path
        response, body = yield self.chat("A")
        self.assertEqual(json.loads(body)["responseMessage"], "gen1")
        old_pids = [self.runtime.processes["A"].pid]
        overlaps = []

        def on_event(kind, data):
            if kind == "modelStatus" and data["id"] == "A" and data["state"] == "starting":
                overlaps.extend(pid for pid in old_pids if pid_alive(pid))

        unsubscribe = self.service.events.subscribe(on_event)
        self.addCleanup(unsubscribe)
        for generation in (2, 3, 4):
            write(generation)
            self.assertTrue(self.service.reload())
        response, body = yield self.chat("A")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["responseMessage"], "gen4")
        self.assertEqual(overlaps, [])
        self.assertFalse(pid_alive(old_pids[0]))
        self.assertEqual(self.runtime.router.retiring("A"), [])


class UploadGuardTests(Harness):
    @defer.inlineCallbacks
    def upload(self, headers, size):
        """Raw HTTP: headers, then the body in pieces; returns (status line, bytes the server spooled)."""
        from twisted.internet.protocol import ClientFactory, Protocol

        port = int(self.base.rsplit(":", 1)[1])
        done = defer.Deferred()

        class Upload(Protocol):
            def connectionMade(self):
                head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                head += b"".join(k + b": " + v + b"\r\n" for k, v in headers.items())
                self.transport.write(head + b"Content-Length: %d\r\n\r\n" % size)
                self.transport.write(b"x" * size)
                self.data = b""

            def dataReceived(self, data):
                self.data += data
                if b"\r\n\r\n" in self.data and not done.called:
                    done.callback(self.data.split(b"\r\n", 1)[0])
                    self.transport.loseConnection()

        reactor.connectTCP("127.0.0.1", port, ClientFactory.forProtocol(Upload))
        status = yield done
        return status

    @defer.inlineCallbacks
    def test_refused_before_the_body_is_stored(self):
        from llamaswap.server.access import LlamaSwapRequest

        created = []
        real = LlamaSwapRequest.gotLength
        self.patch(LlamaSwapRequest, "gotLength",
                   lambda req, length: (real(req, length), created.append(type(req.content).__name__))[0])
        self.start(AB + "    apiKeys: [k]\n    maxRequestBodyBytes: 1000\n")
        status = yield self.upload({}, 200000)
        self.assertEqual(status, b"HTTP/1.1 401 Unauthorized")
        status = yield self.upload({b"Authorization": b"Bearer k"}, 200000)
        self.assertEqual(status, b"HTTP/1.1 413 Request Entity Too Large")
        self.assertEqual(created, ["_Discard", "_Discard"])  # nothing was spooled
        self.assertEqual(self.starts, [])


class ReviewFixTests(Harness):
    @defer.inlineCallbacks
    def test_response_header_timeout(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder()}", timeouts: {{responseHeader: 1}}}}
        """)
        yield self.chat("A")
        started = reactor.seconds()
        response, body = yield self.post("/v1/chat/completions?wait=3s", {"model": "A"})
        self.assertEqual(response.code, 504)
        self.assertLess(reactor.seconds() - started, 2.5)
        self.assertIn("upstream timed out", json.loads(body)["error"]["message"])
        self.assertEqual(self.runtime.router.scheduler.in_flight("A"), 0)

    @defer.inlineCallbacks
    def test_upstream_passthrough_is_not_filtered(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder()}", useModelName: up, filters: {{stripParams: temperature, setParams: {{top_k: 5}}}}}}
        """)
        response, body = yield self.post("/upstream/A/v1/chat/completions", {"model": "A", "temperature": 1})
        self.assertEqual(json.loads(json.loads(body)["request_body"]), {"model": "A", "temperature": 1})

    @defer.inlineCallbacks
    def test_client_gone_while_queued_is_recorded_as_499(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--tokens 100 --token-delay 0.02')}"}}
              B: {{cmd: "{responder()}"}}
        """)
        yield self.chat("A")
        streaming = self.post("/v1/chat/completions", {"model": "A", "stream": True})
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("A") == 1)
        queued = self.chat("B")
        yield self.wait_for(lambda: self.runtime.router.scheduler.queue_snapshot())
        queued.cancel()
        self.failureResultOf(queued)  # the client gave up
        yield streaming
        rows = yield self.wait_for(lambda: self.get("/api/metrics/activity?model=B").addCallback(
            lambda rb: json.loads(rb[1])["data"]))
        self.assertEqual((rows[0]["resp_status_code"], rows[0]["error_msg"]), (499, "client disconnected"))

    @defer.inlineCallbacks
    def test_metrics_labels_stay_bounded(self):
        self.start(AB)
        for i in range(5):
            yield self.get(f"/upstream/A/path-{i}")
        _, body = yield self.get("/metrics")
        lines = [line for line in body.decode().splitlines() if line.startswith("llamaswap_requests_total{")]
        self.assertEqual(len(lines), 1)
        self.assertIn('path="/upstream"', lines[0])

    @defer.inlineCallbacks
    def test_head_on_streams_returns(self):
        self.start(AB)
        for path in ("/api/events", "/logs/stream"):
            response = yield self.request("HEAD", path)
            self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_long_upstream_path_never_stalls(self):
        self.start(AB)
        started = reactor.seconds()
        response, _ = yield self.get("/upstream/B/" + "." * 16000)
        self.assertEqual(response.code, 409)
        self.assertLess(reactor.seconds() - started, 1.0)

    @defer.inlineCallbacks
    def test_stop_drains_requests_in_flight(self):
        self.start(AB)
        yield self.chat("A")
        d = self.post("/v1/chat/completions?wait=1s", {"model": "A"})
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("A") == 1)
        yield self.service.stopService()
        response, body = yield d
        self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "A"))
