"""Request-body filters and model extraction (reference §2.4).

Order for JSON bodies: ``useModelName`` → ``stripParams`` → ``setParams``
(sorted keys) → ``setParamsByID[requested name]``.  Keys may be dotted paths
(``a.b``) as llama-swap's sjson paths.  Multipart bodies only get the
``useModelName`` rewrite of their ``model`` field.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional
from urllib.parse import parse_qs

from ..config import Filters, thaw


def _set_path(obj: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        nxt = obj.get(part)
        if not isinstance(nxt, dict):
            nxt = obj[part] = {}
        obj = nxt
    obj[parts[-1]] = thaw(value)


def _del_path(obj: dict, path: str) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        obj = obj.get(part)
        if not isinstance(obj, dict):
            return
    obj.pop(parts[-1], None)


def apply_json_filters(
    body: dict, requested: str, filters: Filters, use_model_name: str = "",
) -> dict:
    """Rewrite a parsed JSON body in place and return it."""
    if use_model_name:
        body["model"] = use_model_name
    for param in filters.strip_params:
        if param != "model":
            _del_path(body, param)
    for key in sorted(filters.set_params):
        if key != "model":
            _set_path(body, key, filters.set_params[key])
    by_id = filters.set_params_by_id.get(requested)
    if by_id:
        for key in sorted(by_id):
            if key != "model":
                _set_path(body, key, by_id[key])
    return body


def filters_active(requested: str, filters: Filters, use_model_name: str = "") -> bool:
    return bool(use_model_name or filters.strip_params or filters.set_params
                or requested in filters.set_params_by_id)


def model_from_json(body: bytes) -> tuple[Optional[dict], Optional[str]]:
    """``(parsed object or None, model or None)`` of a JSON body."""
    if not body.strip():
        return None, None
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    model = obj.get("model")
    return obj, model if isinstance(model, str) and model else None


def model_from_query(query: bytes) -> Optional[str]:
    values = parse_qs(query.decode("latin-1")).get("model")
    return values[0] if values and values[0] else None


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)


def multipart_boundary(content_type: str) -> Optional[bytes]:
    m = _BOUNDARY.search(content_type or "")
    return m.group(1).encode() if m else None


def _field_spans(body: bytes, boundary: bytes, name: bytes):
    """Yield ``(start, end)`` of the value of each form field called ``name``."""
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    while pos != -1:
        head_start = pos + len(delimiter)
        if body[head_start:head_start + 2] == b"--":
            return
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end == -1:
            return
        nxt = body.find(b"\r\n" + delimiter, head_end)
        if nxt == -1:
            return
        headers = body[head_start:head_end].lower()
        if re.search(rb'content-disposition:[^\r\n]*\bname="?' + re.escape(name.lower()) + rb'"?(;|\s|\r|$)',
                     headers) and b"filename=" not in headers:
            yield head_end + 4, nxt
        pos = nxt + 2


def model_from_multipart(body: bytes, content_type: str) -> Optional[str]:
    boundary = multipart_boundary(content_type)
    if not boundary:
        return None
    for start, end in _field_spans(body, boundary, b"model"):
        value = body[start:end].decode("utf-8", "replace").strip()
        return value or None
    return None


def rewrite_multipart_model(body: bytes, content_type: str, model: str) -> bytes:
    """Replace the ``model`` field's value in a multipart body."""
    boundary = multipart_boundary(content_type)
    if not boundary:
        return body
    for start, end in _field_spans(body, boundary, b"model"):
        return body[:start] + model.encode() + body[end:]
    return body


def requested_model(
    method: bytes, content_type: str, body: bytes, query: bytes,
) -> tuple[Optional[str], Optional[dict]]:
    """The model a request names: JSON ``model``, multipart field, or ``?model=``."""
    parsed = None
    model = None
    ctype = (content_type or "").lower()
    if "application/json" in ctype or (body[:1] == b"{" and "multipart/" not in ctype):
        parsed, model = model_from_json(body)
    elif "multipart/form-data" in ctype:
        model = model_from_multipart(body, content_type)
    if model is None:
        model = model_from_query(query)
    return model, parsed


