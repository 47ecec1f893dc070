"""
A fake OpenAI-compatible inference server ("responder") for demos, tests and
benchmarks.

It speaks just enough of the OpenAI, llama-server, Anthropic and
stable-diffusion APIs for a model-swapping proxy to be exercised end to end,
without a GPU or model weights.  It is built on ``twisted.web`` and the
standard library only, so it starts fast and adds little overhead.

Usage::

    python -m llamaswap.testing.responder --port 8081 --id model1

Command line flags
==================

``--port N``
    TCP port to listen on (required); ``0`` picks a free port.
``--host HOST``
    Interface to listen on (default ``127.0.0.1``).
``--id NAME``
    Model name reported in responses (default ``responder``).
``--respond TEXT``
    Content text of completions (default: the ``--id``).
``--tokens N``
    Completion tokens generated per request (default 10).  The request body
    fields ``max_tokens``, ``max_completion_tokens``, ``max_output_tokens`` and
    ``n_predict`` (non-negative ints, first one present wins) override it.
``--prompt-tokens N``
    Prompt tokens reported in usage/timings (default 25).
``--token-delay SECS``
    Delay before each generated token (default 0).  Streaming responses
    write one event per token; non-streaming responses are held back for
    ``tokens * SECS`` to simulate generation time.
``--health-delay SECS``
    ``GET /health`` answers 503 ``{"status": "loading"}`` until SECS after
    listening started, then 200 ``{"status": "ok"}`` (default 0).
``--start-delay SECS``
    Wait SECS before listening at all, like a slow model load (default 0).
``--exit-at-start CODE``
    Instead of listening (after ``--start-delay``), print
    ``responder: exiting at start with code CODE`` to stderr and exit with
    CODE.
``--exit-after N``
    Exit with code 3 once the response to the Nth counted request (see
    ``/__responder/stats``) has finished and its connection is closed.
``--ignore-sigterm``
    Ignore SIGTERM (SIGINT still stops the server).  Without it, SIGTERM
    and SIGINT stop the server with exit code 0.
``--fork-grandchild``
    At startup spawn a long-lived grandchild process in the same process
    group and session (it exits on its own after an hour) and print
    ``grandchild pid N``; used to test that process groups get cleaned up.
``--silent``
    Do not print request log lines.
``--hang-before-headers``
    Accept every counted request (see ``/__responder/stats``), read it, and
    never answer it (the connection stays open); ``/health`` still answers.
``--stall-after N``
    Completion streams write their first N events, then nothing more while
    the connection stays open (a wedged generation).
``--die-after-tokens N``
    Completion streams write their first N events, then the process exits
    at once with ``os._exit(DIE_CODE)`` (9), mid-response, like a crash.
    Meant for child processes only.

Output
======

On start the responder prints ``My PID: <pid>`` to stdout, and once it
listens exactly one line::

    responder <id> listening on http://<host>:<port>

where ``<port>`` is the actual port (useful with ``--port 0``; IPv6 hosts are
bracketed).  Unless ``--silent``, every finished request is logged as
``[<id>] <status> <METHOD> <uri> <ms>ms`` (``<status>`` is ``gone`` when the
client disconnected first).  All stdout lines are flushed at once.

Endpoints
=========

JSON responses have ``Content-Type: application/json``; streams are
``text/event-stream`` (with ``Cache-Control: no-cache``) written event by
event.  A request is streamed when its JSON body has ``"stream": true`` or
the query has ``stream=true``.  Streams honour backpressure: while the
client's connection does not take more data, generation pauses (as
llama-server's blocking socket writes do) and goes on when it drains.

``GET /health``
    See ``--health-delay``.
``POST /v1/chat/completions``
    ``chat.completion`` object whose ``choices[0].message.content`` is the
    respond text, with ``usage``, llama-server ``timings`` and the
    simple-responder fields ``responseMessage`` (respond text),
    ``h_content_length`` (request Content-Length as int, or null),
    ``request_body`` (raw body) and ``echo`` (see below).  Streaming: one
    ``chat.completion.chunk`` per token (the first delta is the respond text,
    the others ``" tok"``), a chunk with ``finish_reason: "stop"``, a chunk
    with empty ``choices`` plus ``usage`` and ``timings``, then
    ``data: [DONE]``.
``POST /v1/completions``
    ``text_completion`` object (``choices[0].text``), same extra fields as
    chat; streaming like chat.
``POST /completion``
    llama-server native: ``content``, ``tokens_predicted``,
    ``tokens_evaluated``, ``stop``, ``timings``.  Streaming: one
    ``data: {"content": ..., "stop": false}`` event per token, then one with
    ``"stop": true`` and ``timings`` (no ``[DONE]``).
``POST /infill``
    Like ``/completion``, but the non-streaming body is a JSON *array* of
    results.
``POST /v1/responses``
    OpenAI Responses API ``response`` object with ``output[0].content[0]``
    of type ``output_text`` and ``usage`` (``input_tokens``,
    ``output_tokens``, ``total_tokens``).  Streaming: ``response.created``,
    one ``response.output_text.delta`` per token, ``response.completed``
    (whose ``response`` carries ``usage``), each framed as
    ``event: <type>\\ndata: <json with "type">\\n\\n``.
``POST /v1/messages``
    Anthropic ``message`` object (``stop_reason: "end_turn"``, ``usage``
    with ``input_tokens``/``output_tokens``).  Streaming: ``message_start``,
    ``content_block_start``, one ``content_block_delta`` (``text_delta``) per
    token, ``content_block_stop``, ``message_delta`` (``usage.output_tokens``),
    ``message_stop``, framed like the Responses API events.
``POST /v1/embeddings``
    ``{"object": "list", "data": [...], "model", "usage"}`` with one
    deterministic 8-float embedding per input (``input`` may be a string, a
    list of strings, a token list or a list of token lists).
``POST /v1/audio/transcriptions``
    multipart/form-data with ``model`` and ``file`` fields; answers
    ``{"text": "The length of the file is N bytes", "model", "h_content_type",
    "h_content_length"}``, or 400 when a field is missing.
``GET /v1/audio/voices?model=M``
    ``{"voices": ["voice1"], "model": M}``.
``POST /v1/audio/speech``
    ``{"message": "ok"}``.
``POST /sdapi/v1/txt2img``, ``POST /sdapi/v1/img2img``
    ``{"model", "images": []}``.
``GET /sdapi/v1/loras``
    ``{"loras": []}``.
``GET /props``
    ``{"model_id": <id>, "default_generation_settings": {"n_ctx": 4096}}``.
``GET /test``
    The respond text as ``text/plain``.
``GET /env``
    JSON object of the process environment.
``GET /slow-respond?echo=TEXT&delay=D``
    Streams TEXT (``text/plain``; default: letters and digits) one character
    at a time, waiting D (default ``100ms``) after each character.
``GET /__responder/stats``
    ``{"id", "pid", "requests", "in_flight", "cancelled", "paused"}``: counted
    requests received, counted requests not finished yet, responses aborted
    because the client disconnected before they were complete (pending
    generation is stopped then), and how often a stream was paused because
    the client did not read (see below).  ``/health`` and ``/__responder/*``
    are not counted.
Anything else
    200 with the echo object as body.

The echo object is ``{"id", "method", "path" (raw, without query), "query"
(raw query string), "headers" ({lower-cased name: last value}), "body" (raw
body as UTF-8, invalid bytes replaced)}``.

``?wait=DURATION`` on any request delays the response by DURATION before
anything is written; it takes float seconds (``1.5``) or Go-style durations
(``2s``, ``500ms``, ``1m30s``); an unparsable value means no wait.

A body that is not a JSON object on a JSON endpoint is answered with 400
``{"error": {"message": "invalid JSON body", "type":
"invalid_request_error"}}`` (an empty body counts as ``{}``).

Use :func:`build_site` to run the responder in-process (e.g. in tests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO, Union
from urllib.parse import parse_qs

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

__all__ = [
    "EXIT_AFTER_CODE",
    "Generation",
    "Responder",
    "ResponderOptions",
    "ResponderSite",
    "build_site",
    "listening_line",
    "main",
    "parse_args",
    "parse_duration",
    "sse_event",
]

#: Exit status used by ``--exit-after``.
EXIT_AFTER_CODE = 3
#: Exit status of ``--die-after-tokens``.
DIE_CODE = 9
_STALL = 3600.0  # seconds a stalled stream waits before it waits again

_JSON = b"application/json"
_SSE = b"text/event-stream"
_TEXT = b"text/plain; charset=utf-8"
_INVALID_JSON = "invalid JSON body"
_SLOW_RESPOND_DEFAULT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_UNCOUNTED_PATHS = ("/health", "/__responder/")
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict")
_GRANDCHILD_CODE = "import signal; signal.alarm(3600); signal.pause()"


# -- options ----------------------------------------------------------------


@dataclass
class ResponderOptions:
    """Settings of one responder; the CLI flags map onto these fields."""

    port: int = 0
    host: str = "127.0.0.1"
    id: str = "responder"
    respond: str | None = None
    tokens: int = 10
    prompt_tokens: int = 25
    token_delay: float = 0.0
    health_delay: float = 0.0
    start_delay: float = 0.0
    exit_at_start: int | None = None
    exit_after: int | None = None
    ignore_sigterm: bool = False
    fork_grandchild: bool = False
    silent: bool = False
    hang_before_headers: bool = False
    stall_after: int | None = None
    die_after_tokens: int | None = None

    @property
    def respond_text(self) -> str:
        """The completion text: ``--respond``, or the id."""
        return self.id if self.respond is None else self.respond


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def parse_args(argv: list[str] | None = None) -> ResponderOptions:
    """Parse command line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m llamaswap.testing.responder",
        description="Fake OpenAI-compatible upstream server for llamaswap.",
    )
    add = parser.add_argument
    add("--port", type=int, required=True, help="port to listen on, 0 = any free port")
    add("--host", default="127.0.0.1", help="interface to listen on")
    add("--id", default="responder", help="model name reported in responses")
    add("--respond", default=None, help="completion text (default: the id)")
    add("--tokens", type=_non_negative_int, default=10, help="completion tokens")
    add("--prompt-tokens", type=_non_negative_int, default=25, help="prompt tokens")
    add("--token-delay", type=_non_negative_float, default=0.0, metavar="SECS")
    add("--health-delay", type=_non_negative_float, default=0.0, metavar="SECS")
    add("--start-delay", type=_non_negative_float, default=0.0, metavar="SECS")
    add("--exit-at-start", type=int, default=None, metavar="CODE")
    add("--exit-after", type=_positive_int, default=None, metavar="N")
    add("--ignore-sigterm", action="store_true")
    add("--fork-grandchild", action="store_true")
    add("--silent", action="store_true", help="no request log lines")
    add("--hang-before-headers", action="store_true", help="never answer counted requests")
    add("--stall-after", type=_non_negative_int, default=None, metavar="N",
        help="streams stop after N events, connection kept open")
    add("--die-after-tokens", type=_non_negative_int, default=None, metavar="N",
        help="streams write N events, then the process exits (os._exit)")
    return ResponderOptions(**vars(parser.parse_args(argv)))


