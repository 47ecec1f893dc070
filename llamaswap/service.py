"""The service tree: HTTP listeners and the config watcher.

``build_service`` is what ``twistd -n llamaswap``, ``llama-swap`` and
``python -m llamaswap`` all run.
"""

from __future__ import annotations

import os
import signal
from typing import Optional, Sequence

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogPublisher

from twisted.internet import defer, task

from .activity.captures import CaptureStore
from .activity.store import ActivityStore
from prometheus_client import CollectorRegistry

from .config import Config, ConfigError, defaults, load_config
from .config.diff import restart_settings
from .metrics import InferenceMetrics
from .perf import PerfMonitor, SystemCollector
from .events import EventBus
from .listen import with_backlog
from . import logs
from .inflight import InflightTracker
from .process import ChildRegistry
from .perf.footprint import NvmlFootprintSampler
from .runtime import Runtime, access_only, budgets_only
from .sdnotify import ListeningEndpoint, Notifier, ReadyNotifier
from .server.app import LlamaSwapApp
from .server.access import AccessLogSite

SHUTDOWN_GRACE = 30.0


class LlamaSwapService(MultiService):
    """Root service: owns the running config (a ``Runtime``) and reloads it."""

    log = Logger()
    notify = Notifier()  # systemd notifications: none unless build_service finds $NOTIFY_SOCKET

    def __init__(self, reactor, config: Config, config_path: Optional[str] = None,
                 config_dir: Optional[str] = None, registry: Optional[ChildRegistry] = None,
                 footprint_sampler=None):
        """``footprint_sampler``: where models' GPU memory is measured (default
        NVML, through ``llamaswap.perf.footprint.NvmlFootprintSampler``)."""
        super().__init__()
        self.footprint_sampler = footprint_sampler if footprint_sampler is not None else NvmlFootprintSampler()
        self.reactor = reactor
        self.config_path = config_path
        self.config_dir = config_dir
        self.hub = logs.hub()
        self.hub.configure(config.log_level, config.log_time_format)
        self.hub.route(config.log_to_stdout)
        self.upstream_log = self.hub.upstream
        self.registry = registry
        self.events = EventBus()
        self.inflight = InflightTracker(reactor, self.events)
        self.runtime = Runtime(reactor, config, self.upstream_log, registry, events=self.events,
                               footprint_sampler=self.footprint_sampler)
        self.activity = ActivityStore(reactor, config.store_path, config.metrics_max_in_memory)
        self.captures = CaptureStore(config.capture_buffer * 1024 * 1024)
        self.prometheus = CollectorRegistry(auto_describe=True)
        self.metrics = InferenceMetrics(self.prometheus, lambda: self.runtime, self.events, reactor)
        self.perf = None if config.performance.disabled else PerfMonitor(reactor, config.performance.every)
        if self.perf is not None:
            self.prometheus.register(SystemCollector(self.perf))
        self.api = LlamaSwapApp(lambda: self.runtime, reactor, hub=self.hub, events=self.events,
                                inflight=self.inflight, activity=self.activity, captures=self.captures,
                                metrics=self.metrics, registry=self.prometheus, perf=self.perf)
        self._reloading = False
        self._reload_again = False  # asked for while one was being applied
        self._reload_call = None  # a reload scheduled by request_reload
        self._observing = False

    @property
    def config(self) -> Config:
        return self.runtime.config

    @defer.inlineCallbacks
    def drain(self, deadline: float):
        """Wait (at most ``deadline`` s) for requests being served to finish
        (also those on the old processes of models a reload removed)."""
        router = self.runtime.router
        give_up = self.reactor.seconds() + deadline
        while self.reactor.seconds() < give_up and router.serving():
            yield task.deferLater(self.reactor, 0.1, lambda: None)

    def startService(self) -> None:
        if not self.hub.installed:  # plain twistd: still keep the proxy log history
            globalLogPublisher.addObserver(self.hub)
            self._observing = True
        if self.registry is not None:
            for record in self.registry.sweep():
                self.log.warn("killed a stale upstream left by an earlier run: {model} (pid {pid})",
                              model=record.model, pid=record.pid)
        for warning in self.config.warnings:
            # not "warning=": trial's log observer takes events with that key for Python warnings
            self.log.warn("config: {text}", text=warning)
        self.log.info("llamaswap: {n} model(s) configured: {models}",
                      n=len(self.config.models), models=", ".join(sorted(self.config.models)) or "-")
        self.activity.start().addErrback(lambda f: self.log.failure("cannot open the activity store", f))
        if self.perf is not None:
            self.perf.start()
        super().startService()
        self.runtime.preload()

    @defer.inlineCallbacks
    def stopService(self):
        """Stop listening first, then stop every model (TERM, KILL after the grace)."""
        self.api.close_streams()
        yield defer.maybeDeferred(super().stopService)
        yield self.drain(SHUTDOWN_GRACE)
        if self._reload_call is not None and self._reload_call.active():
            self._reload_call.cancel()
        self._reload_call = None
        yield self.runtime.shutdown(SHUTDOWN_GRACE)
        yield self.activity.close()
        if self.perf is not None:
            yield self.perf.stop()
        if self._observing:
            globalLogPublisher.removeObserver(self.hub)
            self._observing = False

    def request_reload(self) -> None:
        """Reload soon (SIGHUP): however many requests arrive before that
        reload runs, or while one is being applied, make one reload more."""
        if self._reloading:
            self._reload_again = True
        elif self._reload_call is None or not self._reload_call.active():
            self._reload_call = self.reactor.callLater(0, self._scheduled_reload)

    def _scheduled_reload(self) -> None:
        self._reload_call = None
        self.reload()

    def reload(self) -> bool:
        """Load the config again; on error keep the old one (every error is
        logged).  True if applied.

        Unlike llama-swap, which stops every model, only what changed is
        touched (``Runtime.apply``): models whose settings are unchanged keep
        their process, queue, TTL and requests in flight; changed and removed
        models finish their requests in flight and stop; a changed model's new
        process starts only once its old one is gone.  Settings read only at
        start-up are logged as ignored until a restart.  A reload asked for
        while this one is applied runs once after it.
        """
        if not self.running:
            return False
        if self._reloading:
            self._reload_again = True
            return False
        self._reloading = True
        self.notify.reloading()
        try:
            try:
                new = load_config(self.config_path, self.config_dir)
            except ConfigError as e:
                self.log.warn("config reload failed, keeping the running config:\n{error}", error=str(e))
                return False
            old = self.config
            for key in restart_settings(old, new):
                self.log.warn("config: {key} changed; the change is ignored until llamaswap restarts", key=key)
            for warning in new.warnings:
                self.log.warn("config: {text}", text=warning)
            self.hub.configure(new.log_level, new.log_time_format)
            if new.log_to_stdout != old.log_to_stdout:
                self.hub.route(new.log_to_stdout)
            if self.runtime.active_profile is not None:  # no profile is active after a reload
                self.events.publish("profileChanged", {"active": None})
            what = "API keys only" if access_only(old, new) else "budgets only" if budgets_only(old, new) else ""
            applied = self.runtime.apply(new, SHUTDOWN_GRACE)
            change = applied.change
            kept = sorted(set(new.models) - change.added - change.restart)
            self.events.publish("configReloaded", {
                "added": sorted(change.added), "removed": sorted(change.removed), "changed": sorted(change.changed),
                "restarted": sorted(change.restart), "evicted": sorted(applied.evicted)})
            self.log.info(
                "config reloaded{what}: added={added} removed={removed} restarted={restarted} "
                "updated in place={updated} kept={kept} evicted={evicted}",
                what=f" ({what})" if what else "", added=sorted(change.added), removed=sorted(change.removed),
                restarted=sorted(change.restart), updated=sorted(change.updated), kept=kept,
                evicted=sorted(applied.evicted))
            return True
        finally:
            self._reloading = False
            self.notify.ready()  # applied or not, the config in force serves
            if self._reload_again:
                self._reload_again = False
                self.request_reload()


