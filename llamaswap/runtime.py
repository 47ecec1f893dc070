"""Everything the running config runs: processes, the local router, the proxy agents.

One ``Runtime`` lives as long as the service; a reload hands it the new
config with :meth:`Runtime.apply`, which changes only what differs
(``llamaswap.config.diff``), unlike llama-swap, which stops every model:

* a model whose settings are equal keeps its ``Process``, its queue, TTL
  and requests in flight; one changed only in settings that apply to a
  running child (TTL, filters, aliases, timeouts, budgets, ...) keeps them
  too and takes the new settings;
* a model whose process settings changed (``PROCESS_FIELDS``: ``cmd``,
  ``proxy``, ``env``, ...) gets a new ``Process``; the old one *retires*
  (the router finishes its requests in flight, then shuts it down) and the
  new one starts, on demand, only once the old one is gone;  queued requests
  wait for the new one;
* a removed model's process retires the same way; its queued requests fail
  with 404 "model 'X' was removed from the config";
* new models are added; the scheduler keeps its queue and counts, plans
  with the new groups or matrix, and stops only the models that may no
  longer run with those kept (``llamaswap.router.planners.replan``).

Why one long-lived object rather than a new ``Runtime`` adopting the old
processes: the scheduler's state (queue, swaps under way, in-flight counts,
recency, load times) belongs to the models that stay and would otherwise
have to be moved piece by piece; requests that hold the runtime across an
``await`` see the same object before and after.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from .config import Config, ConfigDiff, ModelConfig, diff
from .config.types import EMPTY, Resources
from .events import EventBus
from .logmon import LogMonitor
from .perf.footprint import Footprints, FootprintSampler
from .process import Process, ProcessState
from .proxy.stream import close_pools, upstream_client
from .router.local import LocalRouter, RoutingError
from .router.peers import PeerSet

StateListener = Callable[[str, str, str], None]


@dataclass(frozen=True)
class Applied:
    """What :meth:`Runtime.apply` did: the config diff, and the models it
    stopped because they may no longer run with the others (groups or
    matrix changed) or no longer fit a lowered capacity."""

    change: ConfigDiff
    evicted: frozenset


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
        self.registry = registry
        self.processes: dict[str, Process] = {m: self._process(model) for m, model in config.models.items()}
        # measured GPU memory per model (only with resources.capacity configured)
        self.footprints = Footprints(reactor, config, self.processes, footprint_sampler,
                                     publish=self.events.publish)
        self.router = LocalRouter(reactor, config, self.processes, events=self.events,
                                  footprints=self.footprints)
        # one client per model, with its model's connect timeout, over a pool per distinct
        # (kind, idleConn, keepalive, tlsHandshake): those are the pool's connections' settings
        self.pools: dict[tuple, object] = {}
        self.agents: dict[str, object] = {m: self._agent(model) for m, model in config.models.items()}
        self.peers = PeerSet(reactor, config, publish=self.events.publish)  # never swap, never queue
        self.closed = False
        self.active_profile: Optional[str] = None  # runtime state: none at start and after a reload

    def _process(self, model: ModelConfig, logmon: Optional[LogMonitor] = None) -> Process:
        return Process(self.reactor, model, upstream_log=self.upstream_log, on_state=self._state_changed,
                       registry=self.registry, logmon=logmon)

    def _agent(self, model: ModelConfig) -> object:
        """The client for ``model`` (see ``upstream_client``).  Pools live as
        long as the runtime: a reload may leave requests in flight on one that
        no model uses any more."""
        return upstream_client(self.reactor, self.pools, model.proxy, model.timeouts)

    def _state_changed(self, process: Process, old: ProcessState, new: ProcessState) -> None:
        if new is ProcessState.READY:
            self.footprints.ready(process)
        elif new is ProcessState.STOPPED:
            self.footprints.stopped(process.model.id)
        self.router.process_state_changed(process, old, new)
        self.events.publish("modelStatus", {"id": process.model.id, "old": str(old), "state": str(new)})
        if self.on_state is not None:
            self.on_state(process.model.id, str(old), str(new))

    def preload(self, models: Optional[Iterable[str]] = None, what: str = "preload") -> defer.Deferred:
        """Load ``models`` (default ``hooks.on_startup.preload``) in order
        (through the scheduler); ``what`` names it in the log."""
        models = tuple(self.config.preload if models is None else models)

        async def run() -> None:
            for model_id in models:
                if self.closed:
                    return
                try:
                    grant = await self.router.request(model_id)
                except RoutingError as e:
                    self.log.warn("{what} of {model} failed: {error}", what=what, model=model_id, error=e.message)
                    continue
                grant.release()
                self.log.info("{what} of {model} done", what=what, model=model_id)

        return defer.ensureDeferred(run())

    def apply(self, config: Config, grace: float = 30.0) -> Applied:
        """Take ``config`` (a reload), changing only what differs from the
        running one (see the module docstring); old processes of changed or
        removed models get ``grace`` seconds from SIGTERM to SIGKILL once
        their requests in flight are done.  No profile is active after it.
        Preloads the ``hooks.on_startup.preload`` models that are new or
        restarted, and loads a restarted model again when it was loaded.
        Returns what changed."""
        change = diff(self.config, config)
        retire = []
        for model_id in sorted(change.removed):
            retire.append(self.processes.pop(model_id))
            self.agents.pop(model_id, None)
        for model_id in sorted(change.restart):
            old = self.processes[model_id]
            retire.append(old)
            # the same log: /logs/stream/<model> goes on with the new process
            self.processes[model_id] = self._process(config.models[model_id], logmon=old.logmon)
        for model_id in sorted(change.added):
            self.processes[model_id] = self._process(config.models[model_id])
        for model_id, model in config.models.items():
            if model_id not in change.added and model_id not in change.restart:
                self.processes[model_id].update_model(model)
            if model_id in change.changed or model_id in change.added:
                self.agents[model_id] = self._agent(model)
        self.config = config
        self.active_profile = None
        self.peers = self.peers.apply(config)
        self.footprints.reconfigure(config, forget=change.removed | change.restart)
        # a restarted model that was loaded is loaded again (once its old process is gone)
        reload = [p.model.id for p in retire if p.model.id in change.restart and p.model.id not in config.preload
                  and p.state in (ProcessState.STARTING, ProcessState.READY)]
        evicted = self.router.apply(config, self.processes, retire, grace)
        fresh = change.added | change.restart
        self.preload([m for m in config.preload if m in fresh])
        self.preload(reload, "reload")
        return Applied(change, frozenset(evicted))

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
        peers_closed = self.peers.close(grace)  # meanwhile: waits for peer requests in flight
        d = self.router.shutdown(grace)

        def close(_):
            closes = [p.close() for p in self.processes.values()]
            closes.extend(close_pools(self.pools))
            closes.append(peers_closed)
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