# -- small helpers ------------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """
    Parse float seconds (``"1.5"``) or a Go duration (``"1m30s"``,
    ``"500ms"``) into seconds.  Raises ``ValueError`` for anything else,
    including negative durations.
    """
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        while pos < len(text):
            match = _DURATION_PART.match(text, pos)
            if match is None:
                raise ValueError(f"invalid duration: {text!r}") from None
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if not text:
            raise ValueError("empty duration") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"invalid duration: {text!r}")
    return seconds


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def sse_event(data: Any, event: str | None = None) -> bytes:
    """
    Frame one server-sent event.  ``data`` is JSON-encoded unless it is a
    string (e.g. ``"[DONE]"``); ``event`` adds an ``event:`` line.
    """
    payload = data if isinstance(data, str) else _dumps(data)
    if event is None:
        return f"data: {payload}\n\n".encode()
    return f"event: {event}\ndata: {payload}\n\n".encode()


def _typed_event(data: dict[str, Any]) -> bytes:
    """An SSE event named after its payload's ``type`` (Anthropic/Responses)."""
    return sse_event(data, event=data["type"])


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def listening_line(ident: str, host: str, port: int) -> str:
    """The line printed once the responder listens (without newline)."""
    shown = f"[{host}]" if ":" in host else host
    return f"responder {ident} listening on http://{shown}:{port}"


