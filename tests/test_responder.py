"""
Tests for L{llamaswap.testing.responder}, the fake upstream server.

Most tests run the responder's Site in-process on an ephemeral port and talk
to it with treq; a few spawn it as a real child process to check the command
line, the listening line, exit codes and signal handling.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from llamaswap.testing.responder import (
    EXIT_AFTER_CODE,
    Generation,
    ResponderOptions,
    _Exchange,
    build_site,
    listening_line,
    parse_args,
    parse_duration,
    sse_event,
)

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"^responder (\S+) listening on http://127\.0\.0\.1:(\d+)$")


@inlineCallbacks
def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01):
    """Poll C{predicate} (which may return a Deferred) until it is truthy."""
    deadline = reactor.seconds() + timeout
    while True:
        value = yield maybeDeferred(predicate)
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        yield deferLater(reactor, interval, lambda: None)


def parse_sse(body: bytes) -> list[tuple[str | None, str]]:
    """Split an event stream into (event name, data) pairs."""
    events = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        name, data = None, None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data = value
        assert data is not None, block
        events.append((name, data))
    return events


def sse_json(body: bytes) -> list[Any]:
    """The JSON payloads of an event stream, without C{[DONE]}."""
    return [json.loads(data) for _, data in parse_sse(body) if data != "[DONE]"]


class RawClient(Protocol):
    """A bare TCP client, to disconnect in the middle of a response."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)


class InProcessMixin:
    """Runs a responder Site on 127.0.0.1, port 0, for one test."""

    def start(self, **overrides: Any) -> str:
        options = ResponderOptions(**{"id": "model1", "silent": True, **overrides})
        self.exits: list[int] = []
        site = build_site(options, reactor, on_exit=self.exits.append)
        self.responder = site.responder
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.port = port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self._stop, port, site.responder)
        return f"http://127.0.0.1:{self.port}"

    @inlineCallbacks
    def _stop(self, port: Any, responder: Any):
        yield port.stopListening()
        yield wait_for(lambda: responder.connections == 0)
        # Let the client side of the last connections see them close, too.
        yield deferLater(reactor, 0.01, lambda: None)

    @inlineCallbacks
    def request(self, method: str, path: str, **kwargs: Any):
        """Send a request; returns (response, body bytes)."""
        response = yield treq.request(method, self.url + path, pool=self.pool, **kwargs)
        body = yield treq.content(response)
        return response, body

    @inlineCallbacks
    def post_json(self, path: str, obj: Any, **kwargs: Any):
        """POST C{obj} as JSON; returns (response, body bytes)."""
        result = yield self.request("POST", path, data=json.dumps(obj).encode(), **kwargs)
        return result

    @inlineCallbacks
    def timed_chunks(self, path: str, obj: Any):
        """POST and collect (arrival time, bytes) of every received chunk."""
        response = yield treq.post(self.url + path, data=json.dumps(obj).encode(), pool=self.pool)
        chunks: list[tuple[float, bytes]] = []
        yield treq.collect(response, lambda data: chunks.append((reactor.seconds(), data)))
        return response, chunks

    @inlineCallbacks
    def stats(self):
        response, body = yield self.request("GET", "/__responder/stats")
        self.assertEqual(response.code, 200)
        return json.loads(body)

    def header(self, response: Any, name: str) -> str:
        return response.headers.getRawHeaders(name.encode())[0].decode()


