"""The Klein application: llama-swap's HTTP API.

State lives on the instance (Klein as a class attribute), never in a module
global.  The routes here are thin.  A model-dispatched route (the OpenAI,
Anthropic and llama.cpp inference paths, ``/upstream/<model>/...``) hands
its request to the proxy pipeline (``llamaswap.proxy.pipeline``); the others
are here: the model listing, ``/running`` and unloading, logs, live events,
Prometheus metrics, performance, activity and captures, the browser UI.
``resource()`` wraps the Klein resource in ``FrontResource`` (``front.py``:
CORS preflight, who is asking, what they may call); the small HTTP helpers
live in ``http.py``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import time
from typing import Callable, Optional
from urllib.parse import quote, unquote

from klein import Klein
from prometheus_client import generate_latest
from twisted.internet import defer
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..activity.captures import CaptureStore
from ..activity.query import QueryError, parse_activity_query
from ..activity.store import ActivityStore
from ..config import Config, thaw
from ..events import EventBus
from ..inflight import InflightTracker
from ..limits import Limiter
from ..logs import LogHub
from ..metrics import InferenceMetrics
from ..perf.hardware import HardwareInfo, HardwareUnavailable, version_info
from ..perf.monitor import INVALID_AFTER, parse_after
from ..principal import OPEN, Principal
from ..process import ProcessState
from ..proxy.pipeline import VERSIONLESS, ProxyPipeline
from ..router.peers import resolve
from .front import FrontResource
from .http import header, principal_of, query_flag, send_error, send_json, send_text
from .streams import BoundedStream, dropped_marker
from .ui import UiFiles


class LlamaSwapApp:
    app = Klein()

    def __init__(self, runtime: Callable[[], object], clock=None, hub: Optional[LogHub] = None,
                 events: Optional[EventBus] = None, inflight: Optional[InflightTracker] = None,
                 activity: Optional[ActivityStore] = None, captures: Optional[CaptureStore] = None,
                 wall: Callable[[], float] = time.time, metrics: Optional[InferenceMetrics] = None,
                 registry=None, perf=None, limiter: Optional[Limiter] = None):
        self._runtime = runtime
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.hub = hub if hub is not None else LogHub()
        self.events = events if events is not None else EventBus()
        self.inflight = inflight if inflight is not None else InflightTracker(clock, self.events)
        self.streams: set = set()
        self.activity = activity
        self.captures = captures
        self.registry = registry
        self.perf = perf
        self.limiter = limiter if limiter is not None else Limiter(clock)  # per API key, across reloads
        self.ui = UiFiles()  # the browser UI's files (web/), served at /ui/
        self.hardware = HardwareInfo()
        self.pipeline = ProxyPipeline(runtime, clock, self.inflight, self.events, self.limiter,
                                      activity=activity, captures=captures, wall=wall, metrics=metrics)

    def close_streams(self) -> None:
        """End every open log tail and event stream (shutdown)."""
        for stream in list(self.streams):
            stream.end()

    @property
    def runtime(self):
        return self._runtime()

    @property
    def config(self) -> Config:
        return self.runtime.config

    def resource(self) -> Resource:
        front = FrontResource(self.app.resource(), lambda: self.config, self.clock)
        front.signin = self.ui.signin_page  # a browser's page load without a key: the sign-in page
        front.routes = self.fast_routes()
        return front

    def fast_routes(self) -> dict:
        """``{(method, path): handler}`` for the model-dispatched routes of fixed
        paths, as declared below: the front calls them without Klein's routing
        (the hot path; Klein still answers their wrong methods)."""
        handlers = {"model_route": self.model_route, "audioapi": self.audioapi}
        return {(method.encode(), rule.rule.encode()): handlers[rule.endpoint]
                for rule in self.app.url_map.iter_rules() if rule.endpoint in handlers
                for method in rule.methods}

    # -- Go ServeMux-like answers for unknown paths and wrong methods --------------------

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure) -> bytes:
        return send_text(request, "404 page not found", 404)

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure) -> bytes:
        allowed = sorted(failure.value.valid_methods or ())
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
        return send_text(request, "Method Not Allowed", 405)

    # -- simple routes ----------------------------------------------------------------

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        return send_text(request, "OK")

    @app.route("/wol-health", methods=["GET", "HEAD"])
    def wol_health(self, request: IRequest) -> bytes:
        return send_text(request, "OK")

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> bytes:
        request.redirect(b"/ui/")
        return b""

    # -- the browser UI (llamaswap/server/ui.py, files in web/) and what it shows ---------

    @app.route("/ui/", branch=True, methods=["GET", "HEAD"])
    def web_ui(self, request: IRequest) -> bytes:
        return self.ui.render(request)

    @app.route("/favicon.ico", methods=["GET", "HEAD"])
    def favicon(self, request: IRequest) -> bytes:
        return self.ui.favicon(request)

    @app.route("/api/version", methods=["GET"])
    def api_version(self, request: IRequest) -> bytes:
        return send_json(request, version_info())

    @app.route("/api/hardware", methods=["GET"])
    async def api_hardware(self, request: IRequest) -> bytes:
        try:
            return send_json(request, await self.hardware.get())
        except HardwareUnavailable:
            return send_error(request, 503, "hardware detection unavailable")

    @app.route("/v1/models", methods=["GET"])
    @app.route("/models", methods=["GET"])
    def list_models(self, request: IRequest) -> bytes:
        origin = request.getHeader(b"origin")
        if origin:
            request.setHeader(b"access-control-allow-origin", origin)
        return send_json(request, {"object": "list", "data": self.model_records(principal_of(request))})

    def model_records(self, principal: Principal = OPEN) -> list:
        """``/v1/models``: what ``principal`` may use (every record, as it
        would be requested, passes the same check as a request for it)."""
        config = self.config
        created = int(time.time())
        records = []
        processes = self.runtime.processes
        for model_id, model in config.models.items():
            if model.unlisted:
                continue
            state = processes[model_id].state
            loaded = state in (ProcessState.STARTING, ProcessState.READY, ProcessState.STOPPING)
            base = _record_base(created)
            if model.name:
                base["name"] = model.name
            if model.description:
                base["description"] = model.description
            meta = thaw(model.metadata)
            caps = model.capabilities
            if not caps.empty:
                for key in ("architecture", "capabilities", "supported_parameters", "context_length"):
                    meta.pop(key, None)
                base.update(_render_capabilities(caps))
            status = {"value": "loaded" if loaded else "unloaded"}
            info = dict(meta, type="model")
            if model.aliases:
                info["aliases"] = list(model.aliases)
            footprint = self.runtime.footprints.record(model_id)
            if footprint is not None:
                info["footprint"] = footprint
            record = dict(base, id=model_id, status=status)
            record["meta"] = {"llamaswap": info}
            if caps.context:
                record["meta"]["n_ctx"] = caps.context
            if principal.may_use(model_id):
                records.append(record)
            if config.include_aliases_in_list:
                for alias in model.aliases:
                    if not principal.may_use(alias, model_id):
                        continue
                    alias_record = dict(base, id=alias, status=status,
                                        meta={"llamaswap": dict(meta, type="alias", modelID=model_id)})
                    if caps.context:  # the same fields as the model's own record
                        alias_record["meta"]["n_ctx"] = caps.context
                    records.append(alias_record)
        peers = self.runtime.peers
        for peer in config.peers.values():
            for name in peer.models:
                if not principal.may_use(f"{peer.id}/{name}"):
                    continue
                info = {"type": "peer", "peerID": peer.id}
                if peer.health_check is not None:  # llamaswap addition: what its health check says
                    info["available"] = peers.is_available(peer.id)
                records.append(dict(_record_base(created), id=f"{peer.id}/{name}", name=f"{peer.id}: {name}",
                                    meta={"llamaswap": info}, status={"value": "unloaded"}))
        for selector in config.selectors.values():
            if not selector.unlisted and principal.may_use(selector.id, selector.id):
                records.append(self._selector_record(selector, created))
        records.extend(self._pin_records(principal, created))
        records.sort(key=lambda r: r["id"])
        return records

    def _selector_record(self, selector, created: int) -> dict:
        """A selector as llama-swap lists it: loaded when a local target is
        ready or starting (for ``pin``: its first target)."""
        config, processes = self.config, self.runtime.processes
        loaded = False
        for target in selector.targets:
            model_id = config.real_model_name(target)
            if model_id is not None and processes[model_id].state in (ProcessState.READY, ProcessState.STARTING):
                loaded = True
            if loaded or selector.strategy == "pin":
                break
        info = dict(thaw(selector.metadata), type="selector", strategy=selector.strategy,
                    targets=list(selector.targets))
        if selector.strategy == "spillover":
            info["spillover"] = selector.spillover
        record = dict(_record_base(created), id=selector.id)
        if selector.name:
            record["name"] = selector.name
        if selector.description:
            record["description"] = selector.description
        record.update(meta={"llamaswap": info}, status={"value": "loaded" if loaded else "unloaded"})
        return record

    def _pin_records(self, principal: Principal, created: int) -> list:
        """The active profile's pins that name nothing else (``{"type": "profile"}``)."""
        runtime = self.runtime
        profile = self.config.profiles.get(runtime.active_profile) if runtime.active_profile else None
        if profile is None:
            return []
        config = self.config
        out = []
        for pin, target in profile.pins.items():
            if (not target or config.real_model_name(pin) is not None or pin in runtime.peers.routes
                    or pin in config.selectors or not principal.may_use(pin, target)):
                continue
            out.append(dict(_record_base(created), id=pin, meta={"llamaswap": {"type": "profile"}},
                            status={"value": "unloaded"}))
        return out

    @app.route("/running", methods=["GET"])
    def running(self, request: IRequest) -> bytes:
        out = []
        principal = principal_of(request)
        for model_id, process in sorted(self.runtime.processes.items()):
            if not principal.may_use(model_id):
                continue
            if process.state in (ProcessState.STARTING, ProcessState.READY, ProcessState.STOPPING):
                m = process.model
                entry = {"model": model_id, "state": str(process.state), "cmd": m.cmd.strip(),
                         "proxy": m.proxy, "ttl": m.ttl, "name": m.name, "description": m.description}
                footprint = self.runtime.footprints.record(model_id)
                if footprint is not None:
                    entry["footprint"] = footprint
                out.append(entry)
        return send_json(request, {"running": out})

    @app.route("/unload", methods=["GET"])
    async def unload_all_text(self, request: IRequest) -> bytes:
        await self.runtime.router.unload()
        return send_text(request, "OK")

    @app.route("/api/models/unload", methods=["POST"])
    async def unload_all(self, request: IRequest) -> bytes:
        await self.runtime.router.unload()
        return send_json(request, {"msg": "ok"})

    @app.route("/api/models/unload/<path:name>", methods=["POST"])
    async def unload_one(self, request: IRequest, name: str) -> bytes:
        model_id = self.config.real_model_name(name)
        if model_id is None:
            if self.config.peer_model(name):
                return send_error(request, 404, "no local server found for requested model")
            return send_error(request, 404, "model not found")
        await self.runtime.router.unload([model_id])
        return send_text(request, "OK")

    # -- logs ------------------------------------------------------------------------------

    def log_monitor(self, name: str):
        """The monitor for a /logs/stream suffix: '', proxy, upstream, a model id or alias."""
        if name == "":
            return self.hub.combined
        if name == "proxy":
            return self.hub.proxy
        if name == "upstream":
            return self.hub.upstream
        model_id = self.config.real_model_name(name)
        if model_id is not None and model_id in self.runtime.processes:
            return self.runtime.processes[model_id].logmon
        return None

    @app.route("/logs", methods=["GET"])
    def logs(self, request: IRequest) -> bytes:
        if "text/html" in header(request, b"accept"):
            request.redirect(b"/ui/")
            return b""
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return self.hub.combined.history()

    @app.route("/logs/stream", methods=["GET"], branch=True)
    async def log_stream(self, request: IRequest):
        name = unquote(request.path[len(b"/logs/stream"):].decode("latin-1")).strip("/")
        monitor = self.log_monitor(name)
        if monitor is None:
            return send_error(request, 400, "invalid logger. Use 'proxy', 'upstream' or a model's ID")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-accel-buffering", b"no")
        if request.method == b"HEAD":
            return b""
        stream = BoundedStream(request, marker=dropped_marker)
        if not query_flag(request, b"no-history"):
            stream.write(monitor.history())
        unsubscribes = [monitor.subscribe(stream.write)]
        if monitor not in (self.hub.combined, self.hub.proxy, self.hub.upstream):
            # a model's own log: a reload that removes the model ends the tail (a restarted
            # model's new process writes to the same log)
            def reloaded(kind, data) -> None:
                if all(p.logmon is not monitor for p in self.runtime.processes.values()):
                    stream.end()

            unsubscribes.append(self.events.subscribe(reloaded, kinds=("configReloaded",)))
        await self._run_stream(stream, unsubscribes)
        return b""

    async def _run_stream(self, stream: BoundedStream, unsubscribes: list) -> None:
        self.streams.add(stream)
        try:
            await stream.closed
        finally:
            self.streams.discard(stream)
            for unsubscribe in unsubscribes:
                unsubscribe()

    # -- live events --------------------------------------------------------------------------

    def model_status(self) -> list:
        out = []
        config = self.config
        processes = self.runtime.processes
        for model_id in sorted(config.models):
            m = config.models[model_id]
            item = {"id": model_id, "name": m.name, "description": m.description,
                    "state": str(processes[model_id].state), "unlisted": m.unlisted, "peerID": ""}
            if m.aliases:
                item["aliases"] = list(m.aliases)
            if m.capabilities.context:
                item["context_length"] = m.capabilities.context
            footprint = self.runtime.footprints.record(model_id)
            if footprint is not None:
                item["footprint"] = footprint
            out.append(item)
        peers = self.runtime.peers
        for peer in config.peers.values():
            for name in peer.models:
                item = {"id": f"{peer.id}/{name}", "name": "", "description": "", "state": "",
                        "unlisted": False, "peerID": peer.id}
                if peer.health_check is not None:  # llamaswap addition, as in /v1/models
                    item["available"] = peers.is_available(peer.id)
                out.append(item)
        return out

    @staticmethod
    def sse(kind: str, payload) -> bytes:
        envelope = json.dumps({"type": kind, "data": json.dumps(payload, separators=(",", ":"))},
                              separators=(",", ":"))
        return b"event:message\ndata:" + envelope.encode() + b"\n\n"

    @app.route("/api/events", methods=["GET"])
    async def api_events(self, request: IRequest):
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-accel-buffering", b"no")
        if request.method == b"HEAD":
            return b""
        principal = principal_of(request)
        if not principal.admin:
            await self._own_events(request, principal)
            return b""
        stream = BoundedStream(request)
        sse = self.sse

        def log_data(source: str):
            return lambda data: stream.write(sse("logData", {"source": source, "data": data.decode("utf-8", "replace")}))

        stream.write(sse("logData", {"source": "proxy", "data": self.hub.proxy.history().decode("utf-8", "replace")}))
        stream.write(sse("logData", {"source": "upstream",
                                     "data": self.hub.upstream.history().decode("utf-8", "replace")}))
        stream.write(sse("modelStatus", self.model_status()))
        stream.write(sse("uiConfig", {"activity": {"session_id": list(self.config.session_id_headers)}}))
        stream.write(sse("profileChanged", {"active": self.runtime.active_profile}))
        stream.write(sse("inflight", self.inflight.snapshot()))

        def on_event(kind: str, data) -> None:
            if kind in ("modelStatus", "configReloaded", "footprint"):
                if kind == "configReloaded":  # what the reload added, removed, changed, restarted, evicted
                    stream.write(sse(kind, data))
                stream.write(sse("modelStatus", self.model_status()))
            elif kind == "peerStatus":  # a peer's health check changed its verdict
                stream.write(sse(kind, data))
                stream.write(sse("modelStatus", self.model_status()))
            elif kind in ("inflight", "activity", "profileChanged"):
                stream.write(sse(kind, data))
                if kind == "profileChanged":  # as llama-swap: the model list is sent again
                    stream.write(sse("modelStatus", self.model_status()))

        await self._run_stream(stream, [
            self.hub.proxy.subscribe(log_data("proxy")),
            self.hub.upstream.subscribe(log_data("upstream")),
            self.events.subscribe(on_event),
        ])
        return b""

    async def _own_events(self, request: IRequest, principal: Principal) -> None:
        """``/api/events`` for a key without admin: its own requests' activity
        only (``inflight`` entries and ``activity`` rows of its name), no logs,
        model states or other keys' requests."""
        stream = BoundedStream(request)
        sse = self.sse
        name = principal.name
        mine: set = set()  # in-flight ids of this key, to pass on their removal
        snapshot = self.inflight.snapshot(name)
        mine.update(r["id"] for r in snapshot.get("requests", ()))
        stream.write(sse("inflight", snapshot))

        def on_event(kind: str, data) -> None:
            if kind == "activity" and data.get("key_name") == name:
                stream.write(sse(kind, data))
            elif kind == "inflight":
                if data.get("operation") == "upsert" and data["request"].get("key_name") == name:
                    mine.add(data["request"]["id"])
                    stream.write(sse(kind, data))
                elif data.get("operation") == "remove" and data.get("id") in mine:
                    mine.discard(data["id"])
                    stream.write(sse(kind, data))

        await self._run_stream(stream, [self.events.subscribe(on_event, kinds=("activity", "inflight"))])

    # -- profiles ----------------------------------------------------------------------------

    @app.route("/api/profiles", methods=["GET"])
    def profiles(self, request: IRequest) -> bytes:
        profiles = [{"id": name, "description": p.description,
                     "pins": {k: (v if v is not None else "") for k, v in sorted(p.pins.items())}}
                    for name, p in sorted(self.config.profiles.items())]
        return send_json(request, {"active": self.runtime.active_profile, "profiles": profiles})

    @app.route("/api/profiles/active", methods=["PUT"])
    def set_profile(self, request: IRequest) -> bytes:
        try:
            doc = json.loads(request.content.read() or b"null")
        except ValueError:
            return send_error(request, 400, "invalid profile request")
        if not isinstance(doc, dict):
            return send_error(request, 400, "invalid profile request")
        if "name" not in doc:
            return send_error(request, 400, "profile name is required")
        name = doc["name"]
        if name is not None and not isinstance(name, str):
            return send_error(request, 400, "profile name must be a string or null")
        if name == "":
            name = None
        if name is not None and name not in self.config.profiles:
            return send_error(request, 404, f"profile {name!r} not found".replace("'", '"'))
        runtime = self.runtime
        if runtime.active_profile != name:
            runtime.active_profile = name
            self.events.publish("profileChanged", {"active": name})
        return send_json(request, {"active": name})

    @app.route("/api/inflight/<entry_id>/cancel", methods=["POST"])
    def cancel_inflight(self, request: IRequest, entry_id: str) -> bytes:
        if not self.inflight.cancel(entry_id):
            return send_error(request, 404, "inflight request not found")
        return send_json(request, {"msg": "ok"})

    # -- Prometheus ------------------------------------------------------------------------

    @app.route("/metrics", methods=["GET"])
    def prometheus(self, request: IRequest) -> bytes:
        if self.registry is None or self.perf is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"# performance monitor not available\n"
        body = generate_latest(self.registry)
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        request.setHeader(b"content-length", str(len(body)).encode())
        return body

    @app.route("/api/performance", methods=["GET"])
    def performance(self, request: IRequest) -> bytes:
        if self.perf is None:
            return send_json(request, {"enabled": False}, 503)
        after = None
        raw = request.args.get(b"after")
        if raw:
            try:
                after = parse_after(raw[0].decode("utf-8", "replace"))
            except ValueError:
                return send_error(request, 400, INVALID_AFTER)
        return send_json(request, self.perf.snapshot(after))

    # -- activity and captures -------------------------------------------------------------

    @app.route("/api/metrics/activity", methods=["GET"])
    async def metrics_activity(self, request: IRequest):
        if self.activity is None:
            return send_error(request, 503, "activity store unavailable")
        try:
            query = parse_activity_query(request.args)
        except QueryError as e:
            return send_error(request, 400, str(e))
        principal = principal_of(request)
        if not principal.admin:  # a key without admin reads its own rows only
            query = dataclasses.replace(query, key_names=(principal.name,))
        has = self.captures.has if self.captures is not None else None
        try:
            page = await self.activity.query(query, has_capture=has)
        except (sqlite3.Error, RuntimeError) as e:
            return send_error(request, 503, f"activity store unavailable: {e}")
        return send_json(request, page)

    @app.route("/api/metrics/stats", methods=["GET"])
    async def metrics_stats(self, request: IRequest):
        if self.activity is None:
            return send_error(request, 503, "activity store unavailable")
        model = (request.args.get(b"model") or [b""])[0].decode("utf-8", "replace") or None
        keys = [k.decode("utf-8", "replace") for k in request.args.get(b"key", ())]
        group = (request.args.get(b"group_by") or [b""])[0]
        if group not in (b"", b"key"):
            return send_error(request, 400, "group_by must be 'key'")
        principal = principal_of(request)
        if not principal.admin:  # a key without admin counts its own rows only
            keys = [principal.name]
        try:
            stats = await self.activity.stats(model, keys, by_key=group == b"key")
        except (sqlite3.Error, RuntimeError) as e:
            return send_error(request, 503, f"activity store unavailable: {e}")
        return send_json(request, stats)

    @app.route("/api/captures", methods=["GET"])
    def captures_stats(self, request: IRequest) -> bytes:
        stats = self.captures.stats() if self.captures is not None else {"count": 0, "max_bytes": 0}
        return send_json(request, stats)

    @app.route("/api/captures/<capture_id>", methods=["GET"])
    def capture(self, request: IRequest, capture_id: str) -> bytes:
        if not capture_id.isdigit():
            return send_error(request, 400, "invalid capture ID")
        capture = self.captures.get(int(capture_id)) if self.captures is not None else None
        if capture is None:
            return send_error(request, 404, "capture not found")
        return send_json(request, capture.to_json())

    # -- model-dispatched routes ----------------------------------------------------------

    @app.route("/v1/chat/completions", methods=["POST"])
    @app.route("/v1/responses", methods=["POST"])
    @app.route("/v1/completions", methods=["POST"])
    @app.route("/v1/messages", methods=["POST"])
    @app.route("/v1/messages/count_tokens", methods=["POST"])
    @app.route("/v1/embeddings", methods=["POST"])
    @app.route("/reranking", methods=["POST"])
    @app.route("/rerank", methods=["POST"])
    @app.route("/v1/rerank", methods=["POST"])
    @app.route("/v1/reranking", methods=["POST"])
    @app.route("/infill", methods=["POST"])
    @app.route("/completion", methods=["POST"])
    @app.route("/v1/audio/speech", methods=["POST"])
    @app.route("/v1/audio/voices", methods=["GET", "POST"])
    @app.route("/v1/images/generations", methods=["POST"])
    @app.route("/v1/images/edits", methods=["POST"])
    @app.route("/v1/audio/transcriptions", methods=["POST"])
    @app.route("/sdapi/v1/txt2img", methods=["POST"])
    @app.route("/sdapi/v1/img2img", methods=["POST"])
    @app.route("/sdapi/v1/loras", methods=["GET"])
    @app.route("/props", methods=["GET"])
    def model_route(self, request: IRequest):
        return defer.ensureDeferred(self.pipeline.dispatch(request, request.path.decode("latin-1")))

    @app.route("/audioapi/v1/tasks/run", methods=["POST"])
    def audioapi(self, request: IRequest):
        return defer.ensureDeferred(self.pipeline.dispatch(request, "/v1/tasks/run"))

    @app.route("/v/<path:rest>", methods=["POST"])
    def versionless(self, request: IRequest, rest: str):
        if rest not in VERSIONLESS:
            return send_text(request, "404 page not found", 404)
        return defer.ensureDeferred(self.pipeline.dispatch(request, "/" + rest))

    # -- /upstream passthrough ------------------------------------------------------------

    @app.route("/upstream", methods=["GET"])
    def upstream_index(self, request: IRequest) -> bytes:
        request.redirect(b"/ui/models")
        return b""

    @app.route("/upstream/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
    def upstream(self, request: IRequest, rest: str):
        raw = request.uri.split(b"?", 1)[0][len(b"/upstream/"):].decode("latin-1")
        query = request.uri.split(b"?", 1)[1].decode("latin-1") if b"?" in request.uri else ""
        segments = raw.split("/")
        pin = self._upstream_pin(segments)
        if pin is not None:  # the active profile's longest pin prefix (selectors do not apply here)
            length, pinned_to = pin
            if not pinned_to:  # a pin to ""/~: that name is switched off
                return send_error(request, 404, "model not found")
            segments = quote(pinned_to, safe="/").split("/") + segments[length:]
        found = None
        config, routes = self.config, self.runtime.peers.routes
        for i in range(len(segments), 0, -1):  # the longest prefix that names a local or peer model
            candidate = "/".join(segments[:i])
            target = resolve(config, routes, unquote(candidate))
            if target is not None:
                found = (target, candidate, "/".join(segments[i:]), i < len(segments))
                break
        if found is None:
            return send_error(request, 404, "model not found")
        target, prefix, remainder, has_slash = found
        if not has_slash:
            location = f"/upstream/{prefix}/" + (f"?{query}" if query else "")
            request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
            request.setHeader(b"location", location.encode())
            return b""
        path = "/" + remainder
        model_id = target.model_id
        if (model_id is not None and self.runtime.processes[model_id].state is not ProcessState.READY
                and ignored_path(path, self.config.ignore_paths)):  # (a peer never swaps)
            return send_error(request, 409, f"model {model_id} is not loaded; path matches upstream.ignorePaths")
        return defer.ensureDeferred(self.pipeline.dispatch(request, path, model_name=target.name))

    def _upstream_pin(self, segments: list) -> "Optional[tuple[int, str]]":
        """The active profile's pin for the longest leading ``segments`` that
        it pins, as llama-swap: ``(segments it covers, target)``, else None."""
        runtime = self.runtime
        if runtime.active_profile is None:
            return None
        for i in range(len(segments), 0, -1):
            pinned, target = runtime.pinned(unquote("/".join(segments[:i])))
            if pinned:
                return i, target or ""
        return None


def _record_base(created: int) -> dict:
    """What every ``/v1/models`` record starts with (reference §2.6)."""
    return {"object": "model", "created": created, "owned_by": "llama-swap"}


MAX_MATCHED_PATH = 2048


def ignored_path(path: str, patterns) -> bool:
    """Does ``path`` match ``upstream.ignorePaths``?  Python's regex engine can
    backtrack (Go's RE2 cannot), so very long paths count as ignored instead of
    being matched: they never start a model and never stall the reactor."""
    if len(path) > MAX_MATCHED_PATH:
        return True
    return any(re.search(p, path) for p in patterns)


def _render_capabilities(caps) -> dict:
    out: dict = {}
    if caps.inputs or caps.outputs:
        arch = {"input_modalities": list(caps.inputs), "output_modalities": list(caps.outputs)}
        if caps.inputs and caps.outputs:
            arch["modality"] = "+".join(caps.inputs) + "->" + "+".join(caps.outputs)
        out["architecture"] = arch
    flags = {}
    if "image" in caps.inputs:
        flags["vision"] = True
    if "audio" in caps.inputs and "text" in caps.outputs:
        flags["audio_transcriptions"] = True
    if "text" in caps.inputs and "audio" in caps.outputs:
        flags["audio_speech"] = True
    if "text" in caps.inputs and "image" in caps.outputs:
        flags["image_generation"] = True
    if "image" in caps.inputs and "image" in caps.outputs:
        flags["image_to_image"] = True
    if caps.tools:
        flags["function_calling"] = True
        out["supported_parameters"] = ["tools", "tool_choice"]
    if caps.reranker:
        flags["reranker"] = True
    if flags:
        out["capabilities"] = flags
    if caps.context:
        out["context_length"] = caps.context
    return out

