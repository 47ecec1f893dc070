"""Logs, live events and the in-flight table."""

from __future__ import annotations

import base64
import io
import json
import sys

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed
from twisted.web.test.requesthelper import DummyRequest

from llamaswap.logs import LogHub, format_time
from llamaswap.server.streams import BoundedStream, dropped_marker

from .test_e2e import AB, Harness, responder


class LogHubTests(SynchronousTestCase):
    def hub(self, mode):
        out = io.BytesIO()
        hub = LogHub(mode, stdout=out)
        hub.proxy.write(b"proxy line\n")
        hub.upstream.write(b"upstream line\n")
        return out.getvalue(), hub

    def test_routing(self):
        self.assertEqual(self.hub("proxy")[0], b"proxy line\n")
        self.assertEqual(self.hub("upstream")[0], b"upstream line\n")
        self.assertEqual(self.hub("both")[0], b"proxy line\nupstream line\n")
        out, hub = self.hub("none")
        self.assertEqual(out, b"")
        self.assertEqual(hub.proxy.history(), b"proxy line\n")  # histories are always kept
        self.assertEqual(hub.upstream.history(), b"upstream line\n")

    def test_level_and_format(self):
        hub = LogHub("proxy", level="warn")
        from twisted.logger import LogLevel

        hub({"log_format": "quiet", "log_level": LogLevel.info, "log_time": 0})
        hub({"log_format": "loud {x}", "x": 1, "log_level": LogLevel.error, "log_time": 0})
        self.assertEqual(hub.proxy.history(), b"[ERROR] loud 1\n")
        self.assertRegex(format_time("rfc3339", 0), r"^19(69|70)-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$")
        self.assertEqual(format_time("", 0), "")


class BoundedStreamTests(SynchronousTestCase):
    def test_slow_reader_is_bounded(self):
        request = DummyRequest([b""])
        request.registerProducer = lambda producer, streaming: None
        stream = BoundedStream(request, max_bytes=10, marker=dropped_marker)
        stream.write(b"12345")
        stream.pauseProducing()
        stream.write(b"abcde")
        stream.write(b"fghij")
        stream.write(b"klmno")  # over the bound: dropped
        self.assertEqual(stream.buffered, 10)
        stream.resumeProducing()
        self.assertEqual(b"".join(request.written), b"12345abcdefghij\n\xe2\x80\x94 5 bytes dropped \xe2\x80\x94\n")


class _Lines(Protocol):
    def __init__(self):
        self.data = b""
        self.changed = None

    def dataReceived(self, data):
        self.data += data