class ResponderEndpointTests(InProcessMixin, TestCase):
    """The HTTP endpoints, served in-process."""

    timeout = 20

    def setUp(self) -> None:
        self.url = self.start()

    def assertJSON(self, response: Any, body: bytes, code: int = 200) -> Any:
        self.assertEqual(response.code, code, body)
        self.assertEqual(self.header(response, "content-type"), "application/json")
        return json.loads(body)

    def assertEventStream(self, response: Any) -> None:
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "content-type"), "text/event-stream")
        self.assertEqual(self.header(response, "cache-control"), "no-cache")

    def assertTimings(self, timings: dict[str, Any], prompt: int, predicted: int) -> None:
        self.assertEqual(timings["prompt_n"], prompt)
        self.assertEqual(timings["predicted_n"], predicted)
        for key in ("prompt_ms", "prompt_per_second", "predicted_ms", "predicted_per_second"):
            self.assertIsInstance(timings[key], float)
        self.assertGreater(timings["prompt_ms"], 0)

    # -- health and stats

    @inlineCallbacks
    def test_health(self):
        response, body = yield self.request("GET", "/health")
        self.assertEqual(self.assertJSON(response, body), {"status": "ok"})

    @inlineCallbacks
    def test_stats_counts_requests(self):
        stats = yield self.stats()
        self.assertEqual(
            stats,
            {"id": "model1", "pid": os.getpid(), "requests": 0, "in_flight": 0, "cancelled": 0, "paused": 0},
        )
        yield self.request("GET", "/health")
        yield self.post_json("/v1/chat/completions", {})
        yield self.request("GET", "/anything")
        stats = yield self.stats()
        self.assertEqual((stats["requests"], stats["in_flight"], stats["cancelled"]), (2, 0, 0))

    # -- chat completions

    @inlineCallbacks
    def test_chat_non_streaming(self):
        payload = {"model": "the-model", "messages": [{"role": "user", "content": "hi"}]}
        raw = json.dumps(payload).encode()
        response, body = yield self.request(
            "POST", "/v1/chat/completions?a=b", data=raw, headers={"X-Custom": "yes"}
        )
        result = self.assertJSON(response, body)
        self.assertEqual(result["object"], "chat.completion")
        self.assertTrue(result["id"].startswith("chatcmpl-"))
        self.assertIsInstance(result["created"], int)
        self.assertEqual(result["model"], "the-model")
        self.assertEqual(result["choices"][0]["message"], {"role": "assistant", "content": "model1"})
        self.assertEqual(result["choices"][0]["finish_reason"], "stop")
        self.assertEqual(
            result["usage"], {"prompt_tokens": 25, "completion_tokens": 10, "total_tokens": 35}
        )
        self.assertTimings(result["timings"], 25, 10)
        self.assertEqual(result["responseMessage"], "model1")
        self.assertEqual(result["h_content_length"], len(raw))
        self.assertEqual(result["request_body"], raw.decode())
        echo = result["echo"]
        self.assertEqual(echo["method"], "POST")
        self.assertEqual(echo["path"], "/v1/chat/completions")
        self.assertEqual(echo["query"], "a=b")
        self.assertEqual(echo["headers"]["x-custom"], "yes")
        self.assertEqual(echo["body"], raw.decode())

    @inlineCallbacks
    def test_chat_default_model_and_respond_text(self):
        self.url = self.start(id="m2", respond="hello there")
        response, body = yield self.post_json("/v1/chat/completions", {})
        result = self.assertJSON(response, body)
        self.assertEqual(result["model"], "m2")
        self.assertEqual(result["choices"][0]["message"]["content"], "hello there")
        self.assertEqual(result["responseMessage"], "hello there")

    @inlineCallbacks
    def test_chat_streaming_body_flag(self):
        response, body = yield self.post_json(
            "/v1/chat/completions", {"model": "x", "stream": True}
        )
        self.assertEventStream(response)
        events = parse_sse(body)
        self.assertEqual(events[-1], (None, "[DONE]"))
        chunks = sse_json(body)
        self.assertEqual(len(chunks), 10 + 2)
        for chunk in chunks:
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            self.assertEqual(chunk["model"], "x")
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": "model1"})
        self.assertEqual(chunks[1]["choices"][0]["delta"], {"content": " tok"})
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 10)
        self.assertTimings(chunks[-1]["timings"], 25, 10)

    @inlineCallbacks
    def test_chat_streaming_query_flag(self):
        response, body = yield self.post_json("/v1/chat/completions?stream=true", {})
        self.assertEventStream(response)
        self.assertEqual(len(sse_json(body)), 12)

    @inlineCallbacks
    def test_token_count_options_and_overrides(self):
        self.url = self.start(tokens=3, prompt_tokens=7)
        _, body = yield self.post_json("/v1/chat/completions", {})
        self.assertEqual(
            json.loads(body)["usage"],
            {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        )
        for field in ("max_tokens", "n_predict", "max_completion_tokens"):
            _, body = yield self.post_json("/v1/chat/completions", {"stream": True, field: 5})
            chunks = sse_json(body)
            self.assertEqual(len(chunks), 5 + 2, field)
            self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 5)
            self.assertEqual(chunks[-1]["timings"]["predicted_n"], 5)
        _, body = yield self.post_json("/v1/chat/completions", {"n_predict": -1})
        self.assertEqual(json.loads(body)["usage"]["completion_tokens"], 3)

    @inlineCallbacks
    def test_token_delay_streams_tokens_apart(self):
        self.url = self.start(tokens=4, token_delay=0.05)
        response, chunks = yield self.timed_chunks("/v1/chat/completions", {"stream": True})
        self.assertEventStream(response)
        body = b"".join(data for _, data in chunks)
        events = sse_json(body)
        self.assertEqual(len(events), 4 + 2)
        self.assertEqual(events[-1]["timings"]["predicted_ms"], 200.0)
        self.assertEqual(events[-1]["timings"]["predicted_per_second"], 20.0)
        # Tokens arrive as they are produced, not in one buffered lump.
        self.assertGreaterEqual(len(chunks), 4)
        self.assertGreaterEqual(chunks[-1][0] - chunks[0][0], 0.1)

    @inlineCallbacks
    def test_token_delay_holds_non_streaming_response(self):
        self.url = self.start(tokens=4, token_delay=0.05)
        started = reactor.seconds()
        response, body = yield self.post_json("/v1/chat/completions", {})
        self.assertGreaterEqual(reactor.seconds() - started, 0.19)
        self.assertEqual(self.assertJSON(response, body)["timings"]["predicted_ms"], 200.0)

    # -- other completion APIs

    @inlineCallbacks
    def test_openai_completions(self):
        response, body = yield self.post_json("/v1/completions", {"prompt": "x", "max_tokens": 2})
        result = self.assertJSON(response, body)
        self.assertEqual(result["object"], "text_completion")
        self.assertEqual(result["choices"][0]["text"], "model1")
        self.assertEqual(result["usage"]["completion_tokens"], 2)
        self.assertEqual(result["responseMessage"], "model1")
        self.assertEqual(result["echo"]["path"], "/v1/completions")
        self.assertTimings(result["timings"], 25, 2)

        response, body = yield self.post_json("/v1/completions", {"stream": True, "max_tokens": 2})
        self.assertEventStream(response)
        self.assertEqual(parse_sse(body)[-1], (None, "[DONE]"))
        chunks = sse_json(body)
        self.assertEqual([c["choices"][0]["text"] for c in chunks[:2]], ["model1", " tok"])
        self.assertEqual(chunks[2]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(chunks[3]["usage"]["total_tokens"], 27)

    @inlineCallbacks
    def test_llama_server_completion(self):
        response, body = yield self.post_json("/completion", {"prompt": "x", "n_predict": 3})
        result = self.assertJSON(response, body)
        self.assertEqual(result["content"], "model1")
        self.assertEqual(result["tokens_predicted"], 3)
        self.assertTrue(result["stop"])
        self.assertTimings(result["timings"], 25, 3)

        response, body = yield self.post_json("/completion", {"stream": True, "n_predict": 3})
        self.assertEventStream(response)
        self.assertNotIn(b"[DONE]", body)
        events = sse_json(body)
        self.assertEqual([e["content"] for e in events[:3]], ["model1", " tok", " tok"])
        self.assertEqual([e["stop"] for e in events], [False, False, False, True])
        self.assertTimings(events[-1]["timings"], 25, 3)

    @inlineCallbacks
    def test_infill(self):
        response, body = yield self.post_json("/infill", {"input_prefix": "a", "n_predict": 2})
        result = self.assertJSON(response, body)
        self.assertIsInstance(result, list)
        self.assertEqual(result[0]["content"], "model1")
        self.assertTimings(result[0]["timings"], 25, 2)

        response, body = yield self.post_json("/infill", {"stream": True, "n_predict": 2})
        self.assertEventStream(response)
        events = sse_json(body)
        self.assertEqual(len(events), 3)
        self.assertTrue(events[-1]["stop"])

    @inlineCallbacks
    def test_responses_api(self):
        response, body = yield self.post_json("/v1/responses", {"model": "r", "input": "hi"})
        result = self.assertJSON(response, body)
        self.assertEqual(result["object"], "response")
        self.assertEqual(result["status"], "completed")
        self.assertEqual(result["model"], "r")
        message = result["output"][0]
        self.assertEqual((message["type"], message["role"]), ("message", "assistant"))
        self.assertEqual(message["content"][0]["type"], "output_text")
        self.assertEqual(message["content"][0]["text"], "model1")
        self.assertEqual(
            result["usage"], {"input_tokens": 25, "output_tokens": 10, "total_tokens": 35}
        )

        response, body = yield self.post_json("/v1/responses", {"stream": True, "max_tokens": 3})
        self.assertEventStream(response)
        events = parse_sse(body)
        names = [name for name, _ in events]
        self.assertEqual(
            names,
            ["response.created"] + ["response.output_text.delta"] * 3 + ["response.completed"],
        )
        payloads = [json.loads(data) for _, data in events]
        self.assertEqual([p["type"] for p in payloads], names)
        self.assertEqual([p["delta"] for p in payloads[1:4]], ["model1", " tok", " tok"])
        completed = payloads[-1]["response"]
        self.assertEqual(completed["status"], "completed")
        self.assertEqual(completed["usage"]["output_tokens"], 3)
        self.assertEqual(completed["output"][0]["content"][0]["text"], "model1 tok tok")

    @inlineCallbacks
    def test_anthropic_messages(self):
        response, body = yield self.post_json(
            "/v1/messages", {"model": "claude", "max_tokens": 4, "messages": []}
        )
        result = self.assertJSON(response, body)
        self.assertEqual((result["type"], result["role"]), ("message", "assistant"))
        self.assertEqual(result["model"], "claude")
        self.assertEqual(result["content"], [{"type": "text", "text": "model1"}])
        self.assertEqual(result["stop_reason"], "end_turn")
        self.assertEqual(result["usage"], {"input_tokens": 25, "output_tokens": 4})

        response, body = yield self.post_json("/v1/messages", {"stream": True, "max_tokens": 2})
        self.assertEventStream(response)
        events = parse_sse(body)
        names = [name for name, _ in events]
        self.assertEqual(
            names,
            ["message_start", "content_block_start"]
            + ["content_block_delta"] * 2
            + ["content_block_stop", "message_delta", "message_stop"],
        )
        payloads = [json.loads(data) for _, data in events]
        self.assertEqual([p["type"] for p in payloads], names)
        self.assertEqual(payloads[0]["message"]["usage"]["input_tokens"], 25)
        self.assertEqual(payloads[2]["delta"], {"type": "text_delta", "text": "model1"})
        self.assertEqual(payloads[5]["usage"], {"output_tokens": 2})

    # -- other APIs

    @inlineCallbacks
    def test_embeddings(self):
        response, body = yield self.post_json(
            "/v1/embeddings", {"model": "e", "input": ["a", "b", "c"]}
        )
        result = self.assertJSON(response, body)
        self.assertEqual(result["object"], "list")
        self.assertEqual(result["model"], "e")
        self.assertEqual([d["index"] for d in result["data"]], [0, 1, 2])
        for item in result["data"]:
            self.assertEqual(item["object"], "embedding")
            self.assertEqual(len(item["embedding"]), 8)
            self.assertTrue(all(isinstance(x, float) for x in item["embedding"]))
        self.assertEqual(set(result["usage"]), {"prompt_tokens", "total_tokens"})

        _, body = yield self.post_json("/v1/embeddings", {"input": "a"})
        single = json.loads(body)["data"]
        self.assertEqual(len(single), 1)
        self.assertEqual(single[0]["embedding"], result["data"][0]["embedding"])

        response, body = yield self.post_json("/v1/embeddings", {})
        self.assertEqual(self.assertJSON(response, body, 400)["error"]["type"], "invalid_request_error")

    @inlineCallbacks
    def test_audio_transcriptions(self):
        response = yield treq.post(
            self.url + "/v1/audio/transcriptions",
            data={"model": "whisper"},
            files={"file": ("a.wav", "audio/wav", BytesIO(b"x" * 123))},
            pool=self.pool,
        )
        body = yield treq.content(response)
        result = self.assertJSON(response, body)
        self.assertEqual(result["text"], "The length of the file is 123 bytes")
        self.assertEqual(result["model"], "whisper")
        self.assertTrue(result["h_content_type"].startswith("multipart/form-data"))

        response = yield treq.post(
            self.url + "/v1/audio/transcriptions",
            data={"model": "whisper"},
            files={"other": ("a.wav", "audio/wav", BytesIO(b"x"))},
            pool=self.pool,
        )
        body = yield treq.content(response)
        self.assertIn("file", self.assertJSON(response, body, 400)["error"]["message"])

    @inlineCallbacks
    def test_misc_endpoints(self):
        cases = [
            ("GET", "/v1/audio/voices?model=tts", None, {"voices": ["voice1"], "model": "tts"}),
            ("POST", "/v1/audio/speech", {"model": "tts"}, {"message": "ok"}),
            ("POST", "/sdapi/v1/txt2img", {"model": "sd"}, {"model": "sd", "images": []}),
            ("POST", "/sdapi/v1/img2img", {"model": "sd"}, {"model": "sd", "images": []}),
            ("GET", "/sdapi/v1/loras", None, {"loras": []}),
            (
                "GET",
                "/props",
                None,
                {"model_id": "model1", "default_generation_settings": {"n_ctx": 4096}},
            ),
        ]
        for method, path, payload, expected in cases:
            data = json.dumps(payload).encode() if payload is not None else None
            response, body = yield self.request(method, path, data=data)
            self.assertEqual(self.assertJSON(response, body), expected, path)

    @inlineCallbacks
    def test_test_and_env(self):
        response, body = yield self.request("GET", "/test")
        self.assertEqual(response.code, 200)
        self.assertTrue(self.header(response, "content-type").startswith("text/plain"))
        self.assertEqual(body, b"model1")
        response, body = yield self.request("GET", "/env")
        self.assertEqual(self.assertJSON(response, body), dict(os.environ))

    @inlineCallbacks
    def test_slow_respond(self):
        response = yield treq.get(self.url + "/slow-respond?echo=abcd&delay=20ms", pool=self.pool)
        chunks: list[tuple[float, bytes]] = []
        yield treq.collect(response, lambda data: chunks.append((reactor.seconds(), data)))
        self.assertTrue(self.header(response, "content-type").startswith("text/plain"))
        self.assertEqual(b"".join(data for _, data in chunks), b"abcd")
        self.assertGreaterEqual(len(chunks), 4)
        self.assertGreaterEqual(chunks[-1][0] - chunks[0][0], 0.05)

    @inlineCallbacks
    def test_unknown_path_echoes(self):
        response, body = yield self.request(
            "PUT", "/some/where?x=1&y=%20", data=b"\xffhello", headers={"X-Thing": ["a", "b"]}
        )
        echo = self.assertJSON(response, body)
        self.assertEqual(echo["id"], "model1")
        self.assertEqual(echo["method"], "PUT")
        self.assertEqual(echo["path"], "/some/where")
        self.assertEqual(echo["query"], "x=1&y=%20")
        self.assertEqual(echo["headers"]["x-thing"], "b")
        self.assertEqual(echo["headers"]["content-length"], "6")
        self.assertEqual(echo["body"], "\ufffdhello")
        # A known path with another method echoes, too.
        response, body = yield self.request("GET", "/v1/chat/completions")
        self.assertEqual(self.assertJSON(response, body)["method"], "GET")

    @inlineCallbacks
    def test_invalid_json_body(self):
        expected = {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}}
        for path in ("/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/completion"):
            for raw in (b"{nope", b"[1, 2]"):
                response, body = yield self.request("POST", path, data=raw)
                self.assertEqual(self.assertJSON(response, body, 400), expected, (path, raw))
        stats = yield self.stats()
        self.assertEqual(stats["in_flight"], 0)

    # -- ?wait=

    @inlineCallbacks
    def test_wait_query(self):
        for wait, seconds in (("0.15", 0.15), ("150ms", 0.15), ("0.1s", 0.1)):
            started = reactor.seconds()
            response, body = yield self.request("GET", f"/health?wait={wait}")
            self.assertEqual(response.code, 200)
            self.assertGreaterEqual(reactor.seconds() - started, seconds - 0.01, wait)
        response, body = yield self.post_json("/v1/chat/completions?wait=bogus", {})
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_wait_before_stream_headers(self):
        started = reactor.seconds()
        response = yield treq.post(
            self.url + "/v1/chat/completions?stream=true&wait=0.15", data=b"{}", pool=self.pool
        )
        self.assertGreaterEqual(reactor.seconds() - started, 0.14)
        body = yield treq.content(response)
        self.assertEqual(len(sse_json(body)), 12)

    # -- disconnects

    @inlineCallbacks
    def raw_request(self, method: str, path: str, body: bytes = b"{}"):
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        client = yield connectProtocol(endpoint, RawClient(request))
        return client

    def pending_generation(self) -> list[Any]:
        return [
            call
            for call in reactor.getDelayedCalls()
            if isinstance(getattr(call.func, "__self__", None), _Exchange)
        ]

    @inlineCallbacks
    def test_disconnect_stops_streaming(self):
        self.url = self.start(tokens=1000, token_delay=0.02)
        client = yield self.raw_request("POST", "/v1/chat/completions?stream=true")
        yield wait_for(lambda: client.received.count(b"data: ") >= 2)
        self.assertEqual(len(self.pending_generation()), 1)
        client.transport.abortConnection()
        yield client.lost
        stats = yield wait_for(self.cancelled_stats)
        self.assertEqual((stats["requests"], stats["in_flight"], stats["cancelled"]), (1, 0, 1))
        self.assertEqual(self.pending_generation(), [])

    @inlineCallbacks
    def test_disconnect_during_wait(self):
        client = yield self.raw_request("POST", "/v1/messages?wait=30s")
        yield wait_for(lambda: self.responder.in_flight == 1)
        self.assertEqual(len(self.pending_generation()), 1)
        client.transport.loseConnection()
        yield client.lost
        stats = yield wait_for(self.cancelled_stats)
        self.assertEqual((stats["in_flight"], stats["cancelled"]), (0, 1))
        self.assertEqual(client.received, b"")
        self.assertEqual(self.pending_generation(), [])

    @inlineCallbacks
    def test_disconnect_during_non_streaming_generation(self):
        self.url = self.start(tokens=1000, token_delay=0.05)
        client = yield self.raw_request("POST", "/v1/chat/completions")
        yield wait_for(lambda: self.responder.in_flight == 1)
        client.transport.abortConnection()
        yield client.lost
        yield wait_for(self.cancelled_stats)
        self.assertEqual(self.pending_generation(), [])

    @inlineCallbacks
    def cancelled_stats(self):
        stats = yield self.stats()
        return stats if stats["cancelled"] else None

    # -- exit after

    @inlineCallbacks
    def test_exit_after_calls_on_exit(self):
        self.url = self.start(exit_after=2)
        yield self.request("GET", "/health")
        yield self.post_json("/v1/chat/completions", {})
        self.assertEqual(self.exits, [])
        response, body = yield self.post_json("/v1/messages", {})
        self.assertEqual(response.code, 200)
        yield wait_for(lambda: self.exits)
        self.assertEqual(self.exits, [EXIT_AFTER_CODE])


