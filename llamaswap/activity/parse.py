"""Token/timing extraction from upstream responses, fed as the bytes pass.

Mirrors llama-swap's ``internal/server/metrics.go``: usage objects from the
OpenAI, Responses and Anthropic APIs, llama-server ``timings`` and vLLM
``metrics``.  Memory is bounded: compressed bodies are inflated piecewise,
SSE streams are scanned line by line (over-long lines dropped) and a
non-streaming body is buffered only up to ``max_buffer`` bytes.  Pure;
meant to be driven from the reactor thread.  Work stays short per call: an
SSE line is assembled from its pieces in one join (linear in its length), and
``finish_steps`` scans a big non-streaming body in slices (see
:mod:`llamaswap.steps`) instead of parsing it whole; ``finish`` runs the same
steps at once.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Iterator

from ..jsonscan import scan_object
from ..steps import Steps, drive

__all__ = [
    "MAX_BUFFER",
    "DecodeError",
    "ParseResult",
    "ResponseParser",
    "Tokens",
    "duration_ms",
    "error_message",
    "filter_accept_encoding",
]

MAX_BUFFER = 8 * 1024 * 1024
#: A non-streaming body larger than this is scanned for its usage, not parsed whole.
SCAN_ABOVE = 1024 * 1024
_PIECE = 64 * 1024  # largest inflated piece handed on at once
_MAX_ERROR_LEN = 500
_MISSING: Any = object()
_USAGE_PATHS = (("usage",), ("response", "usage"), ("message", "usage"))
_KEYS = (b"usage", b"timings", b"metrics")
_ERROR_PATHS = (("error", "message"), ("error",), ("message",), ("detail",))


@dataclass
class Tokens:
    """llama-swap's ``tokens`` object; ``prompt_ms``/``predicted_ms`` feed the duration rule only."""

    cache_tokens: int = 0
    draft_tokens: int = 0
    draft_acc_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    prompt_per_second: float = 0.0
    tokens_per_second: float = 0.0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0

    def to_json(self) -> dict[str, int | float]:
        """The serialised ``tokens`` object (timing milliseconds left out)."""
        return {
            "cache_tokens": self.cache_tokens,
            "draft_tokens": self.draft_tokens,
            "draft_acc_tokens": self.draft_acc_tokens,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "prompt_per_second": self.prompt_per_second,
            "tokens_per_second": self.tokens_per_second,
        }


@dataclass(frozen=True)
class ParseResult:
    """Outcome of :meth:`ResponseParser.finish`."""

    tokens: Tokens = field(default_factory=Tokens)
    error_msg: str | None = None
    parsed: bool = False


class DecodeError(Exception):
    """The response body could not be decompressed."""


# --------------------------------------------------------------------------- JSON helpers


def _get(value: Any, path: tuple[str, ...]) -> Any:
    """gjson-style lookup: the value at ``path`` or ``_MISSING`` (JSON null exists)."""
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return 0.0
    return 0.0


def _as_int(value: Any) -> int:
    if isinstance(value, int):
        return int(value)
    number = _as_float(value)
    if number != number or number in (float("inf"), float("-inf")):
        return 0
    return int(number)


