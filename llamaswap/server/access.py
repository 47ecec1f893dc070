"""The access log: one line per request in llama-swap's format.

``Request <ip> "<METHOD> <path> <proto>" <status> <bytes> "<UA>" <duration>``;
health probes and metrics scrapes are skipped.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.server import Request, Site

SKIPPED = (b"/wol-health", b"/api/performance", b"/metrics")


class LlamaSwapRequest(Request):
    """A request that also works on listeners without a host (unix sockets)."""

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

    def __init__(self, resource, clock, **kw):
        kw.setdefault("requestFactory", LlamaSwapRequest)
        super().__init__(resource, **kw)
        self.clock = clock

    def log(self, request) -> None:
        if request.path in SKIPPED:
            return
        from .app import client_ip, header

        started = getattr(request, "llamaswap_started", None)
        duration = format_duration(self.clock.seconds() - started) if started is not None else "-"
        self.log_.info(
            'Request {ip} "{method} {path} {proto}" {status} {size} "{agent}" {duration}',
            ip=client_ip(request), method=request.method.decode("latin-1"),
            path=request.uri.decode("latin-1"), proto=request.clientproto.decode("latin-1"),
            status=request.code, size=request.sentLength, agent=header(request, b"user-agent"),
            duration=duration,
        )
