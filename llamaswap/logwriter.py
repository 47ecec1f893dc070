"""Log output to stdout that never blocks the reactor.

A blocking ``write`` to stdout stalls the whole process while nobody reads it:
a pipe into a stuck log shipper, ``| less`` left open, a terminal stopped with
Ctrl-S.  :class:`NonBlockingWriter` instead:

* writes at once while the descriptor takes the bytes (nothing is delayed or
  reordered in normal operation);
* on ``EAGAIN`` keeps the rest in a bounded buffer (``max_buffer``, 1 MiB)
  and lets the reactor say when the descriptor is writable again
  (``addWriter``, no thread);
* past the bound drops whole writes (lines) until the buffer has drained
  completely, then writes one marker (``[WARN] N log lines dropped (stdout not
  keeping up)``) where the gap is;
* at exit (``atexit``) flushes what is still buffered, waiting at most a couple
  of seconds in all.

How the descriptor is made non-blocking matters, because ``O_NONBLOCK`` is a
property of the *open file description*, which stdout shares with every
process that inherited it (the shell, the terminal's other jobs): setting it
on fd 1 of a terminal makes the shell's own reads and writes fail with
``EAGAIN``.  So the flag is never set on a shared description:

* a pipe or FIFO is reopened through ``/proc/self/fd/N`` and a terminal through
  its ``ttyname``: a *new* description of the same pipe or terminal, ours
  alone, opened ``O_NONBLOCK`` (if reopening fails a pipe gets the flag on fd
  N itself: the write end of a pipe is not normally shared);
* a socket (systemd's journal stream) is written with ``send(MSG_DONTWAIT)``,
  which is non-blocking per call and changes no flag;
* a regular file or ``/dev/null`` never says ``EAGAIN``: plain writes;
* a terminal that cannot be reopened keeps plain (blocking) writes.

Rejected: ``twisted.internet.stdio.StandardIO`` sets ``O_NONBLOCK`` on fd 1
itself (the shared description) and buffers without bound; a writer thread
would still block at exit and needs locking around the buffer.
"""

from __future__ import annotations

import atexit
import errno
import os
import select
import socket
import stat
import time
from collections import deque
from typing import Callable, Optional

from twisted.internet.interfaces import IWriteDescriptor
from twisted.python import threadable
from zope.interface import implementer

__all__ = ["MAX_BUFFER", "NonBlockingWriter", "dropped_lines_marker"]

MAX_BUFFER = 1024 * 1024
EXIT_FLUSH_SECONDS = 2.0


def dropped_lines_marker(count: int) -> bytes:
    return f"[WARN] {count} log lines dropped (stdout not keeping up)\n".encode()


def _reopen(path: str) -> Optional[int]:
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None


@implementer(IWriteDescriptor)
class _Watch:
    """What the reactor watches for writability while bytes are buffered."""

    def __init__(self, writer: "NonBlockingWriter") -> None:
        self.writer = writer

    def fileno(self) -> int:
        return self.writer.fd

    def doWrite(self) -> None:
        self.writer._drain()

    def connectionLost(self, reason) -> None:
        self.writer._broken()

    def logPrefix(self) -> str:
        return "stdout"