# -- token generation -----------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """The nominal tokens of one completion, and their usage and timings."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    token_delay: float

    @property
    def content(self) -> str:
        """Non-streamed content: the respond text (empty for 0 tokens)."""
        return self.text if self.completion_tokens else ""

    def pieces(self) -> Iterator[str]:
        """Streamed token texts: the respond text, then ``" tok"`` each."""
        for index in range(self.completion_tokens):
            yield self.text if index == 0 else " tok"

    @property
    def streamed_text(self) -> str:
        return "".join(self.pieces())

    @property
    def duration(self) -> float:
        """Simulated generation time in seconds."""
        return self.completion_tokens * self.token_delay

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def timings(self) -> dict[str, float]:
        prompt_ms = self.prompt_tokens * 0.25
        per_token_ms = self.token_delay * 1000 if self.token_delay > 0 else 1.0
        predicted_ms = self.completion_tokens * per_token_ms
        return {
            "prompt_n": self.prompt_tokens,
            "prompt_ms": prompt_ms,
            "prompt_per_second": _rate(self.prompt_tokens, prompt_ms),
            "predicted_n": self.completion_tokens,
            "predicted_ms": predicted_ms,
            "predicted_per_second": _rate(self.completion_tokens, predicted_ms),
        }


def _rate(tokens: int, ms: float) -> float:
    return tokens * 1000.0 / ms if ms > 0 else 0.0


