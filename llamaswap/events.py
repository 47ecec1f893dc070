"""A small in-process event bus (state changes, swaps, queue positions).

Subscribers are called synchronously from the reactor thread; one that
raises is dropped and logged, never breaking the publisher.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger

Listener = Callable[[str, Any], None]


class EventBus:
    log = Logger()

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, kind: str, data: Any = None) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, data)
            except Exception:
                self.log.failure("event listener failed; removed")
                if listener in self._listeners:
                    self._listeners.remove(listener)
