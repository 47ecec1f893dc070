"""A lean pooled HTTP/1.1 client for plain-http upstreams, on httptools.

Why not ``Agent``: per proxied request, twisted.web's client builds a
``Request``, a ``Response``, two ``Headers``, a chain of Deferreds and a
line-by-line parser in Python; that alone was about a third of llamaswap's
CPU per request.  Here one ``UpstreamConnection`` per socket parses the
response with httptools (llhttp, in C), calls back into one ``_Exchange``
per request, and relays each socket read to the client as it comes, in one
write.  ``https`` upstreams keep ``Agent`` (``llamaswap.proxy.stream``): TLS
costs more than the HTTP layer there, and Agent's handshake timeout is wired.

What it keeps from Agent: keep-alive connections pooled per host and port
(``idle`` seconds, ``max_idle`` per host), TCP keepalive and no-delay, a
stale pooled connection retried once on a fresh one when it closed before
answering a byte, interim 1xx responses skipped, bodies of HEAD/204/304 not
awaited, ``Connection: close`` and HTTP/1.0 upstreams not reused, a body
that ends with the connection (no length) accepted as complete.

The exchange is the client request's push producer while the body flows:
a client that stops reading pauses the upstream socket; cancelling the
Deferred that ``UpstreamClient.forward`` returns aborts the upstream
connection (the upstream stops generating).
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import Callable, Optional

import httptools
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.iweb import IBodyProducer, IRequest
from zope.interface import implementer

from ..httpclient import UpstreamEndpoints, no_delay, tcp_keepalive

log = Logger()

HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
))
#: a request body larger than this goes out in pieces of this size, with backpressure
BODY_PIECE = 1 << 20
_NO_BODY_METHODS = frozenset((b"GET", b"HEAD", b"DELETE", b"OPTIONS"))


class UpstreamUnavailable(Exception):
    """The upstream could not be reached (connect refused, reset before headers)."""


class UpstreamTimeout(Exception):
    """The upstream sent no response headers within ``timeouts.responseHeader``."""


class UpstreamBodyIdle(Exception):
    """The upstream sent no body byte for ``timeouts.bodyIdle`` seconds mid-response."""


class UpstreamBroke(Exception):
    """The upstream's response ended before it was complete (crash, reset)."""


class ResponseHead:
    """An upstream response's status line and headers, as Agent's ``IResponse``
    offers them to the pipeline's observers (``code``, ``phrase``,
    ``headers.getRawHeaders``/``getAllRawHeaders``); names are lower case."""

    __slots__ = ("code", "phrase", "headers")

    def __init__(self, code: int, phrase: bytes, headers: "RawHeaders"):
        self.code, self.phrase, self.headers = code, phrase, headers


class RawHeaders(dict):
    """``{lower-case name: [values]}`` with the methods of twisted.web's
    ``Headers`` the proxy uses: plain dict work, where ``Headers`` encodes and
    checks every name and value (a dozen calls per proxied request)."""

    def getRawHeaders(self, name: bytes, default=None):  # noqa: N802 - Headers' name
        return self.get(name.lower(), default)

    def getAllRawHeaders(self):  # noqa: N802 - Headers' name
        return self.items()

    def setRawHeaders(self, name: bytes, values) -> None:  # noqa: N802 - Headers' name
        self[name.lower()] = list(values)

    def removeHeader(self, name: bytes) -> None:  # noqa: N802 - Headers' name
        self.pop(name.lower(), None)

    def hasHeader(self, name: bytes) -> bool:  # noqa: N802 - Headers' name
        return name.lower() in self


@lru_cache(maxsize=512)  # a model's few paths: parsed once, not per request
def split_url(url: bytes) -> tuple[bytes, bytes, int, bytes]:
    """``(scheme, host, port, target)`` of an absolute http(s) URL."""
    uri = URI.fromBytes(url)
    target = uri.path or b"/"
    if uri.query:
        target += b"?" + uri.query
    return uri.scheme, uri.host, uri.port, target