# -- the HTTP exchange ------------------------------------------------------------

# A stream yields bytes to write, or a float: seconds to wait before going on.
Stream = Iterator[Union[bytes, float]]


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@implementer(IPushProducer)
class _Exchange:
    """One request and its (possibly delayed or streamed) response."""

    def __init__(self, responder: Responder, request: Request) -> None:
        self.responder = responder
        self.request = request
        self.channel = request.channel
        self.started = responder.reactor.seconds()
        self.method = request.method.decode("latin-1").upper()
        self.path = request.path.decode("latin-1")
        _, _, query = request.uri.partition(b"?")
        self.query_string = query.decode("latin-1")
        self.query = {
            key: values[-1]
            for key, values in parse_qs(self.query_string, keep_blank_values=True).items()
        }
        request.content.seek(0)
        self.body: bytes = request.content.read()
        self.counted = not self.path.startswith(_UNCOUNTED_PATHS)
        self.gone = False
        self.code = 200
        self._pending: IDelayedCall | None = None
        self._stream: Stream | None = None
        self._json: dict[str, Any] | None = None
        self.paused = False

    # request details

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (empty body: ``{}``); 400 otherwise."""
        if self._json is None:
            if not self.body.strip():
                self._json = {}
            else:
                try:
                    value = json.loads(self.body)
                except ValueError:
                    raise _BadRequest(_INVALID_JSON) from None
                if not isinstance(value, dict):
                    raise _BadRequest(_INVALID_JSON)
                self._json = value
        return self._json

    def model(self) -> str:
        model = self.json().get("model")
        return model if isinstance(model, str) and model else self.responder.options.id

    def wants_stream(self) -> bool:
        return self.json().get("stream") is True or self.query.get("stream", "").lower() == "true"

    def content_length(self) -> int | None:
        value = self.request.getHeader(b"content-length")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def header(self, name: bytes) -> str | None:
        value = self.request.getHeader(name)
        return value.decode("latin-1") if value is not None else None

    def echo(self) -> dict[str, Any]:
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in self.request.requestHeaders.getAllRawHeaders()
        }
        return {
            "id": self.responder.options.id,
            "method": self.method,
            "path": self.path,
            "query": self.query_string,
            "headers": headers,
            "body": self.body.decode("utf-8", errors="replace"),
        }

    # scheduling

    def later(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` after ``delay`` seconds unless the client goes away."""
        if delay <= 0:
            self.responder.run_guarded(self, action)
        else:
            self._pending = self.responder.reactor.callLater(delay, self._fire, action)

    def _fire(self, action: Callable[[], None]) -> None:
        self._pending = None
        if not self.gone:
            self.responder.run_guarded(self, action)

    def disconnected(self) -> None:
        self.gone = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._stream = None

    # responses

    def send(self, body: bytes, content_type: bytes = _JSON, code: int = 200) -> None:
        request = self.request
        self.code = code
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def send_json(self, obj: Any, code: int = 200) -> None:
        self.send(_dumps(obj).encode(), _JSON, code)

    def send_error(self, message: str) -> None:
        self.send_json({"error": {"message": message, "type": "invalid_request_error"}}, 400)

    def send_stream(self, stream: Stream, content_type: bytes = _SSE) -> None:
        """Start writing ``stream`` chunk by chunk, pausing where it says."""
        request = self.request
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"")  # send the headers now
        self._stream = stream
        # a full socket pauses generation, as llama-server's blocking writes do
        request.registerProducer(self, True)
        self._pump()

    def _pump(self) -> None:
        self._pending = None
        stream, write = self._stream, self.request.write
        if stream is None or self.paused:
            return
        for item in stream:
            if isinstance(item, bytes):
                write(item)
                if self.paused:  # resumeProducing goes on
                    return
            elif item > 0:
                self._pending = self.responder.reactor.callLater(item, self._resume)
                return
        self._stream = None
        self.request.unregisterProducer()
        self.request.finish()

    # IPushProducer: the client connection's flow control

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.responder.paused += 1

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            if self._stream is not None and self._pending is None and not self.gone:
                self._pending = self.responder.reactor.callLater(0, self._resume)

    def stopProducing(self) -> None:
        pass  # the client went away: notifyFinish ends the exchange

    def _resume(self) -> None:
        if not self.gone:
            self.responder.run_guarded(self, self._pump)


