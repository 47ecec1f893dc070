"""The proxy pipeline: one model-dispatched request, from body to record.

``ProxyPipeline.dispatch`` carries a request that names a model
(``/v1/chat/completions``, ``/upstream/<model>/...``, see ``MODEL_ROUTES``)
through every step after the front (``llamaswap.server.front``) decided who
is asking:

1. read the body, bounded (``maxRequestBodyBytes``), a big one in slices;
2. find the model it names (JSON ``model``, ``?model=``, a multipart field)
   and resolve it (profile pin, selector, local id or alias, peer model:
   ``llamaswap.router.peers``, ``llamaswap.router.selectors``);
3. the API key's scope and limits (``llamaswap.principal``,
   ``llamaswap.limits``): refused requests end here;
4. in-flight entry and activity recorder;
5. ``_serve``: for a local model a grant from the router (which may start
   or swap models), meanwhile the loading-state stream for chat clients that
   asked for it; for a peer model nothing to wait for (no swap, no queue);
   request filters; ``forward`` to the upstream (``llamaswap.proxy.stream``);
   upstream failures mapped to 502/504 (or the response cut short once its
   head went out).  A failover selector's targets are tried in turn while
   one fails before any byte reached the client (``_attempts``);
6. whatever happened: the grant and the key's slot released, the in-flight
   entry removed, the activity row and capture stored, metrics counted.

It needs no Klein: it takes the request object (any ``IRequest``: status,
headers, ``write``, ``content``, ``channel``), the runtime and the app's
collaborators.  The front (``FrontResource.routes``) calls it directly for
the model-dispatched routes of fixed paths; Klein routes the rest
(``/upstream/...``, ``/v/...``) to it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from ..activity.captures import CaptureStore
from ..activity.parse import filter_accept_encoding
from ..activity.recorder import CLIENT_CLOSED as RECORDER_CLIENT_CLOSED
from ..activity.recorder import ActivityRecorder
from ..activity.store import ActivityStore
from ..config import Config
from ..events import EventBus
from ..inflight import InflightTracker
from ..jsonscan import ObjectScan, scan_object
from ..limits import Limiter
from ..metrics import InferenceMetrics
from ..principal import NO_KEY, OPEN, Principal, Refusal, model_refusal
from ..process import ProcessState
from ..router.local import RoutingError
from ..router.peers import Target, resolve
from ..router.selectors import NoTarget, SpilloverCounts, choose, selector_targets
from ..server.errors import render_error
from ..server.http import (
    abort_connection, client_ip, forwarded_for, forwarded_proto, header, header_out, principal_of, query_value,
    send_error,
)
from ..steps import run_in_slices
from .filters import (
    LARGE_BODY, apply_json_filters, filter_scanned, filters_active, replace_query_model, requested_model_steps,
    rewrite_multipart_model,
)
from .loading import LoadingStream
from .stream import (
    RawHeaders, UpstreamBodyIdle, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable, forward, upstream_headers,
)

#: A big request body is read from its spool file this many bytes per step.
READ_PIECE = 4 * 1024 * 1024

# the model-dispatched routes: what a front hands to the pipeline (``LlamaSwapApp``
# declares each and routes it to ``ProxyPipeline.dispatch``); activity is recorded for these
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

RECORD_ERROR_EVERY = 60.0  # seconds between reports of activity rows that could not be stored
CLIENT_CLOSED = RECORDER_CLIENT_CLOSED  # nginx's 499: the client went away first (activity rows, metrics)


class ProxyPipeline:
    """Serves model-dispatched requests (see the module docstring).

    ``runtime`` returns the running ``llamaswap.runtime.Runtime`` (a reload
    replaces it; each request uses the one current when it needs it).  The
    collaborators are the app's own, shared with its other routes:
    ``inflight`` (``/api/events``, cancel), ``events``, the per-key
    ``limiter``, the ``activity`` store and ``captures`` (either may be
    None: nothing recorded), ``metrics`` (None: none counted); ``clock``
    runs the timers, ``wall`` stamps activity rows.
    """

    log = Logger()

    def __init__(self, runtime: Callable[[], object], clock, inflight: InflightTracker, events: EventBus,
                 limiter: Limiter, activity: Optional[ActivityStore] = None,
                 captures: Optional[CaptureStore] = None, wall: Callable[[], float] = time.time,
                 metrics: Optional[InferenceMetrics] = None):
        self._runtime = runtime
        self.clock = clock
        self.inflight = inflight
        self.events = events
        self.limiter = limiter
        self.activity = activity
        self.captures = captures
        self.wall = wall
        self.metrics = metrics
        self._record_quiet_until = float("-inf")  # see _record_failed
        self._record_suppressed = 0
        # spillover selectors' requests in flight per target: exact across reloads
        # (each request releases what it reserved), so kept here, not in the runtime
        self.spillover = SpilloverCounts()

    @property
    def runtime(self):
        return self._runtime()

    @property
    def config(self) -> Config:
        return self.runtime.config

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
        (no body filters, as llama-swap).  Returns what remains to be written
        (an error body; ``b""`` once a response was streamed); the caller
        writes it and finishes the request, and cancels the coroutine when the
        client goes away (``render_deferred`` and Klein both do)."""
        body = await run_in_slices(self._read_body(request), self.clock)
        if body is None:
            return send_error(request, 413, "request body too large")
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        ctype = header(request, b"content-type")
        parsed = None
        passthrough_name = model_name is not None  # /upstream/<model>: no profile pins
        if model_name is None:
            # a big body is scanned in slices (an ObjectScan, not a dict): see proxy/filters.py
            model_name, parsed = await run_in_slices(
                requested_model_steps(request.method, ctype, body, query), self.clock)
            if not model_name:
                return send_error(request, 404, "no model id could be identified")
        elif "application/json" in ctype.lower():
            parsed = _json_object(body) if len(body) <= LARGE_BODY else await run_in_slices(
                scan_object(body), self.clock)
        runtime = self.runtime
        config = runtime.config
        asked = model_name  # as the request names it (what its "model" says)
        if not passthrough_name:  # the active profile's pins come before aliases and routing
            pinned, pinned_to = runtime.pinned(model_name)
            if pinned and not pinned_to:
                return send_error(request, 404, f"model {model_name!r} is disabled by profile "
                                                f"{runtime.active_profile!r}")
            model_name = pinned_to
        # a selector (not on /upstream), else local id → local alias → peer model
        selector = None if passthrough_name else config.selectors.get(model_name)
        target = None if selector is not None else resolve(config, runtime.peers.routes, model_name)
        resolved = selector.id if selector is not None else (target.label if target is not None else None)
        principal = principal_of(request)
        # the key's scope: the name asked for or what it resolves to (never revealing
        # whether a model outside the scope exists)
        refusal = model_refusal(principal, model_name, resolved)
        if refusal is None and resolved is None:
            return send_error(request, 404, "no router for requested model")
        if refusal is None:
            admitted = self.limiter.admit(principal.name, principal.limits)
            if isinstance(admitted, Refusal):
                refusal = admitted
        if refusal is not None:
            if self.metrics is not None:
                self.metrics.key_refused(principal.name, "model" if refusal.status == 403 else refusal.code)
            return send_error(request, refusal.status, refusal.message, refusal.code, dict(refusal.headers))
        plan, unreserve = [target], None
        if selector is not None:
            try:
                plan, unreserve = self._select(runtime, selector)
            except NoTarget as e:
                admitted.release()
                return send_error(request, 503, str(e))
        metadata = {"selector": selector.id} if selector is not None else None
        label = plan[0].label  # the model in in-flight entries, activity rows, metrics
        req_headers = {k.decode("latin-1"): v[-1].decode("latin-1")
                       for k, v in request.requestHeaders.getAllRawHeaders()}
        result = b""
        status = None
        passthrough = request.path.startswith(b"/upstream/")
        try:
            entry = self.inflight.add(label, request.path.decode("latin-1"), request.method.decode("latin-1"),
                                      req_headers, client_ip(request), cancel=lambda: abort_connection(request),
                                      metadata=metadata, key_name=principal.attribution)
            recorder = self._recorder(request, label, upstream_path, body, req_headers, principal, metadata)
            request.llamaswap_model = label
        except BaseException:
            admitted.release()
            if unreserve is not None:
                unreserve()
            raise
        try:
            request_info = _RequestInfo(body, parsed, ctype, query, asked, upstream_path, passthrough)
            result = await self._attempts(request, runtime, plan, request_info, entry, recorder, selector)
            return result
        except defer.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            admitted.release()  # at once, however the request ended: limits never leak a slot
            if unreserve is not None:
                unreserve()
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
                self.metrics.request_done(request.llamaswap_model, path, status,
                                          self.clock.seconds() - request.llamaswap_started, principal.name)

    def _select(self, runtime, selector) -> "tuple[list[Target], Optional[Callable[[], None]]]":
        """What serves a request for ``selector`` now (``llamaswap.router.selectors.choose``)."""
        config, peers = runtime.config, runtime.peers
        targets = selector_targets(selector, lambda name: resolve(config, peers.routes, name))

        def state_of(model_id: str) -> Optional[ProcessState]:
            process = runtime.processes.get(model_id)
            return process.state if process is not None else None

        return choose(selector, targets, state_of, peers.is_available, self.spillover)

    def _recorder(self, request: IRequest, model_id: str, upstream_path: str, body: bytes, headers: dict,
                  principal: Principal = OPEN, metadata: Optional[dict] = None):
        """An activity recorder for POSTs to model-dispatched paths (else None)."""
        if self.activity is None or request.method != b"POST":
            return None
        path = request.path.decode("latin-1")
        req_path = path if path in MODEL_ROUTES else upstream_path
        if req_path not in MODEL_ROUTES:
            return None
        limit = self.captures.max_bytes if self.captures is not None and self.captures.enabled else 0
        return ActivityRecorder(self.clock, self.wall, model_id, req_path, headers, body, limit, metadata=metadata,
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

    async def _attempts(self, request: IRequest, runtime, plan: "list[Target]", info: "_RequestInfo", entry,
                        recorder: Optional[ActivityRecorder], selector) -> bytes:
        """Serve ``plan``'s first target; with more (a failover selector), a
        target that fails before any byte of its answer reached the client
        passes the request on to the next.  The last target's answer, success
        or failure, is the client's."""
        for i, target in enumerate(plan):
            if i:  # the request is now this target's
                request.llamaswap_model = entry.model = target.label
                if recorder is not None:
                    recorder.model = target.label
                if isinstance(info.parsed, dict):  # the filters of the target before changed it
                    info.parsed = _json_object(info.body)
            try:
                return await self._serve(request, runtime, target, info, entry, recorder, failover=i + 1 < len(plan))
            except _TryNext as e:
                self.log.warn("{selector}: {target} failed before answering ({why}); trying {next}",
                              selector=selector.id, target=target.label, why=e.why, next=plan[i + 1].label)
        raise AssertionError("the last target never passes a request on")

    async def _serve(self, request: IRequest, runtime, target: Target, info: "_RequestInfo", entry,
                     recorder: Optional[ActivityRecorder] = None, failover: bool = False) -> bytes:
        """Serve ``target``.  ``failover`` (more targets to try): a failure
        before any byte reached the client raises ``_TryNext`` instead of
        answering (and no loading-state stream starts: its bytes would be sent)."""
        if target.peer is not None:
            return await self._serve_peer(request, runtime, target, info, entry, recorder, failover)
        model_id = target.model_id
        model = runtime.config.models.get(model_id)
        if model is None:  # a reload removed it after the plan was made (a failover's later target)
            return _removed(request, model_id, failover)
        process = runtime.processes[model_id]
        streaming = bool(info.parsed and info.parsed.get("stream") is True) or query_value(info.query, b"stream") == b"true"
        loading = None
        if (model.send_loading_state and streaming and info.upstream_path.startswith("/v1/chat/completions")
                and process.state is not ProcessState.READY and not failover):
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
            model = grant.model  # a reload may have redefined the model while the request waited
            if self.metrics is not None:
                self.metrics.waited(model_id, self.clock.seconds() - request.llamaswap_started)
        except RoutingError as e:
            if failover:
                raise _TryNext(f"{e.status} {e.message}")
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
            # the body's model: useModelName, else the name a pin or selector routed to
            rename = model.use_model_name or (target.name if target.name != info.asked else "")
            body, query = self._outgoing(info, target.name, model.filters, rename)
            url = model.proxy.rstrip("/") + info.upstream_path + ("?" + query.decode("latin-1") if query else "")
            headers = self._upstream_headers(request, recorder)
            return await self._relay(request, model_id, runtime.agents[model_id], url, body, headers,
                                     model.timeouts, entry, recorder, loading, failover)
        finally:
            grant.release()

    async def _serve_peer(self, request: IRequest, runtime, target: Target, info: "_RequestInfo", entry,
                          recorder: Optional[ActivityRecorder], failover: bool) -> bytes:
        """A peer model: no swap, no queue, no local concurrency; the peer's
        filters, its own model id in the body, its ``apiKey`` in place of the client's."""
        route, peers = target.peer, runtime.peers
        if peers.routes.get(route.fqn) != route:  # a reload removed it after the plan was made
            return _removed(request, route.fqn, failover)
        peer = peers.peers[route.peer]
        body, query = self._outgoing(info, target.name, peer.filters, route.model if route.model != info.asked else "")
        url = peer.proxy + info.upstream_path + ("?" + query.decode("latin-1") if query else "")
        headers = self._upstream_headers(request, recorder)
        if peer.api_key:
            key = peer.api_key.encode("utf-8")
            headers.setRawHeaders(b"authorization", [b"Bearer " + key])
            headers.setRawHeaders(b"x-api-key", [key])
        peers.started()
        try:
            return await self._relay(request, route.fqn, peers.clients[route.peer], url, body, headers,
                                     peer.timeouts, entry, recorder, None, failover, unreachable="peer proxy error")
        finally:
            peers.finished()

    def _upstream_headers(self, request: IRequest, recorder: Optional[ActivityRecorder]) -> RawHeaders:
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
        return headers

    async def _relay(self, request: IRequest, model_id: str, client, url: str, body: bytes, headers: RawHeaders,
                     timeouts, entry, recorder: Optional[ActivityRecorder], loading: Optional[LoadingStream],
                     failover: bool, unreachable: str = "upstream not reachable") -> bytes:
        """``forward`` to ``url`` and map its failures (see ``_serve``)."""
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
            abort_connection(request)
            return b""

        try:
            await forward(client, request, url.encode(), body, headers,
                          on_chunk=on_chunk, on_headers=on_headers, write_head=loading is None,
                          clock=self.clock, header_timeout=timeouts.response_header,
                          body_idle=timeouts.body_idle, expect_continue=timeouts.expect_continue,
                          reject=_server_error if failover else None)
        except UpstreamRejected as e:  # failover only: nothing of it reached the client
            raise _TryNext(f"answered {e.head.code}: {_excerpt(e.body)}")
        except UpstreamBodyIdle as e:
            self.log.warn("{model}: upstream stalled: {error}", model=model_id, error=str(e))
            message = f"upstream timed out: {e}"
            if request.startedWriting:
                return broke_off(504, message)
            if recorder is not None:
                recorder.fail(504, message)
            return send_error(own_headers(request), 504, message)
        except (UpstreamUnavailable, UpstreamTimeout) as e:
            notice_exits()
            status, message = (504, f"upstream timed out: {e}") if isinstance(e, UpstreamTimeout) else (
                502, f"{unreachable}: {e}")
            if failover and not request.startedWriting:
                raise _TryNext(message)
            if loading is not None:
                loading.failed(render_error(status, message)[1])
                return b""
            if request.startedWriting:
                return b""
            return send_error(own_headers(request), status, message)
        except defer.CancelledError:
            raise
        except Exception as e:  # the upstream died mid-response (crash)
            notice_exits()
            self.log.warn("{model}: upstream response failed: {error}", model=model_id, error=str(e))
            if request.startedWriting:
                return broke_off(502, f"upstream response failed: {e}")
            if recorder is not None:
                recorder.fail(502, f"upstream response failed: {e}")
            return send_error(own_headers(request), 502, f"upstream response failed: {e}")
        return b""

    def _outgoing(self, info: "_RequestInfo", name: str, filters, rename: str) -> "tuple[bytes, bytes]":
        """The body and query sent for target ``name``: its filters
        (``setParamsByID`` by ``name``), ``model`` set to ``rename`` unless
        that is ""; as received on ``/upstream``."""
        if info.passthrough:
            return info.body, info.query
        body = self._filter_body(info.body, info.parsed, info.ctype, name, filters, rename)
        query = replace_query_model(info.query, info.asked, rename) if rename else info.query
        return body, query

    def _filter_body(self, body: bytes, parsed, ctype: str, requested: str, filters, rename: str = "") -> bytes:
        if not filters_active(requested, filters, rename):
            return body
        if isinstance(parsed, ObjectScan):  # a big body: only the members filters touch are re-encoded
            return filter_scanned(parsed, requested, filters, rename)
        if parsed is not None:
            filtered = apply_json_filters(parsed, requested, filters, rename)
            return json.dumps(filtered, separators=(",", ":"), ensure_ascii=False).encode()
        if "multipart/form-data" in ctype.lower() and rename:
            return rewrite_multipart_model(body, ctype, rename)
        return body


class _TryNext(Exception):
    """A failover target failed before any byte reached the client: ``why``."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _removed(request: IRequest, name: str, failover: bool) -> bytes:
    """A target a reload removed while the request was on its way to it (a
    failover selector's later target): the next target, or 404."""
    message = f"model {name!r} was removed from the config"
    if failover:
        raise _TryNext(message)
    return send_error(request, 404, message)


def _server_error(code: int) -> bool:
    return code >= 500


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


class _RequestInfo:
    """What a model-dispatched request carries once its body is read."""

    __slots__ = ("body", "parsed", "ctype", "query", "asked", "upstream_path", "passthrough")

    def __init__(self, body: bytes, parsed, ctype: str, query: bytes, asked: str, upstream_path: str,
                 passthrough: bool = False):
        self.body, self.parsed, self.ctype = body, parsed, ctype
        self.query, self.asked, self.upstream_path = query, asked, upstream_path  # asked: the request's own model
        self.passthrough = passthrough


def _json_object(body: bytes):
    try:
        parsed = json.loads(body) if body.strip() else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def notice_exits() -> None:
    """Reap children that have died, now: when an upstream's connection broke
    because its server died, the SIGCHLD may still be waiting behind this
    event, and a next request must not be granted the dead server (its
    ``Process`` leaves READY as soon as the exit is seen)."""
    try:
        from twisted.internet.process import reapAllProcesses
    except ImportError:  # no POSIX processes
        return
    reapAllProcesses()


def own_headers(request: IRequest) -> IRequest:
    """``request`` with the upstream's response headers dropped (they may have
    been copied before the upstream failed: a ``Content-Encoding`` or
    ``Set-Cookie`` must not go out on our own error body); CORS headers stay."""
    kept = Headers()
    for name, values in request.responseHeaders.getAllRawHeaders():
        if name.lower().startswith(b"access-control-"):
            kept.setRawHeaders(name, values)
    request.responseHeaders = kept
    return request
