"""
A record of spawned children, so that a restarted llamaswap can kill what a
killed one left behind.

One small JSON file per child in a state directory: written at spawn,
removed at exit (both rare, tiny writes, acceptable on the reactor thread).
Each record names its owner (the llamaswap pid and its start time); only
records whose owner is gone are swept.  psutil start times guard against
PID reuse.

The directory is trusted only once it is shown to be ours: a real directory
(not a symlink), owned by this user, with no group or other permission bits.
Anything else (say ``/tmp/llamaswap-0`` planted by another user) could feed
us records naming someone else's process groups, so it is refused: the
registry then records nothing and sweeps nothing, and says so once.  The
checks are made on an ``O_NOFOLLOW`` descriptor, and every file is then
reached through that descriptor, never through the path again.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import psutil
from twisted.logger import Logger

__all__ = ["ChildRecord", "ChildRegistry", "UnsafeStateDir", "default_state_dir", "sweep_stale"]

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


class UnsafeStateDir(Exception):
    """The state directory is not one that this user alone controls."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def _open_state_dir(state_dir: str, create: bool = False) -> Optional[int]:
    """
    A descriptor on ``state_dir`` once it is shown to be ours (see the module
    docstring); with ``create`` it is made (mode 0700) if missing.  None when
    it is missing and ``create`` is false.  Raises :class:`UnsafeStateDir`
    for a directory that must not be trusted, ``OSError`` for other failures.
    """
    if create:
        os.makedirs(os.path.dirname(os.path.abspath(state_dir)), exist_ok=True)
        try:
            os.mkdir(state_dir, 0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(state_dir, _DIR_FLAGS)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symlink" if os.path.islink(state_dir) else "not a directory"
            raise UnsafeStateDir(f"{state_dir} is {kind}") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeStateDir(f"{state_dir} is not a directory")
        if st.st_uid != os.geteuid():
            raise UnsafeStateDir(f"{state_dir} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
        if st.st_mode & 0o077:
            raise UnsafeStateDir(f"{state_dir} has mode {stat.S_IMODE(st.st_mode):04o}; "
                                 "it must have no group or other permissions")
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    """The children of this llamaswap, one JSON file each in ``state_dir``.

    ``disabled`` is None while the directory is usable, else why it is not
    (then nothing is recorded or swept).
    """

    def __init__(self, state_dir: Optional[str] = None) -> None:
        self.state_dir = state_dir or default_state_dir()
        self._owner = (os.getpid(), _create_time(os.getpid()) or 0.0)
        self.disabled: Optional[str] = None

    def _open(self, create: bool = False) -> Optional[int]:
        """The checked directory's descriptor, or None (missing, or refused)."""
        if self.disabled is not None:
            return None
        try:
            return _open_state_dir(self.state_dir, create)
        except UnsafeStateDir as problem:
            self.disabled = str(problem)
            log.warn("stale-child registry disabled, no child is recorded and no stale group is killed: {problem}",
                     problem=self.disabled)
        except OSError as error:
            log.warn("cannot use the state directory {dir}: {error}", dir=self.state_dir, error=error)
        return None

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
        dir_fd = self._open(create=True)
        if dir_fd is None:
            return None
        name = _name(pid)
        try:
            fd = os.open(f"{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS, 0o600, dir_fd=dir_fd)
            with open(fd, "w", encoding="utf-8") as f:
                json.dump(asdict(record), f)
            os.replace(f"{name}.tmp", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as error:
            log.warn("cannot record child {pid} in {dir}: {error}", pid=pid, dir=self.state_dir, error=error)
            return None
        finally:
            os.close(dir_fd)
        return record

    def remove(self, pid: int) -> None:
        """Forget a child that has exited."""
        dir_fd = self._open()
        if dir_fd is None:
            return
        try:
            os.unlink(_name(pid), dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warn("cannot remove record of child {pid}: {error}", pid=pid, error=error)
        finally:
            os.close(dir_fd)

    def records(self) -> list[ChildRecord]:
        """All readable records (unreadable files are skipped)."""
        dir_fd = self._open()
        if dir_fd is None:
            return []
        try:
            return [r for _, r in _read_records(dir_fd) if r is not None]
        finally:
            os.close(dir_fd)

    def sweep(self) -> list[ChildRecord]:
        """:func:`sweep_stale` on this registry's directory (nothing if it is refused)."""
        dir_fd = self._open()
        if dir_fd is None:
            return []
        try:
            return _sweep(dir_fd, os.killpg)
        finally:
            os.close(dir_fd)


def _name(pid: int) -> str:
    return f"child-{pid}.json"


def _read_records(dir_fd: int) -> list[tuple[str, Optional[ChildRecord]]]:
    """(file name, record or None if unreadable) for each record file."""
    out: list[tuple[str, Optional[ChildRecord]]] = []
    for name in sorted(os.listdir(dir_fd)):
        if not (name.startswith("child-") and name.endswith(".json")):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=dir_fd)
            with open(fd, encoding="utf-8") as f:
                out.append((name, ChildRecord.from_json(json.load(f))))
        except (OSError, ValueError, KeyError, TypeError):
            out.append((name, None))
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
    A directory that is not safely ours is refused (logged; nothing is
    read or signalled).  Returns the records whose group was signalled.
    """
    state_dir = state_dir or default_state_dir()
    try:
        dir_fd = _open_state_dir(state_dir)
    except UnsafeStateDir as problem:
        log.warn("not sweeping stale children: {problem}", problem=str(problem))
        return []
    except OSError as error:
        log.warn("cannot read the state directory {dir}: {error}", dir=state_dir, error=error)
        return []
    if dir_fd is None:
        return []
    try:
        return _sweep(dir_fd, killpg)
    finally:
        os.close(dir_fd)


def _sweep(dir_fd: int, killpg: Callable[[int, int], None]) -> list[ChildRecord]:
    killed: list[ChildRecord] = []
    for name, record in _read_records(dir_fd):
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
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
    return killed
