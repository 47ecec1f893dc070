"""End to end against a real llama-server: llamaswap in-process, two tiny models.

The llama-server binary is looked for in ``$LLAMASWAP_LLAMA_SERVER``, then in
``scripts/build-llama-server.sh``'s default cache
(``${XDG_CACHE_HOME:-~/.cache}/llamaswap/llama-server-*/bin/llama-server``),
then on ``PATH``; without one the suite is skipped.  The models are random
weight llama GGUFs written by ``scripts/make_tiny_gguf.py`` (once per class),
with the real tokenizer of a vocabulary file from the same llama.cpp tree.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import psutil
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ProcessProtocol
from twisted.web.client import HTTPConnectionPool

from llamaswap.httpclient import upstream_agent
from llamaswap.process.process import http_status
from tests.test_e2e import Harness, free_port, pid_alive

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_tiny_gguf", ROOT / "scripts" / "make_tiny_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _load_generator()

HOW = ("set LLAMASWAP_LLAMA_SERVER, run scripts/build-llama-server.sh "
       "(default cache ${XDG_CACHE_HOME:-~/.cache}/llamaswap), or put llama-server on PATH")


def find_llama_server() -> tuple[str | None, str | None]:
    """(binary, None) or (None, why not)."""
    env = os.environ.get("LLAMASWAP_LLAMA_SERVER")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env, None
        return None, f"LLAMASWAP_LLAMA_SERVER={env!r} is not an executable file"
    for build in tiny.cached_builds():
        return os.path.join(build, "bin", "llama-server"), None
    found = shutil.which("llama-server")
    if found:
        return found, None
    return None, f"no llama-server binary found: {HOW}"


def check_environment() -> tuple[str | None, str | None]:
    binary, why = find_llama_server()
    if binary is None:
        return None, why
    try:
        subprocess.run([binary, "--version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{binary} --version failed ({e}): {HOW}"
    if tiny.find_vocab(binary) is None:
        return None, (f"no {tiny.VOCAB_NAME} beside {binary} (expected in <build>/models/, as "
                      f"scripts/build-llama-server.sh leaves it) nor in LLAMASWAP_GGUF_VOCAB")
    try:
        tiny.import_gguf(llama_server=binary)
    except ImportError as e:
        return None, f"the gguf package is not importable ({e}): pip install gguf"
    return binary, None


LLAMA_SERVER, SKIP_REASON = check_environment()

# small enough that a 2-layer, n_embd 64 model answers in well under a second
PROMPT = [{"role": "user", "content": "Hello there, who are you?"}]
CHAT = {"messages": PROMPT, "max_tokens": 8}


def make_models() -> dict[str, str]:
    directory = tempfile.mkdtemp(prefix="llamaswap-tiny-gguf-")
    atexit.register(shutil.rmtree, directory, True)
    models = {}
    for seed, name in ((1, "one"), (2, "two")):
        models[name] = tiny.make_tiny_gguf(os.path.join(directory, f"{name}.gguf"), seed=seed,
                                           llama_server=LLAMA_SERVER, name=f"tiny-{name}")
    return models


def sse_data(body: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    out = []
    for line in body.decode("utf-8").splitlines():
        if line.startswith("data:"):
            out.append(line[5:].strip())
    return out


class _Ended(ProcessProtocol):
    """Discards a child's output; ``ended`` fires when it is gone."""

    def __init__(self) -> None:
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