def _loads(data: bytes) -> Any:
    """Parsed JSON, or ``_MISSING`` when ``data`` is not valid JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _MISSING


def _usage_tokens(usage: Any) -> tuple[int, int, int, bool]:
    """(input, output, cached, found) from a usage object; cached defaults to -1."""
    found = False
    counts = []
    for names in (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens")):
        count = 0
        for name in names:
            value = _get(usage, (name,))
            if value is not _MISSING:
                count, found = _as_int(value), True
                break
        counts.append(count)
    cached = -1
    for path in (
        ("cache_read_input_tokens",),
        ("input_tokens_details", "cached_tokens"),
        ("prompt_tokens_details", "cached_tokens"),
    ):
        value = _get(usage, path)
        if value is not _MISSING:
            cached, found = _as_int(value), True
            break
    return counts[0], counts[1], cached, found


def _build_tokens(inp: int, out: int, cached: int, timings: Any, metrics: Any) -> Tokens:
    """Combine usage counts with llama-server ``timings`` and vLLM ``metrics``."""
    tokens = Tokens(
        cache_tokens=cached,
        draft_tokens=-1,
        draft_acc_tokens=-1,
        input_tokens=inp,
        output_tokens=out,
        prompt_per_second=-1.0,
        tokens_per_second=-1.0,
    )
    if timings is not _MISSING:
        _apply_timings(tokens, timings)
    _apply_vllm_metrics(tokens, metrics)
    return tokens


def _apply_timings(tokens: Tokens, timings: Any) -> None:
    def num(name: str) -> Any:
        return _get(timings, (name,))

    tokens.input_tokens = _as_int(num("prompt_n"))
    tokens.output_tokens = _as_int(num("predicted_n"))
    tokens.prompt_per_second = _as_float(num("prompt_per_second"))
    tokens.tokens_per_second = _as_float(num("predicted_per_second"))
    tokens.prompt_ms = _as_float(num("prompt_ms"))
    tokens.predicted_ms = _as_float(num("predicted_ms"))
    if num("cache_n") is not _MISSING:
        tokens.cache_tokens = _as_int(num("cache_n"))
    if num("draft_n") is not _MISSING and num("draft_n_accepted") is not _MISSING:
        tokens.draft_tokens = _as_int(num("draft_n"))
        tokens.draft_acc_tokens = _as_int(num("draft_n_accepted"))


def _apply_vllm_metrics(tokens: Tokens, metrics: Any) -> None:
    drafted = _get(metrics, ("speculative_decoding", "num_draft_tokens"))
    accepted = _get(metrics, ("speculative_decoding", "num_accepted_draft_tokens"))
    if drafted is not _MISSING and accepted is not _MISSING:
        tokens.draft_tokens, tokens.draft_acc_tokens = _as_int(drafted), _as_int(accepted)
    ttft = _as_float(_get(metrics, ("time_to_first_token_ms",)))
    if ttft > 0:
        tokens.prompt_per_second = (tokens.input_tokens - max(tokens.cache_tokens, 0)) / (ttft / 1000)
    itl = _as_float(_get(metrics, ("mean_itl_ms",)))
    if itl > 0:
        tokens.tokens_per_second = 1000 / itl


# --------------------------------------------------------------------------- public helpers


def error_message(status: int, body: bytes, content_type: str = "") -> str:
    """llama-swap's ``error_msg`` for a non-200 response.

    The first non-blank string at ``error.message``, ``error``, ``message`` or
    ``detail`` (trimmed, cut to 500 characters plus ``...``), else
    ``"<code> <StatusText>"``.  Like llama-swap the body is tried as JSON
    whatever ``content_type`` says; the argument is accepted for call sites
    that have it at hand.
    """
    del content_type
    doc = _loads(body) if body else _MISSING
    for path in _ERROR_PATHS:
        value = _get(doc, path)
        if isinstance(value, str) and value.strip():
            message = value.strip()
            if len(message) > _MAX_ERROR_LEN:
                message = message[:_MAX_ERROR_LEN] + "..."
            return message
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def duration_ms(wall_ms: int, tokens: Tokens) -> int:
    """``max(wall clock, timings.prompt_ms + timings.predicted_ms)``: timings only lengthen it."""
    return max(int(wall_ms), int(tokens.prompt_ms + tokens.predicted_ms))


def filter_accept_encoding(value: str | None) -> str:
    """Keep only the ``gzip``/``deflate`` entries (parameters kept) of an Accept-Encoding value."""
    if not value:
        return ""
    kept = []
    for part in value.split(","):
        part = part.strip()
        if part.split(";", 1)[0].strip().lower() in ("gzip", "deflate"):
            kept.append(part)
    return ", ".join(kept)


# --------------------------------------------------------------------------- decoders


class _Identity:
    """Pass-through for absent or unknown encodings (as llama-swap does)."""

    pending = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        yield data

    def finish(self) -> Iterator[bytes]:
        return iter(())


class _Inflate:
    """Incremental gzip (multi-member) or deflate (zlib-wrapped or raw) inflater."""

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._head = b""  # deflate: bytes held until the wrapper can be told
        self._obj: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self._ended = False  # deflate stream complete: later bytes are ignored

    @property
    def pending(self) -> int:
        return len(self._head) + (len(self._obj.unconsumed_tail) if self._obj else 0)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._ended:
            return
        if self._obj is None:
            self._head += data
            if len(self._head) < 2:
                return
            data, self._head = self._head, b""
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if _zlib_header(data) else -zlib.MAX_WBITS)
        yield from self._run(data)

    def finish(self) -> Iterator[bytes]:
        if self._obj is None:  # a single byte of deflate: cannot be a stream
            self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
            yield from self._run(self._head)
        try:
            tail = self._obj.flush()
        except zlib.error as exc:
            raise DecodeError(str(exc)) from None
        if tail:
            yield tail
        if not self._obj.eof:
            raise DecodeError("unexpected EOF")

    def _run(self, data: bytes) -> Iterator[bytes]:
        while True:
            try:
                out = self._obj.decompress(data, _PIECE)
            except zlib.error as exc:
                raise DecodeError(str(exc)) from None
            if out:
                yield out
            data = self._obj.unconsumed_tail
            if self._obj.eof:
                data = self._obj.unused_data
                if not data:
                    return
                if not self._gzip:
                    self._ended = True  # trailing bytes after a deflate stream are ignored
                    return
                self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)  # next gzip member
            elif not data and len(out) < _PIECE:
                return


def _zlib_header(data: bytes) -> bool:
    cmf, flg = data[0], data[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and ((cmf << 8) | flg) % 31 == 0


def _decoder(content_encoding: str) -> _Identity | _Inflate:
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return _Inflate(gzip=True)
    if encoding == "deflate":
        return _Inflate(gzip=False)
    return _Identity()


# --------------------------------------------------------------------------- body sinks


class _Buffer:
    """Keeps the first ``limit`` bytes; remembers whether more arrived."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self.size = 0
        self.overflow = False

    def feed(self, data: bytes) -> None:
        if self.overflow:
            return
        if self.size + len(data) > self._limit:
            self._chunks, self.size, self.overflow = [], 0, True
            return
        self._chunks.append(data)
        self.size += len(data)

    def value(self) -> bytes:
        return b"".join(self._chunks)


