"""Streaming reverse proxying of one request to an upstream.

``forward`` sends a request through what ``upstream_client`` made for the
upstream: the lean pooled client of ``llamaswap.proxy.upstream`` for plain
http (nearly every local model), ``Agent`` over an owned pool for https.
Either way it copies the upstream status and headers to the client
(hop-by-hop headers dropped, ``X-Accel-Buffering: no`` added for SSE) and
relays the body chunk by chunk:

* backpressure: the relay is registered as the client request's push
  producer, so a slow client pauses the upstream socket;
* cancellation: cancelling the returned Deferred (the front does so when the
  client disconnects) aborts the upstream connection, so the upstream stops
  generating;
* an upstream connection failure is a ``UpstreamUnavailable`` (the router
  answers 502); upstream error statuses pass through unchanged, unless
  ``reject`` holds them back for failover (``UpstreamRejected``);
* timeouts (``timeouts.*`` of the model): response headers within
  ``header_timeout`` (``UpstreamTimeout``), no pause longer than ``body_idle``
  between body bytes (``UpstreamBodyIdle``), and ``Expect: 100-continue``
  honoured for at most ``expect_continue`` seconds before the body goes
  anyway.  Connect, TLS handshake, TCP keepalive and idle pooled connections
  are the pools' business (``upstream_client``, ``llamaswap.httpclient``).
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IRequest
from zope.interface import implementer

from ..httpclient import quiet_pool, upstream_agent
from .upstream import (  # noqa: F401 - the exceptions are this module's API too
    HOP_BY_HOP, REJECT_BODY_LIMIT, BytesProducer, RawHeaders, ResponseHead, UpstreamBodyIdle, UpstreamClient,
    UpstreamPool, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable, copy_headers, describe_failure,
)

log = Logger()

_REPLACED = frozenset((b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"))


# idleConn 0 means "no limit" (Go's IdleConnTimeout); the pool wants a number
NO_IDLE_LIMIT = 10 * 365 * 86400.0


@implementer(IBodyProducer)
class ContinueBody(BytesProducer):
    """A body sent with ``Expect: 100-continue``, as Go's ExpectContinueTimeout:
    the request headers go at once, the body once the upstream answers
    anything (``100 Continue`` or a final status) or after ``wait`` seconds."""

    def __init__(self, body: bytes, clock, wait: float):
        super().__init__(body, clock)
        self.clock = clock
        self.wait = wait
        self.protocol = None
        self.consumer = None
        self.finished: Optional[defer.Deferred] = None
        self.timer = None

    def bind_protocol(self, protocol) -> None:
        """Called by the connection's protocol (``llamaswap.httpclient``) before it writes the request."""
        self.protocol = protocol

    def startProducing(self, consumer):
        self.consumer = consumer
        self.finished = defer.Deferred(lambda d: self.stopProducing())
        self.timer = self.clock.callLater(self.wait, self.send)
        if self.protocol is not None:
            self.protocol.on_first_data = self.send
        return self.finished

    def send(self) -> None:
        finished = self.finished
        self._disarm()
        if finished is None or finished.called:
            return
        BytesProducer.startProducing(self, self.consumer).chainDeferred(finished)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.protocol is not None and self.protocol.on_first_data == self.send:
            self.protocol.on_first_data = None
        self.finished = None

    def stopProducing(self):
        self._disarm()  # the connection went away: never write, never fire
        BytesProducer.stopProducing(self)


def wants_continue(headers: Headers) -> bool:
    return any(v.strip().lower() == b"100-continue" for v in headers.getRawHeaders(b"expect", []))


def upstream_headers(headers: Headers, forwarded_for: bytes, proto: bytes, host: Optional[bytes]) -> RawHeaders:
    """Request headers for the upstream: hop-by-hop removed, X-Forwarded-* set.

    ``forwarded_for`` is the complete ``X-Forwarded-For`` value (the trusted
    chain plus our peer, see ``llamaswap.clientaddr``); the client's own
    header is replaced by it."""
    out = RawHeaders()
    connection = headers.getRawHeaders(b"connection")
    connection_tokens = {t.strip().lower() for v in connection for t in v.split(b",")} if connection else ()
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in _REPLACED or lower in connection_tokens:
            continue
        out[lower] = values
    out[b"x-forwarded-for"] = [forwarded_for]
    out[b"x-forwarded-proto"] = [proto]
    if host:
        out[b"x-forwarded-host"] = [host]
    return out


