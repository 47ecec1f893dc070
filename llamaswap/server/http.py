"""HTTP helpers shared by the Klein app and the proxy pipeline.

Everything here works on any ``IRequest``, so the proxy pipeline
(``llamaswap.proxy.pipeline``) can use it without Klein:

* reading a request: ``header``, ``header_out`` (a response header already
  set), ``query_value``, ``query_flag``;
* answering one: ``send_error`` (OpenAI/Anthropic error bodies, see
  ``errors.py``), ``send_json``, ``send_text``, ``abort_connection``;
* who is asking, as the front (``front.py``) decided once per request and
  left on it as ``llamaswap_*`` attributes: ``client_ip``, ``principal_of``,
  ``forwarded_for`` and ``forwarded_proto`` for the upstream, and
  ``peer_ip`` (the socket's peer) before that.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET

from ..principal import NO_KEY, Principal
from .errors import render_error


def header(request: IRequest, name: bytes) -> str:
    """A request header as text ("" when absent)."""
    value = request.getHeader(name)
    return value.decode("latin-1") if value else ""


def header_out(request: IRequest, name: bytes) -> str:
    """A response header already set, as text."""
    values = request.responseHeaders.getRawHeaders(name)
    return values[-1].decode("latin-1") if values else ""


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


def forwarded_proto(request: IRequest) -> bytes:
    """``X-Forwarded-Proto`` for the upstream: ours, or a trusted proxy's."""
    value = getattr(request, "llamaswap_proto", None)
    return value if value is not None else (b"https" if request.isSecure() else b"http")


def forwarded_for(request: IRequest) -> bytes:
    """The ``X-Forwarded-For`` value for the upstream (see ``FrontResource.identify``)."""
    value = getattr(request, "llamaswap_forwarded_for", None)
    return value if value is not None else (peer_ip(request) or "-").encode("latin-1", "replace")


def abort_connection(request: IRequest) -> None:
    """Drop the client's connection at once (a response cut short, a
    cancelled in-flight request): the client sees it end incomplete."""
    transport = getattr(request.channel, "transport", None) if request.channel is not None else None
    if transport is not None:
        transport.abortConnection()



_log = Logger()


def render_deferred(request: IRequest, handler: Callable[[IRequest], defer.Deferred]):
    """Run ``handler(request)`` (a Deferred of what remains to write) as
    Klein runs a route: the result is written and the request finished; a
    client that goes away cancels the Deferred; a failure is logged and
    answered 500.  Returns ``NOT_DONE_YET`` for ``render``."""
    gone = []
    request.notifyFinish().addBoth(gone.append)
    d = handler(request)
    request.notifyFinish().addErrback(lambda _: d.cancel())

    def written(body) -> None:
        if gone:
            return
        if body:
            request.write(body)
        request.finish()

    def failed(failure) -> None:
        if gone:
            if not failure.check(defer.CancelledError):
                _log.failure("request failed after the client went away", failure)
            return
        _log.failure("request failed", failure)
        if not request.startedWriting:
            written(send_error(request, 500, "internal error"))
        else:
            abort_connection(request)

    d.addCallbacks(written, failed)
    return NOT_DONE_YET