def request_head(method: bytes, target: bytes, host: bytes, port: int, headers, length: Optional[int]) -> bytes:
    """The request line and headers for the upstream.

    ``headers`` (anything with ``getAllRawHeaders``) are sent as they are,
    except ``Host`` (the upstream's, as Agent sets it), ``Content-Length`` and
    ``Transfer-Encoding`` (the body is always sent whole, with a length)."""
    netloc = host if port == 80 else b"%s:%d" % (host, port)
    if b":" in host:  # an IPv6 literal
        netloc = b"[%s]:%d" % (host, port)
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, netloc)]
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in (b"host", b"content-length", b"transfer-encoding"):
            continue
        for value in values:
            lines.append(b"%s: %s\r\n" % (name, value))
    if length is not None:
        lines.append(b"Content-Length: %d\r\n" % length)
    lines.append(b"\r\n")
    return b"".join(lines)


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory (it was read with a size bound).

    A small body is written at once.  A large one goes ``CHUNK`` bytes per
    reactor turn, paused while the connection's buffer is full: one write of
    tens of MiB would hold the reactor while the transport joins and copies
    it, and fill memory with a second copy of the body."""

    CHUNK = 1 << 20

    def __init__(self, body: bytes, clock=None):
        self.body = body
        self.length = len(body)
        self._clock = clock
        self._consumer = None
        self._offset = 0
        self._paused = False
        self._call = None
        self._done: Optional[defer.Deferred] = None

    def startProducing(self, consumer):
        if self.length <= self.CHUNK:
            consumer.write(self.body)
            return defer.succeed(None)
        if self._clock is None:
            from twisted.internet import reactor as clock
            self._clock = clock
        # cancelled by the client when the request is abandoned (disconnect,
        # responseHeader timeout): then nothing more may be written
        self._consumer, self._offset = consumer, 0
        self._done = defer.Deferred(lambda d: self.stopProducing())
        done = self._done
        self._schedule()
        return done

    def _schedule(self) -> None:
        if self._call is None and not self._paused and self._done is not None:
            self._call = self._clock.callLater(0, self._step)

    def _step(self) -> None:
        self._call = None
        if self._done is None or self._paused:
            return
        end = min(self._offset + self.CHUNK, self.length)
        chunk, self._offset = self.body[self._offset:end], end
        self._consumer.write(chunk)  # may pause us
        if end >= self.length:
            done, self._done = self._done, None
            if done is not None:
                done.callback(None)
        else:
            self._schedule()

    def pauseProducing(self):
        self._paused = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def resumeProducing(self):
        self._paused = False
        self._schedule()

    def stopProducing(self):
        # the connection went away: write nothing more, never fire
        self.pauseProducing()
        self._done = None


class _BodySender(BytesProducer):
    """A big request body on an upstream connection: ``BytesProducer``'s
    pieces, with the connection's send buffer as the backpressure (the sender
    is the transport's producer until the body is out)."""

    def __init__(self, transport, body: bytes, clock):
        super().__init__(body, clock)
        self.transport = transport
        transport.registerProducer(self, True)
        self.startProducing(transport).addCallback(lambda _: self.stop())

    def stop(self) -> None:
        """No more pieces; the transport's producer slot is freed."""
        BytesProducer.stopProducing(self)
        if self.transport is not None:
            transport, self.transport = self.transport, None
            transport.unregisterProducer()

    def abandon(self) -> None:
        """The connection went away: no more pieces, nothing to unregister."""
        self.transport = None
        BytesProducer.stopProducing(self)

    def stopProducing(self) -> None:
        self.stop()


