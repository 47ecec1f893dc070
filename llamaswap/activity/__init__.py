"""Activity recording: response token parsing, the sqlite activity store, its query API."""

from __future__ import annotations

from .parse import (
    MAX_BUFFER,
    ParseResult,
    ResponseParser,
    Tokens,
    duration_ms,
    error_message,
    filter_accept_encoding,
)
from .query import SORT_COLUMNS, ActivityQuery, QueryError, parse_activity_query
from .store import ActivityEntry, ActivityStore, histogram, rfc3339

__all__ = [
    "MAX_BUFFER",
    "SORT_COLUMNS",
    "ActivityEntry",
    "ActivityQuery",
    "ActivityStore",
    "ParseResult",
    "QueryError",
    "ResponseParser",
    "Tokens",
    "duration_ms",
    "error_message",
    "filter_accept_encoding",
    "histogram",
    "parse_activity_query",
    "rfc3339",
]
