"""
A record of spawned children, so that a restarted llamaswap can kill what a
killed one left behind.

One small JSON file per child in a state directory: written at spawn,
removed at exit (both rare, tiny writes, acceptable on the reactor thread).
Each record names its owner (the llamaswap pid and its start time); only
records whose owner is gone are swept.  psutil start times guard against
PID reuse.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import psutil
from twisted.logger import Logger

__all__ = ["ChildRecord", "ChildRegistry", "default_state_dir", "sweep_stale"]

log = Logger()

#: Start times from psutil are floats computed from boot time and clock
#: ticks; two reads of the same process agree far closer than this.
_TIME_SLACK = 0.05


def default_state_dir() -> str:
    """``$XDG_RUNTIME_DIR/llamaswap``, else ``/tmp/llamaswap-<uid>``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "llamaswap")
    return os.path.join(tempfile.gettempdir(), f"llamaswap-{os.getuid()}")


def _create_time(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ValueError):
        return None


def _alive_with(pid: int, create_time: float) -> bool:
    """Is ``pid`` the very process that started at ``create_time``?"""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - create_time) < _TIME_SLACK
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ValueError):
        return False


@dataclass(frozen=True)
class ChildRecord:
    """What is remembered about one child."""

    pid: int
    pgid: int
    create_time: float
    model: str
    argv: tuple[str, ...]
    owner_pid: int
    owner_create_time: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ChildRecord":
        return cls(
            pid=int(data["pid"]),
            pgid=int(data["pgid"]),
            create_time=float(data["create_time"]),
            model=str(data["model"]),
            argv=tuple(str(a) for a in data["argv"]),
            owner_pid=int(data["owner_pid"]),
            owner_create_time=float(data["owner_create_time"]),
        )


class ChildRegistry:
    """The children of this llamaswap, one JSON file each in ``state_dir``."""

    def __init__(self, state_dir: Optional[str] = None) -> None:
        self.state_dir = state_dir or default_state_dir()
        self._owner = (os.getpid(), _create_time(os.getpid()) or 0.0)

    def _path(self, pid: int) -> str:
        return os.path.join(self.state_dir, f"child-{pid}.json")

    def add(
        self,
        pid: int,
        model: str,
        argv: Sequence[str],
        *,
        owner: Optional[tuple[int, float]] = None,
    ) -> Optional[ChildRecord]:
        """Record a child just spawned (pgid == pid: the launcher makes it so)."""
        create_time = _create_time(pid)
        if create_time is None:
            return None  # already gone
        owner_pid, owner_time = owner or self._owner
        record = ChildRecord(pid, pid, create_time, model, tuple(argv), owner_pid, owner_time)
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            path = self._path(pid)
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(asdict(record), f)
            os.replace(tmp, path)
        except OSError as error:
            log.warn("cannot record child {pid} in {dir}: {error}", pid=pid, dir=self.state_dir, error=error)
            return None
        return record

    def remove(self, pid: int) -> None:
        """Forget a child that has exited."""
        try:
            os.unlink(self._path(pid))
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warn("cannot remove record of child {pid}: {error}", pid=pid, error=error)

    def records(self) -> list[ChildRecord]:
        """All readable records (unreadable files are skipped)."""
        return [r for _, r in _read_records(self.state_dir) if r is not None]

    def sweep(self) -> list[ChildRecord]:
        """:func:`sweep_stale` on this registry's directory."""
        return sweep_stale(self.state_dir)


def _read_records(state_dir: str) -> list[tuple[str, Optional[ChildRecord]]]:
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return []
    out: list[tuple[str, Optional[ChildRecord]]] = []
    for name in names:
        if not (name.startswith("child-") and name.endswith(".json")):
            continue
        path = os.path.join(state_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                out.append((path, ChildRecord.from_json(json.load(f))))
        except (OSError, ValueError, KeyError, TypeError):
            out.append((path, None))
    return out


def _group_members(pgid: int, not_before: float) -> list[int]:
    """Live processes in group ``pgid`` started no earlier than ``not_before``."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
        except OSError:
            continue
        started = _create_time(pid)
        if started is not None and started >= not_before - _TIME_SLACK:
            members.append(pid)
    return members


def _group_is_ours(record: ChildRecord) -> bool:
    """Does group ``record.pgid`` still exist and belong to the recorded child?"""
    if _alive_with(record.pid, record.create_time):
        return True
    started = _create_time(record.pid)
    if started is not None and abs(started - record.create_time) >= _TIME_SLACK:
        # The pid was reused.  The kernel never hands out a number that is
        # still in use as a process group id, so the old group is empty.
        return False
    return bool(_group_members(record.pgid, record.create_time))


def sweep_stale(
    state_dir: Optional[str] = None,
    *,
    killpg: Callable[[int, int], None] = os.killpg,
) -> list[ChildRecord]:
    """
    Kill (SIGKILL to the process group) the recorded children of llamaswap
    processes that are gone, and delete their records.  Records of a live
    owner (this process included) are left alone.  A leader whose pid now
    belongs to another process (start time differs) is never signalled;
    a dead leader's group is still killed if members of it remain (e.g. a
    grandchild that outlived a ``PR_SET_PDEATHSIG``-killed leader).
    Returns the records whose group was signalled.
    """
    state_dir = state_dir or default_state_dir()
    killed: list[ChildRecord] = []
    for path, record in _read_records(state_dir):
        if record is not None and _alive_with(record.owner_pid, record.owner_create_time):
            continue
        if record is not None and _group_is_ours(record):
            try:
                killpg(record.pgid, signal.SIGKILL)
                killed.append(record)
                log.info(
                    "killed stale child {pid} of model {model} (group {pgid})",
                    pid=record.pid,
                    model=record.model,
                    pgid=record.pgid,
                )
            except OSError as error:
                if error.errno != errno.ESRCH:
                    log.warn("cannot kill stale group {pgid}: {error}", pgid=record.pgid, error=error)
        try:
            os.unlink(path)
        except OSError:
            pass
    return killed
