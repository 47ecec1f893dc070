"""The Klein application: llama-swap's HTTP API.

State lives on the instance (Klein as a class attribute), never in a module
global.  ``FrontResource`` wraps the Klein resource with what runs before
routing: CORS preflight, API-key auth and request timing for the access log.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import time
from typing import Callable, Optional
from urllib.parse import unquote

from klein import Klein
from prometheus_client import generate_latest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..activity.captures import CaptureStore
from ..activity.parse import filter_accept_encoding
from ..activity.query import QueryError, parse_activity_query
from ..activity.recorder import CLIENT_CLOSED as RECORDER_CLIENT_CLOSED
from ..activity.recorder import ActivityRecorder
from ..activity.store import ActivityStore
from ..config import Config, thaw
from ..events import EventBus
from ..inflight import InflightTracker
from ..logs import LogHub
from ..metrics import InferenceMetrics
from ..perf.monitor import INVALID_AFTER, parse_after
from ..process import ProcessState
from ..proxy.filters import (
    LARGE_BODY, apply_json_filters, filter_scanned, filters_active, requested_model_steps,
    rewrite_multipart_model,
)
from ..jsonscan import ObjectScan, scan_object
from ..steps import run_in_slices

#: A big request body is read from its spool file this many bytes per step.
READ_PIECE = 4 * 1024 * 1024
from ..proxy.loading import LoadingStream
from ..proxy.stream import UpstreamBodyIdle, UpstreamTimeout, UpstreamUnavailable, forward, upstream_headers
from ..router.local import RoutingError
from ..clientaddr import TrustedProxies
from ..limits import Limiter
from ..principal import NO_KEY, OPEN, Keyring, Principal, Refusal, Verdict, authorize, model_refusal
from .errors import render_error
from .streams import BoundedStream, dropped_marker

# (path, methods, upstream path) of every model-dispatched route
JSON_POST = (
    "/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/messages",
    "/v1/messages/count_tokens", "/v1/embeddings", "/reranking", "/rerank", "/v1/rerank",
    "/v1/reranking", "/infill", "/completion", "/v1/audio/speech", "/v1/images/generations",
    "/sdapi/v1/txt2img", "/sdapi/v1/img2img",
)
FORM_POST = ("/v1/audio/transcriptions", "/v1/images/edits")
GET_ROUTES = ("/sdapi/v1/loras", "/props")
VERSIONLESS = ("chat/completions", "responses", "completions", "messages", "messages/count_tokens",
               "embeddings", "rerank", "reranking")
MODEL_ROUTES = frozenset(JSON_POST + FORM_POST + GET_ROUTES + ("/v1/audio/voices", "/audioapi/v1/tasks/run")
                         + tuple("/v/" + p for p in VERSIONLESS))
CORS_DEFAULT_HEADERS = "Content-Type, Authorization, Accept, X-Requested-With"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def header(request: IRequest, name: bytes) -> str:
    """A request header as text ("" when absent)."""
    value = request.getHeader(name)
    return value.decode("latin-1") if value else ""


def header_out(request: IRequest, name: bytes) -> str:
    """A response header already set, as text."""
    values = request.responseHeaders.getRawHeaders(name)
    return values[-1].decode("latin-1") if values else ""


RECORD_ERROR_EVERY = 60.0  # seconds between reports of activity rows that could not be stored
CLIENT_CLOSED = RECORDER_CLIENT_CLOSED  # nginx's 499: the client went away first (activity rows, metrics)


def query_value(query: bytes, name: bytes) -> Optional[bytes]:
    """The first value of ``name`` in a raw query string (b"" for a bare flag)."""
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        if key == name:
            return value
    return None


def query_flag(request: IRequest, name: bytes) -> bool:
    """Whether ``?name`` (with or without a value) is in the query string."""
    query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
    return any(part.split(b"=", 1)[0] == name for part in query.split(b"&"))


def send_error(request: IRequest, status: int, message: str, code: Optional[str] = None,
               headers: Optional[dict] = None) -> bytes:
    ctype, body = render_error(status, message, header(request, b"accept"), code)
    request.setResponseCode(status)
    request.setHeader(b"content-type", ctype)
    request.setHeader(b"content-length", str(len(body)).encode())
    for name, value in (headers or {}).items():
        request.setHeader(name.encode(), value.encode())
    return body


def send_json(request: IRequest, obj, status: int = 200) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


def send_text(request: IRequest, text: str, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", str(len(text.encode())).encode())
    return text.encode()


def peer_ip(request: IRequest) -> str:
    """The socket peer's address ("" on listeners without one, e.g. unix)."""
    return str(getattr(request.getClientAddress(), "host", "") or "")


