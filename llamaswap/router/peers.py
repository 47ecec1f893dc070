"""Peers: models served by other llama-swap (or OpenAI-compatible) servers.

A peer's models are reached through us as ``<peer>/<model>`` and, when
exactly one peer lists a model and that bare id is not itself some peer
model's full name, as ``<model>``.  Precedence when a name could mean
several things (reference §4): local model id → local alias → peer full name
→ unique bare peer model.  Peer requests never swap, queue or count against
a local model's concurrency: they do not go through the local router.

The decisions are pure (:func:`peer_routes`, :func:`resolve`); :class:`PeerSet`
holds what one loaded config needs at run time: an HTTP client per peer
(``timeouts`` applied, ``responseHeader`` 60 s unless set), the count of
requests in flight (a shutdown waits for them), and the optional health
checks (``peers.<id>.healthCheck``, a llamaswap addition): a peer whose
check fails is *unavailable*, published as a ``peerStatus`` event, and
skipped by failover and spillover selectors until a check passes again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from twisted.internet import defer, task
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from ..config import Config, Peer
from ..config.types import peer_names
from ..httpclient import quiet_pool, upstream_agent
from ..proxy.stream import close_pools, upstream_client


@dataclass(frozen=True)
class PeerRoute:
    """One model of one peer."""

    peer: str
    model: str

    @property
    def fqn(self) -> str:
        """``<peer>/<model>``: its name in activity rows, metrics and listings."""
        return f"{self.peer}/{self.model}"


@dataclass(frozen=True)
class Target:
    """What a name routes to: a local model (``model_id``) or a peer model
    (``peer``).  ``name`` is the name routed (after profile pins and
    selectors): the ``setParamsByID`` key, and what the body's ``model``
    becomes when it was something else."""

    name: str
    model_id: Optional[str] = None
    peer: Optional[PeerRoute] = None

    @property
    def label(self) -> str:
        """The model id, or the peer model's ``<peer>/<model>``."""
        return self.model_id if self.model_id is not None else self.peer.fqn


def peer_routes(peers: Mapping[str, Peer]) -> dict[str, PeerRoute]:
    """Every name a peer model answers to (``Config``'s ``peer_names``) and its route."""
    return {name: PeerRoute(peer, model) for name, (peer, model) in peer_names(peers).items()}


def resolve(config: Config, routes: Mapping[str, PeerRoute], name: str) -> Optional[Target]:
    """The target ``name`` routes to (local id, alias, peer full name, unique
    bare peer model, in that order), or None."""
    model_id = config.real_model_name(name)
    if model_id is not None:
        return Target(name, model_id=model_id)
    route = routes.get(name)
    return Target(name, peer=route) if route is not None else None


class _Discard(Protocol):
    """Reads a health check's body to its end, keeping nothing."""

    def __init__(self, done: defer.Deferred):
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        if not self.done.called:
            self.done.callback(None)


