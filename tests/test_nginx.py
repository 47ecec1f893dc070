"""llamaswap behind a real nginx running the README's site block.

Each test starts llamaswap in-process (``Harness``) with fake upstream models,
and an nginx child (``daemon off; master_process off``, every file it writes
inside the test's temp dir) whose ``server`` block is ``examples/nginx.conf``
with only the ``listen`` address and the ``proxy_pass`` target changed.  The
nginx tests skip when there is no nginx binary (``.ci/run`` installs
nginx-light); the README check always runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import textwrap
import uuid
from pathlib import Path

from treq.client import HTTPClient
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from .test_e2e import Harness, free_port, responder

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "nginx.conf"
README = ROOT / "README.rst"
MiB = 1 << 20


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


NGINX = find_nginx()
NO_NGINX = None if NGINX else "no nginx binary (neither on PATH nor /usr/sbin/nginx); .ci/run installs nginx-light"


def readme_block() -> str:
    """The literal block of README.rst's "Behind nginx" section, dedented."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\nBehind nginx\n============\n", 1)[1]
    rest = section.split("::\n\n", 1)[1]
    lines = []
    for line in rest.splitlines():
        if line.strip() and not line.startswith(" "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines)).strip()


def site_block(listen_port: int, upstream: str) -> str:
    """examples/nginx.conf with our listen address and proxy_pass target."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text, listens = re.subn(r"(?m)^(\s*listen\s+)[^;]+;", rf"\g<1>127.0.0.1:{listen_port};", text)
    text, passes = re.subn(r"(?m)^(\s*proxy_pass\s+)[^;]+;", rf"\g<1>{upstream};", text)
    if (listens, passes) != (1, 1):
        raise ValueError(f"examples/nginx.conf: expected one listen and one proxy_pass, got {listens}, {passes}")
    return text


def nginx_conf(tmp: Path, site: str) -> str:
    temps = "\n".join(f"    {kind}_temp_path {tmp}/{kind}_temp;"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"error_log {tmp}/error.log info;\npid {tmp}/nginx.pid;\n"
            f"events {{ worker_connections 128; }}\n"
            f"http {{\n    access_log {tmp}/access.log;\n{temps}\n"
            + textwrap.indent(site, "    ") + "}\n")


class _Nginx(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ended = False
        self._waiters: list = []

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def when_ended(self) -> defer.Deferred:
        if self.ended:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d


@implementer(IAgentEndpointFactory)
class _From:
    """Agent endpoints that connect from a chosen loopback address."""

    def __init__(self, source: str):
        self.source = source

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(reactor, uri.host.decode(), uri.port, timeout=5, bindAddress=(self.source, 0))


class _Filler:
    """A file-like body of ``size`` bytes, ``prefix + "x"... + suffix``, made as it is read."""

    def __init__(self, prefix: bytes, size: int, suffix: bytes):
        self.prefix, self.size, self.suffix = prefix, size, suffix
        self.pos = 0
        self.x = b"x" * (1 << 16)

    def seek(self, offset, whence=os.SEEK_SET):
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        end = self.size if n < 0 else min(self.size, self.pos + n)
        out = []
        pos, filler_end = self.pos, self.size - len(self.suffix)
        while pos < end:
            if pos < len(self.prefix):
                piece = self.prefix[pos:end]
            elif pos < filler_end:
                piece = self.x[:min(end, filler_end) - pos]
            else:
                piece = self.suffix[pos - filler_end:end - filler_end]
            out.append(piece)
            pos += len(piece)
        self.pos = end
        return b"".join(out)

    def close(self):
        pass


class _Unsized:
    """A body whose length the client does not know: sent chunked."""

    def __init__(self, body: _Filler):
        self.read, self.close = body.read, body.close


def json_body(size: int, model: str = "A", unsized: bool = False) -> FileBodyProducer:
    """An embeddings request of exactly ``size`` bytes, never held in memory whole."""
    body = _Filler(b'{"model": "%s", "input": "' % model.encode(), size, b'"}')
    return FileBodyProducer(_Unsized(body) if unsized else body)


class _Collect(protocol.Protocol):
    """A response body with the arrival time of each SSE event (blank-line framed)."""

    def __init__(self):
        self.data = b""
        self.events: list = []
        self.first = None
        self.finished = False
        self.done = defer.Deferred()
        self._pending = b""

    def dataReceived(self, data):
        now = reactor.seconds()
        if self.first is None:
            self.first = now
        self.data += data
        self._pending += data
        while b"\n\n" in self._pending:
            event, self._pending = self._pending.split(b"\n\n", 1)
            self.events.append((now, event))

    def connectionLost(self, reason):
        self.finished = True
        self.done.callback(None)


class _RawUpload(protocol.Protocol):
    """Request head plus the first piece of a body; collects what comes back."""

    def __init__(self, head: bytes, first: bytes):
        self.head, self.first = head, first
        self.data = b""
        self.lost = False

    def connectionMade(self):
        self.transport.write(self.head + self.first)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True


def bounded(d: defer.Deferred, seconds: float) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


class NginxHarness(Harness):
    skip = NO_NGINX
    timeout = 40

    @defer.inlineCallbacks
    def start_nginx(self):
        """Start nginx in front of the started service; sets ``self.front``."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir(parents=True)
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, site_block(port, self.base)))
        nginx = _Nginx()
        argv = [NGINX, "-p", f"{tmp}/", "-c", str(conf), "-g", "daemon off; master_process off;"]
        transport = reactor.spawnProcess(nginx, NGINX, argv, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                         path=str(tmp))
        self.addCleanup(self.stop_nginx, nginx, transport)
        self.nginx_dir = tmp
        self.front = f"http://127.0.0.1:{port}"
        for _ in range(200):
            if nginx.ended or port_open(port):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        if nginx.ended or not port_open(port):
            log = (tmp / "error.log").read_bytes() if (tmp / "error.log").exists() else b""
            self.fail(f"nginx did not start: {nginx.output!r} {log[-2000:]!r}")

    @defer.inlineCallbacks
    def stop_nginx(self, nginx: _Nginx, transport):
        """TERM (a QUIT would wait for open streams), KILL after 5 s; bounded."""
        if nginx.ended:
            return
        ended = nginx.when_ended()
        for sig, grace in (("TERM", 5), ("KILL", 5)):
            try:
                transport.signalProcess(sig)
            except error.ProcessExitedAlready:
                break
            try:
                yield bounded(nginx.when_ended(), grace)
                break
            except defer.TimeoutError:
                continue
        yield bounded(ended, 1)

    def via(self, method, path, source="127.0.0.1", front=True, **kw):
        """A request through nginx (``front=False``: straight to llamaswap) from ``source``."""
        agent = Agent.usingEndpointFactory(reactor, _From(source), pool=self.pool)
        kw.setdefault("timeout", 20)
        return HTTPClient(agent).request(method, (self.front if front else self.base) + path, **kw)

    @defer.inlineCallbacks
    def fetch(self, method, path, obj=None, **kw):
        """(response, body) of a request; ``obj`` is sent as JSON."""
        if obj is not None:
            kw["data"] = json.dumps(obj).encode()
            kw.setdefault("headers", {}).setdefault("Content-Type", "application/json")
        response = yield self.via(method, path, **kw)
        body = yield bounded(response.content(), 30)
        return response, body

    @defer.inlineCallbacks
    def open_stream(self, path, **kw):
        response = yield self.via("GET", path, unbuffered=True, **kw)
        collector = _Collect()
        response.deliverBody(collector)
        self.addCleanup(self.close_stream, collector)
        return response, collector

    def close_stream(self, collector: _Collect):
        if not collector.finished and collector.transport is not None:
            collector.transport.stopProducing()
        return bounded(collector.done, 5) if not collector.done.called else None

    def access_line(self, marker: str) -> str | None:
        """The access log line of the request with User-Agent ``marker``."""
        for line in self.service.hub.proxy.history().decode("utf-8", "replace").splitlines():
            if marker in line and "Request " in line:
                return line[line.index("Request "):]
        return None

    @defer.inlineCallbacks
    def activity(self, n):
        yield self.wait_for(lambda: self.fetch("GET", "/api/metrics/activity", front=False).addCallback(
            lambda rb: len(json.loads(rb[1])["data"]) >= n))
        _, body = yield self.fetch("GET", "/api/metrics/activity?sort=id&order=asc", front=False)
        return json.loads(body)["data"]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


