"""Records one metered request: tokens as the bytes pass, then a row and a capture.

The proxy calls ``on_headers`` and ``on_chunk`` while it relays the response;
``finish`` builds the :class:`ActivityEntry`.  The response body is kept only
when a capture needs it (bounded by the capture store's size) and is
decompressed for the capture, as llama-swap stores it.  ``finish_steps`` and
``capture_steps`` do the heavy part (scanning a big response, inflating a big
body) a step at a time, for :func:`llamaswap.steps.run_in_slices`.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Optional

from ..steps import Steps, drive
from .captures import CAPTURE_RESP_BODY, Capture, build_capture, capture_mask
from .parse import ResponseParser, duration_ms
from .store import ActivityEntry

CLIENT_CLOSED = 499  # the client went away before the response was complete


#: Output inflated per step when decompressing a captured body.
PIECE = 512 * 1024


def _inflate(body: bytes, wbits: int, limit: int) -> "Steps[Optional[bytes]]":
    """``body`` inflated ``PIECE`` bytes per step; None past ``limit`` bytes.
    Raises ``zlib.error`` on a corrupt stream."""
    obj = zlib.decompressobj(wbits)
    out: list[bytes] = []
    size = 0
    data = body
    while True:
        piece = obj.decompress(data, PIECE)
        size += len(piece)
        if size > limit:
            return None
        out.append(piece)
        data = obj.unconsumed_tail
        if obj.eof or (not data and len(piece) < PIECE):
            break
        yield
    tail = obj.flush()
    if size + len(tail) > limit:
        return None
    out.append(tail)
    return b"".join(out)


def _decompress(body: bytes, encoding: str, limit: int) -> "Steps[Optional[bytes]]":
    """The body as the client sees it, for a capture; None when it inflates past ``limit``
    (left out, as a body that big could never be stored, rather than cut)."""
    encoding = encoding.lower().strip()
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return body
    wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
    try:
        return (yield from _inflate(body, wbits, limit))
    except zlib.error:
        try:
            return (yield from _inflate(body, -zlib.MAX_WBITS, limit))
        except zlib.error:
            return body


class ActivityRecorder:
    def __init__(self, clock, wall, model: str, req_path: str, req_headers: Mapping[str, str],
                 req_body: bytes, capture_limit: int = 0, metadata: Optional[dict] = None,
                 remote_ip: str = "", key_name: str = ""):
        self.clock = clock
        self.wall = wall
        self.started = clock.seconds()
        self.model = model
        self.req_path = req_path
        self.req_headers = dict(req_headers)
        self.req_body = req_body
        self.metadata = metadata
        self.remote_ip = remote_ip
        self.key_name = key_name  # the API key's name, never the key
        self.mask = capture_mask(req_path)
        self.capture_limit = capture_limit
        self.status: Optional[int] = None
        self.content_type = ""
        self.content_encoding = ""
        self.resp_headers: dict = {}
        self.parser: Optional[ResponseParser] = None
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.keep_body = bool(capture_limit) and bool(self.mask & CAPTURE_RESP_BODY)
        self.failure: Optional[str] = None

    def on_headers(self, status: int, headers: Mapping[str, str]) -> None:
        self.status = status
        self.resp_headers = dict(headers)
        lower = {k.lower(): v for k, v in headers.items()}
        self.content_type = lower.get("content-type", "")
        self.content_encoding = lower.get("content-encoding", "")
        self.parser = ResponseParser(self.content_type, self.content_encoding, self.req_path, status=status)

    def on_chunk(self, data: bytes) -> None:
        if self.parser is not None:
            self.parser.feed(data)
        if self.keep_body:
            if self.body_bytes + len(data) > self.capture_limit:
                self.keep_body = False  # larger than the whole store: no capture body
                self.body, self.body_bytes = [], 0
            else:
                self.body.append(data)
                self.body_bytes += len(data)

    def own_response(self, status: int, content_type: str, body: bytes) -> None:
        """The proxy answered itself (routing error, 502...): record that answer."""
        if self.status is None:
            self.on_headers(status, {"Content-Type": content_type})
            self.on_chunk(body)

    def fail(self, status: int, message: str) -> None:
        """The response failed after its head came (upstream died, timeouts.bodyIdle):
        record ``status`` and ``message`` instead of the upstream's status."""
        if self.status is None:
            self.on_headers(status, {})
        self.status = status
        self.failure = message

    def finish(self) -> ActivityEntry:
        return drive(self.finish_steps())

    def finish_steps(self) -> "Steps[ActivityEntry]":
        """:meth:`finish` in steps: a big non-streaming response is scanned in
        slices (see :mod:`llamaswap.steps`)."""
        tokens = None
        error = None
        if self.parser is not None:
            result = yield from self.parser.finish_steps()
            tokens, error = result.tokens, result.error_msg
        wall_ms = int((self.clock.seconds() - self.started) * 1000)
        entry = ActivityEntry(
            timestamp=self.wall(), model=self.model, req_path=self.req_path,
            resp_content_type=self.content_type, resp_status_code=self.status or 0,
            duration_ms=duration_ms(wall_ms, tokens) if tokens is not None else wall_ms,
            error_msg=error, metadata=self.metadata or None, remote_ip=self.remote_ip,
            key_name=self.key_name,
        )
        if tokens is not None:
            entry.tokens = tokens
        if self.status == CLIENT_CLOSED:
            entry.error_msg = "client disconnected"
        if self.failure is not None:
            entry.error_msg = self.failure
        return entry

    def capture(self, entry_id: int) -> Optional[Capture]:
        return drive(self.capture_steps(entry_id))

    def capture_steps(self, entry_id: int) -> "Steps[Optional[Capture]]":
        """The capture for ``entry_id`` (None when captures are off).

        Size limits come before any work: a request body larger than the
        capture limit (the whole store) is left out, as the response body
        already is once it outgrows it (``on_chunk``), and a compressed
        response body is inflated in steps and left out the moment it passes
        the limit; so nothing too big is ever decompressed, CBOR-encoded or
        compressed."""
        if not self.capture_limit:
            return None
        body = None
        if self.mask & CAPTURE_RESP_BODY and self.keep_body and self.status == 200:
            joined = b"".join(self.body)
            yield
            body = yield from _decompress(joined, self.content_encoding, self.capture_limit)
        req_body = self.req_body
        if req_body is not None and len(req_body) > self.capture_limit:
            req_body = None
        return build_capture(entry_id, self.req_path, self.req_headers, req_body,
                             self.resp_headers, body, key_name=self.key_name)