@implementer(IPushProducer)
class _Relay(Protocol):
    """Upstream body → client request, with the client's flow control.

    Chunks that arrive in one reactor turn (a burst read from the socket) are
    joined and written once at the end of that turn: no added latency (the
    transport would only flush then anyway), far less per-chunk work.
    """

    def __init__(self, request: IRequest, done: defer.Deferred, on_chunk: Optional[Callable[[bytes], None]],
                 clock=None, idle: float = 0):
        self.request = request
        self.done = done
        self.on_chunk = on_chunk
        self.clock = clock
        self.bytes = 0
        self.registered = False
        self.pending: list[bytes] = []
        self.flush_call = None
        self.idle = idle if clock is not None else 0
        self.idle_call = None
        self.idle_fired = False
        self.paused = False

    def connectionMade(self) -> None:
        if getattr(self.request, "channel", None) is None:  # client already gone
            self.transport.stopProducing()
            return
        self.request.registerProducer(self, True)
        self.registered = True
        self._arm_idle()

    # bodyIdle: the upstream must send a byte at least every ``idle`` seconds,
    # except while the client's flow control holds it back

    def _arm_idle(self) -> None:
        if self.idle > 0 and not self.paused and not self.idle_fired:
            if self.idle_call is None:
                self.idle_call = self.clock.callLater(self.idle, self._idle_expired)
            else:
                self.idle_call.reset(self.idle)

    def _disarm_idle(self) -> None:
        if self.idle_call is not None:
            if self.idle_call.active():
                self.idle_call.cancel()
            self.idle_call = None

    def _idle_expired(self) -> None:
        self.idle_call = None
        self.idle_fired = True
        if self.transport is not None:
            self.transport.stopProducing()  # drop the upstream connection

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.idle_call is not None:
            self.idle_call.reset(self.idle)
        if self.clock is None:
            self._write(data)
            return
        self.pending.append(data)
        if self.flush_call is None:
            self.flush_call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        self.flush_call = None
        if self.pending:
            data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
            self.pending = []
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self.on_chunk is not None:
            try:
                self.on_chunk(data)
            except Exception:  # an observer's failure must not stall the stream
                log.failure("chunk observer failed; continuing the relay")
                self.on_chunk = None
        self.request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self._disarm_idle()
        if self.flush_call is not None:
            self.flush_call.cancel()
            self.flush_call = None
        if getattr(self.request, "channel", None) is not None:
            self.flush()
        self.pending = []
        if self.registered and getattr(self.request, "channel", None) is not None:
            self.request.unregisterProducer()
        self.registered = False
        if self.done.called:
            return
        if self.idle_fired:
            self.done.errback(Failure(UpstreamBodyIdle(
                f"no data from the upstream for {self.idle:g}s (timeouts.bodyIdle)")))
        elif reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.bytes)
        else:
            self.done.errback(reason)

    # IPushProducer, driven by the client connection
    def pauseProducing(self) -> None:
        self.paused = True
        self._disarm_idle()  # a slow client is not an idle upstream
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resumeProducing()
            self._arm_idle()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


class _Keep(Protocol):
    """Keeps the first ``limit`` bytes of a response body; fires ``finished`` at its end."""

    def __init__(self, limit: int):
        self.limit = limit
        self.pieces: list[bytes] = []
        self.size = 0
        self.finished: Optional[defer.Deferred] = None

    def dataReceived(self, data: bytes) -> None:
        if self.size < self.limit:
            self.pieces.append(data)
            self.size += len(data)

    def connectionLost(self, reason=None) -> None:
        self.finished.callback(None)