class ConfigWatcher(TimerService):
    """Polls the config file (or directory) every 2 s; a change triggers a reload.

    A file that disappears is ignored; when it comes back that counts as a change.
    """

    log = Logger()

    def __init__(self, root: LlamaSwapService, interval: float = defaults.WATCH_INTERVAL):
        super().__init__(interval, self.check)
        self.root = root
        self.clock = root.reactor
        self._last = self.fingerprint()

    def fingerprint(self):
        prints = []
        if self.root.config_path:
            prints.append(_stat(self.root.config_path))
        keys_file = self.root.config.api_keys_file  # re-read with the config when it changes
        if keys_file:
            prints.append(("apiKeysFile", keys_file, _stat(keys_file)))
        if self.root.config_dir:
            try:
                names = sorted(n for n in os.listdir(self.root.config_dir) if n.endswith((".yml", ".yaml")))
            except OSError:
                names = []
            prints.extend((n, _stat(os.path.join(self.root.config_dir, n))) for n in names)
        return tuple(prints)

    def check(self) -> None:
        current = self.fingerprint()
        if current == self._last:
            return
        missing = self.root.config_path and current and current[0] is None
        self._last = current
        if not missing:
            try:
                self.root.reload()
            except Exception:  # logged; the watch goes on (an exception would end the TimerService's loop)
                self.log.failure("config reload failed")


def _stat(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class SighupReload(Service):
    """SIGHUP reloads the config (without it, SIGHUP would end the process);
    signals that arrive before that reload runs, or while one is applied,
    make one reload (``LlamaSwapService.request_reload``)."""

    def __init__(self, root: LlamaSwapService):
        self.root = root
        self._previous = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._handler)

    def _handler(self, signum, frame) -> None:
        self.root.reactor.callFromThread(self.root.request_reload)

    def stopService(self):
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        return super().stopService()


def build_service(
    reactor,
    config: Config,
    endpoints: Sequence[str],
    config_path: Optional[str] = None,
    config_dir: Optional[str] = None,
    watch: bool = False,
    registry: Optional[ChildRegistry] = None,
    notify: Optional[Notifier] = None,
    footprint_sampler=None,
) -> LlamaSwapService:
    root = LlamaSwapService(reactor, config, config_path, config_dir,
                            registry=registry if registry is not None else ChildRegistry(),
                            footprint_sampler=footprint_sampler)
    root.notify = notify if notify is not None else Notifier.from_environ()
    SighupReload(root).setServiceParent(root)
    if watch:
        ConfigWatcher(root).setServiceParent(root)
    site = AccessLogSite(root.api.resource(), reactor)
    listeners = [ListeningEndpoint(serverFromString(reactor, with_backlog(d)), d) for d in endpoints]
    for listener in listeners:
        http = StreamServerEndpointService(listener, site)
        # a bind error aborts start-up loudly, as strports.service arranges (private; checked
        # by tests/test_twisted_private.py)
        http._raiseSynchronously = True
        http.setName(f"http:{listener.description}")
        http.setServiceParent(root)
    ReadyNotifier(root.notify, listeners).setServiceParent(root)  # last: READY after listening, first to stop
    return root
