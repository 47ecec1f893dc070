"""Where log lines go: the proxy, upstream and combined log monitors, and stdout.

As llama-swap (``logToStdout``):

* ``proxy`` (default): proxy lines reach the combined log and stdout;
* ``upstream``: only the model servers' output does;
* ``both``: both do;
* ``none``: nothing reaches stdout.

The proxy and upstream monitors always keep their own history (for
``/logs/stream/proxy|upstream`` and the live events).  Proxy lines are
``twisted.logger`` events formatted as ``[<time> ][LEVEL] message``, filtered
by ``logLevel``.

Under ``llama-swap`` / ``python -m llamaswap`` twistd runs with
``--logger=llamaswap.logs.observer``, so stdout carries exactly the combined
log.  Plain ``twistd -n llamaswap`` keeps twistd's own stdout log unless given
that ``--logger`` option too.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from twisted.logger import LogLevel, formatEvent

from .logmon import LogMonitor
from .logwriter import NonBlockingWriter

_LEVELS = {"debug": 0, "info": 1, "warn": 2, "error": 3}
_EVENT_LEVELS = {LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3, LogLevel.critical: 3}
_NAMES = {0: "DEBUG", 1: "INFO", 2: "WARN", 3: "ERROR"}
# Go layout names → strftime (close renderings of Go's reference layouts)
_TIME_FORMATS = {
    "ansic": "%a %b %e %H:%M:%S %Y",
    "unixdate": "%a %b %e %H:%M:%S %Z %Y",
    "rubydate": "%a %b %d %H:%M:%S %z %Y",
    "rfc822": "%d %b %y %H:%M %Z",
    "rfc822z": "%d %b %y %H:%M %z",
    "rfc850": "%A, %d-%b-%y %H:%M:%S %Z",
    "rfc1123": "%a, %d %b %Y %H:%M:%S %Z",
    "rfc1123z": "%a, %d %b %Y %H:%M:%S %z",
    "rfc3339": "%Y-%m-%dT%H:%M:%S%z",
    "rfc3339nano": "%Y-%m-%dT%H:%M:%S.%f%z",
    "kitchen": "%I:%M%p",
    "stamp": "%b %e %H:%M:%S",
    "stampmilli": "%b %e %H:%M:%S.%f",
    "stampmicro": "%b %e %H:%M:%S.%f",
    "stampnano": "%b %e %H:%M:%S.%f",
}


def format_time(fmt_name: str, when: float) -> str:
    fmt = _TIME_FORMATS.get(fmt_name)
    if not fmt:
        return ""
    text = time.strftime(fmt.replace("%f", "{frac}"), time.localtime(when))
    if "{frac}" in text:
        digits = {"stampmilli": 3, "stampmicro": 6}.get(fmt_name, 9)
        frac = f"{when % 1:.9f}"[2:2 + digits]
        text = text.replace("{frac}", frac)
    if fmt_name.startswith("rfc3339") and len(text) > 5 and text[-5] in "+-":
        text = text[:-2] + ":" + text[-2:]
    return text


class LogHub:
    """The shared log monitors, routed per ``logToStdout``."""

    def __init__(self, log_to_stdout: str = "proxy", level: str = "info", time_format: str = "",
                 stdout=None):
        self.proxy = LogMonitor()
        self.upstream = LogMonitor()
        self.combined = LogMonitor()
        self.level = _LEVELS.get(level, 1)
        self.time_format = time_format
        self.stdout = stdout
        self.installed = False  # True when twistd uses this hub as its log observer
        self._routes: list = []
        self.route(log_to_stdout)
        self.combined.subscribe(self._to_stdout)

    def route(self, log_to_stdout: str) -> None:
        for unsubscribe in self._routes:
            unsubscribe()
        self._routes = []
        if log_to_stdout in ("proxy", "both"):
            self._routes.append(self.proxy.subscribe(self.combined.write))
        if log_to_stdout in ("upstream", "both"):
            self._routes.append(self.upstream.subscribe(self.combined.write))

    def configure(self, level: str, time_format: str) -> None:
        """Re-apply ``logLevel`` and ``logTimeFormat`` (config reload)."""
        self.level = _LEVELS.get(level, 1)
        self.time_format = time_format

    def _to_stdout(self, data: bytes) -> None:
        """Hand a combined-log write to stdout: a ``NonBlockingWriter`` under
        ``observer()`` (never blocks), any file object otherwise (tests)."""
        if self.stdout is not None:
            try:
                self.stdout.write(data)
                self.stdout.flush()
            except (OSError, ValueError):
                pass

    def dropped_marker(self, count: int) -> bytes:
        """The line written where stdout lost ``count`` lines (see ``llamaswap.logwriter``)."""
        return self.line(2, f"{count} log lines dropped (stdout not keeping up)")

    def info(self, message: str) -> None:
        """A proxy INFO line written straight to the proxy log (hot paths)."""
        if self.level <= 1:
            self.proxy.write(self.line(1, message))

    def line(self, level: int, message: str, when: Optional[float] = None) -> bytes:
        stamp = format_time(self.time_format, time.time() if when is None else when)
        return f"{stamp + ' ' if stamp else ''}[{_NAMES[level]}] {message}\n".encode("utf-8", "replace")

    def __call__(self, event: dict) -> None:
        """A twisted.logger observer: proxy events become proxy log lines."""
        level = _EVENT_LEVELS.get(event.get("log_level"), 1)
        if level < self.level:
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}" if text else failure.getTraceback()
        if not text:
            return
        self.proxy.write(self.line(level, text, event.get("log_time")))


_hub: Optional[LogHub] = None


def hub() -> LogHub:
    """The process-wide hub (created on first use)."""
    global _hub
    if _hub is None:
        _hub = LogHub()
    return _hub


def observer():
    """twistd ``--logger`` factory: stdout carries llama-swap's combined log.

    Written through a :class:`~llamaswap.logwriter.NonBlockingWriter`: a
    stdout nobody reads drops lines (with a marker) instead of stalling the
    reactor."""
    h = hub()
    h.stdout = None
    if sys.__stdout__ is not None:
        try:
            fd = sys.__stdout__.fileno()
        except (OSError, ValueError):
            h.stdout = sys.__stdout__.buffer
        else:
            sys.__stdout__.flush()
            writer = NonBlockingWriter.for_fd(fd, marker=h.dropped_marker)
            writer.install_exit_flush()
            h.stdout = writer
    h.installed = True
    return h