class _DropBody(Protocol):
    """Takes a response body nobody will read and drops the upstream
    connection at once.  ``IResponse`` has no public transport: the protocol
    its body is delivered to is given one (``deliverBody``)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass


def _drop_body(response) -> None:
    """Drop the connection of a response whose body has not been delivered."""
    try:
        response.deliverBody(_DropBody())
    except Exception:
        log.failure("could not drop the upstream connection")


def forward(
    agent: Agent,
    request: IRequest,
    url: bytes,
    body: bytes,
    headers: Headers,
    on_chunk: Optional[Callable[[bytes], None]] = None,
    on_headers: Optional[Callable[[object], None]] = None,
    write_head: bool = True,
    clock=None,
    header_timeout: float = 0,
    body_idle: float = 0,
    expect_continue: float = 0,
    reject: Optional[Callable[[int], bool]] = None,
) -> defer.Deferred:
    """Proxy ``request`` to ``url``; fires with the number of body bytes relayed.

    Cancelling the Deferred aborts the upstream request at whatever stage it is.
    With ``write_head=False`` the status and headers were already sent (the
    loading-state stream) and only the body is relayed.  ``header_timeout``
    (seconds, 0 = none) bounds the wait for the upstream's response headers;
    ``body_idle`` (0 = none) the silence between body bytes (the upstream
    connection is then dropped and the Deferred fails with
    ``UpstreamBodyIdle``).  When ``headers`` carry ``Expect: 100-continue``,
    the body waits up to ``expect_continue`` seconds (0 = not at all) for the
    upstream's first answer.  The timers need ``clock``.
    """
    if isinstance(agent, UpstreamClient):  # a plain-http upstream: the lean client
        return agent.forward(request, url, body, headers, on_chunk, on_headers, write_head, clock,
                             header_timeout, body_idle, expect_continue, reject, wants_continue(headers))
    relay_holder: dict = {}

    def cancel(d: defer.Deferred) -> None:
        relay = relay_holder.get("relay")
        if relay is not None and relay.transport is not None:
            relay.transport.stopProducing()
        pending = relay_holder.get("pending")
        if pending is not None and not pending.called:
            pending.cancel()

    done: defer.Deferred = defer.Deferred(cancel)
    method = request.method
    if body and expect_continue > 0 and clock is not None and wants_continue(headers):
        producer = ContinueBody(body, clock, expect_continue)
    else:
        producer = BytesProducer(body, clock) if body or method in (b"POST", b"PUT", b"PATCH") else None
    if isinstance(headers, RawHeaders):  # Agent wants twisted.web's Headers
        headers = Headers(dict(headers))
    pending = agent.request(method, url, headers, producer)
    relay_holder["pending"] = pending
    timer = None
    if header_timeout and clock is not None:
        def headers_late() -> None:
            relay_holder["timed_out"] = True
            pending.cancel()

        timer = clock.callLater(header_timeout, headers_late)

    def got_response(response) -> None:
        if timer is not None and timer.active():
            timer.cancel()
        if done.called:
            return
        head = ResponseHead(response.code, response.phrase or b"", RawHeaders(
            (name.lower(), values) for name, values in response.headers.getAllRawHeaders()))
        if reject is not None and reject(response.code):  # nothing reaches the client: keep the answer
            kept = _Keep(REJECT_BODY_LIMIT)
            finished = defer.Deferred()
            kept.finished = finished
            response.deliverBody(kept)
            finished.addBoth(lambda _: done.called or done.errback(
                Failure(UpstreamRejected(head, b"".join(kept.pieces)[:REJECT_BODY_LIMIT]))))
            return
        try:
            if on_headers is not None:
                on_headers(response)
            if write_head:
                request.setResponseCode(response.code, response.phrase)
                copy_headers(head, request)
            relay = _Relay(request, done, on_chunk, clock, body_idle)
            relay_holder["relay"] = relay
            response.deliverBody(relay)
        except Exception:
            # never leave the request hanging: drop the upstream and report
            failure = Failure()
            relay = relay_holder.get("relay")
            if relay is not None and relay.transport is not None:  # the relay has the body
                relay.transport.stopProducing()
            else:
                _drop_body(response)
            if not done.called:
                done.errback(failure)

    def failed(failure: Failure) -> None:
        if timer is not None and timer.active():
            timer.cancel()
        if done.called:
            return
        if relay_holder.get("timed_out"):
            done.errback(Failure(UpstreamTimeout(f"no response headers within {header_timeout:g}s")))
            return
        if failure.check(defer.CancelledError):
            return
        done.errback(Failure(UpstreamUnavailable(describe_failure(failure))))

    pending.addCallbacks(got_response, failed)
    return done


def make_agent(reactor, connect_timeout: float = 30.0, max_per_host: int = 64) -> tuple[Agent, HTTPConnectionPool]:
    """An Agent with its own persistent connection pool (close it on shutdown)."""
    pool = make_pool(reactor, max_per_host)
    return Agent(reactor, connectTimeout=connect_timeout or None, pool=pool), pool


def make_pool(reactor, max_per_host: int = 64, idle: float = 60, keepalive: float = 0,
              tls_handshake: float = 0) -> HTTPConnectionPool:
    """A persistent, quiet connection pool for upstream requests (close it on shutdown).

    ``idle``: seconds an unused keep-alive connection stays cached (0 = no
    limit); ``keepalive``: TCP keepalive period of its sockets (0 = off);
    ``tls_handshake``: bound on an https connection's handshake (0 = none)."""
    pool = quiet_pool(reactor, persistent=True, keepalive=keepalive, tls_handshake=tls_handshake)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle if idle > 0 else NO_IDLE_LIMIT
    return pool


def upstream_client(reactor, pools: dict, url: str, timeouts):
    """What ``forward`` sends a model's (or peer's) requests through: the lean
    client (``llamaswap.proxy.upstream``) for a plain-http ``url``, an
    ``Agent`` for https.  Connections are pooled per distinct (kind, idleConn,
    keepalive, tlsHandshake) in ``pools`` (shared by the caller; close them
    with :func:`close_pools`); ``timeouts`` is a model's ``timeouts``."""
    t = timeouts
    lean = url.startswith("http://")
    key = (lean, t.idle_conn, t.keepalive, t.tls_handshake)
    pool = pools.get(key)
    if pool is None:
        pool = pools[key] = (UpstreamPool(reactor, idle=t.idle_conn, keepalive=t.keepalive) if lean else
                             make_pool(reactor, idle=t.idle_conn, keepalive=t.keepalive, tls_handshake=t.tls_handshake))
    if lean:
        return UpstreamClient(reactor, pool, t.connect or None)
    return upstream_agent(reactor, pool, t.connect or None)


def close_pools(pools: dict) -> list:
    """Close the pools :func:`upstream_client` made; Deferreds of their parked connections' ends."""
    return [pool.close() if isinstance(pool, UpstreamPool) else pool.closeCachedConnections()
            for pool in pools.values()]
