"""Requests being served right now, for the UI's in-flight table.

Each entry is published on the event bus as ``inflight`` upserts (when added,
when the response headers arrive, and as bytes flow, at most every 250 ms)
and a ``remove`` when it ends.  ``cancel(id)`` aborts a request.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Optional

from .events import EventBus
from .timefmt import format_rfc3339

UPSERT_INTERVAL = 0.25
SENSITIVE = {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}


def redact(headers: dict) -> dict:
    return {k: ("[REDACTED]" if k.lower() in SENSITIVE else v) for k, v in headers.items()}


class InflightEntry:
    def __init__(self, entry_id: str, started: float, model: str, path: str, method: str,
                 headers: dict, remote_ip: str, cancel: Callable[[], None], metadata: Optional[dict] = None,
                 key_name: str = ""):
        self.id = entry_id
        self.started = started
        self.model = model
        self.path = path
        self.method = method
        self.headers = redact(headers)
        self.remote_ip = remote_ip
        self.key_name = key_name  # the API key's name, never the key
        self.cancel = cancel
        self.metadata = metadata or {}
        self.resp_headers: dict = {}
        self.resp_bytes = 0
        self.last_upsert = 0.0

    def to_json(self, now: float, wall_started: float) -> dict:
        out = {
            "id": self.id,
            "timestamp": format_rfc3339(wall_started),
            "model": self.model, "req_path": self.path, "method": self.method,
            "req_headers": self.headers, "remote_ip": self.remote_ip,
            "resp_headers": self.resp_headers, "resp_bytes": self.resp_bytes,
            "elapsed_ms": int((now - self.started) * 1000),
        }
        if self.metadata:
            out["metadata"] = self.metadata
        if self.key_name:
            out["key_name"] = self.key_name
        return out


class InflightTracker:
    def __init__(self, clock, events: EventBus, wall: Optional[Callable[[], float]] = None):
        self.clock = clock
        self.events = events
        self.wall = wall or time.time
        self._ids = itertools.count(1)
        self.entries: dict[str, InflightEntry] = {}
        self._wall_started: dict[str, float] = {}

    def add(self, model: str, path: str, method: str, headers: dict, remote_ip: str,
            cancel: Callable[[], None], metadata: Optional[dict] = None, key_name: str = "") -> InflightEntry:
        entry = InflightEntry(str(next(self._ids)), self.clock.seconds(), model, path, method, headers,
                              remote_ip, cancel, metadata, key_name)
        self.entries[entry.id] = entry
        self._wall_started[entry.id] = self.wall()
        self._upsert(entry)
        return entry

    def _json(self, entry: InflightEntry) -> dict:
        return entry.to_json(self.clock.seconds(), self._wall_started.get(entry.id, 0.0))

    def _upsert(self, entry: InflightEntry) -> None:
        entry.last_upsert = self.clock.seconds()
        if self.events.wants("inflight"):
            self.events.publish("inflight", {"operation": "upsert", "request": self._json(entry)})

    def response_headers(self, entry: InflightEntry, headers: dict) -> None:
        entry.resp_headers = redact(headers)
        if entry.id in self.entries:
            self._upsert(entry)

    def add_bytes(self, entry: InflightEntry, n: int) -> None:
        entry.resp_bytes += n
        if entry.id in self.entries and self.clock.seconds() - entry.last_upsert >= UPSERT_INTERVAL:
            self._upsert(entry)

    def remove(self, entry: InflightEntry) -> None:
        if self.entries.pop(entry.id, None) is not None:
            self._wall_started.pop(entry.id, None)
            self.events.publish("inflight", {"operation": "remove", "id": entry.id})

    def snapshot(self, key_name: Optional[str] = None) -> dict:
        """Every request in flight, or only those of the API key ``key_name``."""
        requests = [self._json(e) for e in self.entries.values() if key_name is None or e.key_name == key_name]
        return {"operation": "snapshot", "requests": requests} if requests else {"operation": "snapshot"}

    def cancel(self, entry_id: str) -> bool:
        entry = self.entries.get(entry_id)
        if entry is None:
            return False
        entry.cancel()
        return True