class EndpointTests(Harness):
    @defer.inlineCallbacks
    def open_stream(self, path):
        response = yield treq.get(self.base + path, pool=self.pool, unbuffered=True)
        collector = _Lines()
        response.deliverBody(collector)
        return response, collector

    @defer.inlineCallbacks
    def test_logs(self):
        self.start(AB)
        yield self.chat("A")
        response, body = yield self.get("/logs")
        self.assertEqual(response.code, 200)
        response = yield self.request("GET", "/logs", headers={"Accept": "text/html"}, allow_redirects=False)
        self.assertEqual((response.code, response.headers.getRawHeaders("location")), (302, ["/ui/"]))
        yield response.content()
        response, collector = yield self.open_stream("/logs/stream/a1")  # an alias
        yield self.wait_for(lambda: b"listening on" in collector.data)
        response, quiet = yield self.open_stream("/logs/stream/A?no-history")
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(quiet.data, b"")
        yield self.post("/upstream/A/anything", {"model": "A"})  # the responder logs nothing (--silent)...
        self.runtime.processes["A"].logmon.write(b"live line\n")  # ...so write a line the way output arrives
        yield self.wait_for(lambda: quiet.data == b"live line\n")
        response, body = yield self.get("/logs/stream/nope")
        self.assertEqual(response.code, 400)
        self.assertIn(b"invalid logger", body)

    @defer.inlineCallbacks
    def test_events(self):
        self.start(AB)
        response, collector = yield self.open_stream("/api/events")
        self.assertEqual(response.headers.getRawHeaders("x-accel-buffering"), ["no"])

        def messages():
            out = []
            for frame in collector.data.split(b"\n\n"):
                if frame.startswith(b"event:message\ndata:"):
                    envelope = json.loads(frame[len(b"event:message\ndata:"):])
                    out.append((envelope["type"], json.loads(envelope["data"])))
            return out

        yield self.wait_for(lambda: len(messages()) >= 6)
        kinds = [k for k, _ in messages()[:6]]
        self.assertEqual(kinds, ["logData", "logData", "modelStatus", "uiConfig", "profileChanged", "inflight"])
        self.assertEqual([m["id"] for m in messages()[2][1]], ["A", "B"])
        self.assertEqual(messages()[3][1], {"activity": {"session_id": ["X-Session-ID", "X-Litellm-Session-Id"]}})
        self.assertEqual(messages()[5][1], {"operation": "snapshot"})
        yield self.chat("A")
        states = [{m["id"]: m["state"] for m in data}["A"] for kind, data in messages() if kind == "modelStatus"]
        self.assertIn("starting", states)
        self.assertEqual(states[-1], "ready")
        ops = [data["operation"] for kind, data in messages() if kind == "inflight"]
        self.assertEqual(ops[0], "snapshot")
        self.assertIn("upsert", ops)
        self.assertEqual(ops[-1], "remove")
        upsert = next(data["request"] for kind, data in messages()
                      if kind == "inflight" and data["operation"] == "upsert")
        self.assertEqual((upsert["model"], upsert["req_path"], upsert["method"]), ("A", "/v1/chat/completions", "POST"))

    @defer.inlineCallbacks
    def test_cancel_inflight(self):
        self.start(f"""
            models:
              A: {{cmd: "{responder('--tokens 500 --token-delay 0.02')}"}}
        """)
        yield self.chat("A")
        d = self.post("/v1/chat/completions", {"model": "A", "stream": True})
        d.addErrback(lambda f: f.trap(ResponseFailed))  # the client sees its connection cut
        yield self.wait_for(lambda: self.service.inflight.entries)
        entry_id = next(iter(self.service.inflight.entries))
        response, body = yield self.post(f"/api/inflight/{entry_id}/cancel", {})
        self.assertEqual(json.loads(body), {"msg": "ok"})
        yield d
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("A") == 0)
        response, body = yield self.post("/api/inflight/999/cancel", {})
        self.assertEqual((response.code, json.loads(body)["error"]["message"]), (404, "inflight request not found"))


class ActivityEndpointTests(Harness):
    @defer.inlineCallbacks
    def rows(self, n):
        yield self.wait_for(lambda: self.get("/api/metrics/activity").addCallback(
            lambda rb: len(json.loads(rb[1])["data"]) >= n))
        _, body = yield self.get("/api/metrics/activity?sort=id&order=asc")
        return json.loads(body)["data"]

    @defer.inlineCallbacks
    def test_rows_match_upstream_timings(self):
        self.start(AB)
        response, body = yield self.post("/v1/chat/completions", {"model": "A"},
                                         headers={"Authorization": "Bearer secret"})
        upstream = json.loads(body)
        response, stream_body = yield self.post("/v1/chat/completions", {"model": "A", "stream": True})
        last = [json.loads(line[6:]) for line in stream_body.decode().split("\n")
                if line.startswith("data: {") and "timings" in line][-1]
        plain, streamed = yield self.rows(2)
        for row, timings in ((plain, upstream["timings"]), (streamed, last["timings"])):
            self.assertEqual((row["model"], row["req_path"], row["resp_status_code"]),
                             ("A", "/v1/chat/completions", 200))
            self.assertEqual(row["tokens"]["input_tokens"], timings["prompt_n"])
            self.assertEqual(row["tokens"]["output_tokens"], timings["predicted_n"])
            self.assertAlmostEqual(row["tokens"]["tokens_per_second"], timings["predicted_per_second"])
            self.assertAlmostEqual(row["tokens"]["prompt_per_second"], timings["prompt_per_second"])
            self.assertGreaterEqual(row["duration_ms"], int(timings["prompt_ms"] + timings["predicted_ms"]))
            self.assertTrue(row["has_capture"])
        self.assertIn("text/event-stream", streamed["resp_content_type"])
        _, body = yield self.get(f"/api/captures/{plain['id']}")
        capture = json.loads(body)
        self.assertEqual(json.loads(base64.b64decode(capture["req_body"])), {"model": "A"})
        self.assertEqual(capture["req_headers"]["Authorization"], "[REDACTED]")
        self.assertEqual(json.loads(base64.b64decode(capture["resp_body"]))["responseMessage"], "A")
        response, _ = yield self.get("/api/captures/abc")
        self.assertEqual(response.code, 400)
        response, _ = yield self.get("/api/captures/99999")
        self.assertEqual(response.code, 404)
        _, body = yield self.get("/api/metrics/stats")
        stats = json.loads(body)
        self.assertEqual(stats["total_requests"], 2)
        self.assertEqual(stats["total_input_tokens"], 50)
        response, body = yield self.get("/api/metrics/activity?limit=0")
        self.assertEqual((response.code, json.loads(body)["error"]["message"]),
                         (400, "limit must be between 1 and 999"))
        _, body = yield self.get("/api/captures")
        self.assertEqual(json.loads(body)["count"], 2)

    @defer.inlineCallbacks
    def test_errors_are_recorded(self):
        self.start(f"""
            models:
              bad: {{cmd: "{sys.executable} -c 'import sys; sys.exit(1)'", proxy: "http://127.0.0.1:1"}}
        """)
        response, _ = yield self.chat("bad")
        self.assertEqual(response.code, 500)
        (row,) = yield self.rows(1)
        self.assertEqual(row["resp_status_code"], 500)
        self.assertIn("upstream command exited prematurely", row["error_msg"])

    @defer.inlineCallbacks
    def test_activity_event(self):
        self.start(AB)
        seen = []
        self.service.events.subscribe(lambda kind, data: seen.append(data) if kind == "activity" else None)
        yield self.chat("A")
        yield self.wait_for(lambda: seen)
        self.assertEqual(seen, [{"id": 1}])


