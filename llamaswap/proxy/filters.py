"""Request-body filters and model extraction (reference §2.4).

Order for JSON bodies: ``useModelName`` → ``stripParams`` → ``setParams``
(sorted keys) → ``setParamsByID[requested name]``.  Keys may be dotted paths
(``a.b``) as llama-swap's sjson paths.  Multipart bodies only get the
``useModelName`` rewrite of their ``model`` field.

Bodies above ``LARGE_BODY`` are never parsed whole (that would hold the
reactor for tens of milliseconds per 10 MiB): :func:`requested_model_steps`
finds ``model`` with a structural scan (:mod:`llamaswap.jsonscan`) run in
slices, and :func:`filter_scanned` applies the filters by rewriting only the
top-level members they touch.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional
from urllib.parse import parse_qs, parse_qsl, urlencode

from ..config import Filters, thaw
from ..jsonscan import ObjectScan, scan_object
from ..steps import Steps, drive

#: Bodies larger than this (bytes) are scanned in slices instead of parsed in one go.
LARGE_BODY = 1024 * 1024
#: Multipart bodies are searched this many bytes at a time between yields.
_FIND_WINDOW = 1024 * 1024


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


def _top_key(path: str) -> str:
    return path.split(".", 1)[0]


def filter_scanned(scan: ObjectScan, requested: str, filters: Filters, use_model_name: str = "") -> bytes:
    """:func:`apply_json_filters` on a scanned (unparsed) body; returns the new body.

    Every filter touches the subtree of one top-level key, so the touched
    members are copied into a small dict (parsed only where a dotted path
    reaches inside them), filtered there with :func:`apply_json_filters` and
    written back; all other members are copied through unparsed."""
    touched: set[str] = set()
    nested: set[str] = set()
    paths = [p for p in filters.strip_params if p != "model"]
    paths += [k for k in filters.set_params if k != "model"]
    paths += [k for k in filters.set_params_by_id.get(requested, {}) if k != "model"]
    for path in paths:
        touched.add(_top_key(path))
        if "." in path:
            nested.add(_top_key(path))
    if use_model_name:
        touched.add("model")
    kept = object()
    mini: dict = {}
    for key, _, vs, ve in scan.members:
        if key in touched and key not in mini:
            mini[key] = kept
    for key in nested & mini.keys():
        try:
            mini[key] = json.loads(scan.raw(key))
        except ValueError:
            mini[key] = None
    apply_json_filters(mini, requested, filters, use_model_name)

    def encode(value) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    replace = {key: encode(value) for key, value in mini.items() if key in scan and value is not kept}
    drop = [key for key in touched if key in scan and key not in mini]
    append = [(key, encode(value)) for key, value in mini.items() if key not in scan]
    return scan.rebuild(replace, drop, append)


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


def replace_query_model(query: bytes, model: str, replacement: str) -> bytes:
    """``query`` with its ``model`` parameter set to ``replacement`` when it is ``model``."""
    if model_from_query(query) != model:
        return query
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    return urlencode([(k, replacement if k == "model" else v) for k, v in pairs]).encode("latin-1")


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)


def multipart_boundary(content_type: str) -> Optional[bytes]:
    m = _BOUNDARY.search(content_type or "")
    return m.group(1).encode() if m else None


def _find(body: bytes, needle: bytes, start: int) -> "Steps[int]":
    """``body.find(needle, start)``, a window at a time (yields in between)."""
    n = len(body)
    while True:
        end = min(n, start + _FIND_WINDOW + len(needle))
        found = body.find(needle, start, end)
        if found != -1 or end >= n:
            return found
        start = end - len(needle) + 1
        yield


def _field_span(body: bytes, boundary: bytes, name: bytes) -> "Steps[Optional[tuple[int, int]]]":
    """``(start, end)`` of the value of the first form field called ``name``, or None."""
    delimiter = b"--" + boundary
    pos = yield from _find(body, delimiter, 0)
    while pos != -1:
        head_start = pos + len(delimiter)
        if body[head_start:head_start + 2] == b"--":
            return None
        head_end = yield from _find(body, b"\r\n\r\n", head_start)
        if head_end == -1:
            return None
        nxt = yield from _find(body, b"\r\n" + delimiter, head_end)
        if nxt == -1:
            return None
        headers = body[head_start:head_end].lower()
        if re.search(rb'content-disposition:[^\r\n]*\bname="?' + re.escape(name.lower()) + rb'"?(;|\s|\r|$)',
                     headers) and b"filename=" not in headers:
            return head_end + 4, nxt
        pos = nxt + 2
    return None


def model_from_multipart_steps(body: bytes, content_type: str) -> "Steps[Optional[str]]":
    boundary = multipart_boundary(content_type)
    if not boundary:
        return None
    span = yield from _field_span(body, boundary, b"model")
    if span is None:
        return None
    return body[span[0]:span[1]].decode("utf-8", "replace").strip() or None


def model_from_multipart(body: bytes, content_type: str) -> Optional[str]:
    return drive(model_from_multipart_steps(body, content_type))


def rewrite_multipart_model(body: bytes, content_type: str, model: str) -> bytes:
    """Replace the ``model`` field's value in a multipart body."""
    boundary = multipart_boundary(content_type)
    if not boundary:
        return body
    span = drive(_field_span(body, boundary, b"model"))
    if span is None:
        return body
    view = memoryview(body)
    return b"".join((view[:span[0]], model.encode(), view[span[1]:]))  # one copy of a big upload, not two


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


def requested_model_steps(
    method: bytes, content_type: str, body: bytes, query: bytes,
) -> "Steps[tuple[Optional[str], Optional[dict | ObjectScan]]]":
    """:func:`requested_model` in steps (see :mod:`llamaswap.steps`).

    A body up to ``LARGE_BODY`` is handled at once, exactly as
    :func:`requested_model`; a larger JSON body is scanned, not parsed, and
    comes back as an :class:`~llamaswap.jsonscan.ObjectScan` (its ``get`` reads
    single members, :func:`filter_scanned` filters it)."""
    if len(body) <= LARGE_BODY:
        return requested_model(method, content_type, body, query)
    parsed = None
    model = None
    ctype = (content_type or "").lower()
    if "application/json" in ctype or (body[:1] == b"{" and "multipart/" not in ctype):
        parsed = yield from scan_object(body)
        if parsed is not None:
            value = parsed.get("model")
            model = value if isinstance(value, str) and value else None
    elif "multipart/form-data" in ctype:
        model = yield from model_from_multipart_steps(body, content_type)
    if model is None:
        model = model_from_query(query)
    return model, parsed


