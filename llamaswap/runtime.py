"""Everything one loaded config runs: processes, the local router, the proxy agent.

A reload builds a new ``Runtime`` and shuts the old one down (llama-swap
semantics: every model of the old config is stopped), unless it changes
nothing but resource budgets (:func:`budgets_only`): then the running
``Runtime`` takes the new config with :meth:`Runtime.apply_budgets`; or
nothing but API keys (:func:`access_only`, :meth:`Runtime.apply_access`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from .config import Config
from .config.types import EMPTY, Resources
from .events import EventBus
from .httpclient import upstream_agent
from .logmon import LogMonitor
from .perf.footprint import Footprints, FootprintSampler
from .process import Process, ProcessState
from .proxy.stream import make_pool
from .router.local import LocalRouter, RoutingError

StateListener = Callable[[str, str, str], None]


class Runtime:
    log = Logger()

    def __init__(self, reactor, config: Config, upstream_log: Optional[LogMonitor] = None,
                 registry=None, on_state: Optional[StateListener] = None,
                 events: Optional[EventBus] = None, footprint_sampler: Optional[FootprintSampler] = None):
        self.reactor = reactor
        self.config = config
        self.upstream_log = upstream_log if upstream_log is not None else LogMonitor()
        self.on_state = on_state
        self.events = events if events is not None else EventBus()
        self.processes: dict[str, Process] = {}
        for model_id, model in config.models.items():
            self.processes[model_id] = Process(
                reactor, model, upstream_log=self.upstream_log, on_state=self._state_changed,
                registry=registry,
            )
        # measured GPU memory per model (only with resources.capacity configured)
        self.footprints = Footprints(reactor, config, self.processes, footprint_sampler,
                                     publish=self.events.publish)
        self.router = LocalRouter(reactor, config, self.processes, events=self.events,
                                  footprints=self.footprints)
        # one Agent per model, with its model's connect timeout, over a pool per
        # distinct (idleConn, keepalive, tlsHandshake): those are the pool's connections' settings
        self.pools: dict[tuple, HTTPConnectionPool] = {}
        self.agents: dict[str, Agent] = {}
        for model_id, model in config.models.items():
            t = model.timeouts
            key = (t.idle_conn, t.keepalive, t.tls_handshake)
            pool = self.pools.get(key)
            if pool is None:
                pool = self.pools[key] = make_pool(reactor, idle=t.idle_conn, keepalive=t.keepalive,
                                                   tls_handshake=t.tls_handshake)
            self.agents[model_id] = upstream_agent(reactor, pool, t.connect or None)
        self.closed = False
        self.active_profile: Optional[str] = None  # runtime state: none at start and after a reload

    def _state_changed(self, process: Process, old: ProcessState, new: ProcessState) -> None:
        if new is ProcessState.READY:
            self.footprints.ready(process)
        elif new is ProcessState.STOPPED:
            self.footprints.stopped(process.model.id)
        self.router.process_state_changed(process, old, new)
        self.events.publish("modelStatus", {"id": process.model.id, "old": str(old), "state": str(new)})
        if self.on_state is not None:
            self.on_state(process.model.id, str(old), str(new))

    def preload(self) -> defer.Deferred:
        """Load ``hooks.on_startup.preload`` models in order (through the scheduler)."""

        async def run() -> None:
            for model_id in self.config.preload:
                if self.closed:
                    return
                try:
                    grant = await self.router.request(model_id)
                except RoutingError as e:
                    self.log.warn("preload of {model} failed: {error}", model=model_id, error=e.message)
                    continue
                grant.release()
                self.log.info("preloaded {model}", model=model_id)

        return defer.ensureDeferred(run())

    def apply_budgets(self, config: Config) -> frozenset:
        """Take ``config``, which differs from the running one only in
        budgets (see ``budgets_only``), without stopping models that still
        fit; returns the idle models stopped because they no longer do."""
        self.config = config
        self.active_profile = None
        for model_id, process in self.processes.items():
            process.model = config.models[model_id]
        self.footprints.reconfigure(config)
        return self.router.apply_budgets(config)

    def apply_access(self, config: Config) -> None:
        """Take ``config``, which differs from the running one only in who may
        ask (see ``access_only``): models, queues and requests in flight are
        untouched; the next request is decided with the new keys."""
        self.config = config
        self.active_profile = None

    def pinned(self, requested: str) -> "tuple[bool, Optional[str]]":
        """The active profile's pin for ``requested``: ``(False, requested)``
        when it has none, ``(True, target)`` when it has one, ``target`` None
        when the pin disables the id."""
        profile = self.config.profiles.get(self.active_profile) if self.active_profile else None
        if profile is None or requested not in profile.pins:
            return False, requested
        return True, profile.pins[requested]

    def shutdown(self, grace: float = 30.0) -> defer.Deferred:
        self.closed = True
        self.footprints.close()
        d = self.router.shutdown(grace)

        def close(_):
            closes = [p.close() for p in self.processes.values()]
            closes.extend(pool.closeCachedConnections() for pool in self.pools.values())
            return defer.gatherResults(closes, consumeErrors=True)

        return d.addBoth(close).addCallback(lambda _: None)


def budgets_only(old: Config, new: Config) -> bool:
    """True when ``new`` differs from ``old`` in nothing but resource budgets
    (``resources``, ``swapPolicy``, models' ``resources`` and ``minResident``),
    so a reload can keep every model running."""
    def strip(config: Config) -> Config:
        models = {mid: dataclasses.replace(m, resources=EMPTY, min_resident=0.0)
                  for mid, m in config.models.items()}
        return dataclasses.replace(config, models=models, resources=Resources(), swap_policy="",
                                   warnings=(), sources=(), **ACCESS_DEFAULTS)

    return old != new and strip(old) == strip(new)


#: the settings of who may ask: a reload that changes only these keeps everything running
ACCESS_DEFAULTS = {"api_keys": (), "api_keys_file": None, "metrics_public": False}


def access_only(old: Config, new: Config) -> bool:
    """True when ``new`` differs from ``old`` in nothing but API keys
    (``apiKeys``, ``apiKeysFile`` and its entries) and ``metricsPublic``."""
    def strip(config: Config) -> Config:
        return dataclasses.replace(config, warnings=(), sources=(), **ACCESS_DEFAULTS)

    return old != new and strip(old) == strip(new)
