"""The access log: one line per request in llama-swap's format.

``Request <ip> "<METHOD> <path> <proto>" <status> <bytes> "<UA>" <duration>``,
plus `` key=<name>`` when API keys are configured; health probes and metrics
scrapes are skipped.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.server import Request, Site

from .. import logs
from .fast import FastChannel
from .http import client_ip, header

SKIPPED = (b"/wol-health", b"/api/performance", b"/metrics")
log = Logger()


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


def request_line(request: Request) -> tuple[bytes, bytes]:
    """The method and path (without the query) of a request whose headers are
    in but whose body is not yet (Twisted sets ``Request.method`` and
    ``Request.path`` only once the whole body has arrived): the channel
    (``fast._Stream``) holds them from the moment the head is parsed.
    ``(b"", b"")`` on a channel without them."""
    channel = request.channel
    path = (getattr(channel, "uri", b"") or b"").split(b"?", 1)[0]
    method = getattr(channel, "command", b"") or b""
    return method, path


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
            method, path = request_line(self)
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


class AccessLogSite(Site):
    noisy = False
    log_ = Logger(namespace="llamaswap.access")
    #: seconds a client may take no response bytes before its connection is
    #: dropped (see ``LlamaSwapChannel``; nginx's send_timeout default)
    send_timeout = 60.0

    def __init__(self, resource, clock, **kw):
        kw.setdefault("requestFactory", LlamaSwapRequest)
        # Twisted would parse every multipart/urlencoded POST body into request.args with the email
        # package: seconds of reactor time for a big upload, for arguments nothing here reads.  With
        # that off it does not look at a POST's Content-Type either.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kw)
        self.clock = clock
        self.front = resource if hasattr(resource, "check") else None

    def buildProtocol(self, addr):  # noqa: N802 - Twisted's name
        """An httptools channel (``fast.py``) handing requests to this site."""
        channel = FastChannel(self)
        channel.factory = self
        return channel

    def log(self, request) -> None:
        if request.path in SKIPPED:
            return
        started = getattr(request, "llamaswap_started", None)
        duration = format_duration(self.clock.seconds() - started) if started is not None else "-"
        line = (f'Request {client_ip(request)} "{request.method.decode("latin-1")} '
                f'{request.uri.decode("latin-1")} {request.clientproto.decode("latin-1")}" '
                f'{request.code} {request.sentLength} "{header(request, b"user-agent")}" {duration}')
        verdict = getattr(request, "llamaswap_verdict", None)
        key_name = verdict.key_name if verdict is not None else None
        if key_name is not None:  # with apiKeys: the key's name (never the key), "-" for none
            line += f" key={key_name}"
        hub = logs.hub()
        if hub.installed:  # our observer owns stdout: skip the logging machinery (hot path)
            hub.info(line)
        else:
            self.log_.info("{line}", line=line)
