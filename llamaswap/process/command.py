"""Turning a model's ``cmd`` into argv and environment (pure, no Twisted)."""

from __future__ import annotations

import os
import shlex
import shutil
from typing import Mapping, Optional, Sequence

from .errors import CommandError

__all__ = ["CommandError", "sanitize_command", "build_env", "resolve_executable"]


def sanitize_command(cmd: str) -> list[str]:
    """
    Split a ``cmd`` string the way llama-swap does: drop lines whose stripped
    text starts with ``#``, join lines ending in ``\\``, then split with POSIX
    shell quoting rules (no shell, no ``$VAR`` expansion).
    """
    kept = []
    for line in cmd.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            kept.append(stripped[:-1] + " ")
        else:
            kept.append(line)
    try:
        argv = shlex.split("\n".join(kept), comments=False, posix=True)
    except ValueError as error:
        raise CommandError(f"invalid command: {error}") from None
    if not argv:
        raise CommandError("empty command")
    return argv


def build_env(base: Mapping[str, str], model_env: Sequence[str]) -> dict[str, str]:
    """
    The child's environment: ``base`` plus the model's ``NAME=value`` entries
    (a later entry wins).  Never empty: ``PATH`` falls back to ``os.defpath``.
    """
    env = dict(base)
    for entry in model_env:
        name, sep, value = entry.partition("=")
        if not sep or not name or "\0" in entry:
            raise CommandError(f"invalid env entry {entry!r}: expected NAME=value")
        env[name] = value
    env.setdefault("PATH", os.defpath)
    return env


def resolve_executable(argv0: str, path_env: Optional[str]) -> str:
    """
    The absolute path of ``argv0``: looked up in ``path_env`` unless it
    contains a slash.  Raises ``CommandError`` when not found or not executable.
    """
    if os.sep in argv0 or (os.altsep and os.altsep in argv0):
        path = os.path.abspath(argv0)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        raise CommandError(f"executable '{argv0}' not found or not executable")
    found = shutil.which(argv0, path=path_env if path_env is not None else os.defpath)
    if found is None:
        raise CommandError(f"executable '{argv0}' not found in PATH")
    return os.path.abspath(found)
