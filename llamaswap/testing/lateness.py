"""Measuring how long the reactor is held: timer lateness and a big POST from a child.

Used by ``tests/test_stall.py`` and ``bench/stall.py``.  A :class:`LatenessProbe`
keeps a ``callLater`` chain at a fixed interval and records how late each call
fires; a reactor held for *t* seconds shows up as a lateness of about *t*.
The big request is sent by a separate Python process (:func:`post_in_child`),
so building and sending it costs the measured reactor nothing.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol

__all__ = ["LatenessProbe", "post_in_child"]


class LatenessProbe:
    """A ``callLater`` chain every ``interval`` seconds, recording each call's lateness.

    Lateness is measured with ``time.monotonic`` (the reactor's own clock is
    what is being measured, so it cannot be the ruler)."""

    def __init__(self, reactor, interval: float = 0.005) -> None:
        self.reactor = reactor
        self.interval = interval
        self.lateness: list[float] = []
        self._call = None
        self._due = 0.0

    def start(self) -> None:
        self._due = time.monotonic() + self.interval
        self._call = self.reactor.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.lateness.append(max(0.0, now - self._due))
        self._due = now + self.interval
        self._call = self.reactor.callLater(self.interval, self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    @property
    def max(self) -> float:
        return max(self.lateness, default=0.0)

    def percentile(self, p: float) -> float:
        if not self.lateness:
            return 0.0
        ordered = sorted(self.lateness)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


_CLIENT = r"""
import base64, http.client, json, os, sys, time
host, port, path, size, model, stream, ctype = sys.argv[1:8]
size = int(size)
if ctype == "json":
    head = json.dumps({"model": model, "stream": stream == "1"})[:-1].encode()
    # "model" last, as the OpenAI SDK orders it: a scanner must skip the big value first
    # base64 of random bytes, like an image: compresses about as badly as real uploads
    text = base64.b64encode(os.urandom(size * 3 // 4 + 3))[:size]
    body = b'{"input": "' + text + b'", ' + head[1:] + b"}"
    content_type = "application/json"
else:
    boundary = "stallboundary"
    body = (("--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
             "Content-Type: application/octet-stream\r\n\r\n" % boundary).encode() + b"\0" * size
            + ("\r\n--%s\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n%s\r\n--%s--\r\n"
               % (boundary, model, boundary)).encode())
    content_type = "multipart/form-data; boundary=" + boundary
conn = http.client.HTTPConnection(host, int(port), timeout=120)
started = time.monotonic()
conn.request("POST", path, body=body, headers={"Content-Type": content_type})
response = conn.getresponse()
data = response.read()
print(json.dumps({"status": response.status, "bytes": len(data), "seconds": time.monotonic() - started}))
"""


class _Collect(ProcessProtocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason) -> None:
        out = b"".join(self.out).strip()
        try:
            self.done.callback(json.loads(out.splitlines()[-1]))
        except (ValueError, IndexError):
            self.done.errback(RuntimeError("client failed: %r" % b"".join(self.err)[-2000:]))


def post_in_child(reactor, port: int, path: str, size: int, model: str, *, stream: bool = False,
                  kind: str = "json", host: str = "127.0.0.1", python: Optional[str] = None) -> defer.Deferred:
    """POST a body of about ``size`` bytes from a child process; fires with
    ``{"status", "bytes", "seconds"}`` (``kind``: ``json`` or ``multipart``)."""
    done: defer.Deferred = defer.Deferred()
    argv = [python or sys.executable, "-c", _CLIENT, host, str(port), path, str(size), model,
            "1" if stream else "0", kind]
    reactor.spawnProcess(_Collect(done), argv[0], argv, env=None)
    return done