BOTH = f"""
    healthCheckTimeout: 15
    models:
      A: {{cmd: "{responder('--respond A')}"}}
      B: {{cmd: "{responder('--respond B')}"}}
    groups:
      both: {{swap: false, exclusive: false, members: [A, B]}}
"""

# (method, path, how the model is named): model-dispatched routes, README "HTTP API"
ROUTES = [
    ("POST", "/v1/chat/completions", "json"), ("POST", "/v1/completions", "json"),
    ("POST", "/v1/responses", "json"), ("POST", "/v1/messages", "json"),
    ("POST", "/v1/messages/count_tokens", "json"), ("POST", "/v1/embeddings", "json"),
    ("POST", "/rerank", "json"), ("POST", "/reranking", "json"), ("POST", "/v1/rerank", "json"),
    ("POST", "/v1/reranking", "json"), ("POST", "/infill", "json"), ("POST", "/completion", "json"),
    ("POST", "/v1/audio/speech", "json"), ("GET", "/v1/audio/voices", "query"),
    ("POST", "/v1/audio/transcriptions", "form"), ("POST", "/v1/images/generations", "json"),
    ("POST", "/v1/images/edits", "form"), ("POST", "/sdapi/v1/txt2img", "json"),
    ("POST", "/sdapi/v1/img2img", "json"), ("GET", "/sdapi/v1/loras", "query"), ("GET", "/props", "query"),
    ("POST", "/audioapi/v1/tasks/run", "json"), ("POST", "/v/chat/completions", "json"),
    ("POST", "/v/embeddings", "json"), ("GET", "/upstream/{model}/test", "path"),
]


