"""Spawning a child in its own process group, through the launcher."""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Sequence

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport
from twisted.logger import Logger

from . import launch as _launch

__all__ = ["GroupTransport", "launcher_argv", "spawn_in_new_group"]

log = Logger()


def launcher_argv(argv: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """
    The argv that runs ``argv`` through :mod:`llamaswap.process.launch`.

    The launcher is run by file path with ``-I -S`` (isolated, no site): it
    needs only the standard library, starts in ~10 ms, and neither the
    working directory nor a model's ``PYTHONPATH``/``PYTHONHOME`` can break
    it.  ``-m llamaswap.process.launch`` is the fallback when the module is
    not a plain file.
    """
    parent = ["--parent", str(os.getpid() if parent_pid is None else parent_pid), "--"]
    path = os.path.abspath(_launch.__file__)
    if os.path.isfile(path) and path.endswith(".py"):
        return [sys.executable, "-I", "-S", path, *parent, *argv]
    return [sys.executable, "-m", "llamaswap.process.launch", *parent, *argv]


class GroupTransport:
    """
    A spawned child whose ``signalProcess`` reaches its whole process group.

    The launcher makes pid == pgid.  Until it has called ``setsid`` (or once
    the group is empty) ``killpg`` fails with ESRCH; then the pid itself is
    signalled, and a child that is already gone is not an error.
    """

    def __init__(self, transport: IProcessTransport) -> None:
        self.transport = transport
        self.pid: int = transport.pid  # type: ignore[assignment]

    def signalProcess(self, signal: int) -> None:  # noqa: N802 - Twisted's name
        """Send ``signal`` to the process group; quietly ignore a gone child."""
        try:
            os.killpg(self.pid, signal)
            return
        except ProcessLookupError:
            pass
        except PermissionError as error:
            log.warn("killpg({pid}, {sig}) refused: {error}", pid=self.pid, sig=signal, error=error)
        try:
            self.transport.signalProcess(signal)
        except (ProcessExitedAlready, ProcessLookupError):
            pass


def spawn_in_new_group(
    reactor: Any,
    protocol: IProcessProtocol,
    argv: Sequence[str],
    env: Mapping[str, str],
) -> GroupTransport:
    """
    Spawn ``argv`` (``argv[0]`` an absolute path) via the launcher, with
    exactly ``env`` as its environment (never Twisted's empty default).
    """
    args = launcher_argv(argv)
    transport = reactor.spawnProcess(protocol, args[0], args, env=dict(env))
    return GroupTransport(transport)
