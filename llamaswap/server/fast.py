"""The HTTP/1.1 server side: one ``FastChannel`` per client connection, on httptools.

twisted.web's ``HTTPChannel`` parses requests line by line in Python; here
httptools (llhttp, in C, as uvicorn uses) parses them, and each parsed
request is handed to the ``Site`` as an ordinary twisted.web ``Request``
(``LlamaSwapRequest``), attached to a small per-request ``_Stream`` that
plays the part of its channel, as Twisted's own HTTP/2 server does with
``H2Stream``.  So everything above the channel stays as it was: the
resource tree, Klein for the API, UI and observability routes, the front
(``front.py``: client address, API keys, CORS), the access log; and the
model-dispatched routes go from the front straight to the proxy pipeline
(``FrontResource.routes``), skipping Klein's routing.  Why hand the parsed
request to the Site rather than serve Klein's resources from a second
request type: one request type means every handler and helper sees the
same object, tested the same way, and the cost that remained in twisted.web
(the parser, the line buffering) is what this replaces.

What the channel does itself:

* requests are answered in order; while one is answered, later pipelined
  ones are parsed and queued (reading stops with ``MAX_QUEUED`` waiting);
* ``Expect: 100-continue``: ``100 Continue`` is sent when the request is
  the one being answered (never inside an earlier response);
* persistence as Twisted decides it: HTTP/1.1 without ``Connection: close``
  (the response then says ``Connection: close`` and the connection closes
  after it);
* a head over ``MAX_HEAD`` bytes is answered 431, anything httptools
  cannot parse 400, each with a body and ``Connection: close``, then the
  connection lingers (reads and drops) for ``LINGER`` seconds so the client
  reads the answer (Go's closeWriteAndWait, nginx's lingering close);
* flow control: the channel is its transport's producer; a full send
  buffer pauses the producer the current request registered (the upstream
  relay), and a client that leaves it full for the site's ``send_timeout``
  loses its connection (nginx's send_timeout);
* an idle keep-alive connection is closed after the site's ``timeOut``
  (``Site(timeout=...)``, 60 s by default);
* ``Upgrade`` (h2c, websocket) is ignored, as twisted.web ignores it: the
  request is answered over HTTP/1.1 (one with a body is answered 400);
* a lost connection is reported to every request not yet answered
  (``Request.connectionLost``), which cancels what they were doing.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import httptools
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ..httpclient import no_delay

log = Logger()

#: request line plus headers, at most (Twisted's and nginx's 16 KiB-ish figure)
MAX_HEAD = 16 * 1024
#: requests parsed and waiting behind the one being answered before reading stops
MAX_QUEUED = 8
_PHRASES = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0", "0.9": b"HTTP/0.9"}


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the head is over ``MAX_HEAD`` (answered 431)."""


class _Unparseable(Exception):
    """Raised from a parser callback: a request the channel cannot serve (answered 400)."""