# -- the responder --------------------------------------------------------------


Handler = Callable[["Responder", _Exchange], None]
_ROUTES: dict[tuple[str, str], Handler] = {}


def _route(method: str, *paths: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        for path in paths:
            _ROUTES[method, path] = handler
        return handler

    return register


class Responder(Resource):
    """The fake server: a leaf resource answering every path."""

    isLeaf = True

    def __init__(
        self,
        options: ResponderOptions,
        reactor: IReactorTime,
        on_exit: Callable[[int], None] | None = None,
        out: TextIO | None = None,
    ) -> None:
        super().__init__()
        self.options = options
        self.reactor = reactor
        self.on_exit = on_exit
        self.out = out if out is not None else sys.stdout
        self.started_at = reactor.seconds()
        self.pid = os.getpid()
        self.requests = 0
        self.in_flight = 0
        self.cancelled = 0
        self.paused = 0
        self.finished = 0
        self.connections = 0
        self.exiting = False

    # bookkeeping

    def render(self, request: Request) -> int:
        exchange = _Exchange(self, request)
        if exchange.counted:
            self.requests += 1
            self.in_flight += 1
        request.notifyFinish().addBoth(self._done, exchange)
        if self.options.hang_before_headers and exchange.counted:
            return NOT_DONE_YET  # read, never answered
        wait = exchange.query.get("wait")
        try:
            delay = parse_duration(wait) if wait else 0.0
        except ValueError:
            delay = 0.0
        exchange.later(delay, lambda: self._dispatch(exchange))
        return NOT_DONE_YET

    def run_guarded(self, exchange: _Exchange, action: Callable[[], None]) -> None:
        """Run a response step; errors become a 400/500 (or a dropped connection)."""
        try:
            action()
        except Exception as error:
            if isinstance(error, _BadRequest):
                code, body = 400, {"message": error.message, "type": "invalid_request_error"}
            else:
                traceback.print_exc()
                code, body = 500, {"message": "responder bug", "type": "server_error"}
            request = exchange.request
            if exchange.gone or request.finished:
                return
            if request.startedWriting:
                exchange.disconnected()
                request.loseConnection()
            else:
                exchange.send_json({"error": body}, code)

    def _done(self, result: object, exchange: _Exchange) -> None:
        aborted = result is not None
        if aborted:
            exchange.disconnected()
        if exchange.counted:
            self.in_flight -= 1
            self.finished += 1
            if aborted:
                self.cancelled += 1
        self._log(exchange, aborted)
        limit = self.options.exit_after
        if exchange.counted and limit is not None and self.finished >= limit and not self.exiting:
            self.exiting = True
            transport = exchange.channel.transport if exchange.channel is not None else None
            if aborted or transport is None:
                self._exit()
            else:
                # Exit once the response is flushed: see connection_lost.
                transport.loseConnection()

    def _log(self, exchange: _Exchange, aborted: bool) -> None:
        if self.options.silent:
            return
        ms = (self.reactor.seconds() - exchange.started) * 1000
        status = "gone" if aborted else str(exchange.code)
        uri = exchange.request.uri.decode("latin-1")
        self.out.write(f"[{self.options.id}] {status} {exchange.method} {uri} {ms:.1f}ms\n")
        self.out.flush()

    def connection_made(self) -> None:
        self.connections += 1

    def connection_lost(self) -> None:
        self.connections -= 1
        if self.exiting:
            self._exit()

    def _exit(self) -> None:
        on_exit, self.on_exit = self.on_exit, None
        if on_exit is not None:
            on_exit(EXIT_AFTER_CODE)

    def generation(self, exchange: _Exchange) -> Generation:
        options = self.options
        body = exchange.json()
        tokens = options.tokens
        for field in _TOKEN_FIELDS:
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                tokens = value
                break
        return Generation(options.respond_text, tokens, options.prompt_tokens, options.token_delay)

    def _dispatch(self, exchange: _Exchange) -> None:
        method = "GET" if exchange.method == "HEAD" else exchange.method
        handler = _ROUTES.get((method, exchange.path), Responder._unknown)
        handler(self, exchange)

    def _generate(
        self,
        exchange: _Exchange,
        respond: Callable[[Generation, str], Any],
        stream: Callable[[Generation, str], Stream],
    ) -> None:
        """Answer a completion-like request, streamed or after generating."""
        gen, model = self.generation(exchange), exchange.model()
        if exchange.wants_stream():
            exchange.send_stream(self._faults(stream(gen, model)))
        else:
            exchange.later(gen.duration, lambda: exchange.send_json(respond(gen, model)))

    def _faults(self, stream: Stream) -> Stream:
        """``--stall-after`` / ``--die-after-tokens``: cut a stream after N events."""
        options = self.options
        limit = options.die_after_tokens if options.die_after_tokens is not None else options.stall_after
        if limit is None:
            yield from stream
            return
        events = 0
        for item in stream:
            if isinstance(item, bytes):
                if events == limit:
                    break
                events += 1
            yield item
        if options.die_after_tokens is not None:
            # let the events written so far leave the socket buffer, then crash
            self.reactor.callLater(0.05, os._exit, DIE_CODE)
        while True:
            yield _STALL

    def _compat_fields(self, exchange: _Exchange) -> dict[str, Any]:
        return {
            "responseMessage": self.options.respond_text,
            "h_content_length": exchange.content_length(),
            "request_body": exchange.body.decode("utf-8", errors="replace"),
            "echo": exchange.echo(),
        }

    # -- simple endpoints

    @_route("GET", "/health")
    def _health(self, exchange: _Exchange) -> None:
        if self.reactor.seconds() - self.started_at < self.options.health_delay:
            exchange.send_json({"status": "loading"}, 503)
        else:
            exchange.send_json({"status": "ok"})

    @_route("GET", "/__responder/stats")
    def _stats(self, exchange: _Exchange) -> None:
        exchange.send_json(
            {
                "id": self.options.id,
                "pid": self.pid,
                "requests": self.requests,
                "in_flight": self.in_flight,
                "cancelled": self.cancelled,
                "paused": self.paused,
            }
        )

    @_route("GET", "/test")
    def _test(self, exchange: _Exchange) -> None:
        exchange.send(self.options.respond_text.encode(), _TEXT)

    @_route("GET", "/env")
    def _env(self, exchange: _Exchange) -> None:
        exchange.send_json(dict(os.environ))

    @_route("GET", "/props")
    def _props(self, exchange: _Exchange) -> None:
        exchange.send_json(
            {"model_id": self.options.id, "default_generation_settings": {"n_ctx": 4096}}
        )

    @_route("GET", "/slow-respond")
    def _slow_respond(self, exchange: _Exchange) -> None:
        text = exchange.query.get("echo") or _SLOW_RESPOND_DEFAULT
        try:
            delay = parse_duration(exchange.query.get("delay") or "100ms")
        except ValueError as error:
            exchange.send(f"Invalid duration: {error}".encode(), _TEXT, 400)
            return

        def chars() -> Stream:
            for char in text:
                yield char.encode()
                yield delay

        exchange.send_stream(chars(), _TEXT)

    @_route("GET", "/v1/audio/voices")
    def _voices(self, exchange: _Exchange) -> None:
        model = exchange.query.get("model") or self.options.id
        exchange.send_json({"voices": ["voice1"], "model": model})

    @_route("POST", "/v1/audio/speech")
    def _speech(self, exchange: _Exchange) -> None:
        exchange.json()
        exchange.send_json({"message": "ok"})

    @_route("POST", "/v1/audio/transcriptions")
    def _transcriptions(self, exchange: _Exchange) -> None:
        args = exchange.request.args
        models, files = args.get(b"model"), args.get(b"file")
        if not models or not models[0]:
            exchange.send_error("missing multipart field: model")
        elif not files:
            exchange.send_error("missing multipart field: file")
        else:
            exchange.send_json(
                {
                    "text": f"The length of the file is {len(files[0])} bytes",
                    "model": models[0].decode("utf-8", errors="replace"),
                    "h_content_type": exchange.header(b"content-type"),
                    "h_content_length": exchange.content_length(),
                }
            )

    @_route("POST", "/sdapi/v1/txt2img", "/sdapi/v1/img2img")
    def _sd_image(self, exchange: _Exchange) -> None:
        exchange.send_json({"model": exchange.model(), "images": []})

    @_route("GET", "/sdapi/v1/loras")
    def _sd_loras(self, exchange: _Exchange) -> None:
        exchange.send_json({"loras": []})

    def _unknown(self, exchange: _Exchange) -> None:
        exchange.send_json(exchange.echo())

    @_route("POST", "/v1/embeddings")
    def _embeddings(self, exchange: _Exchange) -> None:
        raw = exchange.json().get("input")
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            inputs: list[Any] = [raw]
        elif isinstance(raw, list):
            inputs = raw
        else:
            raise _BadRequest("'input' must be a string or a list")
        data = [
            {"object": "embedding", "index": index, "embedding": _embedding(item)}
            for index, item in enumerate(inputs)
        ]
        tokens = self.options.prompt_tokens
        exchange.send_json(
            {
                "object": "list",
                "data": data,
                "model": exchange.model(),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    # -- OpenAI chat and completions

    @_route("POST", "/v1/chat/completions")
    def _chat(self, exchange: _Exchange) -> None:
        ident, created = _new_id("chatcmpl-"), int(self.reactor.seconds())

        def respond(gen: Generation, model: str) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": gen.content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": gen.usage(),
                "timings": gen.timings(),
                **self._compat_fields(exchange),
            }

        def stream(gen: Generation, model: str) -> Stream:
            def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
                head = {"id": ident, "object": "chat.completion.chunk", "created": created}
                return sse_event({**head, "model": model, "choices": choices, **extra})

            for index, piece in enumerate(gen.pieces()):
                yield gen.token_delay
                delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
                yield chunk([{"index": 0, "delta": delta, "finish_reason": None}])
            yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            yield chunk([], usage=gen.usage(), timings=gen.timings())
            yield sse_event("[DONE]")

        self._generate(exchange, respond, stream)

    @_route("POST", "/v1/completions")
    def _completions(self, exchange: _Exchange) -> None:
        ident, created = _new_id("cmpl-"), int(self.reactor.seconds())

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def respond(gen: Generation, model: str) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [choice(gen.content, "stop")],
                "usage": gen.usage(),
                "timings": gen.timings(),
                **self._compat_fields(exchange),
            }

        def stream(gen: Generation, model: str) -> Stream:
            def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
                head = {"id": ident, "object": "text_completion", "created": created}
                return sse_event({**head, "model": model, "choices": choices, **extra})

            for piece in gen.pieces():
                yield gen.token_delay
                yield chunk([choice(piece, None)])
            yield chunk([choice("", "stop")])
            yield chunk([], usage=gen.usage(), timings=gen.timings())
            yield sse_event("[DONE]")

        self._generate(exchange, respond, stream)

    # -- llama-server native

    def _native_result(self, gen: Generation, model: str) -> dict[str, Any]:
        return {
            "index": 0,
            "content": gen.content,
            "model": model,
            "tokens_predicted": gen.completion_tokens,
            "tokens_evaluated": gen.prompt_tokens,
            "stop": True,
            "stop_type": "eos",
            "timings": gen.timings(),
        }

    def _native_stream(self, gen: Generation, model: str) -> Stream:
        for index, piece in enumerate(gen.pieces()):
            yield gen.token_delay
            yield sse_event(
                {"index": 0, "content": piece, "stop": False, "tokens_predicted": index + 1}
            )
        yield sse_event({**self._native_result(gen, model), "content": ""})

    @_route("POST", "/completion")
    def _completion(self, exchange: _Exchange) -> None:
        self._generate(exchange, self._native_result, self._native_stream)

    @_route("POST", "/infill")
    def _infill(self, exchange: _Exchange) -> None:
        self._generate(
            exchange, lambda gen, model: [self._native_result(gen, model)], self._native_stream
        )

    # -- OpenAI Responses API

    @_route("POST", "/v1/responses")
    def _responses(self, exchange: _Exchange) -> None:
        ident, item_id = _new_id("resp_"), _new_id("msg_")
        created = int(self.reactor.seconds())

        def response(gen: Generation, model: str, text: str | None) -> dict[str, Any]:
            done = text is not None
            output = [
                {
                    "type": "message",
                    "id": item_id,
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ]
            usage = {
                "input_tokens": gen.prompt_tokens,
                "output_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens,
            }
            return {
                "id": ident,
                "object": "response",
                "created_at": created,
                "status": "completed" if done else "in_progress",
                "model": model,
                "output": output if done else [],
                "usage": usage if done else None,
            }

        def stream(gen: Generation, model: str) -> Stream:
            seq = 0
            yield _typed_event(
                {
                    "type": "response.created",
                    "sequence_number": seq,
                    "response": response(gen, model, None),
                }
            )
            for piece in gen.pieces():
                yield gen.token_delay
                seq += 1
                yield _typed_event(
                    {
                        "type": "response.output_text.delta",
                        "sequence_number": seq,
                        "item_id": item_id,
                        "output_index": 0,
                        "content_index": 0,
                        "delta": piece,
                    }
                )
            yield _typed_event(
                {
                    "type": "response.completed",
                    "sequence_number": seq + 1,
                    "response": response(gen, model, gen.streamed_text),
                }
            )

        self._generate(exchange, lambda gen, model: response(gen, model, gen.content), stream)

    # -- Anthropic messages

    @_route("POST", "/v1/messages")
    def _messages(self, exchange: _Exchange) -> None:
        ident = _new_id("msg_")

        def message(model: str, content: list[Any], **rest: Any) -> dict[str, Any]:
            return {
                "id": ident,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_sequence": None,
                **rest,
            }

        def respond(gen: Generation, model: str) -> dict[str, Any]:
            usage = {"input_tokens": gen.prompt_tokens, "output_tokens": gen.completion_tokens}
            text = [{"type": "text", "text": gen.content}]
            return message(model, text, stop_reason="end_turn", usage=usage)

        def stream(gen: Generation, model: str) -> Stream:
            usage = {"input_tokens": gen.prompt_tokens, "output_tokens": 0}
            start = message(model, [], stop_reason=None, usage=usage)
            yield _typed_event({"type": "message_start", "message": start})
            yield _typed_event(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                }
            )
            for piece in gen.pieces():
                yield gen.token_delay
                yield _typed_event(
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    }
                )
            yield _typed_event({"type": "content_block_stop", "index": 0})
            yield _typed_event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": gen.completion_tokens},
                }
            )
            yield _typed_event({"type": "message_stop"})

        self._generate(exchange, respond, stream)