class UpstreamConnection(Protocol):
    """One keep-alive connection to an upstream; one exchange at a time."""

    def __init__(self, pool: "UpstreamPool", key: tuple):
        self.pool = pool
        self.key = key
        self.exchange: Optional["_Exchange"] = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_call = None
        self.uses = 0
        self.fresh_parser = False
        self.sender: Optional[_BodySender] = None
        self.lost = False
        self.on_lost: Optional[defer.Deferred] = None  # fired by connectionLost (pool closing)
        # the message being parsed
        self._phrase = b""
        self._headers: Optional[RawHeaders] = None

    # -- transport --
    def connectionMade(self) -> None:
        no_delay(self.transport)
        if self.pool.keepalive:
            tcp_keepalive(self.transport, self.pool.keepalive)

    def send(self, exchange: "_Exchange", head: bytes, body: bytes, hold_body: bool) -> None:
        """Write one request; with ``hold_body`` only its head (Expect: 100-continue)."""
        self.uses += 1
        self.exchange = exchange
        if self.fresh_parser:  # the last response was to a HEAD: its parser waits for a body that never comes
            self.parser = httptools.HttpResponseParser(self)
            self.fresh_parser = False
        if hold_body or not body:
            self.transport.write(head)
        elif len(body) <= BODY_PIECE:
            self.transport.writeSequence((head, body))
        else:
            self.transport.write(head)
            self.send_body(body)

    def send_body(self, body: bytes) -> None:
        if self.lost:
            return
        if len(body) <= BODY_PIECE:
            self.transport.write(body)
        else:
            self.sender = _BodySender(self.transport, body, self.pool.clock)

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # nothing asked: an idle connection the upstream talks on is not reusable
            self.transport.abortConnection()
            return
        exchange.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroke("the upstream switched protocols"))
            return
        except httptools.HttpParserError as e:
            self._fail(UpstreamBroke(f"malformed response from the upstream: {e}"))
            return
        if self.exchange is not None:
            self.exchange.flush()

    def _fail(self, error: Exception) -> None:
        exchange, self.exchange = self.exchange, None
        self.transport.abortConnection()
        if exchange is not None:
            exchange.failed(Failure(error), retry=False)

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost = True
        if self.sender is not None:
            self.sender.abandon()
            self.sender = None
        self._cancel_idle()
        self.pool.forget(self)
        if self.on_lost is not None:
            self.on_lost.callback(None)
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        # a body delimited by the connection's end; not when bodyIdle dropped the connection
        if exchange.head is not None and exchange.body_until_close and exchange.idle_call is not False:
            exchange.complete()
            return
        exchange.failed(reason or Failure(ConnectionDone()), retry=not exchange.got_bytes and self.uses > 1)

    # -- idle in the pool --
    def park(self, timeout: float) -> None:
        self._cancel_idle()
        if timeout > 0:
            self.idle_call = self.pool.clock.callLater(timeout, self.transport.loseConnection)

    def _cancel_idle(self) -> None:
        if self.idle_call is not None:
            if self.idle_call.active():
                self.idle_call.cancel()
            self.idle_call = None

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self._phrase = b""
        self._headers = RawHeaders()

    def on_status(self, status: bytes) -> None:
        self._phrase += status

    def on_header(self, name: bytes, value: bytes) -> None:
        values = self._headers.get(name.lower())
        if values is None:
            self._headers[name.lower()] = [value]
        else:
            values.append(value)

    def on_headers_complete(self) -> None:
        code = self.parser.get_status_code()
        exchange = self.exchange
        if exchange is None:
            return
        if 100 <= code < 200 and code != 101:  # interim: 100 Continue lets a held body go
            exchange.interim()
            return
        headers = self._headers
        exchange.body_until_close = (b"content-length" not in headers and b"transfer-encoding" not in headers
                                     and code not in (204, 304) and exchange.method != b"HEAD")
        exchange.response(ResponseHead(code, self._phrase, headers))
        if exchange.method == b"HEAD" and self.exchange is exchange:
            self.fresh_parser = True
            self._message_done(exchange)

    def on_body(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.body(data)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.head is None:  # an interim response, or after HEAD's head
            return
        self._message_done(exchange)

    def _message_done(self, exchange: "_Exchange") -> None:
        self.exchange = None
        reusable = self.parser.should_keep_alive() and not exchange.body_held and not self.lost
        if self.sender is not None:
            # answered before the whole body went out (a 413, a 401): the rest of the body would
            # still be due on this connection, so it is not reused
            if self.sender.transport is not None:
                reusable = False
                self.sender.stop()
            self.sender = None
        # parked (or closed) before the exchange's Deferred fires: a caller that sends its next
        # request from that callback finds this connection in the pool
        if reusable:
            self.pool.release(self)
        else:
            self.transport.loseConnection()
        exchange.complete()


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: "UpstreamPool", key: tuple):
        self.pool, self.key = pool, key

    def buildProtocol(self, addr) -> UpstreamConnection:  # noqa: N802 - Twisted's name
        return UpstreamConnection(self.pool, self.key)


