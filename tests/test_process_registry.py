"""Tests of the stale-children registry (files in a temp dir; a fake killpg,
so nothing real is ever signalled here)."""

from __future__ import annotations

import json
import os
import signal

import psutil
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.process import registry as registry_module
from llamaswap.process.registry import ChildRegistry, default_state_dir, sweep_stale

DEAD_OWNER = (os.getpid(), 1.0)  # our pid with another start time: "gone"


def unused_pid() -> int:
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


class RegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.registry = ChildRegistry(self.dir)
        self.killed: list[tuple[int, int]] = []

    def killpg(self, pgid: int, sig: int) -> None:
        self.killed.append((pgid, sig))

    def test_default_state_dir(self) -> None:
        self.patch(os, "environ", {"XDG_RUNTIME_DIR": "/run/user/7"})
        self.assertEqual(default_state_dir(), "/run/user/7/llamaswap")
        self.patch(os, "environ", {})
        self.assertTrue(default_state_dir().endswith(f"llamaswap-{os.getuid()}"))

    def test_add_and_remove(self) -> None:
        record = self.registry.add(os.getpid(), "m", ["/bin/server", "--x"])
        assert record is not None
        [path] = os.listdir(self.dir)
        with open(os.path.join(self.dir, path)) as f:
            data = json.load(f)
        self.assertEqual(data["pid"], os.getpid())
        self.assertEqual(data["pgid"], os.getpid())
        self.assertEqual(data["model"], "m")
        self.assertEqual(data["argv"], ["/bin/server", "--x"])
        self.assertAlmostEqual(data["create_time"], psutil.Process().create_time(), places=1)
        self.assertEqual(data["owner_pid"], os.getpid())
        self.assertEqual(self.registry.records(), [record])
        self.registry.remove(os.getpid())
        self.registry.remove(os.getpid())  # twice is fine
        self.assertEqual(os.listdir(self.dir), [])

    def test_add_gone_child_records_nothing(self) -> None:
        self.assertIsNone(self.registry.add(unused_pid(), "m", ["x"]))
        self.assertFalse(os.path.exists(self.dir))

    def test_sweep_leaves_records_of_live_owner(self) -> None:
        self.registry.add(os.getpid(), "m", ["x"])
        self.assertEqual(sweep_stale(self.dir, killpg=self.killpg), [])
        self.assertEqual(self.killed, [])
        self.assertEqual(len(os.listdir(self.dir)), 1)

    def test_sweep_kills_group_of_dead_owner(self) -> None:
        self.registry.add(os.getpid(), "m", ["x"], owner=DEAD_OWNER)
        [record] = sweep_stale(self.dir, killpg=self.killpg)
        self.assertEqual(self.killed, [(os.getpid(), signal.SIGKILL)])
        self.assertEqual(record.model, "m")
        self.assertEqual(os.listdir(self.dir), [])

    def test_sweep_pid_reuse_guard(self) -> None:
        record = self.registry.add(os.getpid(), "m", ["x"], owner=DEAD_OWNER)
        assert record is not None
        # rewrite the record as if an earlier process had had our pid
        path = os.path.join(self.dir, os.listdir(self.dir)[0])
        with open(path) as f:
            data = json.load(f)
        data["create_time"] -= 1000
        with open(path, "w") as f:
            json.dump(data, f)
        self.assertEqual(sweep_stale(self.dir, killpg=self.killpg), [])
        self.assertEqual(self.killed, [])
        self.assertEqual(os.listdir(self.dir), [])

    def test_sweep_dead_leader_without_members(self) -> None:
        pid = unused_pid()
        os.makedirs(self.dir, mode=0o700)
        data = dict(pid=pid, pgid=pid, create_time=1.0, model="m", argv=["x"], owner_pid=DEAD_OWNER[0], owner_create_time=1.0)
        with open(os.path.join(self.dir, f"child-{pid}.json"), "w") as f:
            json.dump(data, f)
        self.assertEqual(sweep_stale(self.dir, killpg=self.killpg), [])
        self.assertEqual(self.killed, [])
        self.assertEqual(os.listdir(self.dir), [])

    def test_sweep_dead_leader_with_surviving_member(self) -> None:
        pid = unused_pid()
        self.patch(registry_module, "_group_members", lambda pgid, since: [12345] if pgid == pid else [])
        os.makedirs(self.dir, mode=0o700)
        data = dict(pid=pid, pgid=pid, create_time=1.0, model="m", argv=["x"], owner_pid=DEAD_OWNER[0], owner_create_time=1.0)
        with open(os.path.join(self.dir, f"child-{pid}.json"), "w") as f:
            json.dump(data, f)
        [record] = sweep_stale(self.dir, killpg=self.killpg)
        self.assertEqual(self.killed, [(pid, signal.SIGKILL)])

    def test_sweep_removes_unreadable_records(self) -> None:
        os.makedirs(self.dir, mode=0o700)
        for name in ("child-1.json", "child-2.json"):
            with open(os.path.join(self.dir, name), "w") as f:
                f.write("{not json" if name == "child-1.json" else "{}")
        with open(os.path.join(self.dir, "unrelated.txt"), "w") as f:
            f.write("keep me")
        self.assertEqual(sweep_stale(self.dir, killpg=self.killpg), [])
        self.assertEqual(os.listdir(self.dir), ["unrelated.txt"])

    def test_sweep_missing_dir(self) -> None:
        self.assertEqual(sweep_stale(self.dir, killpg=self.killpg), [])