class NonBlockingWriter:
    """Writes bytes to a descriptor without ever blocking (see the module doc).

    ``mode`` says how: ``nonblocking`` (a descriptor of our own, reopened or a
    pipe given ``O_NONBLOCK``), ``socket`` (``send`` with ``MSG_DONTWAIT``) or
    ``blocking`` (plain writes: regular files, ``/dev/null``, a terminal that
    could not be reopened)."""

    def __init__(self, fd: int, mode: str = "nonblocking", *, max_buffer: int = MAX_BUFFER,
                 marker: Callable[[int], bytes] = dropped_lines_marker, reactor=None,
                 sock: Optional[socket.socket] = None) -> None:
        self.fd = fd
        self.mode = mode
        self.max_buffer = max_buffer
        self.marker = marker
        self._reactor = reactor
        self._sock = sock
        self._buffer: deque[bytes] = deque()
        self.buffered = 0
        self.dropped = 0  # lines dropped since the buffer last drained
        self.dropped_total = 0
        self.broken = False  # the reader went away (EPIPE): everything is discarded
        self._watch: Optional[_Watch] = None

    @classmethod
    def for_fd(cls, fd: int, **kw) -> "NonBlockingWriter":
        """A writer for ``fd`` (normally 1), chosen as the module doc says."""
        try:
            info = os.fstat(fd)
        except OSError:
            return cls(fd, "blocking", **kw)
        if stat.S_ISSOCK(info.st_mode):
            try:
                return cls(fd, "socket", sock=socket.socket(fileno=os.dup(fd)), **kw)
            except OSError:
                return cls(fd, "blocking", **kw)
        if stat.S_ISFIFO(info.st_mode):
            own = _reopen(f"/proc/self/fd/{fd}")
            if own is not None:
                return cls(own, "nonblocking", **kw)
            try:
                os.set_blocking(fd, False)
            except OSError:
                return cls(fd, "blocking", **kw)
            return cls(fd, "nonblocking", **kw)
        if os.isatty(fd):
            try:
                own = _reopen(os.ttyname(fd))
            except OSError:
                own = None
            if own is not None:
                return cls(own, "nonblocking", **kw)
        return cls(fd, "blocking", **kw)

    # -- writing -----------------------------------------------------------------

    def flush(self) -> None:
        """File-object compatibility: nothing is ever held back while the descriptor takes bytes."""

    def write(self, data: bytes) -> None:
        if not data or self.broken:
            return
        if not threadable.isInIOThread() and self._reactor_running():
            self._get_reactor().callFromThread(self.write, data)
            return
        if self.dropped and not self._buffer:
            self._drain()  # defensive: the marker is owed as soon as the buffer is empty
        if self.dropped or (self._buffer and self.buffered + len(data) > self.max_buffer):
            lines = max(1, data.count(b"\n"))
            self.dropped += lines  # dropping until the buffer has drained: one gap, one marker
            self.dropped_total += lines
            return
        if self._buffer:
            self._buffer.append(data)
            self.buffered += len(data)
            return
        sent = self._send(data)
        if sent is not None and sent < len(data):
            # the rest of this one write is kept whatever its size: never a cut line
            self._buffer.append(data[sent:])
            self.buffered += len(data) - sent
            self._start_watching()

    def _send(self, data) -> Optional[int]:
        """Bytes taken (0 on EAGAIN), or None when the reader has gone."""
        try:
            if self.mode == "socket":
                return self._sock.send(data, socket.MSG_DONTWAIT)
            if self.mode == "blocking":
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
                return len(data)
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except InterruptedError:
            return 0
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            self._broken()
            return None

    def _drain(self) -> None:
        """Write what is buffered; once empty, the marker for what was dropped."""
        buffer = self._buffer
        while buffer:
            head = buffer[0]
            sent = self._send(head)
            if sent is None:
                return
            if sent < len(head):
                if sent:
                    buffer[0] = head[sent:]
                    self.buffered -= sent
                self._start_watching()
                return
            buffer.popleft()
            self.buffered -= len(head)
        self._stop_watching()
        if self.dropped:
            marker, self.dropped = self.marker(self.dropped), 0
            sent = self._send(marker)
            if sent is not None and sent < len(marker):
                self._buffer.append(marker[sent:])
                self.buffered += len(marker) - sent
                self._start_watching()

    def _broken(self) -> None:
        self.broken = True
        self._buffer.clear()
        self.buffered = 0
        self._stop_watching()

    # -- the reactor's part ----------------------------------------------------------

    def _get_reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _reactor_running(self) -> bool:
        return bool(getattr(self._get_reactor(), "running", False))

    def _start_watching(self) -> None:
        if self._watch is None and self.mode != "blocking":
            self._watch = _Watch(self)
            self._get_reactor().addWriter(self._watch)

    def _stop_watching(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            self._get_reactor().removeWriter(watch)

    # -- shutdown ----------------------------------------------------------------------

    def close(self, timeout: float = EXIT_FLUSH_SECONDS) -> None:
        """Flush what is buffered, waiting for the reader at most ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        self._stop_watching()
        while (self._buffer or self.dropped) and not self.broken:
            self._drain()
            self._stop_watching()
            remaining = deadline - time.monotonic()
            if not self._buffer and not self.dropped:
                break
            if remaining <= 0:
                break
            try:
                select.select([], [self.fd], [], remaining)
            except (OSError, ValueError):
                break

    def install_exit_flush(self) -> None:
        """Flush at interpreter exit (after twistd has stopped the reactor)."""
        atexit.register(self.close)