def principal_of(request: IRequest) -> Principal:
    """Who is asking, as ``FrontResource`` decided (``OPEN`` when no API keys
    are configured; a request that reached a handler without a verdict may
    use nothing)."""
    verdict = getattr(request, "llamaswap_verdict", None)
    if verdict is not None and verdict.principal is not None:
        return verdict.principal
    return NOBODY


#: stands for a request no verdict identified: no admin, no model
NOBODY = Principal(NO_KEY)


def client_ip(request: IRequest) -> str:
    """The client's address, decided once per request by ``FrontResource``
    (forwarding headers only from trusted proxies); the peer before that."""
    known = getattr(request, "llamaswap_client", None)
    return known if known is not None else (peer_ip(request) or "-")


class FrontResource(Resource):
    """CORS preflight, who is asking (client address, API key's principal)
    and what they may call, before the Klein routes."""

    isLeaf = True

    def __init__(self, inner: Resource, config: Callable[[], Config], clock):
        super().__init__()
        self.inner = inner
        self.config = config
        self.clock = clock
        self._trusted: Optional[TrustedProxies] = None
        self._keyring: Optional[Keyring] = None
        self._keys_source: Optional[tuple] = None

    def trusted(self) -> TrustedProxies:
        networks = self.config().trusted_proxies
        if self._trusted is None or self._trusted.source != networks:
            self._trusted = TrustedProxies(networks)
            self._trusted.source = networks
        return self._trusted

    def keyring(self) -> Keyring:
        """The configured keys; rebuilt when a reload changes them (the next
        request uses the new keys, requests in flight keep their verdict)."""
        keys = self.config().api_keys
        if self._keyring is None or self._keys_source is not keys:
            self._keyring = Keyring(keys)
            self._keys_source = keys
        return self._keyring

    def verdict(self, request: IRequest, method: bytes, path: bytes) -> Verdict:
        """Who is asking and whether the route is theirs: decided once per
        request (see ``llamaswap.principal``) and kept on it."""
        verdict = getattr(request, "llamaswap_verdict", None)
        if verdict is None:
            verdict = authorize(self.keyring(), method.decode("latin-1"), path.decode("latin-1"),
                                header(request, b"authorization"), header(request, b"x-api-key"),
                                self.config().metrics_public)
            request.llamaswap_verdict = verdict
        return verdict

    def identify(self, request: IRequest) -> None:
        """Decide who is asking, once: the client address and the upstream's
        ``X-Forwarded-For`` (a malformed header never fails the request).
        The API key's principal is decided by :meth:`verdict`, from
        :meth:`check`, as soon as the headers are in."""
        peer = peer_ip(request)
        trusted = self.trusted()
        xff = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or ()
        request.llamaswap_client = trusted.client(peer, xff, request.getHeader(b"x-real-ip"))
        request.llamaswap_forwarded_for = trusted.forwarded_for(peer, xff)
        proto = b"https" if request.isSecure() else b"http"
        if peer and trusted.trusts(peer):  # a TLS-terminating proxy in front says what the client used
            claimed = (request.getHeader(b"x-forwarded-proto") or b"").strip().lower()
            if claimed in (b"http", b"https"):
                proto = claimed
        request.llamaswap_proto = proto

    def render(self, request: IRequest):
        request.llamaswap_started = self.clock.seconds()
        self.identify(request)
        if request.method == b"OPTIONS":
            asked = header(request, b"access-control-request-headers")
            tokens = [t.strip() for t in asked.split(",") if _TOKEN.match(t.strip())]
            request.setResponseCode(204)
            request.setHeader(b"access-control-allow-origin", b"*")
            request.setHeader(b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE, OPTIONS")
            request.setHeader(b"access-control-allow-headers", (", ".join(tokens) or CORS_DEFAULT_HEADERS).encode())
            request.setHeader(b"access-control-max-age", b"86400")
            return b""
        refused = getattr(request, "refused", None) or self.check(request, request.method, request.path, None)
        if refused is not None:
            status, message, headers = refused
            return send_error(request, status, message, headers=headers)
        return self.inner.render(request)

    def check(self, request: IRequest, method: bytes, path: bytes, length: Optional[int]):
        """``(status, message, headers)`` for a request to refuse, else None.

        Also called with the headers alone, before the body is read (see
        ``LlamaSwapRequest.gotLength``), so a refused upload is never stored.
        """
        if method == b"OPTIONS":
            return None
        config = self.config()
        refusal = self.verdict(request, method, path).refusal
        if refusal is not None:
            return (refusal.status, refusal.message, dict(refusal.headers) or None)
        if length is not None and length > config.max_request_body_bytes:
            return (413, "request body too large", None)
        return None

    def body_limit(self) -> int:
        return self.config().max_request_body_bytes


class LlamaSwapApp:
    app = Klein()
    log = Logger()

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
        self.wall = wall
        self.metrics = metrics
        self.registry = registry
        self.perf = perf
        self.limiter = limiter if limiter is not None else Limiter(clock)  # per API key, across reloads
        self._record_quiet_until = float("-inf")  # see _record_failed
        self._record_suppressed = 0

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
        return FrontResource(self.app.resource(), lambda: self.config, self.clock)

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
            base = {"object": "model", "created": created, "owned_by": "llama-swap"}
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
                    records.append(alias_record)
        for peer in config.peers.values():
            for name in peer.models:
                if not principal.may_use(f"{peer.id}/{name}"):
                    continue
                records.append({"id": f"{peer.id}/{name}", "object": "model", "created": created,
                                "owned_by": "llama-swap", "name": f"{peer.id}: {name}",
                                "meta": {"llamaswap": {"type": "peer", "peerID": peer.id}},
                                "status": {"value": "unloaded"}})
        records.sort(key=lambda r: r["id"])
        return records

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
            # a model's own log belongs to the running config: a reload ends the tail
            unsubscribes.append(self.events.subscribe(lambda kind, data: stream.end(), kinds=("configReloaded",)))
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
        for peer in config.peers.values():
            for name in peer.models:
                out.append({"id": f"{peer.id}/{name}", "name": "", "description": "", "state": "",
                            "unlisted": False, "peerID": peer.id})
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
        stream.write(sse("profileChanged", {"active": None}))
        stream.write(sse("inflight", self.inflight.snapshot()))

        def on_event(kind: str, data) -> None:
            if kind in ("modelStatus", "configReloaded", "footprint"):
                stream.write(sse("modelStatus", self.model_status()))
            elif kind in ("inflight", "activity", "profileChanged"):
                stream.write(sse(kind, data))

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
        return defer.ensureDeferred(self.dispatch(request, request.path.decode("latin-1")))

    @app.route("/audioapi/v1/tasks/run", methods=["POST"])
    def audioapi(self, request: IRequest):
        return defer.ensureDeferred(self.dispatch(request, "/v1/tasks/run"))

    @app.route("/v/<path:rest>", methods=["POST"])
    def versionless(self, request: IRequest, rest: str):
        if rest not in VERSIONLESS:
            return send_text(request, "404 page not found", 404)
        return defer.ensureDeferred(self.dispatch(request, "/" + rest))

    def _read_body(self, request: IRequest):
        """Steps (see ``llamaswap.steps``) that return the body, or None when it is too large.

        A big body (spooled to a temporary file by twisted.web) is read
        ``READ_PIECE`` bytes per step: one ``read`` of 30 MiB holds the reactor
        for over 10 ms."""
        limit = self.config.max_request_body_bytes
        declared = request.getHeader(b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return None
        content = request.content
        content.seek(0, 2)
        size = content.tell()
        if size > limit:
            return None
        content.seek(0)
        if size <= LARGE_BODY:
            return content.read()
        pieces = []
        while True:
            piece = content.read(READ_PIECE)
            if not piece:
                break
            pieces.append(piece)
            yield
        return b"".join(pieces)

    async def dispatch(self, request: IRequest, upstream_path: str, model_name: Optional[str] = None):
        """Find the model a request names, then serve it through the router.

        ``model_name`` given means ``/upstream/<model>/...``: a passthrough
        (no body filters, as llama-swap)."""
        body = await run_in_slices(self._read_body(request), self.clock)
        if body is None:
            return send_error(request, 413, "request body too large")
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        ctype = header(request, b"content-type")
        parsed = None
        if model_name is None:
            # a big body is scanned in slices (an ObjectScan, not a dict): see proxy/filters.py
            model_name, parsed = await run_in_slices(
                requested_model_steps(request.method, ctype, body, query), self.clock)
            if not model_name:
                return send_error(request, 404, "no model id could be identified")
        elif "application/json" in ctype.lower():
            parsed = _json_object(body) if len(body) <= LARGE_BODY else await run_in_slices(
                scan_object(body), self.clock)
        config = self.config
        model_id = config.real_model_name(model_name)
        principal = principal_of(request)
        # the key's scope: the name asked for or what it resolves to (never revealing
        # whether a model outside the scope exists)
        peer = config.peer_model(model_name) if model_id is None else None
        refusal = model_refusal(principal, model_name, model_id or ("/".join(peer) if peer else None))
        if refusal is None and model_id is None:
            return send_error(request, 404, "no router for requested model")
        if refusal is None:
            admitted = self.limiter.admit(principal.name, principal.limits)
            if isinstance(admitted, Refusal):
                refusal = admitted
        if refusal is not None:
            if self.metrics is not None:
                self.metrics.key_refused(principal.name, "model" if refusal.status == 403 else refusal.code)
            return send_error(request, refusal.status, refusal.message, refusal.code, dict(refusal.headers))
        runtime = self.runtime
        req_headers = {k.decode("latin-1"): v[-1].decode("latin-1")
                       for k, v in request.requestHeaders.getAllRawHeaders()}
        result = b""
        status = None
        passthrough = request.path.startswith(b"/upstream/")
        try:
            entry = self.inflight.add(model_id, request.path.decode("latin-1"), request.method.decode("latin-1"),
                                      req_headers, client_ip(request), cancel=lambda: _abort(request),
                                      key_name=principal.attribution)
            recorder = self._recorder(request, model_id, upstream_path, body, req_headers, principal)
            request.llamaswap_model = model_id
        except BaseException:
            admitted.release()
            raise
        try:
            request_info = _RequestInfo(body, parsed, ctype, query, model_name, upstream_path, passthrough)
            result = await self._serve(request, runtime, model_id, request_info, entry, recorder)
            return result
        except defer.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            admitted.release()  # at once, however the request ended: limits never leak a slot
            self.inflight.remove(entry)
            broke_off = getattr(request, "llamaswap_broke_off", None)  # (status, message): cut mid-response
            status = status or (broke_off[0] if broke_off else request.code)
            if recorder is not None:
                if status == CLIENT_CLOSED and recorder.status is None:
                    recorder.on_headers(CLIENT_CLOSED, {})
                recorder.own_response(status, header_out(request, b"content-type"), result or b"")
                self._record(recorder)
            if self.metrics is not None:
                path = "/upstream" if passthrough else request.path.decode("latin-1")  # bounded label values
                self.metrics.request_done(model_id, path, status, self.clock.seconds() - request.llamaswap_started,
                                          principal.name)

    def _recorder(self, request: IRequest, model_id: str, upstream_path: str, body: bytes, headers: dict,
                  principal: Principal = OPEN):
        """An activity recorder for POSTs to model-dispatched paths (else None)."""
        if self.activity is None or request.method != b"POST":
            return None
        path = request.path.decode("latin-1")
        req_path = path if path in MODEL_ROUTES else upstream_path
        if req_path not in MODEL_ROUTES:
            return None
        limit = self.captures.max_bytes if self.captures is not None and self.captures.enabled else 0
        return ActivityRecorder(self.clock, self.wall, model_id, req_path, headers, body, limit,
                                remote_ip=client_ip(request), key_name=principal.attribution)

    def _record(self, recorder: ActivityRecorder) -> None:
        """The activity row, then the capture.  Heavy parts (scanning a big
        response, inflating and compressing a big capture) run in slices
        (``llamaswap.steps``); for ordinary requests every step finishes at once."""
        def finished(entry):
            if self.metrics is not None:
                self.metrics.count_tokens(entry.model, entry.tokens, entry.key_name or NO_KEY)
            if entry.key_name:  # tokensPerMinute counts from the response's own usage figures
                tokens = entry.tokens
                self.limiter.add_tokens(entry.key_name, max(0, tokens.input_tokens) + max(0, tokens.output_tokens))
            return self.activity.add(entry)

        def captured(capture, entry_id: int):
            if capture is None:
                return None
            return self.captures.submit(capture, self.clock)

        def stored(entry_id: int):
            d = run_in_slices(recorder.capture_steps(entry_id), self.clock)
            d.addCallback(captured, entry_id)
            event = {"id": entry_id, "key_name": recorder.key_name} if recorder.key_name else {"id": entry_id}
            d.addCallback(lambda _: self.events.publish("activity", event))
            return d

        d = run_in_slices(recorder.finish_steps(), self.clock)
        d.addCallback(finished).addCallback(stored).addErrback(self._record_failed)

    def _record_failed(self, failure) -> None:
        """An activity row could not be stored (a full disk, a store that did not
        open): the request was served all the same.  At most one report per
        ``RECORD_ERROR_EVERY`` seconds, counting the failures in between, so a
        broken store does not put a traceback in the log for every request."""
        now = self.clock.seconds()
        if now < self._record_quiet_until:
            self._record_suppressed += 1
            return
        more, self._record_suppressed = self._record_suppressed, 0
        self._record_quiet_until = now + RECORD_ERROR_EVERY
        since = f" ({more} more since the last report)" if more else ""
        if failure.check(sqlite3.Error, RuntimeError):
            self.log.error("recording activity failed: {error}{since}", error=failure.getErrorMessage(), since=since)
        else:
            self.log.failure("recording activity failed{since}", failure, since=since)

    async def _serve(self, request: IRequest, runtime, model_id: str, info: "_RequestInfo", entry,
                     recorder: Optional[ActivityRecorder] = None):
        model = runtime.config.models[model_id]
        process = runtime.processes[model_id]
        streaming = bool(info.parsed and info.parsed.get("stream") is True) or query_value(info.query, b"stream") == b"true"
        loading = None
        if (model.send_loading_state and streaming and info.upstream_path.startswith("/v1/chat/completions")
                and process.state is not ProcessState.READY):
            seen: list = []  # what happened before the stream began, replayed into it

            def note(event) -> None:
                if loading is not None:
                    event(loading)
                else:
                    seen.append(event)

            def on_position(n: int) -> None:
                note(lambda stream: stream.position(n))

            def on_swap(kind: str, data) -> None:  # which models make room for ours, and why
                if data.get("target") == model_id:
                    for evicted, why in data.get("reasons", {}).items():
                        note(lambda stream, m=evicted, w=why: stream.evicting(m, w))

            stop_listening = runtime.router.events.subscribe(on_swap, kinds=("swap",))
            wait = runtime.router.request(model_id, on_position)
            wait.addBoth(lambda result: (stop_listening(), result)[1])
            if not wait.called:
                loading = LoadingStream(request, self.clock, model_id)
                for event in seen:
                    event(loading)
        else:
            wait = runtime.router.request(model_id)
        try:
            grant = await wait
            if self.metrics is not None:
                self.metrics.waited(model_id, self.clock.seconds() - request.llamaswap_started)
        except RoutingError as e:
            if loading is not None:
                loading.failed(render_error(e.status, e.message, None, e.code)[1])
                return b""
            return send_error(request, e.status, e.message, e.code, e.headers)
        except defer.CancelledError:
            if loading is not None:
                loading.stop()
            raise
        try:
            if loading is not None:
                loading.done()
            body = info.body if info.passthrough else self._filter_body(
                info.body, info.parsed, info.ctype, info.model_name, model)
            url = model.proxy.rstrip("/") + info.upstream_path + (
                "?" + info.query.decode("latin-1") if info.query else "")
            headers = upstream_headers(request.requestHeaders, forwarded_for(request),
                                       forwarded_proto(request), request.getHeader(b"host"))
            verdict = getattr(request, "llamaswap_verdict", None)
            for name in (verdict.hide if verdict is not None else ()):  # an object key stays with llamaswap
                headers.removeHeader(name.encode("latin-1"))
            if recorder is not None:  # only encodings the activity parser can read
                accepted = filter_accept_encoding(header(request, b"accept-encoding"))
                if accepted:
                    headers.setRawHeaders(b"accept-encoding", [accepted.encode("latin-1")])
                else:
                    headers.removeHeader(b"accept-encoding")

            def on_chunk(data: bytes) -> None:
                self.inflight.add_bytes(entry, len(data))
                if recorder is not None:
                    recorder.on_chunk(data)

            def on_headers(response) -> None:
                flat = {k.decode("latin-1"): v[-1].decode("latin-1") for k, v in response.headers.getAllRawHeaders()}
                self.inflight.response_headers(entry, flat)
                if self.metrics is not None:
                    self.metrics.first_byte(model_id, self.clock.seconds() - request.llamaswap_started)
                if recorder is not None:
                    recorder.on_headers(response.code, flat)

            def broke_off(status: int, message: str) -> bytes:
                """The response was cut after its head went out: the client sees it
                end incomplete; activity and metrics record the failure."""
                request.llamaswap_broke_off = (status, message)
                if recorder is not None:
                    recorder.fail(status, message)
                _abort(request)
                return b""

            timeouts = model.timeouts
            try:
                await forward(runtime.agents[model_id], request, url.encode(), body, headers,
                              on_chunk=on_chunk, on_headers=on_headers, write_head=loading is None,
                              clock=self.clock, header_timeout=timeouts.response_header,
                              body_idle=timeouts.body_idle, expect_continue=timeouts.expect_continue)
            except UpstreamBodyIdle as e:
                self.log.warn("{model}: upstream stalled: {error}", model=model_id, error=str(e))
                message = f"upstream timed out: {e}"
                if request.startedWriting:
                    return broke_off(504, message)
                if recorder is not None:
                    recorder.fail(504, message)
                return send_error(request, 504, message)
            except (UpstreamUnavailable, UpstreamTimeout) as e:
                status, message = (504, f"upstream timed out: {e}") if isinstance(e, UpstreamTimeout) else (
                    502, f"upstream not reachable: {e}")
                if loading is not None:
                    loading.failed(render_error(status, message)[1])
                    return b""
                if request.startedWriting:
                    return b""
                return send_error(request, status, message)
            except defer.CancelledError:
                raise
            except Exception as e:  # the upstream died mid-response (crash)
                self.log.warn("{model}: upstream response failed: {error}", model=model_id, error=str(e))
                if request.startedWriting:
                    return broke_off(502, f"upstream response failed: {e}")
                if recorder is not None:
                    recorder.fail(502, f"upstream response failed: {e}")
                return send_error(request, 502, f"upstream response failed: {e}")
            return b""
        finally:
            grant.release()

    def _filter_body(self, body: bytes, parsed, ctype: str, requested: str, model) -> bytes:
        if not filters_active(requested, model.filters, model.use_model_name):
            return body
        if isinstance(parsed, ObjectScan):  # a big body: only the members filters touch are re-encoded
            return filter_scanned(parsed, requested, model.filters, model.use_model_name)
        if parsed is not None:
            filtered = apply_json_filters(parsed, requested, model.filters, model.use_model_name)
            return json.dumps(filtered, separators=(",", ":"), ensure_ascii=False).encode()
        if "multipart/form-data" in ctype.lower() and model.use_model_name:
            return rewrite_multipart_model(body, ctype, model.use_model_name)
        return body

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
        found = None
        for i in range(len(segments), 0, -1):
            candidate = "/".join(segments[:i])
            model_id = self.config.real_model_name(unquote(candidate))
            if model_id is not None:
                found = (model_id, candidate, "/".join(segments[i:]), i < len(segments))
                break
        if found is None:
            return send_error(request, 404, "model not found")
        model_id, prefix, remainder, has_slash = found
        if not has_slash:
            target = f"/upstream/{prefix}/" + (f"?{query}" if query else "")
            request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
            request.setHeader(b"location", target.encode())
            return b""
        path = "/" + remainder
        process = self.runtime.processes[model_id]
        if process.state is not ProcessState.READY and ignored_path(path, self.config.ignore_paths):
            return send_error(request, 409, f"model {model_id} is not loaded; path matches upstream.ignorePaths")
        return defer.ensureDeferred(self.dispatch(request, path, model_name=model_id))


class _RequestInfo:
    """What a model-dispatched request carries once its body is read."""

    __slots__ = ("body", "parsed", "ctype", "query", "model_name", "upstream_path", "passthrough")

    def __init__(self, body: bytes, parsed, ctype: str, query: bytes, model_name: str, upstream_path: str,
                 passthrough: bool = False):
        self.body, self.parsed, self.ctype = body, parsed, ctype
        self.query, self.model_name, self.upstream_path = query, model_name, upstream_path
        self.passthrough = passthrough


def forwarded_proto(request: IRequest) -> bytes:
    """``X-Forwarded-Proto`` for the upstream: ours, or a trusted proxy's."""
    value = getattr(request, "llamaswap_proto", None)
    return value if value is not None else (b"https" if request.isSecure() else b"http")


def forwarded_for(request: IRequest) -> bytes:
    """The ``X-Forwarded-For`` value for the upstream (see ``FrontResource.identify``)."""
    value = getattr(request, "llamaswap_forwarded_for", None)
    return value if value is not None else (peer_ip(request) or "-").encode("latin-1", "replace")


def _json_object(body: bytes):
    try:
        parsed = json.loads(body) if body.strip() else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _abort(request: IRequest) -> None:
    transport = getattr(request.channel, "transport", None) if request.channel is not None else None
    if transport is not None:
        transport.abortConnection()


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

