"""Tests for llamaswap.logmon."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.logmon import LogMonitor


class LogMonitorTests(SynchronousTestCase):
    def test_history_keeps_everything_under_limit(self) -> None:
        mon = LogMonitor(max_bytes=100)
        mon.write(b"hello ")
        mon.write(b"")
        mon.write(b"world\n")
        self.assertEqual(mon.history(), b"hello world\n")
        self.assertEqual(len(mon), 12)

    def test_default_limit(self) -> None:
        self.assertEqual(LogMonitor().max_bytes, 100 * 1024)

    def test_drops_oldest_bytes(self) -> None:
        mon = LogMonitor(max_bytes=10)
        mon.write(b"0123456")
        mon.write(b"789ab")
        self.assertEqual(mon.history(), b"23456789ab")
        mon.write(b"c")
        self.assertEqual(mon.history(), b"3456789abc")
        self.assertEqual(len(mon), 10)

    def test_write_larger_than_limit(self) -> None:
        mon = LogMonitor(max_bytes=4)
        mon.write(b"ab")
        mon.write(b"0123456789")
        self.assertEqual(mon.history(), b"6789")

    def test_many_small_writes_bounded(self) -> None:
        mon = LogMonitor(max_bytes=1000)
        for i in range(10000):
            mon.write(b"line %d\n" % i)
        history = mon.history()
        self.assertEqual(len(history), 1000)
        self.assertTrue(history.endswith(b"line 9999\n"))

    def test_zero_limit(self) -> None:
        mon = LogMonitor(max_bytes=0)
        got: list[bytes] = []
        mon.subscribe(got.append)
        mon.write(b"x")
        self.assertEqual(mon.history(), b"")
        self.assertEqual(got, [b"x"])

    def test_subscribers_get_live_writes_until_unsubscribed(self) -> None:
        mon = LogMonitor()
        mon.write(b"before")
        a: list[bytes] = []
        b: list[bytes] = []
        unsubscribe_a = mon.subscribe(a.append)
        mon.subscribe(b.append)
        mon.write(b"one")
        unsubscribe_a()
        unsubscribe_a()  # idempotent
        mon.write(b"two")
        self.assertEqual(a, [b"one"])
        self.assertEqual(b, [b"one", b"two"])
        self.assertEqual(mon.subscriber_count, 1)

    def test_same_callback_twice(self) -> None:
        mon = LogMonitor()
        got: list[bytes] = []
        first = mon.subscribe(got.append)
        mon.subscribe(got.append)
        mon.write(b"x")
        first()
        mon.write(b"y")
        self.assertEqual(got, [b"x", b"x", b"y"])

    def test_raising_subscriber_removed_and_logged(self) -> None:
        mon = LogMonitor()
        good: list[bytes] = []

        def bad(data: bytes) -> None:
            raise ZeroDivisionError("boom")

        mon.subscribe(bad)
        mon.subscribe(good.append)
        mon.write(b"a")
        mon.write(b"b")
        self.assertEqual(good, [b"a", b"b"])
        self.assertEqual(mon.subscriber_count, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_unsubscribe_during_dispatch(self) -> None:
        mon = LogMonitor()
        got: list[bytes] = []
        unsubscribers = []

        def once(data: bytes) -> None:
            got.append(data)
            unsubscribers[0]()

        unsubscribers.append(mon.subscribe(once))
        mon.write(b"a")
        mon.write(b"b")
        self.assertEqual(got, [b"a"])

    def test_clear(self) -> None:
        mon = LogMonitor(max_bytes=10)
        mon.write(b"abc")
        mon.clear()
        self.assertEqual(mon.history(), b"")
        self.assertEqual(len(mon), 0)

    def test_negative_limit_rejected(self) -> None:
        self.assertRaises(ValueError, LogMonitor, -1)
