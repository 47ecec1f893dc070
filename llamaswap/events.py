"""A small in-process event bus (state changes, swaps, queue positions).

Subscribers are called synchronously from the reactor thread; one that
raises is dropped and logged, never breaking the publisher.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from twisted.logger import Logger

Listener = Callable[[str, Any], None]


class EventBus:
    log = Logger()

    def __init__(self) -> None:
        self._listeners: list[tuple[Listener, Optional[frozenset]]] = []

    def subscribe(self, listener: Listener, kinds: Optional[Iterable[str]] = None) -> Callable[[], None]:
        """Call ``listener(kind, data)`` for every event (or only ``kinds``)."""
        entry = (listener, frozenset(kinds) if kinds is not None else None)
        self._listeners.append(entry)

        def unsubscribe() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)

        return unsubscribe

    def wants(self, kind: str) -> bool:
        """Whether anyone listens to ``kind`` (so a costly payload is worth building)."""
        return any(kinds is None or kind in kinds for _, kinds in self._listeners)

    def publish(self, kind: str, data: Any = None) -> None:
        for entry in list(self._listeners):
            listener, kinds = entry
            if kinds is not None and kind not in kinds:
                continue
            try:
                listener(kind, data)
            except Exception:
                self.log.failure("event listener failed; removed")
                if entry in self._listeners:
                    self._listeners.remove(entry)