class UpstreamPool:
    """Keep-alive connections to plain-http upstreams, per (host, port).

    ``idle``: seconds an unused connection is kept (0: no limit);
    ``max_idle``: unused connections kept per host; ``keepalive``: TCP
    keepalive period (0: off); ``connect_timeout``: seconds (0: 30)."""

    def __init__(self, clock, idle: float = 60.0, keepalive: float = 0.0, max_idle: int = 64):
        self.clock = clock
        self.idle = idle
        self.keepalive = keepalive
        self.max_idle = max_idle
        self._idle: dict[tuple, deque] = {}
        self._endpoints: dict[tuple, object] = {}
        self.closed = False

    def acquire(self, host: bytes, port: int, endpoints: UpstreamEndpoints,
                fresh: bool = False) -> tuple[Optional[UpstreamConnection], Optional[defer.Deferred]]:
        """A parked connection at once (unless ``fresh``), else ``(None, Deferred)`` of a new one."""
        key = (host, port)
        parked = None if fresh else self._idle.get(key)
        while parked:
            connection = parked.pop()
            if not connection.lost:
                connection._cancel_idle()
                return connection, None
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = endpoints.endpointForURI(
                URI(b"http", b"%s:%d" % (host, port), host, port, b"/", b"", b"", b""))
        return None, endpoint.connect(_ConnectionFactory(self, key))

    def parked(self) -> list:
        """The connections waiting for a next request."""
        return [c for parked in self._idle.values() for c in parked]

    def release(self, connection: UpstreamConnection) -> None:
        parked = self._idle.setdefault(connection.key, deque())
        if self.closed or len(parked) >= self.max_idle:
            connection.transport.loseConnection()
            return
        parked.append(connection)
        connection.park(self.idle)

    def forget(self, connection: UpstreamConnection) -> None:
        parked = self._idle.get(connection.key)
        if parked and connection in parked:
            parked.remove(connection)

    def close(self) -> defer.Deferred:
        """Close the parked connections (the busy ones close when their
        exchange ends); fires once the parked ones are closed."""
        self.closed = True
        waits = []
        for parked in self._idle.values():
            while parked:
                connection = parked.pop()
                connection.on_lost = defer.Deferred()
                waits.append(connection.on_lost)
                connection._cancel_idle()
                connection.transport.loseConnection()
        return defer.gatherResults(waits).addCallback(lambda _: None)