class ResponderHealthDelayTests(InProcessMixin, TestCase):
    timeout = 20

    @inlineCallbacks
    def test_health_delay(self):
        started = reactor.seconds()
        self.url = self.start(health_delay=0.3)
        response, body = yield self.request("GET", "/health")
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body), {"status": "loading"})

        @inlineCallbacks
        def healthy():
            response, body = yield self.request("GET", "/health")
            return response.code == 200 and json.loads(body) == {"status": "ok"}

        yield wait_for(healthy)
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)


class ResponderHelperTests(SynchronousTestCase):
    """Pure helpers: options, durations, SSE framing, token accounting."""

    def test_parse_duration(self):
        cases = {
            "1.5": 1.5,
            "0": 0.0,
            "2s": 2.0,
            "500ms": 0.5,
            "1m": 60.0,
            "1m30s": 90.0,
            "1h": 3600.0,
            ".5s": 0.5,
            "250us": 0.00025,
        }
        for text, seconds in cases.items():
            self.assertAlmostEqual(parse_duration(text), seconds, msg=text)
        for bad in ("", "abc", "5x", "-1", "-1s", "1.5.5s", "nan", "inf"):
            self.assertRaises(ValueError, parse_duration, bad)

    def test_parse_args(self):
        options = parse_args(["--port", "0"])
        self.assertEqual(options, ResponderOptions(port=0))
        self.assertEqual(options.respond_text, "responder")
        options = parse_args(
            "--port 9 --host 0.0.0.0 --id m --respond hi --tokens 3 --prompt-tokens 4"
            " --token-delay 0.5 --health-delay 1 --start-delay 2 --exit-at-start 7"
            " --exit-after 5 --ignore-sigterm --fork-grandchild --silent".split()
        )
        self.assertEqual(
            options,
            ResponderOptions(
                port=9,
                host="0.0.0.0",
                id="m",
                respond="hi",
                tokens=3,
                prompt_tokens=4,
                token_delay=0.5,
                health_delay=1.0,
                start_delay=2.0,
                exit_at_start=7,
                exit_after=5,
                ignore_sigterm=True,
                fork_grandchild=True,
                silent=True,
            ),
        )
        self.assertEqual(options.respond_text, "hi")

    def test_sse_event(self):
        self.assertEqual(sse_event("[DONE]"), b"data: [DONE]\n\n")
        self.assertEqual(sse_event({"a": 1}), b'data: {"a":1}\n\n')
        self.assertEqual(sse_event({"a": 1}, "x"), b'event: x\ndata: {"a":1}\n\n')

    def test_listening_line(self):
        self.assertEqual(
            listening_line("m", "127.0.0.1", 80), "responder m listening on http://127.0.0.1:80"
        )
        self.assertEqual(listening_line("m", "::1", 80), "responder m listening on http://[::1]:80")

    def test_generation(self):
        gen = Generation("hi", completion_tokens=3, prompt_tokens=5, token_delay=0.0)
        self.assertEqual(list(gen.pieces()), ["hi", " tok", " tok"])
        self.assertEqual(gen.content, "hi")
        self.assertEqual(gen.usage(), {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})
        self.assertEqual(gen.timings()["predicted_ms"], 3.0)
        empty = Generation("hi", completion_tokens=0, prompt_tokens=5, token_delay=0.1)
        self.assertEqual((list(empty.pieces()), empty.content), ([], ""))
        self.assertEqual(empty.timings()["predicted_per_second"], 0.0)