class _Stream:
    """The channel one request sees (the interface ``twisted.web.http.Request``
    uses: ``getPeer``, ``write``, ``writeHeaders``, ``registerProducer``,
    ``requestDone``...), bound to its ``FastChannel``."""

    def __init__(self, channel: "FastChannel", method: bytes, uri: bytes, version: bytes, persistent: bool):
        self.channel = channel
        self.site = channel.site
        self.factory = channel.site  # Request.finish logs through channel.factory
        self.transport = channel.transport
        # the request line before the body is in: read by access.request_line
        self.command, self.uri = method, uri
        self.version = version
        self.persistent = persistent
        self.request = None
        self.complete = False  # the whole request (body included) is in
        self.early = False  # answered before its body is in (see FastChannel._answer_early)
        self.started = False  # handed to the Site
        self.continue_wanted = False
        self.done = False

    def getPeer(self):  # noqa: N802 - the channel interface's names
        return self.channel.transport.getPeer()

    def getHost(self):  # noqa: N802
        return self.channel.transport.getHost()

    def isSecure(self) -> bool:  # noqa: N802
        return self.channel.secure

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:  # noqa: N802
        if not self.persistent and not headers.hasHeader(b"connection"):
            headers.setRawHeaders(b"connection", [b"close"])
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts.extend((name, b": ", value, b"\r\n"))
        parts.append(b"\r\n")
        self.channel.transport.write(b"".join(parts))

    def write(self, data: bytes) -> None:
        self.channel.transport.write(data)

    def writeSequence(self, data) -> None:  # noqa: N802
        self.channel.transport.writeSequence(data)

    def registerProducer(self, producer, streaming: bool) -> None:  # noqa: N802
        self.channel.request_producer(producer, streaming)

    def unregisterProducer(self) -> None:  # noqa: N802
        self.channel.request_producer(None, True)

    def loseConnection(self) -> None:  # noqa: N802
        self.channel.transport.loseConnection()

    def requestDone(self, request) -> None:  # noqa: N802
        self.done = True
        self.channel.request_done(self)


@implementer(IPushProducer)
class _PullAsPush:
    """A pull producer (``registerProducer(p, False)``, as ``static.File``'s)
    driven like a push one: ``resumeProducing`` once per reactor turn while
    the send buffer has room, none while the transport has paused us."""

    def __init__(self, producer, clock):
        self.producer, self.clock = producer, clock
        self.paused = False
        self.attached = True
        self.call = None
        self._schedule()

    def _schedule(self) -> None:
        if self.call is None and self.attached and not self.paused:
            self.call = self.clock.callLater(0, self._pull)

    def _pull(self) -> None:
        self.call = None
        if self.attached and not self.paused:
            self.producer.resumeProducing()
            self._schedule()

    def detach(self) -> None:
        """The request unregistered it: ask for nothing more."""
        self.attached = False
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:  # noqa: N802
        self.detach()
        self.producer.stopProducing()


