"""A log monitor: a bounded byte history plus live subscribers.

One per model, plus the shared proxy/upstream monitors; it feeds the
``/logs`` endpoints and their SSE streams.  Reactor-thread only, no locks.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from twisted.logger import Logger

__all__ = ["LogMonitor"]

Subscriber = Callable[[bytes], None]


class LogMonitor:
    """Keeps the newest ``max_bytes`` bytes written and fans writes out live."""

    log = Logger()

    def __init__(self, max_bytes: int = 100 * 1024) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._subscribers: dict[object, Subscriber] = {}

    def write(self, data: bytes) -> None:
        """Append ``data`` to the history and hand it to every subscriber."""
        if not data:
            return
        self._remember(data)
        if self._subscribers:
            for token, callback in list(self._subscribers.items()):
                try:
                    callback(data)
                except Exception:
                    if self._subscribers.pop(token, None) is not None:
                        self.log.failure("log subscriber {callback!r} raised; removed", callback=callback)

    def _remember(self, data: bytes) -> None:
        limit = self.max_bytes
        if len(data) >= limit:
            self._chunks.clear()
            self._size = 0
            if limit:
                self._chunks.append(data[-limit:])
                self._size = limit
            return
        self._chunks.append(data)
        self._size += len(data)
        excess = self._size - limit
        chunks = self._chunks
        while excess > 0:
            head = chunks[0]
            if len(head) <= excess:
                chunks.popleft()
                self._size -= len(head)
                excess -= len(head)
            else:
                chunks[0] = head[excess:]
                self._size -= excess
                excess = 0

    def history(self) -> bytes:
        """The retained bytes, oldest first."""
        if len(self._chunks) > 1:
            joined = b"".join(self._chunks)
            self._chunks.clear()
            self._chunks.append(joined)
        return self._chunks[0] if self._chunks else b""

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        """Forget the history (subscribers stay)."""
        self._chunks.clear()
        self._size = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(data)`` for every later write; returns the unsubscriber."""
        token = object()
        self._subscribers[token] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe
