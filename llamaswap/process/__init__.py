"""Model processes: a supervised lifecycle for every upstream server.

The public names are loaded lazily, so that running the launcher
(``python -m llamaswap.process.launch``) imports nothing but the standard
library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ChildHandle",
    "ChildRecord",
    "ChildRegistry",
    "CommandError",
    "ExitStatus",
    "GroupTransport",
    "HealthCheckTimeoutError",
    "LineSplitter",
    "PrematureExitError",
    "Process",
    "ProcessError",
    "ProcessShutdownError",
    "ProcessState",
    "StartAbortedError",
    "StartError",
    "UpstreamProtocol",
    "build_env",
    "default_state_dir",
    "launcher_argv",
    "resolve_executable",
    "sanitize_command",
    "spawn_in_new_group",
    "sweep_stale",
]

_WHERE = {
    "ChildHandle": "process",
    "Process": "process",
    "ProcessState": "process",
    "ChildRecord": "registry",
    "ChildRegistry": "registry",
    "default_state_dir": "registry",
    "sweep_stale": "registry",
    "CommandError": "errors",
    "HealthCheckTimeoutError": "errors",
    "PrematureExitError": "errors",
    "ProcessError": "errors",
    "ProcessShutdownError": "errors",
    "StartAbortedError": "errors",
    "StartError": "errors",
    "ExitStatus": "protocol",
    "LineSplitter": "protocol",
    "UpstreamProtocol": "protocol",
    "GroupTransport": "spawn",
    "launcher_argv": "spawn",
    "spawn_in_new_group": "spawn",
    "build_env": "command",
    "resolve_executable": "command",
    "sanitize_command": "command",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    from .command import build_env, resolve_executable, sanitize_command
    from .errors import (
        CommandError,
        HealthCheckTimeoutError,
        PrematureExitError,
        ProcessError,
        ProcessShutdownError,
        StartAbortedError,
        StartError,
    )
    from .process import ChildHandle, Process, ProcessState
    from .protocol import ExitStatus, LineSplitter, UpstreamProtocol
    from .registry import ChildRecord, ChildRegistry, default_state_dir, sweep_stale
    from .spawn import GroupTransport, launcher_argv, spawn_in_new_group