@implementer(IPushProducer)
class _Exchange:
    """One proxied request: upstream response → client request (see the module docstring)."""

    def __init__(self, client: "UpstreamClient", request: IRequest, method: bytes, host: bytes, port: int,
                 head: bytes, body: bytes, write_head: bool, on_chunk, on_headers, clock,
                 header_timeout: float, body_idle: float, continue_wait: float, reject):
        self.client, self.request, self.method = client, request, method
        self.host, self.port = host, port
        self.request_head, self.request_body = head, body
        self.write_head, self.on_chunk, self.on_headers = write_head, on_chunk, on_headers
        self.clock = clock
        self.idle = body_idle if clock is not None else 0.0
        self.continue_wait = continue_wait
        self.reject = reject
        self.done: defer.Deferred = defer.Deferred(self._cancel)
        self.connection: Optional[UpstreamConnection] = None
        self.connecting: Optional[defer.Deferred] = None
        self.head: Optional[ResponseHead] = None
        self.got_bytes = False
        self.body_until_close = False
        self.body_held = False
        self.pending: list = []
        self.bytes = 0
        self.registered = False
        self.paused = False
        self.idle_call = None
        self.header_call = None
        self.continue_call = None
        self.finished = False
        self.retried = False
        self.rejected: Optional[tuple] = None
        if header_timeout and clock is not None:
            self.header_call = clock.callLater(header_timeout, self._headers_late, header_timeout)

    # -- sending --
    def start(self, fresh: bool = False) -> None:
        connection, connecting = self.client.pool.acquire(self.host, self.port, self.client.endpoints, fresh)
        if connection is not None:
            self._send(connection)
            return
        self.connecting = connecting
        connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, connection: UpstreamConnection) -> None:
        self.connecting = None
        if self.finished:
            self.client.pool.release(connection)
            return
        self._send(connection)

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if failure.check(defer.CancelledError) or self.finished:
            return
        self._finish_error(Failure(UpstreamUnavailable(describe_failure(failure))))

    def _send(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        self.got_bytes = False
        hold = bool(self.continue_wait and self.clock is not None and self.request_body)
        self.body_held = hold
        connection.send(self, self.request_head, self.request_body, hold)
        if hold:
            # a retry's own wait: the stale attempt's timer would release the body early on this one
            if self.continue_call is not None and self.continue_call.active():
                self.continue_call.cancel()
            self.continue_call = self.clock.callLater(self.continue_wait, self._release_body)

    def _release_body(self) -> None:
        """Expect: 100-continue: the upstream answered, or did not within the wait."""
        if self.continue_call is not None and self.continue_call.active():
            self.continue_call.cancel()
        self.continue_call = None
        if self.body_held and self.connection is not None:
            self.body_held = False
            self.connection.send_body(self.request_body)

    def interim(self) -> None:
        if self.body_held:
            self._release_body()

    # -- the response --
    def response(self, head: ResponseHead) -> None:
        if self.header_call is not None and self.header_call.active():
            self.header_call.cancel()
        self.header_call = None
        if self.body_held:  # a final answer before the body: the body is never sent
            if self.continue_call is not None and self.continue_call.active():
                self.continue_call.cancel()
            self.continue_call = None
        self.head = head
        if self.reject is not None and self.reject(head.code):
            self.rejected = (head, [])
            return
        request = self.request
        if getattr(request, "channel", None) is None:  # the client went away meanwhile
            self.abort()
            self._finish_error(Failure(UpstreamBroke("the client went away")))
            return
        try:
            if self.on_headers is not None:
                self.on_headers(head)
            if self.write_head:
                request.setResponseCode(head.code, head.phrase or None)
                copy_headers(head, request)
        except Exception:
            self.abort()
            self._finish_error(Failure())
            return
        request.registerProducer(self, True)
        self.registered = True
        self._arm_idle()

    def body(self, data: bytes) -> None:
        if self.rejected is not None:
            kept = self.rejected[1]
            if sum(map(len, kept)) < REJECT_BODY_LIMIT:
                kept.append(data)
            return
        self.bytes += len(data)
        self.pending.append(data)

    def flush(self) -> None:
        """Relay what one socket read brought, in one write."""
        if self.idle_call:
            self.idle_call.reset(self.idle)
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        if self.on_chunk is not None:
            try:
                self.on_chunk(data)
            except Exception:  # an observer's failure must not stall the stream
                log.failure("chunk observer failed; continuing the relay")
                self.on_chunk = None
        if getattr(self.request, "channel", None) is not None:
            self.request.write(data)

    def complete(self) -> None:
        if self.finished:
            return
        if self.rejected is not None:
            head, kept = self.rejected
            self._finish_error(Failure(UpstreamRejected(head, b"".join(kept)[:REJECT_BODY_LIMIT])))
            return
        self.flush()
        self._finish()
        self.done.callback(self.bytes)

    def failed(self, failure: Failure, retry: bool) -> None:
        if self.finished:
            return
        if retry and not self.retried and self.head is None:  # a stale keep-alive connection
            self.retried = True
            self.connection = None
            self.start(fresh=True)
            return
        if self.rejected is not None:  # a rejected answer cut short: still the answer it was
            head, kept = self.rejected
            error: Exception = UpstreamRejected(head, b"".join(kept)[:REJECT_BODY_LIMIT])
        elif self.head is None:
            error = failure.value if failure.check(UpstreamUnavailable) else UpstreamUnavailable(describe_failure(failure))
        elif self.idle_call is False:  # bodyIdle expired
            error = UpstreamBodyIdle(f"no data from the upstream for {self.idle:g}s (timeouts.bodyIdle)")
        else:
            self.flush()
            error = failure.value if failure.check(UpstreamBroke) else UpstreamBroke(
                f"the upstream closed the response early: {describe_failure(failure)}")
        self._finish_error(Failure(error))

    # -- timers --
    def _headers_late(self, timeout: float) -> None:
        self.header_call = None
        if self.finished:
            return
        self.abort()
        self._finish_error(Failure(UpstreamTimeout(f"no response headers within {timeout:g}s")))

    def _arm_idle(self) -> None:
        if self.idle > 0 and not self.paused and self.idle_call is not False:
            if self.idle_call is None:
                self.idle_call = self.clock.callLater(self.idle, self._idle_expired)
            else:
                self.idle_call.reset(self.idle)

    def _disarm_idle(self) -> None:
        if self.idle_call:
            if self.idle_call.active():
                self.idle_call.cancel()
            self.idle_call = None

    def _idle_expired(self) -> None:
        self.idle_call = False  # marks the expiry for ``failed``
        if self.connection is not None and self.connection.transport is not None:
            self.connection.transport.abortConnection()

    # -- the end --
    def _finish(self) -> None:
        self.finished = True
        for name in ("header_call", "continue_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        if self.idle_call:
            self._disarm_idle()
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        if self.registered:
            self.registered = False
            if getattr(self.request, "channel", None) is not None:
                self.request.unregisterProducer()
        if self.paused:  # a connection goes back to the pool reading
            self.paused = False
            connection = self.connection
            if connection is not None and connection.transport is not None:
                connection.transport.resumeProducing()

    def _finish_error(self, failure: Failure) -> None:
        if self.finished:
            return
        self._finish()
        self.done.errback(failure)

    def abort(self) -> None:
        """Drop the upstream connection now (the upstream stops generating)."""
        connection, self.connection = self.connection, None
        if connection is not None:
            if connection.exchange is self:
                connection.exchange = None
            if connection.transport is not None:
                connection.transport.abortConnection()

    def _cancel(self, d: defer.Deferred) -> None:
        """The client went away: abort the upstream request wherever it is."""
        self._finish()
        self.abort()

    # -- IPushProducer, driven by the client connection --
    def pauseProducing(self) -> None:
        self.paused = True
        if self.idle_call:
            self._disarm_idle()  # a slow client is not an idle upstream
        if self.connection is not None and self.connection.transport is not None:
            self.connection.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.connection is not None and self.connection.transport is not None:
            self.connection.transport.resumeProducing()
            self._arm_idle()

    def stopProducing(self) -> None:
        self.abort()


#: how much of a rejected (failover) answer's body is kept for the client
REJECT_BODY_LIMIT = 64 * 1024


class UpstreamRejected(Exception):
    """The upstream answered with a status the caller rejects (failover on
    5xx): nothing reached the client; ``head`` and ``body`` (at most
    ``REJECT_BODY_LIMIT`` bytes) are the answer, to give the client when no
    other target serves."""

    def __init__(self, head: ResponseHead, body: bytes):
        super().__init__(f"upstream answered {head.code}")
        self.head, self.body = head, body


def copy_headers(head: ResponseHead, request: IRequest) -> None:
    """The upstream's response headers onto the client's response: hop-by-hop
    ones dropped, a single valid ``Content-Length`` kept, ``X-Accel-Buffering:
    no`` for SSE so a proxy in front does not hold events back."""
    set_raw = request.responseHeaders.setRawHeaders
    for name, values in head.headers.items():
        if name in HOP_BY_HOP:
            continue
        if name == b"content-length":
            if len(values) == 1 and values[0].isdigit():
                set_raw(name, values)
            continue
        set_raw(name, values)
        if name == b"content-type" and b"text/event-stream" in values[0].lower():
            set_raw(b"x-accel-buffering", [b"no"])


class UpstreamClient:
    """Sends proxied requests to plain-http upstreams over an ``UpstreamPool``.

    ``connect_timeout``: seconds (None: the endpoints' default)."""

    def __init__(self, reactor, pool: UpstreamPool, connect_timeout: Optional[float] = None):
        self.pool = pool
        self.endpoints = UpstreamEndpoints(reactor, connect_timeout)

    def forward(self, request: IRequest, url: bytes, body: bytes, headers,
                on_chunk: Optional[Callable[[bytes], None]] = None,
                on_headers: Optional[Callable[[object], None]] = None, write_head: bool = True, clock=None,
                header_timeout: float = 0, body_idle: float = 0, expect_continue: float = 0,
                reject: Optional[Callable[[int], bool]] = None, expects: bool = False) -> defer.Deferred:
        """See ``llamaswap.proxy.stream.forward``; ``expects``: the request
        carries ``Expect: 100-continue`` (the body then waits up to
        ``expect_continue`` seconds for the upstream's first answer)."""
        scheme, host, port, target = split_url(url)
        method = request.method
        length = len(body) if body or method not in _NO_BODY_METHODS else None
        head = request_head(method, target, host, port, headers, length)
        exchange = _Exchange(self, request, method, host, port, head, body, write_head, on_chunk, on_headers,
                             clock, header_timeout, body_idle, expect_continue if expects else 0.0, reject)
        exchange.start()
        return exchange.done


def describe_failure(failure: Failure) -> str:
    """A short reason, also for the lists of Failures Agent and endpoints wrap errors in."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(describe_failure(r) for r in reasons)
    message = failure.getErrorMessage()
    return message if message and not message.startswith("[") else failure.type.__name__