def _embedding(item: Any) -> list[float]:
    digest = hashlib.sha256(_dumps(item).encode()).digest()
    return [round(byte / 127.5 - 1.0, 6) for byte in digest[:8]]


# -- site -----------------------------------------------------------------


class _Channel(HTTPChannel):
    """HTTP channel that disables Nagle and tells the responder about closes."""

    site: ResponderSite

    def connectionMade(self) -> None:
        super().connectionMade()
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self.site.responder.connection_made()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.site.responder.connection_lost()


class ResponderSite(Site):
    """A Site serving a :class:`Responder`, available as ``.responder``."""

    protocol = _Channel  # type: ignore[assignment]

    def __init__(self, responder: Responder, reactor: IReactorTime) -> None:
        super().__init__(responder, reactor=reactor)
        self.responder = responder

    def log(self, request: Request) -> None:
        """The responder writes its own log lines; skip the access log."""


def build_site(
    options: ResponderOptions,
    reactor: IReactorTime,
    on_exit: Callable[[int], None] | None = None,
    out: TextIO | None = None,
) -> ResponderSite:
    """
    Build the responder's Site.  ``on_exit(code)`` is called when
    ``--exit-after`` is reached; ``out`` receives request log lines (default
    stdout).  The ``--health-delay`` clock starts now.
    """
    return ResponderSite(Responder(options, reactor, on_exit=on_exit, out=out), reactor)