# -- real child processes ---------------------------------------------------------


class ResponderProcess(ProcessProtocol):
    """Collects a spawned responder's output and tells when it listens/ends."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.lines: list[str] = []
        self.port: int | None = None
        self.reason: Any = None
        self._listening: list[Deferred[int]] = []
        self._ended: list[Deferred[Any]] = []

    def outReceived(self, data: bytes) -> None:
        self.out += data
        *complete, _ = self.out.split(b"\n")
        for line in complete[len(self.lines) :]:
            self.lines.append(line.decode())
            match = LISTENING.match(line.decode())
            if match and self.port is None:
                self.port = int(match.group(2))
                waiters, self._listening = self._listening, []
                for d in waiters:
                    d.callback(self.port)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.reason = reason.value
        waiters, self._listening = self._listening, []
        for d in waiters:
            d.errback(AssertionError(f"exited before listening: {self.reason} {self.err!r}"))
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(self.reason)

    def listening(self, timeout: float = 10) -> Deferred[int]:
        """Fires with the port from the listening line."""
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[int] = Deferred()
        self._listening.append(d)
        return d.addTimeout(timeout, reactor)

    def ended(self, timeout: float = 10) -> Deferred[Any]:
        """Fires with ProcessDone/ProcessTerminated once the process exited."""
        if self.reason is not None:
            return succeed(self.reason)
        d: Deferred[Any] = Deferred()
        self._ended.append(d)
        return d.addTimeout(timeout, reactor)


def _alive(pid: int) -> bool:
    """Whether C{pid} exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


