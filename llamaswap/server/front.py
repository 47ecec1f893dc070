"""The front of the HTTP API: what runs for every request before routing.

``FrontResource`` wraps the Klein resource (``app.py``) and decides, once
per request, who is asking: the client address (``X-Forwarded-For`` and
``X-Forwarded-Proto`` believed only from trusted proxies) and the API key's
principal with what it may call (``llamaswap.principal``).  It answers CORS
preflights itself and refuses what the verdict refuses; the request's
``llamaswap_*`` attributes carry the decisions (read them with the helpers
in ``http.py``).  ``LlamaSwapRequest`` (``access.py``) calls :meth:`check`
as soon as the headers are in, so a refused upload is never stored.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from ..clientaddr import TrustedProxies
from ..config import Config
from ..principal import Keyring, Verdict, authorize
from .http import header, peer_ip, render_deferred, send_error

CORS_DEFAULT_HEADERS = "Content-Type, Authorization, Accept, X-Requested-With"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class _Derived:
    """A value built from one config field, rebuilt only when a reload
    replaces that field (compared by identity: configs are immutable)."""

    def __init__(self, build: Callable):
        self.build = build
        self.source: object = _Derived
        self.value = None

    def __call__(self, source):
        if source is not self.source:
            self.value, self.source = self.build(source), source
        return self.value


class FrontResource(Resource):
    """CORS preflight, who is asking (client address, API key's principal)
    and what they may call, before the Klein routes."""

    isLeaf = True
    #: ``(request) -> bytes | None``: what a browser's page load refused with a 401 gets
    #: instead of the error (the web UI's sign-in page, ``ui.py``), or None
    signin: Optional[Callable[[IRequest], Optional[bytes]]] = None
    #: ``{(method, path): handler}``: routes served without Klein's routing (the
    #: model-dispatched ones, see ``LlamaSwapApp.fast_routes``); a handler takes the
    #: request and returns a Deferred of what remains to write
    routes: dict = {}

    def __init__(self, inner: Resource, config: Callable[[], Config], clock):
        super().__init__()
        self.inner = inner
        self.config = config
        self.clock = clock
        self._trusted = _Derived(TrustedProxies)
        self._keyring = _Derived(Keyring)

    def trusted(self) -> TrustedProxies:
        return self._trusted(self.config().trusted_proxies)

    def keyring(self) -> Keyring:
        """The configured keys; rebuilt when a reload changes them (the next
        request uses the new keys, requests in flight keep their verdict)."""
        return self._keyring(self.config().api_keys)

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
            page = self.signin(request) if status == 401 and self.signin is not None else None
            return page if page is not None else send_error(request, status, message, headers=headers)
        handler = self.routes.get((request.method, request.path))
        if handler is not None:
            return render_deferred(request, handler)
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