# -- main ----------------------------------------------------------------


def _spawn_grandchild() -> int:
    child = subprocess.Popen([sys.executable, "-c", _GRANDCHILD_CODE])
    return child.pid


def main(argv: list[str] | None = None) -> int:
    """Run the responder until stopped; returns the process exit code."""
    options = parse_args(argv)
    print(f"My PID: {os.getpid()}", flush=True)
    if options.fork_grandchild:
        print(f"grandchild pid {_spawn_grandchild()}", flush=True)

    def exit_at_start_message() -> None:
        print(
            f"responder: exiting at start with code {options.exit_at_start}",
            file=sys.stderr,
            flush=True,
        )

    if options.exit_at_start is not None and options.start_delay <= 0:
        exit_at_start_message()
        return options.exit_at_start

    from twisted.internet import reactor as _reactor
    from twisted.internet.error import CannotListenError, ReactorNotRunning

    reactor: Any = _reactor
    exit_code: int | None = None

    def stop(code: int) -> None:
        nonlocal exit_code
        if exit_code is None:
            exit_code = code
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass  # already stopping, e.g. after SIGTERM

    def start() -> None:
        if options.exit_at_start is not None:
            exit_at_start_message()
            stop(options.exit_at_start)
            return
        site = build_site(options, reactor, on_exit=stop)
        try:
            port = reactor.listenTCP(options.port, site, interface=options.host)
        except CannotListenError as error:
            print(f"responder: {error}", file=sys.stderr, flush=True)
            stop(1)
            return
        site.responder.started_at = reactor.seconds()
        print(listening_line(options.id, options.host, port.getHost().port), flush=True)

    if options.ignore_sigterm:
        # After the reactor installed its own handlers.
        reactor.callWhenRunning(signal.signal, signal.SIGTERM, signal.SIG_IGN)
    reactor.callWhenRunning(reactor.callLater, options.start_delay, start)
    reactor.run()
    return exit_code or 0


if __name__ == "__main__":
    raise SystemExit(main())