@implementer(IPushProducer)
class FastChannel(Protocol):
    """One client connection (see the module docstring)."""

    LINGER = 1.0

    def __init__(self, site):
        self.site = site
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque = deque()  # streams in arrival order; the first is being answered
        self.current: Optional[_Stream] = None  # the one being parsed
        self.producer = None  # what the request being answered registered
        self.paused = False  # by the transport: its send buffer is full
        self.reading_paused = False  # by us: too many pipelined requests
        self.secure = False
        self.refusing = False
        self.refusal: Optional[int] = None  # a 400/431 to send once the requests before it are answered
        self.lost = False
        self.stalled = None
        self.idle = None
        self.linger = None
        self._url = b""
        self._headers: list = []
        self._head_size = 0  # request line and headers parsed so far
        self._raw_head = 0  # bytes received while in a head
        self.in_head = False

    # -- connection --
    def connectionMade(self) -> None:
        self.secure = ISSLTransport(self.transport, None) is not None
        no_delay(self.transport)
        self.transport.registerProducer(self, True)
        self._arm_idle()

    def dataReceived(self, data: bytes) -> None:
        if self.refusing:
            return  # lingering: read and dropped
        if self.idle is not None:
            self._disarm_idle()
        try:
            while True:
                try:
                    self.parser.feed_data(data)
                    break
                except httptools.HttpParserUpgrade as upgrade:
                    # An Upgrade (h2c from ``curl --http2``, a websocket attempt) is ignored, as
                    # twisted.web ignores it: the request was dispatched over HTTP/1.1 (httptools
                    # completes it before raising) and the client, with no 101, goes on in
                    # HTTP/1.1.  httptools resumes after the upgrade; the bytes after the
                    # request are parsed as the next request.
                    data = data[upgrade.args[0]:] if upgrade.args else b""
                    if not data or self.refusing:
                        break
        except httptools.HttpParserError:
            if not self.refusing:
                self._refuse(431 if self._head_size > MAX_HEAD else 400)
            return
        if self.in_head:  # a head still coming: bound what httptools buffers of an endless header line
            self._raw_head += len(data)
            if self._raw_head > 4 * MAX_HEAD:
                self._head_size = self._raw_head
                self._refuse(431)
                return
        if not self.queue and self.current is None and not self.lost:
            self._arm_idle()

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        for call in (self.stalled, self.idle, self.linger):
            if call is not None and call.active():
                call.cancel()
        self.stalled = self.idle = self.linger = None
        streams = list(self.queue)
        if self.current is not None and self.current not in self.queue:
            streams.append(self.current)
        self.queue.clear()
        self.current = None
        for stream in streams:
            if stream.request is not None and not stream.done:
                stream.request.connectionLost(reason)
        if isinstance(self.producer, _PullAsPush):
            self.producer.detach()
        self.producer = None

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._raw_head = 0
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD:
            raise _HeadTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            raise _HeadTooLarge()

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        if parser.should_upgrade() and any(
                name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self._headers):
            # an Upgrade with a body: httptools would complete the request without it and hand
            # the body over as the new protocol's bytes; refused (400) rather than served bodiless
            raise _Unparseable()
        method = parser.get_method()
        version = _VERSIONS.get(parser.get_http_version(), b"HTTP/1.1")
        persistent = version == b"HTTP/1.1" and parser.should_keep_alive()
        stream = _Stream(self, method, self._url, version, persistent)
        request = self.site.requestFactory(stream, queued=False)
        request.clientproto = version
        add = request.requestHeaders.addRawHeader
        length = None
        chunked = False
        expect = False
        for name, value in self._headers:
            add(name, value)
            lower = name.lower()
            if lower == b"content-length":
                length = int(value) if value.strip().isdigit() else None
            elif lower == b"transfer-encoding":
                chunked = True
            elif lower == b"expect" and value.strip().lower() == b"100-continue":
                expect = True
        self._headers = []
        stream.request = request
        self.current = stream
        self.queue.append(stream)
        if len(self.queue) > MAX_QUEUED:
            self._pause_reading()
        request.parseCookies()
        request.gotLength(None if chunked else (length or 0))  # no length, not chunked: no body
        if request.refused is not None and (chunked or length):
            self._answer_early(stream)  # refused by its head: its body is never waited for
        elif expect and request.refused is None and version == b"HTTP/1.1":
            # (RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored)
            stream.continue_wanted = True
            if self.queue[0] is stream:
                self._send_continue(stream)

    def on_body(self, body: bytes) -> None:
        stream = self.current
        request = stream.request
        request.handleContentChunk(body)
        if request.refused is not None and not stream.started:  # over the body limit while reading
            self._answer_early(stream)

    def on_message_complete(self) -> None:
        stream, self.current = self.current, None
        stream.complete = True
        if self.queue and self.queue[0] is stream and not stream.started:
            self._start(stream)

    # -- answering in order --
    def _send_continue(self, stream: _Stream) -> None:
        stream.continue_wanted = False
        if not stream.complete:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _start(self, stream: _Stream) -> None:
        stream.started = True
        stream.request.requestReceived(stream.command, stream.uri, stream.version)

    def _answer_early(self, stream: _Stream) -> None:
        """A request refused before its body is all in (API key, ``maxRequestBodyBytes``):
        answered as soon as it is its turn, and the connection then closes with a
        lingering close (the rest of the body is read and dropped meanwhile), so
        a client uploading gigabytes learns at once and never has to send them."""
        if stream.early:
            return
        stream.early = True
        stream.persistent = False
        if self.queue and self.queue[0] is stream:
            self._start(stream)

    def request_done(self, stream: _Stream) -> None:
        """A response is complete: the next queued request goes, or the connection closes."""
        if self.queue and self.queue[0] is stream:
            self.queue.popleft()
        self.producer = None
        if self.lost:
            return
        # A response that closes the connection comes first: what the client pipelined after
        # it (llhttp refuses bytes after "Connection: close": a pending 400) is never answered.
        if not stream.persistent:
            self.refusing = True  # nothing more is parsed
            self.refusal = None
            self.transport.unregisterProducer()
            if stream.complete:
                self.transport.loseConnection()
            else:  # its body is still coming: read and drop it a while, so the client reads the answer
                self._linger_close()
            return
        if self.refusal is not None and not self.queue:
            status, self.refusal, self.refusing = self.refusal, None, False
            self._refuse(status)
            return
        if self.reading_paused and len(self.queue) <= MAX_QUEUED:
            self._resume_reading()
        if self.queue:
            nxt = self.queue[0]
            if nxt.continue_wanted:
                self._send_continue(nxt)
            if (nxt.complete or nxt.early) and not nxt.started:
                self._start(nxt)
        elif self.current is None:
            self._arm_idle()

    def request_producer(self, producer, streaming: bool) -> None:
        if isinstance(self.producer, _PullAsPush):
            self.producer.detach()
        if producer is not None and not streaming:  # a pull producer: asked for more once per turn
            producer = _PullAsPush(producer, self.site.clock)
        self.producer = producer
        if producer is not None and self.paused:
            producer.pauseProducing()

    def _pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pauseProducing()

    def _resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resumeProducing()

    # -- IPushProducer, driven by the transport's send buffer --
    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True
        if self.producer is not None:
            self.producer.pauseProducing()
        timeout = getattr(self.site, "send_timeout", None)
        if timeout and self.stalled is None:
            self.stalled = self.site.clock.callLater(timeout, self._send_timed_out)

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        if self.stalled is not None:
            if self.stalled.active():
                self.stalled.cancel()
            self.stalled = None
        if self.producer is not None:
            self.producer.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        if self.producer is not None:
            self.producer.stopProducing()

    def _send_timed_out(self) -> None:
        self.stalled = None
        peer = self.transport.getPeer()
        log.info("client {peer} took no data for {timeout:g}s: connection dropped",
                 peer=f"{getattr(peer, 'host', '-')}:{getattr(peer, 'port', '')}", timeout=self.site.send_timeout)
        self.transport.abortConnection()

    # -- idle keep-alive connections --
    def _arm_idle(self) -> None:
        # Twisted's name for it: ``Site(timeout=...)`` sets ``timeOut`` (60 s by default)
        timeout = getattr(self.site, "timeOut", None)
        if timeout and self.idle is None and not self.lost:
            self.idle = self.site.clock.callLater(timeout, self._idle_expired)

    def _disarm_idle(self) -> None:
        if self.idle is not None:
            if self.idle.active():
                self.idle.cancel()
            self.idle = None

    def _idle_expired(self) -> None:
        self.idle = None
        if not self.queue and self.current is None:
            self.transport.loseConnection()

    # -- what cannot be parsed --
    def _refuse(self, status: int) -> None:
        """Answer ``status`` with ``Connection: close``, then linger (see the
        module docstring); after the responses to requests before it."""
        if self.refusing:
            return
        self.refusing = True
        self._disarm_idle()
        if self.current is not None and self.queue and self.queue[-1] is self.current:
            self.queue.pop()  # the request that could not be parsed: never answered as a request
            self.current = None
        if self.queue:
            self.refusal = status
            return
        phrase = _PHRASES[status]
        body = b"%d %s" % (status, phrase)
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (status, phrase, len(body), body))
        self._linger_close()

    def _linger_close(self) -> None:
        """Half-close now, close after ``LINGER`` seconds: data the client still
        sends is read and dropped, so the close does not turn into a reset that
        destroys the answer it has not read yet."""
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
            return
        self._resume_reading()  # what it still sends is read (and dropped), even past MAX_QUEUED
        half_close()
        self.linger = self.site.clock.callLater(self.LINGER, self.transport.loseConnection)
