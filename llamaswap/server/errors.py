"""llama-swap's error bodies: OpenAI-style JSON, or text/HTML by ``Accept``."""

from __future__ import annotations

import html
import json
from typing import Optional

_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("authentication_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}


def error_type(status: int) -> tuple[str, str]:
    """``(type, code)`` for an HTTP status, as llama-swap maps them."""
    if status in _TYPES:
        return _TYPES[status]
    if 400 <= status < 500:
        return ("invalid_request_error", "invalid_request")
    return ("server_error", "internal_error")


def render_error(
    status: int, message: str, accept: Optional[str] = None, code: Optional[str] = None,
) -> tuple[bytes, bytes]:
    """``(content type, body)`` for an error, following the request's Accept header."""
    accept = (accept or "").lower()
    if code is None:
        if "text/plain" in accept:
            return b"text/plain; charset=utf-8", f"llama-swap: {message}".encode()
        if "text/html" in accept:
            body = f"<html><body><h1>llama-swap</h1><p>{html.escape(message)}</p></body></html>"
            return b"text/html; charset=utf-8", body.encode()
    kind, default_code = error_type(status)
    body = {"src": "llama-swap",
            "error": {"message": message, "type": kind, "param": None, "code": code or default_code}}
    return b"application/json", json.dumps(body, separators=(",", ":")).encode()