class _JSONSink:
    """Non-streaming body: buffered (bounded), parsed at the end."""

    def __init__(self, req_path: str, limit: int) -> None:
        self._infill = req_path.startswith("/infill")
        self._buffer = _Buffer(limit)

    @property
    def buffered(self) -> int:
        return self._buffer.size

    def feed(self, data: bytes) -> None:
        self._buffer.feed(data)

    def finish(self) -> Tokens | None:
        return drive(self.finish_steps())

    def finish_steps(self) -> "Steps[Tokens | None]":
        """A body above ``SCAN_ABOVE`` is scanned in steps for its top-level
        ``usage``/``timings``/``metrics`` (parsed alone) instead of parsed whole."""
        if self._buffer.overflow:
            return None
        body = self._buffer.value()
        if not any(key in body for key in _KEYS):
            return None
        scan = (yield from scan_object(body)) if len(body) > SCAN_ABOVE else None
        if scan is not None:
            usage, timings, metrics = (scan.get(k, _MISSING) for k in ("usage", "timings", "metrics"))
        else:  # small, or not an object (an /infill list): parsed whole
            doc = _loads(body)
            usage, timings, metrics = (_get(doc, (k,)) for k in ("usage", "timings", "metrics"))
            if self._infill and isinstance(doc, list) and doc:
                timings = _get(doc[-1], ("timings",))
        if usage is _MISSING and timings is _MISSING and metrics is _MISSING:
            return None
        inp, out, cached, _ = _usage_tokens(usage)
        return _build_tokens(inp, out, cached, timings, metrics)


class _SSESink:
    """``text/event-stream`` body: ``data:`` lines scanned as they complete."""

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        # the incomplete last line, as pieces: joined once when its newline
        # comes, so a long line costs time linear in its length
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._skipping = False  # inside an over-long line being dropped
        self._input = self._output = 0
        self._cached = -1
        self._timings: Any = _MISSING
        self._metrics: Any = _MISSING
        self._any = False

    @property
    def buffered(self) -> int:
        return self._pending_size

    def feed(self, data: bytes) -> None:
        end = data.rfind(b"\n")  # only the new bytes are searched
        if end < 0:
            self._hold(data)
            return
        if self._pending:
            self._pending.append(data[: end + 1])
            head = b"".join(self._pending)
        else:
            head = data[: end + 1]
        self._pending, self._pending_size = [], 0
        if self._skipping:
            head = head[head.find(b"\n") + 1 :]
            self._skipping = False
        if any(key in head for key in _KEYS):
            for line in head.split(b"\n"):
                if len(line) <= self._max_line:
                    self._line(line)
        self._hold(data[end + 1 :])

    def finish(self) -> Tokens | None:
        if not self._skipping:
            self._line(b"".join(self._pending))
        self._pending, self._pending_size = [], 0
        if not self._any:
            return None
        return _build_tokens(self._input, self._output, self._cached, self._timings, self._metrics)

    def _hold(self, data: bytes) -> None:
        if self._skipping:
            return
        if self._pending_size + len(data) > self._max_line:
            self._pending, self._pending_size, self._skipping = [], 0, True
            return
        if data:
            self._pending.append(data)
            self._pending_size += len(data)

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if not data or data == b"[DONE]" or not any(key in data for key in _KEYS):
            return
        event = _loads(data)
        if event is _MISSING:
            return
        self._merge_usage(event)
        for name in ("timings", "metrics"):
            value = _get(event, (name,))
            if value is not _MISSING:
                setattr(self, "_" + name, value)
                self._any = True

    def _merge_usage(self, event: Any) -> None:
        for path in _USAGE_PATHS:
            usage = _get(event, path)
            if usage is _MISSING:
                continue
            inp, out, cached, found = _usage_tokens(usage)
            if not found:
                continue
            self._any = True
            if inp > 0:
                self._input = inp
            if out > 0:
                self._output = out
            if cached >= 0:
                self._cached = cached


