"""The ProcessProtocol of an upstream server: output lines and exit events."""

from __future__ import annotations

import signal as _signal
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

__all__ = ["ExitStatus", "LineSplitter", "UpstreamProtocol", "MAX_LINE", "TRUNCATED_MARKER"]

#: Longest line kept whole; longer ones are cut here and marked.
MAX_LINE = 8 * 1024
TRUNCATED_MARKER = b" [line truncated]"


@dataclass(frozen=True)
class ExitStatus:
    """How a child ended: an exit code, or the signal that killed it."""

    code: Optional[int]
    signal: Optional[int] = None

    @classmethod
    def from_reason(cls, reason: Failure) -> "ExitStatus":
        value = reason.value
        if isinstance(value, ProcessDone):
            return cls(0)
        if isinstance(value, ProcessTerminated):
            return cls(value.exitCode, value.signal)
        return cls(None)

    def __str__(self) -> str:
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by signal {self.signal} ({name})"
        if self.code is None:
            return "unknown exit status"
        return f"exit code {self.code}"


class LineSplitter:
    """
    Splits a byte stream into lines (without ``\\n`` / ``\\r\\n``).  Memory is
    bounded: a line longer than ``max_line`` is delivered cut to
    ``max_line`` bytes plus :data:`TRUNCATED_MARKER`, and the rest of it is
    skipped.  Nothing is dropped silently and the stream is never closed.
    """

    __slots__ = ("_deliver", "_max", "_buf", "_skipping")

    def __init__(self, deliver: Callable[[bytes], None], max_line: int = MAX_LINE) -> None:
        self._deliver = deliver
        self._max = max_line
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> None:
        start = 0
        if self._skipping:
            newline = data.find(b"\n")
            if newline < 0:
                return
            self._skipping = False
            start = newline + 1
        buf = self._buf
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            if buf:
                buf += data[start:newline]
                line = bytes(buf)
                buf.clear()
            else:
                line = data[start:newline]
            self._emit(line)
            start = newline + 1
        if start < len(data):
            room = self._max - len(buf)
            rest = len(data) - start
            if rest > room:
                buf += data[start : start + room]
                line = bytes(buf)
                buf.clear()
                self._skipping = True
                self._deliver(line + TRUNCATED_MARKER)
            else:
                buf += data[start:]

    def _emit(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._max:
            line = line[: self._max] + TRUNCATED_MARKER
        self._deliver(line)

    def flush(self) -> None:
        """Deliver a last line that had no newline."""
        if self._buf:
            line = bytes(self._buf)
            self._buf.clear()
            self._emit(line)
        self._skipping = False


class UpstreamProtocol(ProcessProtocol):
    """
    Feeds the child's stdout and stderr, line by line, to ``on_line`` and
    keeps the last ``tail_lines`` lines for error messages.

    ``on_exited(status)`` runs when the child has died (``processExited``),
    ``on_ended(status)`` when, in addition, all its output is read
    (``processEnded``).  ``when_exited()``/``when_ended()`` give each caller
    a fresh Deferred firing with the :class:`ExitStatus`.
    """

    def __init__(
        self,
        on_line: Callable[[bytes], None],
        *,
        on_exited: Optional[Callable[[ExitStatus], None]] = None,
        on_ended: Optional[Callable[[ExitStatus], None]] = None,
        tail_lines: int = 50,
        max_line: int = MAX_LINE,
    ) -> None:
        self._on_line = on_line
        self._on_exited = on_exited
        self._on_ended = on_ended
        self.tail: deque[bytes] = deque(maxlen=tail_lines)
        self._splitters = {
            1: LineSplitter(self._line, max_line),
            2: LineSplitter(self._line, max_line),
        }
        self.exit_status: Optional[ExitStatus] = None
        self.ended = False
        self._exit_waiters: list[Deferred[ExitStatus]] = []
        self._end_waiters: list[Deferred[ExitStatus]] = []

    def _line(self, line: bytes) -> None:
        self.tail.append(line)
        self._on_line(line)

    def last_lines(self, n: Optional[int] = None) -> list[str]:
        """The last ``n`` (default all kept) output lines, decoded."""
        lines = list(self.tail)
        if n is not None:
            lines = lines[-n:] if n > 0 else []
        return [line.decode("utf-8", "replace") for line in lines]

    def connectionMade(self) -> None:
        # Upstream servers do not read stdin: give them EOF, not a pipe that
        # never delivers anything.
        self.transport.closeStdin()  # type: ignore[union-attr,misc]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        splitter = self._splitters.get(childFD)
        if splitter is not None:
            splitter.feed(data)

    def flush(self) -> None:
        """Deliver partial last lines (done automatically at the end)."""
        for splitter in self._splitters.values():
            splitter.flush()

    def processExited(self, reason: Failure) -> None:
        status = ExitStatus.from_reason(reason)
        self.exit_status = status
        waiters, self._exit_waiters = self._exit_waiters, []
        if self._on_exited is not None:
            self._on_exited(status)
        for d in waiters:
            d.callback(status)

    def processEnded(self, reason: Failure) -> None:
        self.flush()
        status = ExitStatus.from_reason(reason)
        if self.exit_status is None:
            self.exit_status = status
        self.ended = True
        waiters, self._end_waiters = self._end_waiters, []
        if self._on_ended is not None:
            self._on_ended(status)
        for d in waiters:
            d.callback(status)

    def when_exited(self) -> Deferred[ExitStatus]:
        """A fresh Deferred that fires with the exit status once the child died."""
        if self.exit_status is not None:
            return _fired(self.exit_status)
        d: Deferred[ExitStatus] = Deferred()
        self._exit_waiters.append(d)
        return d

    def when_ended(self) -> Deferred[ExitStatus]:
        """A fresh Deferred that fires once the child died and its output is read."""
        if self.ended:
            assert self.exit_status is not None
            return _fired(self.exit_status)
        d: Deferred[ExitStatus] = Deferred()
        self._end_waiters.append(d)
        return d


def _fired(status: ExitStatus) -> Deferred[ExitStatus]:
    d: Deferred[ExitStatus] = Deferred()
    d.callback(status)
    return d