class ExampleTests(SynchronousTestCase):
    def test_readme_block_is_the_example(self):
        self.assertEqual(readme_block(), EXAMPLE.read_text(encoding="utf-8").strip())

    def test_site_block_changes_only_address_and_upstream(self):
        site = site_block(1234, "http://127.0.0.1:5678")
        self.assertIn("listen 127.0.0.1:1234;", site)
        self.assertIn("proxy_pass http://127.0.0.1:5678;", site)
        original = EXAMPLE.read_text(encoding="utf-8").splitlines()
        changed = [(a, b) for a, b in zip(original, site.splitlines()) if a != b]
        self.assertEqual(len(changed), 2)


class RouteTests(NginxHarness):
    @defer.inlineCallbacks
    def counts(self):
        out = {}
        for model in "AB":
            _, body = yield self.fetch("GET", f"/upstream/{model}/__responder/stats", front=False)
            out[model] = json.loads(body)["requests"]
        return out

    def send(self, method, path, kind, model, front):
        if kind == "path":
            return self.fetch(method, path.format(model=model), front=front)
        if kind == "query":
            return self.fetch(method, f"{path}?model={model}", front=front)
        if kind == "form":
            return self.fetch(method, path, data={"model": model}, files={"file": ("a.wav", b"12345")}, front=front)
        obj = {"model": model, "messages": [], "prompt": "hi", "input": "hi"}
        return self.fetch(method, path, obj, front=front)

    @defer.inlineCallbacks
    def test_routes_answer_as_directly(self):
        self.start(BOTH)
        yield self.start_nginx()
        for model in "AB":
            response, body = yield self.fetch("POST", "/v1/chat/completions", {"model": model, "messages": []})
            self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, model))
        for method, path, kind in ROUTES:
            for model in "BA":
                before = yield self.counts()
                response, body = yield self.send(method, path, kind, model, front=True)
                after = yield self.counts()
                where = f"{method} {path} for {model} via nginx"
                self.assertEqual(response.code, 200, f"{where}: {body[:300]!r}")
                self.assertEqual({m: after[m] - before[m] for m in "AB"},
                                 {m: int(m == model) for m in "AB"}, where)
                direct, direct_body = yield self.send(method, path, kind, model, front=False)
                self.assertEqual(direct.code, response.code, where)
                self.assertEqual(direct.headers.getRawHeaders("content-type"),
                                 response.headers.getRawHeaders("content-type"), where)
                if response.headers.getRawHeaders("content-type") == ["application/json"]:
                    got, expected = json.loads(body), json.loads(direct_body)
                    if isinstance(got, dict):
                        self.assertEqual(sorted(got), sorted(expected), where)
                        self.assertEqual(got.get("model"), expected.get("model"), where)
                        self.assertEqual(got.get("model_id", model), model, where)
                else:
                    self.assertEqual(body, direct_body, where)

        for path in ("/v1/models", "/models", "/running"):
            response, body = yield self.fetch("GET", path)
            direct, direct_body = yield self.fetch("GET", path, front=False)
            self.assertEqual((response.code, json.loads(body)), (200, json.loads(direct_body)), path)
        self.assertEqual({r["model"]: r["state"] for r in json.loads(body)["running"]}, {"A": "ready", "B": "ready"})
        response, body = yield self.fetch("GET", "/health")
        self.assertEqual(response.code, 200)
        response, body = yield self.fetch("GET", "/unload")
        self.assertEqual((response.code, body), (200, b"OK"))
        _, body = yield self.fetch("GET", "/running")
        self.assertEqual(json.loads(body)["running"], [])
        yield self.fetch("POST", "/v1/chat/completions", {"model": "A"})
        response, body = yield self.fetch("POST", "/api/models/unload", {})
        self.assertEqual((response.code, json.loads(body)), (200, {"msg": "ok"}))
        yield self.fetch("POST", "/v1/chat/completions", {"model": "B"})
        response, body = yield self.fetch("POST", "/api/models/unload/B", {})
        self.assertEqual((response.code, body), (200, b"OK"))
        _, body = yield self.fetch("GET", "/running")
        self.assertEqual(json.loads(body)["running"], [])