# --------------------------------------------------------------------------- the parser


class ResponseParser:
    """Watches one upstream response body go by and extracts its token statistics.

    ``feed`` every body chunk as it is relayed, then call ``finish`` once.
    ``max_buffer`` bounds both a buffered non-streaming body (larger: not
    parsed) and any single SSE line (longer: dropped).  ``status`` other than 200 switches to error-message mode: the (decoded)
    body is buffered up to ``max_buffer`` and ``finish`` reports
    :func:`error_message` with all-zero tokens.
    """

    def __init__(
        self,
        content_type: str,
        content_encoding: str,
        req_path: str,
        max_buffer: int = MAX_BUFFER,
        *,
        status: int = 200,
    ) -> None:
        self._content_type = content_type or ""
        self._status = status
        self._decoder = _decoder(content_encoding)
        self._error: DecodeError | None = None
        self._raw = 0
        self._finished = False
        self._sink: _Buffer | _JSONSink | _SSESink
        if status != 200:
            self._sink = _Buffer(max_buffer)
        elif "text/event-stream" in self._content_type.lower():
            self._sink = _SSESink(max_buffer)
        else:
            self._sink = _JSONSink(req_path or "", max_buffer)

    @property
    def buffered_bytes(self) -> int:
        """Bytes currently held by the parser (decoder input + body/line buffers)."""
        sink = self._sink
        held = sink.size if isinstance(sink, _Buffer) else sink.buffered
        return held + self._decoder.pending

    def feed(self, chunk: bytes) -> None:
        """Take the next raw (possibly compressed) body chunk."""
        if not chunk or self._finished or self._error is not None:
            return
        self._raw += len(chunk)
        self._pump(self._decoder.feed, chunk)

    def finish(self) -> ParseResult:
        """Flush the decoder and return the extracted tokens / error message."""
        return drive(self.finish_steps())

    def finish_steps(self) -> "Steps[ParseResult]":
        """:meth:`finish` in steps (see :mod:`llamaswap.steps`): a big
        non-streaming body is scanned a slice at a time, not parsed in one go."""
        if self._finished:
            raise RuntimeError("ResponseParser.finish() called twice")
        self._finished = True
        if self._raw and self._error is None:
            self._pump(self._decoder.finish)
        if self._status != 200:
            return ParseResult(error_msg=self._failure_message())
        if not self._raw:
            return ParseResult()
        if self._error is not None:
            return ParseResult(error_msg=f"response decompression failed: {self._error}")
        assert not isinstance(self._sink, _Buffer)
        if isinstance(self._sink, _JSONSink):
            tokens = yield from self._sink.finish_steps()
        else:
            tokens = self._sink.finish()
        return ParseResult() if tokens is None else ParseResult(tokens, None, True)

    def _pump(self, step: Any, *args: bytes) -> None:
        try:
            for piece in step(*args):
                self._sink.feed(piece)
        except DecodeError as exc:
            self._error = exc
            self._decoder, self._sink = _Identity(), _Buffer(0)  # release what was held

    def _failure_message(self) -> str:
        if self._error is not None:
            return f"response decode failed: {self._error}"
        assert isinstance(self._sink, _Buffer)
        body = b"" if self._sink.overflow else self._sink.value()
        return error_message(self._status, body, self._content_type)
