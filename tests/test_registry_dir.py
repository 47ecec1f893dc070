"""The stale-child registry trusts only a directory that is safely its own.

A record names a process group to SIGKILL, so a directory another user could
write to (planted ``/tmp/llamaswap-0``, loose mode, a symlink) is refused:
nothing is recorded, read or swept.  One test points a record at a real
child and checks that it survives the sweep of a refused directory.
"""

from __future__ import annotations

import os
import signal
import stat

from twisted.internet import defer, protocol, reactor, task
from twisted.logger import globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.process.registry import ChildRegistry, sweep_stale

DEAD_OWNER = (os.getpid(), 1.0)  # our pid with another start time: "gone"
SETSID = "/usr/bin/setsid"
SLEEP = "/usr/bin/sleep"


def stale_dir(path: str, pid: int = os.getpid()) -> str:
    """A proper (0700, ours) directory holding one stale record of ``pid``."""
    assert ChildRegistry(path).add(pid, "m", ["server"], owner=DEAD_OWNER) is not None
    return path


def problems(events) -> list[str]:
    return [e["problem"] for e in events if "problem" in e]


class StateDirTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.killed: list[tuple[int, int]] = []
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def killpg(self, pgid: int, sig: int) -> None:
        self.killed.append((pgid, sig))

    def assertRefused(self, path: str, reason: str) -> None:
        self.assertEqual(sweep_stale(path, killpg=self.killpg), [])
        self.assertEqual(self.killed, [])
        registry = ChildRegistry(path)
        self.assertEqual(registry.sweep(), [])
        self.assertEqual(registry.records(), [])
        self.assertIsNone(registry.add(os.getpid(), "m", ["server"]))
        registry.remove(os.getpid())
        self.assertIn(reason, registry.disabled)
        # refused by sweep_stale, then once (not four times) by the registry
        self.assertEqual(len(problems(self.events)), 2, problems(self.events))
        self.assertTrue(all(reason in p for p in problems(self.events)))

    def test_fresh_dir_is_created_0700(self) -> None:
        previous = os.umask(0)  # even with a permissive umask
        self.addCleanup(os.umask, previous)
        registry = ChildRegistry(self.dir)
        self.assertIsNotNone(registry.add(os.getpid(), "m", ["server"]))
        st = os.lstat(self.dir)
        self.assertTrue(stat.S_ISDIR(st.st_mode))
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid), (0o700, os.geteuid()))
        [name] = os.listdir(self.dir)
        self.assertEqual(stat.S_IMODE(os.lstat(os.path.join(self.dir, name)).st_mode), 0o600)
        self.assertIsNone(registry.disabled)
        self.assertEqual(len(registry.records()), 1)

    def test_control_a_proper_dir_is_swept(self) -> None:
        """The set-up the refusals below start from is swept when it is trusted."""
        [record] = sweep_stale(stale_dir(self.dir), killpg=self.killpg)
        self.assertEqual(self.killed, [(os.getpid(), signal.SIGKILL)])
        self.assertEqual(problems(self.events), [])

    def test_loose_mode_is_refused(self) -> None:
        os.chmod(stale_dir(self.dir), 0o777)
        self.assertRefused(self.dir, "mode 0777")
        self.assertEqual(len(os.listdir(self.dir)), 1)  # nothing read, nothing deleted

    def test_group_readable_is_refused(self) -> None:
        os.chmod(stale_dir(self.dir), 0o750)
        self.assertRefused(self.dir, "mode 0750")

    def test_symlink_is_refused(self) -> None:
        link = os.path.abspath(self.mktemp())
        os.symlink(stale_dir(self.dir), link)
        self.assertRefused(link, "is a symlink")
        self.assertEqual(len(os.listdir(self.dir)), 1)

    def test_not_a_directory_is_refused(self) -> None:
        with open(self.dir, "w") as f:
            f.write("{}")
        self.assertRefused(self.dir, "not a directory")

    def test_other_owner_is_refused(self) -> None:
        if os.geteuid() != 0:
            raise self.skipTest("chown to another uid needs root")
        os.chown(stale_dir(self.dir), 65534, 65534)
        self.assertRefused(self.dir, "owned by uid 65534")
        self.assertEqual(len(os.listdir(self.dir)), 1)

    def test_missing_dir_is_not_created_by_a_sweep(self) -> None:
        registry = ChildRegistry(self.dir)
        self.assertEqual((registry.sweep(), registry.records()), ([], []))
        registry.remove(1)
        self.assertFalse(os.path.exists(self.dir))
        self.assertIsNone(registry.disabled)


class _Child(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


class LiveChildTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_refused_dir_never_kills_a_live_group(self):
        child = _Child()
        # setsid execs in place (a Twisted child is no group leader): pid == pgid
        transport = reactor.spawnProcess(child, SETSID, [SETSID, SLEEP, "30"], env={})
        pid = transport.pid
        self.addCleanup(lambda: child.ended if child.ended.called else _kill(pid, child))
        for _ in range(250):
            if _pgid(pid) == pid:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(_pgid(pid), pid)

        path = stale_dir(os.path.abspath(self.mktemp()), pid)
        os.chmod(path, 0o777)
        self.assertEqual(sweep_stale(path), [])
        self.assertEqual(ChildRegistry(path).sweep(), [])
        yield task.deferLater(reactor, 0.2, lambda: None)  # a SIGKILL would have ended it by now
        self.assertFalse(child.ended.called, "a refused directory got a process group killed")
        os.kill(pid, 0)

        # control: the very same record, once the directory is safe, kills it
        os.chmod(path, 0o700)
        [record] = sweep_stale(path)
        self.assertEqual((record.pid, record.pgid), (pid, pid))
        status = yield child.ended.addTimeout(5, reactor)
        self.assertEqual(status.signal, signal.SIGKILL)


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def _kill(pid: int, child: _Child) -> defer.Deferred:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        os.kill(pid, signal.SIGKILL)
    return child.ended.addTimeout(5, reactor)
