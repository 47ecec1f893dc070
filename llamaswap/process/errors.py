"""Errors raised by model processes (pure: no Twisted import)."""

from __future__ import annotations

from typing import Sequence


class ProcessError(Exception):
    """Base class of every error a model process reports."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class CommandError(ProcessError):
    """A ``cmd``/``cmdStop`` string or environment entry cannot be used."""


class StartError(ProcessError):
    """``failed to start command '…': …``: the command could not be spawned."""


class _WithOutput(ProcessError):
    """An error that carries the last lines of the child's output."""

    def __init__(self, message: str, output: Sequence[str] = ()) -> None:
        self.output = tuple(output)
        if self.output:
            message = message + "; last output:\n" + "\n".join(self.output)
        super().__init__(message)


class PrematureExitError(_WithOutput):
    """``upstream command exited prematurely``: the child died while starting."""


class HealthCheckTimeoutError(_WithOutput):
    """``health check timed out after Ns``."""


class StartAbortedError(ProcessError):
    """The start was aborted by a stop (``aborted``)."""


class ProcessShutdownError(StartAbortedError):
    """The process was shut down; it cannot start again."""
