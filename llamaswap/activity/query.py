"""``GET /api/metrics/activity`` query parameters and the SQL they become.

Pure: parses and validates parameters exactly as llama-swap's
``parseActivityQuery`` and builds parameterised SQL fragments.  User values
only ever travel as bound parameters; sort columns come from a fixed map.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..timefmt import parse_rfc3339

__all__ = [
    "DEFAULT_LIMIT",
    "SORT_COLUMNS",
    "ActivityQuery",
    "QueryError",
    "parse_activity_query",
    "parse_rfc3339",
    "where_clause",
]

DEFAULT_LIMIT = 25
MAX_LIMIT = 999

#: API sort key -> SQL column (the only way a column name reaches SQL).
SORT_COLUMNS: Mapping[str, str] = {
    "id": "id",
    "time": "ts_created",
    "model": "model_id",
    "req_path": "req_path",
    "resp_status_code": "resp_status_code",
    "resp_content_type": "resp_content_type",
    "cached": "cache_tokens",
    "prompt": "input_tokens",
    "generated": "output_tokens",
    "drafted": "draft_tokens",
    "prompt_speed": "prompt_per_second",
    "gen_speed": "tokens_per_second",
    "duration": "duration_ms",
    "key": "key_name",
}

_INTEGER = re.compile(r"[+-]?[0-9]{1,19}\Z")
_INT64_MAX = 2**63 - 1


class QueryError(ValueError):
    """A bad query parameter; ``message`` is the 400 response text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ActivityQuery:
    """A validated activity query; times are unix seconds, ``None``/0 = unbounded."""

    models: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    min_id: int = 0
    max_id: int = 0
    limit: int = DEFAULT_LIMIT
    page: int = 1
    sort: str = "id"
    order: str = "desc"
    key_names: tuple[str, ...] = ()  # API key names ("-": requests without a key)

    def where(self) -> tuple[str, list[Any]]:
        """``(" WHERE ...", params)`` for this query's filters ("" when none)."""
        return where_clause(self.models, self.start, self.end, self.min_id, self.max_id, self.key_names)

    def order_by(self) -> str:
        """``" ORDER BY <col> <dir>, id <dir>"`` from the fixed column map."""
        column = SORT_COLUMNS.get(self.sort, "id")
        direction = "ASC" if self.order.lower() == "asc" else "DESC"
        if column == "id":
            return f" ORDER BY id {direction}"
        return f" ORDER BY {column} {direction}, id {direction}"

    def page_limit(self) -> tuple[int, int]:
        """(limit, offset), normalising page < 1 and limit < 1 like llama-swap's store."""
        limit = self.limit if self.limit >= 1 else DEFAULT_LIMIT
        page = max(self.page, 1)
        return limit, min((page - 1) * limit, _INT64_MAX)


def where_clause(
    models: Sequence[str] = (),
    start: float | None = None,
    end: float | None = None,
    min_id: int = 0,
    max_id: int = 0,
    key_names: Sequence[str] = (),
    empty_key: bool = False,
) -> tuple[str, list[Any]]:
    """Parameterised WHERE clause: ANDed conditions, every value bound as ``?``.

    ``key_names``: rows of these API key names, where "-" stands for rows
    without one (stored as ""); ``empty_key``: "" in ``key_names`` is such a
    name too, not a blank to skip."""
    conditions: list[str] = []
    params: list[Any] = []
    names = [m.strip() for m in models if m.strip()]
    if names:
        conditions.append("model_id IN (" + ", ".join(["?"] * len(names)) + ")")
        params.extend(names)
    keys = ["" if k.strip() == "-" else k.strip() for k in key_names if k.strip() or empty_key]
    if keys:
        conditions.append("key_name IN (" + ", ".join(["?"] * len(keys)) + ")")
        params.extend(keys)
    for value, condition in ((start, "ts_created >= ?"), (end, "ts_created <= ?")):
        if value is not None:
            conditions.append(condition)
            params.append(math.floor(value))
    for ident, condition in ((min_id, "id >= ?"), (max_id, "id <= ?")):
        if ident > 0:
            conditions.append(condition)
            params.append(ident)
    if not conditions:
        return "", []
    return " WHERE " + " AND ".join(conditions), params


def parse_activity_query(args: Mapping[Any, Sequence[Any]]) -> ActivityQuery:
    """Validate query-string ``args`` (str or bytes keys/values, e.g. ``request.args``).

    Raises :class:`QueryError` with llama-swap's 400 messages.
    """
    params = _normalise(args)
    start, end = _time(params, "start"), _time(params, "end")
    if start is not None and end is not None and start > end:
        raise QueryError("start must be before end")
    min_id, max_id = _ident(params, "min_id"), _ident(params, "max_id")
    if min_id and max_id and min_id > max_id:
        raise QueryError("min_id must be <= max_id")
    return ActivityQuery(
        models=tuple(m.strip() for m in params.get("model", []) if m.strip()),
        start=start,
        end=end,
        min_id=min_id,
        max_id=max_id,
        limit=_limit(params),
        page=_page(params),
        sort=_sort(params),
        order=_order(params),
        key_names=tuple(k.strip() for k in params.get("key", []) if k.strip()),
    )


def _normalise(args: Mapping[Any, Sequence[Any]]) -> dict[str, list[str]]:
    def text(value: Any) -> str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    params: dict[str, list[str]] = {}
    for key, values in args.items():
        params.setdefault(text(key), []).extend(text(v) for v in values)
    return params


def _first(params: Mapping[str, list[str]], name: str) -> str:
    values = params.get(name)
    return values[0].strip() if values else ""


def _time(params: Mapping[str, list[str]], name: str) -> float | None:
    raw = _first(params, name)
    if not raw:
        return None
    try:
        return parse_rfc3339(raw).timestamp()
    except (ValueError, OverflowError):
        raise QueryError(f"invalid '{name}' timestamp, use RFC3339 format") from None


def _atoi(raw: str) -> int | None:
    """Go ``strconv.Atoi``: optional sign, ASCII digits, 64-bit range; else None."""
    if not _INTEGER.match(raw):
        return None
    value = int(raw)
    return value if -_INT64_MAX - 1 <= value <= _INT64_MAX else None


def _ident(params: Mapping[str, list[str]], name: str) -> int:
    raw = _first(params, name)
    if not raw:
        return 0
    value = _atoi(raw)
    if value is None or value < 1:
        raise QueryError(f"{name} must be >= 1")
    return value


def _limit(params: Mapping[str, list[str]]) -> int:
    raw = _first(params, "limit")
    if not raw:
        return DEFAULT_LIMIT
    limit = _atoi(raw)
    if limit is None:
        raise QueryError("invalid limit")
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError("limit must be between 1 and 999")
    return limit


def _page(params: Mapping[str, list[str]]) -> int:
    raw = _first(params, "page")
    if not raw:
        return 1
    page = _atoi(raw)
    if page is None or page < 1:
        raise QueryError("page must be >= 1")
    return page


def _sort(params: Mapping[str, list[str]]) -> str:
    raw = _first(params, "sort")
    if not raw:
        return "id"
    if raw not in SORT_COLUMNS:
        raise QueryError("invalid sort column")
    return raw


def _order(params: Mapping[str, list[str]]) -> str:
    raw = _first(params, "order")
    if not raw:
        return "desc"
    if raw.lower() not in ("asc", "desc"):
        raise QueryError("order must be asc or desc")
    return raw.lower()