class ResponderProcessTests(TestCase):
    """The responder as a real child process, as the proxy runs it."""

    timeout = 20

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def spawn(self, *args: str) -> ResponderProcess:
        """Start a responder in its own session (pid == pgid)."""
        proto = ResponderProcess()
        argv = [
            "/usr/bin/setsid",
            sys.executable,
            "-m",
            "llamaswap.testing.responder",
            "--port",
            "0",
            *args,
        ]
        transport = reactor.spawnProcess(proto, argv[0], argv, env=os.environ, path=str(ROOT))
        proto.pid = transport.pid
        self.addCleanup(self.reap, proto)
        return proto

    def reap(self, proto: ResponderProcess) -> Deferred[Any]:
        """Kill the child's whole process group and wait for the child."""
        try:
            os.killpg(proto.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proto.ended()

    @inlineCallbacks
    def get(self, port: int, path: str, data: bytes | None = None):
        url = f"http://127.0.0.1:{port}{path}"
        method = "GET" if data is None else "POST"
        response = yield treq.request(method, url, data=data, pool=self.pool)
        body = yield treq.content(response)
        return response, body

    @inlineCallbacks
    def test_listening_line_and_sigterm(self):
        proto = self.spawn("--id", "m1", "--respond", "hello")
        port = yield proto.listening()
        self.assertEqual(proto.lines[0], f"My PID: {proto.pid}")
        self.assertEqual(proto.lines[1], f"responder m1 listening on http://127.0.0.1:{port}")
        response, body = yield self.get(port, "/v1/chat/completions", b'{"model": "m1"}')
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], "hello")
        response, body = yield self.get(port, "/__responder/stats")
        self.assertEqual(json.loads(body)["pid"], proto.pid)
        yield wait_for(lambda: any("POST /v1/chat/completions" in line for line in proto.lines))
        os.kill(proto.pid, signal.SIGTERM)
        reason = yield proto.ended()
        self.assertIsInstance(reason, ProcessDone)
        self.assertEqual([line for line in proto.lines if "listening" in line], [proto.lines[1]])

    @inlineCallbacks
    def test_silent_and_start_delay(self):
        started = reactor.seconds()
        proto = self.spawn("--silent", "--start-delay", "0.3")
        port = yield proto.listening()
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)
        yield self.get(port, "/v1/chat/completions", b"{}")
        os.kill(proto.pid, signal.SIGINT)
        reason = yield proto.ended()
        self.assertIsInstance(reason, ProcessDone)
        self.assertEqual(proto.lines[1:], [f"responder responder listening on http://127.0.0.1:{port}"])

    @inlineCallbacks
    def test_exit_at_start(self):
        proto = self.spawn("--exit-at-start", "7")
        reason = yield proto.ended()
        self.assertIsInstance(reason, ProcessTerminated)
        self.assertEqual(reason.exitCode, 7)
        self.assertIn(b"responder: exiting at start with code 7", proto.err)
        self.assertNotIn(b"listening", proto.out)

    @inlineCallbacks
    def test_exit_at_start_after_start_delay(self):
        started = reactor.seconds()
        proto = self.spawn("--exit-at-start", "5", "--start-delay", "0.2")
        reason = yield proto.ended()
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        self.assertEqual(reason.exitCode, 5)
        self.assertIn(b"responder: exiting at start with code 5", proto.err)

    @inlineCallbacks
    def test_exit_after(self):
        proto = self.spawn("--exit-after", "2")
        port = yield proto.listening()
        for _ in range(2):
            response, body = yield self.get(port, "/v1/chat/completions", b"{}")
            self.assertEqual(response.code, 200)
            self.assertEqual(json.loads(body)["responseMessage"], "responder")
        reason = yield proto.ended()
        self.assertIsInstance(reason, ProcessTerminated)
        self.assertEqual(reason.exitCode, EXIT_AFTER_CODE)

    @inlineCallbacks
    def test_ignore_sigterm(self):
        proto = self.spawn("--ignore-sigterm")
        port = yield proto.listening()
        os.kill(proto.pid, signal.SIGTERM)
        yield deferLater(reactor, 0.3, lambda: None)
        response, _ = yield self.get(port, "/health")
        self.assertEqual(response.code, 200)
        self.assertIsNone(proto.reason)
        os.kill(proto.pid, signal.SIGKILL)
        reason = yield proto.ended()
        self.assertIsInstance(reason, ProcessTerminated)
        self.assertEqual(reason.signal, signal.SIGKILL)

    @inlineCallbacks
    def test_fork_grandchild(self):
        proto = self.spawn("--fork-grandchild")
        yield proto.listening()
        found = [re.fullmatch(r"grandchild pid (\d+)", line) for line in proto.lines]
        grandchild = int(next(match for match in found if match).group(1))
        self.assertTrue(_alive(grandchild))
        self.assertEqual(os.getpgid(proto.pid), proto.pid)
        self.assertEqual(os.getpgid(grandchild), proto.pid)
        yield self.reap(proto)
        yield wait_for(lambda: not _alive(grandchild))
