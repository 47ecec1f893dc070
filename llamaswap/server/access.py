"""The access log: one line per request in llama-swap's format.

``Request <ip> "<METHOD> <path> <proto>" <status> <bytes> "<UA>" <duration>``;
health probes and metrics scrapes are skipped.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web import http
from twisted.web.server import Request, Site

from .. import logs
from ..httpclient import no_delay

SKIPPED = (b"/wol-health", b"/api/performance", b"/metrics")


class _Discard:
    """Stands in for the body file of a request refused before its body came."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, *args) -> bytes:
        return b""

    def close(self) -> None:
        pass


class LlamaSwapRequest(Request):
    """Checks API key and body size as soon as the headers are in, so a refused
    upload is discarded instead of spooled to disk, and works on listeners
    without a host (unix sockets)."""

    refused = None
    _limit: "int | None" = None
    _received = 0

    def gotLength(self, length) -> None:
        front = getattr(getattr(self.channel, "site", None), "front", None)
        if front is not None:
            path = (getattr(self.channel, "_path", b"") or b"").split(b"?", 1)[0]
            method = getattr(self.channel, "_command", b"") or b""
            self.refused = front.check(self, method, path, length)
            if self.refused is not None:
                self.content = _Discard()
                return
            self._limit = front.body_limit()
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused is not None:
            return
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:  # chunked bodies have no length
            self.refused = (413, "request body too large", None)
            self.content.close()
            self.content = _Discard()
            return
        super().handleContentChunk(data)

    def getRequestHostname(self) -> bytes:
        host = self.getHeader(b"host")
        if host:
            return host.split(b":", 1)[0] if not host.startswith(b"[") else host.split(b"]", 1)[0] + b"]"
        return str(getattr(self.getHost(), "host", "localhost")).encode()


def format_duration(seconds: float) -> str:
    """Go's Duration formatting, roughly: 1.234ms, 2.5s, 150µs."""
    if seconds >= 1:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    if seconds >= 0.001:
        return f"{seconds * 1000:.3f}ms"
    return f"{seconds * 1e6:.0f}µs"


_parse_content_type = getattr(http, "_parseContentType", None)


def _fast_parse_content_type(line: bytes) -> bytes:
    """Twisted parses every POST's Content-Type with the email package (about
    0.1 ms) only to spot form bodies; plain types need just the lower-cased
    media type."""
    head = line.split(b";", 1)[0].strip().lower()
    if b"/" not in head or head in (b"application/x-www-form-urlencoded", b"multipart/form-data"):
        return _parse_content_type(line)
    return head


def install_fast_content_type() -> None:
    """Use :func:`_fast_parse_content_type` (a no-op if Twisted changes)."""
    if _parse_content_type is not None:
        http._parseContentType = _fast_parse_content_type


class AccessLogSite(Site):
    noisy = False
    log_ = Logger(namespace="llamaswap.access")

    def __init__(self, resource, clock, **kw):
        kw.setdefault("requestFactory", LlamaSwapRequest)
        super().__init__(resource, **kw)
        self.clock = clock
        self.front = resource if hasattr(resource, "check") else None
        install_fast_content_type()

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        make = protocol.makeConnection

        def make_connection(transport) -> None:
            no_delay(transport)
            make(transport)

        protocol.makeConnection = make_connection
        return protocol

    def log(self, request) -> None:
        if request.path in SKIPPED:
            return
        from .app import client_ip, header

        started = getattr(request, "llamaswap_started", None)
        duration = format_duration(self.clock.seconds() - started) if started is not None else "-"
        line = (f'Request {client_ip(request)} "{request.method.decode("latin-1")} '
                f'{request.uri.decode("latin-1")} {request.clientproto.decode("latin-1")}" '
                f'{request.code} {request.sentLength} "{header(request, b"user-agent")}" {duration}')
        hub = logs.hub()
        if hub.installed:  # our observer owns stdout: skip the logging machinery (hot path)
            hub.info(line)
        else:
            self.log_.info("{line}", line=line)