class PeerSet:
    """The peers of one loaded config, at run time (see the module docstring).

    ``publish(kind, data)`` receives ``peerStatus`` events
    (``{"peer", "available"}``) when a health check changes a peer's state."""

    log = Logger()

    def __init__(self, reactor, config: Config, publish: Optional[Callable[[str, Any], None]] = None):
        self.reactor = reactor
        self.peers: Mapping[str, Peer] = config.peers
        self.routes = peer_routes(config.peers)
        self.publish = publish
        self.pools: dict = {}
        self.clients = {peer_id: upstream_client(reactor, self.pools, peer.proxy, peer.timeouts)
                        for peer_id, peer in config.peers.items()}
        self.available: dict[str, bool] = {peer_id: True for peer_id in config.peers}
        self.in_flight = 0
        self._idle: list[defer.Deferred] = []  # close() waiting for in_flight to reach 0
        self._checks: dict[str, task.LoopingCall] = {}
        self._probes: dict[str, defer.Deferred] = {}
        self._probe_pool = None
        self._retiring: list[defer.Deferred] = []  # closes of the sets this one replaced
        self.closed = False
        for peer_id, peer in sorted(config.peers.items()):
            if peer.health_check is not None:
                self._start_checks(peer)

    def apply(self, config: Config) -> "PeerSet":
        """The peers for ``config`` (a reload): this set when its peers are
        unchanged, else a new one; this one then closes once its requests in
        flight are done (the new set's :meth:`close` waits for that too)."""
        if config.peers == self.peers:
            return self
        fresh = PeerSet(self.reactor, config, self.publish)
        fresh._retiring.append(self.close())
        return fresh

    def is_available(self, peer_id: str) -> bool:
        """False while the peer's health check fails (always True without one)."""
        return self.available.get(peer_id, True)

    # -- requests in flight ----------------------------------------------------------------

    def started(self) -> None:
        """A request to a peer began (pair it with :meth:`finished`)."""
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            waiting, self._idle = self._idle, []
            for d in waiting:
                if not d.called:  # (one that timed out has)
                    d.callback(None)

    # -- health checks ---------------------------------------------------------------------

    def _start_checks(self, peer: Peer) -> None:
        if self._probe_pool is None:  # fresh connections: a check also proves the peer accepts them
            self._probe_pool = quiet_pool(self.reactor, persistent=False)
        check = peer.health_check
        agent = upstream_agent(self.reactor, self._probe_pool, peer.timeouts.connect or check.interval)
        url = (peer.proxy + check.path).encode("utf-8")
        headers = Headers({b"user-agent": [b"llamaswap-peer-health"]})
        if peer.api_key:
            headers.setRawHeaders(b"authorization", [b"Bearer " + peer.api_key.encode("utf-8")])
            headers.setRawHeaders(b"x-api-key", [peer.api_key.encode("utf-8")])
        loop = task.LoopingCall(self._probe, peer.id, agent, url, headers, check.interval)
        loop.clock = self.reactor
        self._checks[peer.id] = loop
        loop.start(check.interval, now=True)

    def _probe(self, peer_id: str, agent, url: bytes, headers: Headers, timeout: float) -> defer.Deferred:
        """One check: any 2xx within ``timeout`` (body read) passes."""
        d = agent.request(b"GET", url, headers)

        def got(response) -> defer.Deferred:
            proto = None

            def cancel(_: defer.Deferred) -> None:
                if proto is not None and proto.transport is not None:
                    proto.transport.stopProducing()

            done = defer.Deferred(cancel)
            proto = _Discard(done)
            response.deliverBody(proto)
            return done.addCallback(lambda _: response.code)

        d.addCallback(got)
        d.addTimeout(timeout, self.reactor)
        self._probes[peer_id] = d
        d.addCallbacks(lambda code: (200 <= code < 300, f"answered {code}"),
                       lambda f: (False, _reason(f)))
        d.addCallback(lambda result: self._checked(peer_id, *result))
        return d

    def _checked(self, peer_id: str, ok: bool, why: str) -> None:
        self._probes.pop(peer_id, None)
        if self.closed or self.available.get(peer_id) == ok:
            return
        self.available[peer_id] = ok
        if ok:
            self.log.info("peer {peer} is available again", peer=peer_id)
        else:
            self.log.warn("peer {peer} is unavailable: health check {why}", peer=peer_id, why=why)
        if self.publish is not None:
            self.publish("peerStatus", {"peer": peer_id, "available": ok})

    # -- shutdown ----------------------------------------------------------------------------

    def close(self, grace: float = 30.0) -> defer.Deferred:
        """Stop checking, wait (at most ``grace`` s) for requests in flight,
        then close the pooled connections."""
        self.closed = True
        for loop in self._checks.values():
            if loop.running:
                loop.stop()
        for d in list(self._probes.values()):
            d.cancel()
        self._checks.clear()
        if self.in_flight:
            idle = defer.Deferred()
            self._idle.append(idle)
            idle.addTimeout(grace, self.reactor).addErrback(lambda f: f.trap(defer.TimeoutError))
        else:
            idle = defer.succeed(None)

        def close_connections(_) -> defer.Deferred:
            closes = close_pools(self.pools) + self._retiring
            if self._probe_pool is not None:
                closes.append(self._probe_pool.closeCachedConnections())
            return defer.gatherResults(closes, consumeErrors=True)

        return idle.addCallback(close_connections).addCallback(lambda _: None)


def _reason(failure: Failure) -> str:
    """Why a health check failed, in words.  The agent wraps what went wrong
    in a list (``ResponseNeverReceived``, ``ResponseFailed``): a check cut by
    its timeout fails with ``[CancelledError]`` there, not a ``TimeoutError``."""
    if failure.check(defer.TimeoutError, defer.CancelledError, ConnectingCancelledError):
        return "timed out"
    nested = getattr(failure.value, "reasons", None)
    if nested and all(isinstance(f, Failure) for f in nested):
        reasons = list(dict.fromkeys(_reason(f) for f in nested))
        return "timed out" if "timed out" in reasons else "; ".join(reasons)
    return failure.getErrorMessage() or failure.type.__name__