class StreamingTests(NginxHarness):
    @defer.inlineCallbacks
    def test_tokens_arrive_one_by_one(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--tokens 20 --token-delay 0.05')}"}}
        """)
        yield self.start_nginx()
        response, _ = yield self.fetch("POST", "/v1/chat/completions", {"model": "A", "max_tokens": 1})
        self.assertEqual(response.code, 200)
        response = yield self.via("POST", "/v1/chat/completions", unbuffered=True,
                                  data=json.dumps({"model": "A", "stream": True}).encode(),
                                  headers={"Content-Type": "application/json"})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        collector = _Collect()
        response.deliverBody(collector)
        yield bounded(collector.done, 15)
        tokens = [when for when, event in collector.events
                  if event.startswith(b"data: {") and json.loads(event[6:])["choices"]
                  and json.loads(event[6:])["choices"][0]["delta"].get("content")]
        self.assertEqual(len(tokens), 20)
        self.assertEqual(collector.events[-1][1], b"data: [DONE]")
        span = tokens[-1] - tokens[0]
        distinct = len(set(tokens))
        print(f"\n20 tokens via nginx: spread over {span:.2f}s, {distinct} distinct arrival times")
        self.assertGreater(span, 0.5)  # 19 gaps of 0.05 s: buffering would deliver them at once
        self.assertGreaterEqual(distinct, 10)

    @defer.inlineCallbacks
    def test_event_and_log_streams_are_not_buffered(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder()}"}}
        """)
        yield self.start_nginx()
        streams = {}
        for path in ("/api/events", "/logs/stream"):
            opened = reactor.seconds()
            response, collector = yield self.open_stream(path)
            self.assertEqual(response.code, 200, path)
            yield self.wait_for(lambda: collector.data, timeout=5)
            self.assertLess(collector.first - opened, 1.0, path)
            streams[path] = collector
        events, logs = streams["/api/events"], streams["/logs/stream"]
        marker = f"nginx-stream-{uuid.uuid4().hex}"
        response, _ = yield self.fetch("POST", "/v1/chat/completions", {"model": "A"}, headers={"User-Agent": marker})
        self.assertEqual(response.code, 200)

        def model_states():
            states = []
            for _, frame in events.events:
                if frame.startswith(b"event:message\ndata:"):
                    envelope = json.loads(frame[len(b"event:message\ndata:"):])
                    if envelope["type"] == "modelStatus":
                        states.append({m["id"]: m["state"] for m in json.loads(envelope["data"])}["A"])
            return states

        yield self.wait_for(lambda: "ready" in model_states(), timeout=5)
        self.assertIn("starting", model_states())
        yield self.wait_for(lambda: marker.encode() in logs.data, timeout=5)  # the chat's access log line
        yield self.wait_for(lambda: marker.encode() in events.data, timeout=5)  # ...as logData
        self.assertFalse(events.finished or logs.finished)

    @defer.inlineCallbacks
    def test_client_disconnect_frees_the_model(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--tokens 500 --token-delay 0.02')}"}}
        """)
        yield self.start_nginx()
        yield self.fetch("POST", "/v1/chat/completions", {"model": "A", "max_tokens": 1})
        response = yield self.via("POST", "/v1/chat/completions", unbuffered=True,
                                  data=json.dumps({"model": "A", "stream": True}).encode(),
                                  headers={"Content-Type": "application/json"})
        collector = _Collect()
        response.deliverBody(collector)
        yield self.wait_for(lambda: len(collector.events) >= 3)
        self.assertEqual(self.runtime.router.scheduler.in_flight("A"), 1)
        left = reactor.seconds()
        collector.transport.stopProducing()  # the client goes away mid-stream (10 s of tokens)
        yield bounded(collector.done, 5)
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("A") == 0, timeout=5)

        @defer.inlineCallbacks
        def upstream_saw_it():
            _, body = yield self.fetch("GET", "/upstream/A/__responder/stats", front=False)
            stats = json.loads(body)
            return stats["cancelled"] == 1 and stats["in_flight"] == 0

        yield self.wait_for(upstream_saw_it, timeout=5)
        self.assertLess(reactor.seconds() - left, 5.0)
        response, body = yield self.fetch("POST", "/v1/chat/completions", {"model": "A", "max_tokens": 2})
        self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "A"))


class UploadTests(NginxHarness):
    @defer.inlineCallbacks
    def raw_upload(self, path, size, first):
        """Head with Content-Length ``size`` plus ``first`` body bytes to nginx; the bytes that come back."""
        port = int(self.front.rsplit(":", 1)[1])
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {size}\r\nConnection: close\r\n\r\n").encode()
        upload = yield bounded(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5),
                                               _RawUpload(head, first)), 5)
        try:
            yield self.wait_for(lambda: b"</html>" in upload.data or upload.lost, timeout=5)
        finally:
            upload.transport.abortConnection()
        return upload.data

    @defer.inlineCallbacks
    def test_upload_limits(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder()}"}}
        """)
        yield self.start_nginx()
        started = reactor.seconds()
        response = yield self.via("POST", "/v1/embeddings", data=json_body(60 * MiB),
                                  headers={"Content-Type": "application/json"}, timeout=30)
        body = json.loads((yield bounded(response.content(), 30)))
        print(f"\n60 MiB upload via nginx: {reactor.seconds() - started:.2f}s")
        self.assertEqual((response.code, body["model"], len(body["data"])), (200, "A", 1))
        # streamed through (proxy_request_buffering off), not spooled to nginx's temp dir first
        self.assertNotIn(b"buffered to a temporary file", (self.nginx_dir / "error.log").read_bytes())

        data = yield self.raw_upload("/v1/embeddings", 70 * MiB, b'{"model": "A", "input": "' + b"x" * 65536)
        status, _, rest = data.partition(b"\r\n")
        self.assertEqual(status, b"HTTP/1.1 413 Request Entity Too Large")
        self.assertIn(b"<center>nginx", rest)  # nginx's own page: llamaswap never saw it
        self.assertNotIn(b"llama-swap", rest)

    @defer.inlineCallbacks
    def test_llamaswap_limit_below_nginx(self):
        self.start(f"""
            maxRequestBodyBytes: {MiB}
            models:
              A: {{cmd: "{responder()}"}}
        """)
        yield self.start_nginx()
        for unsized in (False, True):  # Content-Length, then chunked
            response = yield self.via("POST", "/v1/embeddings", data=json_body(2 * MiB, unsized=unsized),
                                      headers={"Content-Type": "application/json"})
            body = yield bounded(response.content(), 10)
            self.assertEqual(response.code, 413, unsized)
            self.assertEqual(json.loads(body)["src"], "llama-swap")
            self.assertEqual(json.loads(body)["error"]["message"], "request body too large")
        response, body = yield self.fetch("POST", "/v1/embeddings", {"model": "A", "input": "x" * 1000})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.starts, ["A"])  # the refused uploads never started the model


