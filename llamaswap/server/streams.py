"""Long-lived streaming responses (log tails, SSE) with a bounded buffer.

The stream registers itself as the request's push producer: while the client
connection is congested, writes collect in a buffer of at most ``max_bytes``;
past that they are dropped (with a marker for text streams), so a slow reader
never grows memory without bound.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.web.iweb import IRequest
from zope.interface import implementer


@implementer(IPushProducer)
class BoundedStream:
    def __init__(self, request: IRequest, max_bytes: int = 1024 * 1024,
                 marker: Optional[Callable[[int], bytes]] = None):
        self.request = request
        self.max_bytes = max_bytes
        self.marker = marker
        self.paused = False
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.dropped = 0
        self.closed: defer.Deferred = defer.Deferred()
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._lost)
        request.write(b"")  # send the headers now: a stream may stay quiet for long

    def _unregister(self) -> None:
        if getattr(self.request, "producer", None) is self and getattr(self.request, "channel", None) is not None:
            self.request.unregisterProducer()

    def _lost(self, _result) -> None:
        self.buffer, self.buffered = [], 0
        self._unregister()
        if not self.closed.called:
            self.closed.callback(None)

    @property
    def open(self) -> bool:
        return not self.closed.called

    def write(self, data: bytes) -> None:
        if not self.open or not data:
            return
        if not self.paused:
            self.request.write(data)
            return
        if self.buffered + len(data) > self.max_bytes:
            self.dropped += len(data)
            return
        self.buffer.append(data)
        self.buffered += len(data)

    def end(self) -> None:
        """Finish the response from our side (server shutdown)."""
        if self.open:
            self._unregister()
            self.closed.callback(None)

    # IPushProducer
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        pending, self.buffer, self.buffered = self.buffer, [], 0
        for data in pending:
            self.request.write(data)
        if self.dropped:
            if self.marker is not None:
                self.request.write(self.marker(self.dropped))
            self.dropped = 0

    def stopProducing(self) -> None:
        self._lost(None)


def dropped_marker(n: int) -> bytes:
    return f"\n— {n} bytes dropped —\n".encode()
