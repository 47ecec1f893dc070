"""The access log: one line per request in llama-swap's format.

``Request <ip> "<METHOD> <path> <proto>" <status> <bytes> "<UA>" <duration>``,
plus `` key=<name>`` when API keys are configured; health probes and metrics
scrapes are skipped.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web import http
from twisted.web.server import Request, Site

from .. import logs
from ..httpclient import no_delay
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
    in but whose body is not yet.

    Twisted sets ``Request.method`` and ``Request.path`` only once the whole
    body has arrived (``requestReceived``), and no public attribute holds the
    request line before that; the HTTP/1.1 channel keeps it in ``_command``
    and ``_path`` from the moment it parsed that line until the request is
    complete.  ``tests/test_twisted_private.py`` checks that this still holds
    for the installed Twisted.  ``(b"", b"")`` on a channel without them,
    such as an HTTP/2 stream (only with the optional ``h2`` package, over TLS).
    """
    channel = request.channel
    path = (getattr(channel, "_path", b"") or b"").split(b"?", 1)[0]
    method = getattr(channel, "_command", b"") or b""
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


_PHRASES = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


class LlamaSwapChannel(http.HTTPChannel):
    """Twisted's HTTP/1.1 channel with real answers to requests it cannot
    parse, and a bound on clients that stop reading.

    * A request head over Twisted's limits (a line over ``MAX_LENGTH``, 16 KiB,
      or request line plus headers over ``totalHeadersSize``, 16 KiB) is
      answered ``431 Request Header Fields Too Large``, as Go's net/http does
      (Twisted drops a too-long line without a word and answers an oversized
      head with a bare 400).  Other malformed requests keep their 400, now
      with a body and ``Connection: close``.
    * After such an answer the connection is half-closed and whatever the
      client still sends is read and dropped for ``LINGER`` seconds before the
      close, so data left unread does not turn the close into a reset that
      destroys the answer (Go's closeWriteAndWait, nginx's lingering close).
    * The site's ``send_timeout``: a client that leaves our send buffer full
      for that long (from the pause until Twisted has written the whole buffer
      out and resumes us: a client that never reads, or drains ~64 KiB slower
      than about 1 KiB/s per minute) loses its connection, and its request is cancelled like any client that went
      away, which frees its model slot and stops the upstream (nginx's
      send_timeout).
    """

    # Twisted offers no public hooks for these answers: the overrides below use
    # HTTPChannel's private ``_receivedHeaderSize`` (bytes of the head so far) and
    # ``_respondToBadRequestAndDisconnect`` (its bare 400), which
    # tests/test_twisted_private.py checks against the installed Twisted.

    LINGER = 1.0
    _refusing = False
    _linger = None
    _stalled = None

    def lineReceived(self, line):
        if getattr(self, "_receivedHeaderSize", 0) + len(line) > self.totalHeadersSize:
            return self._refuse(431)
        return super().lineReceived(line)

    def lineLengthExceeded(self, line):
        return self._refuse(431)

    def _respondToBadRequestAndDisconnect(self):  # Twisted's bare 400 for whatever it cannot parse
        self._refuse(400)

    def _refuse(self, status: int) -> None:
        if self._refusing:
            return
        self._refusing = True
        # nothing more is parsed on this connection
        self.clearLineBuffer()
        self.dataReceived = self.lineReceived = self.rawDataReceived = _ignore
        self.setTimeout(None)
        phrase = _PHRASES[status]
        body = b"%d %s" % (status, phrase)
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (status, phrase, len(body), body))
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
            return
        half_close()
        self._linger = self.callLater(self.LINGER, self.transport.loseConnection)

    def pauseProducing(self):
        super().pauseProducing()
        timeout = getattr(getattr(self, "site", None), "send_timeout", None)
        if timeout and self._stalled is None:
            self._stalled = self.callLater(timeout, self._send_timed_out)

    def resumeProducing(self):
        if self._stalled is not None:
            if self._stalled.active():
                self._stalled.cancel()
            self._stalled = None
        super().resumeProducing()

    def _send_timed_out(self) -> None:
        self._stalled = None
        log.info("client {peer} took no data for {timeout:g}s: connection dropped",
                 peer=_peer(self.transport), timeout=self.site.send_timeout)
        self.transport.abortConnection()

    def connectionLost(self, reason):
        for call in (self._stalled, self._linger):
            if call is not None and call.active():
                call.cancel()
        self._stalled = self._linger = None
        super().connectionLost(reason)


def _ignore(*args) -> None:
    pass


def _peer(transport) -> str:
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", None)
    return f"{host}:{peer.port}" if host else "-"


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

    def protocol(self):
        """Twisted's HTTP/1.1-or-2 wrapper around a ``LlamaSwapChannel``
        (private, as Twisted's own ``Site.protocol``; checked by
        tests/test_twisted_private.py)."""
        generic = getattr(http, "_GenericHTTPChannelProtocol", None)
        return generic(LlamaSwapChannel()) if generic is not None else LlamaSwapChannel()

    def __init__(self, resource, clock, **kw):
        kw.setdefault("requestFactory", LlamaSwapRequest)
        # Twisted would parse every multipart/urlencoded POST body into request.args with the email
        # package: seconds of reactor time for a big upload, for arguments nothing here reads.  With
        # that off it does not look at a POST's Content-Type either.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kw)
        self.clock = clock
        self.front = resource if hasattr(resource, "check") else None

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