class ClientTests(NginxHarness):
    @defer.inlineCallbacks
    def test_api_keys(self):
        self.start(f"""
            apiKeys: [k]
            models:
              A: {{cmd: "{responder()}"}}
        """)
        yield self.start_nginx()
        response, body = yield self.fetch("POST", "/v1/chat/completions", {"model": "A"})
        self.assertEqual(response.code, 401)
        self.assertEqual(json.loads(body)["error"]["type"], "authentication_error")
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Basic realm="llama-swap"'])
        for headers in ({"Authorization": "Bearer k"}, {"x-api-key": "k"}):
            response, body = yield self.fetch("POST", "/v1/chat/completions", {"model": "A"}, headers=headers)
            self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "A"), headers)
        response, _ = yield self.fetch("POST", "/v1/chat/completions", {"model": "A"},
                                       headers={"Authorization": "Bearer wrong"})
        self.assertEqual(response.code, 401)

    @defer.inlineCallbacks
    def test_client_address_through_nginx(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder()}"}}
        """)
        yield self.start_nginx()
        marker = f"nginx-client-{uuid.uuid4().hex}"
        response, body = yield self.fetch("POST", "/v1/chat/completions", {"model": "A"}, source="127.0.0.2",
                                          headers={"User-Agent": marker})
        self.assertEqual(response.code, 200)
        # nginx (from 127.0.0.1) says the client is 127.0.0.2; the model server gets the chain
        self.assertEqual(json.loads(body)["echo"]["headers"]["x-forwarded-for"], "127.0.0.2, 127.0.0.1")
        line = yield self.wait_for(lambda: self.access_line(marker))
        self.assertTrue(line.startswith('Request 127.0.0.2 "POST /v1/chat/completions HTTP/1.1" 200 '), line)
        rows = yield self.activity(1)
        self.assertEqual([r.get("remote_ip") for r in rows], ["127.0.0.2"])

    @defer.inlineCallbacks
    def test_forwarded_for_believed_only_from_trusted_proxies(self):
        self.start(f"""
            trustedProxies: ["127.0.0.1/32"]
            models:
              A: {{cmd: "{responder()}"}}
        """)
        yield self.start_nginx()
        spoofed = {"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.7", "X-Forwarded-Proto": "https"}
        direct = f"nginx-direct-{uuid.uuid4().hex}"
        response, body = yield self.fetch("POST", "/v1/chat/completions", {"model": "A"}, source="127.0.0.2",
                                          front=False, headers=dict(spoofed, **{"User-Agent": direct}))
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["echo"]["headers"]["x-forwarded-for"], "127.0.0.2")
        self.assertEqual(json.loads(body)["echo"]["headers"]["x-forwarded-proto"], "http")  # untrusted claim ignored
        line = yield self.wait_for(lambda: self.access_line(direct))
        self.assertTrue(line.startswith("Request 127.0.0.2 "), line)
        # through nginx the spoofed hop is still in the chain, but the hop nginx added wins
        proxied = f"nginx-proxied-{uuid.uuid4().hex}"
        response, body = yield self.fetch("POST", "/v1/chat/completions", {"model": "A"}, source="127.0.0.2",
                                          headers=dict(spoofed, **{"User-Agent": proxied}))
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["echo"]["headers"]["x-forwarded-for"], "6.6.6.6, 127.0.0.2, 127.0.0.1")
        line = yield self.wait_for(lambda: self.access_line(proxied))
        self.assertTrue(line.startswith("Request 127.0.0.2 "), line)
        rows = yield self.activity(2)
        self.assertEqual([r.get("remote_ip") for r in rows], ["127.0.0.2", "127.0.0.2"])