class LlamaServerTests(Harness):
    timeout = 120
    if SKIP_REASON:
        skip = SKIP_REASON

    models: dict[str, str] | None = None  # generated once for the class

    def setUp(self):
        cls = type(self)
        if cls.models is None:
            cls.models = make_models()
        # registered before start(), so it runs after the service has stopped
        self.addCleanup(self.assert_no_llama_server)

    def llama_servers(self) -> list[int]:
        """pids of live processes serving one of this class's models."""
        paths = set(self.models.values())
        pids = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if paths.intersection(proc.info["cmdline"] or ()):
                pids.append(proc.info["pid"])
        return pids

    @defer.inlineCallbacks
    def assert_no_llama_server(self):
        try:
            yield self.wait_for(lambda: not self.llama_servers(), timeout=10)
        except self.failureException:
            left = self.llama_servers()
            for pid in left:  # do not leak them into the next test
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            self.fail(f"llama-server processes left running: {left}")

    def command(self, name: str) -> str:
        return (f"{shlex.quote(LLAMA_SERVER)} --port ${{PORT}} -m {shlex.quote(self.models[name])}"
                f" -c 256 -t 1 --host 127.0.0.1")

    def start_models(self, **extra: dict):
        lines = ["healthCheckTimeout: 60", "models:"]
        for name in ("one", "two"):
            entry = {"cmd": self.command(name), "proxy": "http://127.0.0.1:${PORT}"}
            entry.update(extra.get(name, {}))
            lines.append(f"  {name}: {json.dumps(entry)}")
        return self.start("\n".join(lines) + "\n")

    def assert_timings(self, timings: dict):
        for key in ("prompt_n", "predicted_n", "prompt_per_second", "predicted_per_second"):
            self.assertIn(key, timings)
        self.assertGreater(timings["prompt_n"], 0)
        self.assertGreater(timings["predicted_n"], 0)

    @defer.inlineCallbacks
    def rows(self, n: int):
        yield self.wait_for(lambda: self.get("/api/metrics/activity").addCallback(
            lambda rb: len(json.loads(rb[1])["data"]) >= n), timeout=20)
        _, body = yield self.get("/api/metrics/activity?sort=id&order=asc")
        return json.loads(body)["data"]

    # -- tests -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_swap_between_models(self):
        self.start_models()
        response, body = yield self.chat("one", **CHAT)
        self.assertEqual(response.code, 200, body)
        reply = json.loads(body)
        self.assertEqual(reply["object"], "chat.completion")
        self.assertIsInstance(reply["choices"][0]["message"]["content"], str)
        self.assert_timings(reply["timings"])
        pid_one = self.runtime.processes["one"].pid
        self.assertEqual((yield self.running()), {"one": "ready"})

        # llama-server's own /completion endpoint, on the other model
        response, body = yield self.post("/completion", {"model": "two", "prompt": "Once upon a time",
                                                         "n_predict": 8})
        self.assertEqual(response.code, 200, body)
        reply = json.loads(body)
        self.assertIsInstance(reply["content"], str)
        self.assert_timings(reply["timings"])
        self.assertEqual((yield self.running()), {"two": "ready"})
        self.assertFalse(pid_alive(pid_one))
        self.assertNotIn(pid_one, self.llama_servers())
        self.assertEqual(self.llama_servers(), [self.runtime.processes["two"].pid])

    @defer.inlineCallbacks
    def test_streaming_chat(self):
        self.start_models()
        response, body = yield self.post("/v1/chat/completions", dict(CHAT, model="one", stream=True))
        self.assertEqual(response.code, 200, body)
        self.assertIn("text/event-stream", response.headers.getRawHeaders("content-type")[0])
        events = sse_data(body)
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertTrue(chunks)
        self.assertTrue(all(c["object"] == "chat.completion.chunk" for c in chunks))
        self.assertTrue(any(c["choices"] and "delta" in c["choices"][0] for c in chunks))
        self.assert_timings([c for c in chunks if "timings" in c][-1]["timings"])

    @defer.inlineCallbacks
    def test_activity_rows_match_timings(self):
        self.start_models()
        response, body = yield self.chat("one", **CHAT)
        self.assertEqual(response.code, 200, body)
        plain_timings = json.loads(body)["timings"]
        response, body = yield self.post("/v1/chat/completions", dict(CHAT, model="one", stream=True))
        self.assertEqual(response.code, 200, body)
        chunks = [json.loads(e) for e in sse_data(body) if e.startswith("{")]
        stream_timings = [c for c in chunks if "timings" in c][-1]["timings"]
        plain, streamed = yield self.rows(2)
        for row, timings in ((plain, plain_timings), (streamed, stream_timings)):
            self.assertEqual((row["model"], row["req_path"], row["resp_status_code"]),
                             ("one", "/v1/chat/completions", 200))
            tokens = row["tokens"]
            self.assertEqual(tokens["input_tokens"], timings["prompt_n"])
            self.assertEqual(tokens["output_tokens"], timings["predicted_n"])
            self.assertAlmostEqual(tokens["prompt_per_second"], timings["prompt_per_second"])
            self.assertAlmostEqual(tokens["tokens_per_second"], timings["predicted_per_second"])
        self.assertIn("text/event-stream", streamed["resp_content_type"])

    @defer.inlineCallbacks
    def test_upstream_props(self):
        self.start_models()
        response, body = yield self.get("/upstream/one/props")
        self.assertEqual(response.code, 200, body)
        self.assertIn("application/json", response.headers.getRawHeaders("content-type")[0])
        props = json.loads(body)
        self.assertEqual(os.path.basename(props["model_path"]), "one.gguf")
        self.assertIn("default_generation_settings", props)
        self.assertEqual((yield self.running()), {"one": "ready"})

    @defer.inlineCallbacks
    def test_unload(self):
        self.start_models()
        response, body = yield self.chat("one", **CHAT)
        self.assertEqual(response.code, 200, body)
        pid = self.runtime.processes["one"].pid
        self.assertTrue(pid_alive(pid))
        response, body = yield self.post("/api/models/unload", {})
        self.assertEqual((response.code, json.loads(body)), (200, {"msg": "ok"}))
        self.assertEqual((yield self.running()), {})
        self.assertFalse(pid_alive(pid))
        self.assertEqual(self.llama_servers(), [])

    @defer.inlineCallbacks
    def test_ttl(self):
        self.start_models(one={"ttl": 2})
        response, body = yield self.chat("one", **CHAT)
        self.assertEqual(response.code, 200, body)
        answered = reactor.seconds()
        pid = self.runtime.processes["one"].pid
        self.assertEqual((yield self.running()), {"one": "ready"})
        yield self.wait_for(lambda: self.running().addCallback(lambda r: r == {}), timeout=8)
        waited = reactor.seconds() - answered
        self.assertGreater(waited, 1.5)  # not before the TTL
        self.assertLess(waited, 4.5)     # ttl 2 s, plus the checker's period and the stop
        self.assertFalse(pid_alive(pid))

    @defer.inlineCallbacks
    def own_start(self, name: str) -> float:
        """llama-server's own exec-to-healthy time: exec'd directly (no
        llamaswap, no launcher), ``GET /health`` polled every millisecond."""
        port = free_port()
        argv = shlex.split(self.command(name).replace("${PORT}", str(port)))
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = upstream_agent(reactor, pool, 1.0)
        proto = _Ended()
        started = reactor.seconds()
        child = reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ))
        try:
            deadline = started + 30
            while reactor.seconds() < deadline:
                try:
                    if (yield http_status(reactor, agent, f"http://127.0.0.1:{port}/health", 1.0)) == 200:
                        return reactor.seconds() - started
                except Exception:
                    pass  # not listening yet
                yield task.deferLater(reactor, 0.001, lambda: None)
            self.fail("llama-server not healthy within 30 s")
        finally:
            child.signalProcess("KILL")
            yield proto.ended

    @defer.inlineCallbacks
    def cold_first_byte(self, model: str) -> float:
        """Unload everything, then the time from sending a streaming chat
        request for ``model`` to its first byte (the answer's head)."""
        response, _ = yield self.post("/api/models/unload", {})
        self.assertEqual(response.code, 200)
        yield task.deferLater(reactor, 0.2, lambda: None)  # let the stopped server's exit settle
        started = reactor.seconds()
        response = yield self.request("POST", "/v1/chat/completions", unbuffered=True,
                                      data=json.dumps(dict(CHAT, model=model, max_tokens=1, stream=True)).encode(),
                                      headers={"Content-Type": "application/json"})
        first = reactor.seconds() - started
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(sse_data(body)[-1], "[DONE]")
        return first

    @defer.inlineCallbacks
    def test_cold_start_first_byte(self):
        """A request for a stopped model gets its first byte within the
        upstream's own exec-to-healthy time plus 150 ms (the target is 30 ms;
        the slack is for a loaded CI machine), both measured here, in turn."""
        self.start_models()
        yield self.cold_first_byte("one")  # warm: page cache, lazy imports
        own, cold = [], []
        for _ in range(5):
            own.append((yield self.own_start("one")))
            cold.append((yield self.cold_first_byte("one")))
        added = statistics.median(cold) - statistics.median(own)
        print(f"\n    exec to healthy {', '.join(f'{t * 1000:.0f}' for t in own)} ms;"
              f" cold request to first byte {', '.join(f'{t * 1000:.0f}' for t in cold)} ms;"
              f" added {added * 1000:+.0f} ms (median)", end=" ")
        self.assertLess(added, 0.150)