class PrometheusTests(Harness):
    @defer.inlineCallbacks
    def test_metrics_after_requests(self):
        from prometheus_client.parser import text_string_to_metric_families

        self.start(AB)
        for model in "ABA":
            yield self.chat(model)
        yield self.post("/v1/chat/completions", {"model": "A", "stream": True})
        yield self.wait_for(lambda: self.get("/api/metrics/activity").addCallback(
            lambda rb: len(json.loads(rb[1])["data"]) >= 4))
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn("text/plain; version=0.0.4", response.headers.getRawHeaders("content-type")[0])
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}

        def value(family, suffix="", **labels):
            return sum(s.value for s in families[family].samples
                       if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()))

        self.assertEqual(value("llamaswap_requests", "_total", model="A", status="200"), 3)
        self.assertEqual(value("llamaswap_requests", "_total", model="B"), 1)
        self.assertEqual(value("llamaswap_model_loads", "_total", model="A"), 2)
        self.assertEqual(value("llamaswap_model_loads", "_total", model="B"), 1)
        self.assertEqual(value("llamaswap_swaps", "_total"), 3)
        self.assertEqual(value("llamaswap_tokens", "_total", model="A", kind="input"), 75)
        self.assertEqual(value("llamaswap_tokens", "_total", model="A", kind="output"), 30)
        self.assertEqual(value("llamaswap_request_duration_seconds", "_count", model="A"), 3)
        self.assertEqual(value("llamaswap_time_to_first_byte_seconds", "_count", model="B"), 1)
        self.assertEqual(value("llamaswap_model_load_duration_seconds", "_count", model="A"), 2)
        self.assertEqual(value("llamaswap_queue_wait_seconds", "_count", model="A"), 3)
        self.assertEqual(value("llamaswap_model_state", model="A", state="ready"), 1)
        self.assertEqual(value("llamaswap_model_state", model="B", state="stopped"), 1)
        self.assertEqual(value("llamaswap_queue_depth", model="A"), 0)
        self.assertEqual(value("llamaswap_inflight_requests", model="A"), 0)

    @defer.inlineCallbacks
    def test_performance_api(self):
        self.start(AB)
        response, body = yield self.get("/api/performance")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body), {"enabled": True, "sys_stats": [], "gpu_stats": []})
        response, body = yield self.get("/api/performance?after=yesterday")
        self.assertEqual((response.code, json.loads(body)["error"]["message"]),
                         (400, "invalid 'after' timestamp, use RFC3339 format"))
        response, body = yield self.get("/api/performance?after=2026-01-01T00:00:00Z")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_disabled(self):
        self.start(AB + "    performance: {disabled: true}\n")
        response, body = yield self.get("/api/performance")
        self.assertEqual((response.code, json.loads(body)), (503, {"enabled": False}))
        response, body = yield self.get("/metrics")
        self.assertEqual((response.code, body), (503, b"# performance monitor not available\n"))
