"""systemd ``Type=notify``: readiness, reload and stop notifications.

sd_notify(3) without libsystemd: one datagram of ``KEY=value`` lines to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace).  Unset, every call is a no-op.  The variable is removed
from ``os.environ`` when read, so model servers never inherit it (with
``NotifyAccess=main`` systemd would ignore them anyway).  A send never blocks
(a non-blocking socket) and never raises: a failure is logged once.

* ``READY=1`` once every listener listens (:class:`ReadyNotifier`), and again
  when a reload is over, applied or not (the config in force serves);
* ``RELOADING=1`` with ``MONOTONIC_USEC`` when a reload begins;
* ``STOPPING=1`` when shutdown begins.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping, MutableMapping, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["ListeningEndpoint", "Notifier", "ReadyNotifier"]


def _socket_address(value: str) -> Optional[str]:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value; None if unsupported."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # relative paths are invalid; vsock: is not supported here


class Notifier:
    """Sends sd_notify datagrams to one socket (or nothing, when there is none)."""

    log = Logger()

    def __init__(self, address: Optional[str] = None) -> None:
        self.address = address or None
        self._target = _socket_address(address) if address else None
        self._complained = False
        self.status = "running"
        if self.address and self._target is None:
            self.log.warn("NOTIFY_SOCKET={address!r} is not a path or @name; systemd is not notified",
                          address=self.address)

    @classmethod
    def from_environ(cls, environ: Optional[MutableMapping[str, str]] = None) -> "Notifier":
        """The notifier for ``$NOTIFY_SOCKET``, which is then removed from ``environ``."""
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, fields: Mapping[str, object]) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it was sent."""
        if self._target is None:
            return False
        message = "".join(f"{key}={_one_line(value)}\n" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message, self._target)
        except OSError as error:
            if not self._complained:
                self._complained = True
                self.log.warn("cannot notify systemd at {address}: {error}", address=self.address, error=error)
            return False
        return True

    def ready(self, status: Optional[str] = None) -> bool:
        """``READY=1``: serving (at start-up, and after a reload)."""
        if status is not None:
            self.status = status
        return self.send({"READY": 1, "STATUS": self.status, "MAINPID": os.getpid()})

    def reloading(self) -> bool:
        """``RELOADING=1``: a config reload has begun; :meth:`ready` ends it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send({"RELOADING": 1, "MONOTONIC_USEC": usec, "STATUS": "reloading the config"})

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send({"STOPPING": 1, "STATUS": "stopping"})


def _one_line(value: object) -> str:
    return str(value).replace("\n", " ")


@implementer(IStreamServerEndpoint)
class ListeningEndpoint:
    """A server endpoint that can tell, to any number of waiters, that it listens."""

    def __init__(self, endpoint: IStreamServerEndpoint, description: str = "") -> None:
        self.endpoint = endpoint
        self.description = description
        self.listening = False
        self._waiters: list[defer.Deferred] = []

    def listen(self, factory):
        d = self.endpoint.listen(factory)
        d.addCallback(self._listened)
        return d

    def _listened(self, port):
        self.listening = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return port

    def when_listening(self) -> defer.Deferred:
        """A new Deferred that fires once a ``listen`` has succeeded."""
        if self.listening:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        return waiter


class ReadyNotifier(Service):
    """``READY=1`` once all ``listeners`` listen; ``STOPPING=1`` when stopped.

    Add it to the root service after the listeners: a ``MultiService`` stops
    its children in reverse order, so its ``stopService`` comes first.
    """

    name = "sdnotify"
    log = Logger()

    def __init__(self, notifier: Notifier, listeners: Sequence[ListeningEndpoint]) -> None:
        self.notifier = notifier
        self.listeners = list(listeners)
        self._waiting: Optional[defer.Deferred] = None

    def startService(self) -> None:
        super().startService()
        self._waiting = defer.gatherResults([e.when_listening() for e in self.listeners], consumeErrors=True)
        self._waiting.addCallbacks(self._ready, self._cancelled)

    def _ready(self, _) -> None:
        self._waiting = None
        where = ", ".join(e.description for e in self.listeners if e.description)
        self.notifier.ready(f"listening on {where}" if where else "running")

    def _cancelled(self, failure: Failure) -> None:
        failure.trap(defer.FirstError)
        failure.value.subFailure.trap(defer.CancelledError)

    def stopService(self):
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        self.notifier.stopping()
        return super().stopService()
