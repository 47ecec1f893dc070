"""Tests for llamaswap.router.scheduler."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Hashable, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config.types import Group, Matrix, MatrixSet
from llamaswap.router.planners import GroupPlanner, MatrixPlanner
from llamaswap.router.scheduler import (MSG_NOT_FOUND, MSG_QUEUE_FULL, MSG_SHUTDOWN,
                                        MSG_TOO_MANY, MSG_UNLOADED, Outcome, Scheduler)

GRANTED, JOINED, QUEUED, STARTED, FAILED = (
    Outcome.GRANTED, Outcome.JOINED, Outcome.QUEUED, Outcome.STARTED, Outcome.FAILED)


def fs(*models: str) -> frozenset:
    return frozenset(models)


class Recorder:
    """A fake effects object: records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def start_swap(self, target: str, evict: frozenset, reason: str) -> None:
        self.calls.append(("start_swap", target, evict))

    def grant(self, req_id: Hashable, model: str) -> None:
        self.calls.append(("grant", req_id, model))

    def fail(self, req_id: Hashable, status: int, message: str,
             headers: Optional[dict]) -> None:
        self.calls.append(("fail", req_id, status, message, headers))

    def queue_position(self, req_id: Hashable, position: int) -> None:
        self.calls.append(("position", req_id, position))

    def evicting(self, model: str, reason: str) -> None:
        self.calls.append(("evicting", model, reason))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == kind]

    def take(self) -> list[tuple[Any, ...]]:
        calls, self.calls = self.calls, []
        return calls


DEFAULT = Group("(default)", ("a", "b", "c", "d"), swap=True, exclusive=True)
SIDE = Group("side", ("s1", "s2"), swap=True, exclusive=False)
OTHER = Group("other", ("o1",), swap=True, exclusive=False)


class Harness(SynchronousTestCase):
    """A scheduler over a dict of process states and a recording effects object."""

    groups = (DEFAULT, SIDE, OTHER)
    limits = {"a": 10, "b": 10, "c": 10, "d": 10, "s1": 10, "s2": 10, "o1": 10}
    max_wait: Optional[float] = 60.0
    max_queue = 512
    priorities: dict[str, int] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.states: dict[str, str] = {}
        self.fx = Recorder()
        self.sched = self.make()

    def make(self, planner: Any = None, **kw: Any) -> Scheduler:
        args: dict[str, Any] = dict(priorities=self.priorities, max_wait=self.max_wait,
                                    max_queue=self.max_queue, clock=self.clock)
        args.update(kw)
        return Scheduler(planner or GroupPlanner(self.groups), self.fx,
                         lambda m: self.states.get(m, "stopped"),
                         kw.pop("limits", None) or self.limits,
                         **{k: v for k, v in args.items() if k != "limits"})

    def finish_swap(self, target: str, error: Optional[str] = None) -> None:
        """Play the router: stop the evicted models, start the target."""
        swap = self.sched.active_swaps()[target]
        for model in swap.evict:
            self.states[model] = "stopped"
        self.states[target] = "stopped" if error else "ready"
        self.sched.swap_done(target, error)

    def queued(self) -> list[Hashable]:
        return [e.req_id for e in self.sched.queue_snapshot()]


class DecisionTests(Harness):
    def test_unknown_model_404(self) -> None:
        self.assertIs(self.sched.request(1, "zzz"), FAILED)
        self.assertEqual(self.fx.take(), [("fail", 1, 404, MSG_NOT_FOUND, None)])
        self.assertEqual(self.sched.admitted("zzz"), 0)

    def test_fast_path(self) -> None:
        self.states["a"] = "ready"
        self.assertIs(self.sched.request(1, "a"), GRANTED)
        self.assertEqual(self.fx.take(), [("grant", 1, "a")])
        self.assertEqual(self.sched.in_flight("a"), 1)
        self.assertEqual(self.sched.active_swaps(), {})

    def test_cold_start_and_join(self) -> None:
        self.assertIs(self.sched.request(1, "a"), STARTED)
        self.assertEqual(self.fx.take(), [("start_swap", "a", fs())])
        self.states["a"] = "starting"
        self.assertIs(self.sched.request(2, "a"), JOINED)
        self.assertEqual(self.fx.take(), [])
        self.assertEqual(self.sched.active_swaps()["a"].waiters, (1, 2))
        self.assertEqual(self.sched.in_flight("a"), 0)
        self.finish_swap("a")
        self.assertEqual(self.fx.take(), [("grant", 1, "a"), ("grant", 2, "a")])
        self.assertEqual(self.sched.in_flight("a"), 2)
        self.assertEqual(self.sched.active_swaps(), {})

    def test_swap_evicts_idle_model_with_reason(self) -> None:
        self.states["a"] = "ready"
        self.assertIs(self.sched.request(1, "b"), STARTED)
        calls = self.fx.take()
        self.assertEqual(calls[0][:2], ("evicting", "a"))
        self.assertIn("swaps", calls[0][2])
        self.assertEqual(calls[1], ("start_swap", "b", fs("a")))
        self.assertIn("'a'", self.sched.active_swaps()["b"].reason)

    def test_parallel_disjoint_swaps(self) -> None:
        self.assertIs(self.sched.request(1, "s1"), STARTED)
        self.assertIs(self.sched.request(2, "o1"), STARTED)
        self.assertEqual(set(self.sched.active_swaps()), {"s1", "o1"})
        self.finish_swap("o1")
        self.finish_swap("s1")
        self.assertEqual(sorted(self.fx.of("grant")), [(1, "s1"), (2, "o1")])

    def test_collision_our_evict_holds_active_target(self) -> None:
        self.assertIs(self.sched.request(1, "a"), STARTED)
        self.assertIs(self.sched.request(2, "b"), QUEUED)
        self.assertEqual(self.fx.of("position"), [(2, 1)])
        self.assertIn("collides", self.sched.queue_snapshot()[0].blocked_by)
        self.finish_swap("a")
        # a now has a request in flight, so b still waits
        self.assertEqual(self.queued(), [2])
        self.assertIn("in flight", self.sched.queue_snapshot()[0].blocked_by)
        self.sched.serve_done(1)
        self.assertEqual(self.fx.of("start_swap")[-1], ("b", fs("a")))
        self.assertEqual(self.queued(), [])

    def test_collision_active_evict_holds_us(self) -> None:
        self.states["a"] = "ready"
        self.sched.request(1, "b")  # evicts a
        self.fx.take()
        # a is still "ready" until the router stops it, but no fast path
        self.assertIs(self.sched.request(2, "a"), QUEUED)
        self.assertEqual(self.sched.in_flight("a"), 0)

    def test_collision_overlapping_evict_sets(self) -> None:
        m = Matrix(MappingProxyType({}), MappingProxyType({}), (
            MatrixSet("pair", "t1 & t2", (fs("t1", "t2"),)),
            MatrixSet("solo", "m", (fs("m"),)),
        ))
        self.sched = self.make(MatrixPlanner(m), limits={"t1": 5, "t2": 5, "m": 5})
        self.states["m"] = "ready"
        self.assertIs(self.sched.request(1, "t1"), STARTED)
        self.assertEqual(self.fx.of("start_swap"), [("t1", fs("m"))])
        self.assertIs(self.sched.request(2, "t2"), QUEUED)
        self.finish_swap("t1")
        # t1 and t2 coexist; m is gone: t2 loads without evicting anything
        self.assertEqual(self.fx.of("start_swap")[-1], ("t2", fs()))

    def test_eviction_waits_for_in_flight(self) -> None:
        self.states["a"] = "ready"
        self.sched.request(1, "a")
        self.sched.request(2, "a")
        self.assertIs(self.sched.request(3, "b"), QUEUED)
        self.assertEqual(self.fx.of("start_swap"), [])
        self.sched.serve_done(1)
        self.assertEqual(self.fx.of("start_swap"), [])
        self.sched.serve_done(2)
        self.assertEqual(self.fx.of("start_swap"), [("b", fs("a"))])

    def test_request_for_stopping_model_starts_swap(self) -> None:
        # TTL unload under way: ensure_ready will wait for the stop and restart
        self.states["a"] = "stopping"
        self.assertIs(self.sched.request(1, "a"), STARTED)
        self.assertEqual(self.fx.of("start_swap"), [("a", fs())])

    def test_model_stopped_drains(self) -> None:
        self.states["a"] = "ready"
        self.sched.request(1, "a")
        self.assertIs(self.sched.request(2, "b"), QUEUED)
        self.states["a"] = "stopped"  # crashed with a request in flight
        self.sched.model_stopped("a")
        self.assertEqual(self.fx.of("start_swap"), [("b", fs())])
        self.sched.serve_done(1)  # its 502 went out
        self.assertEqual(self.sched.in_flight("a"), 0)

    def test_swap_failure_fails_all_waiters(self) -> None:
        self.sched.request(1, "a")
        self.sched.request(2, "a")
        self.sched.request(3, "b")
        self.fx.take()
        self.finish_swap("a", "health check timed out after 120s")
        calls = self.fx.take()
        msg = "unspecific error: health check timed out after 120s"
        self.assertEqual(calls[:2], [("fail", 1, 500, msg, None), ("fail", 2, 500, msg, None)])
        # the queue is drained: b loads now
        self.assertIn(("start_swap", "b", fs()), calls)
        self.assertEqual(self.sched.admitted("a"), 0)
        self.assertEqual(self.sched.in_flight("a"), 0)


class MoreDecisionTests(Harness):
    def test_ready_target_that_still_evicts_starts_swap(self) -> None:
        # one-way groups: s1 (non-exclusive) loaded next to a; asking for a
        # (exclusive group) evicts s1 even though a is ready
        self.states["a"] = self.states["s1"] = "ready"
        self.assertIs(self.sched.request(1, "a"), STARTED)
        self.assertEqual(self.fx.of("start_swap"), [("a", fs("s1"))])
        self.finish_swap("a")
        self.assertEqual(self.fx.of("grant"), [(1, "a")])
        self.assertIs(self.sched.request(2, "s1"), STARTED)
        self.assertEqual(self.fx.of("start_swap")[-1], ("s1", fs()))

    def test_effects_without_evicting_hook(self) -> None:
        class Plain:
            def __init__(self) -> None:
                self.swaps: list[Any] = []

            def start_swap(self, target: str, evict: frozenset, reason: str) -> None:
                self.swaps.append((target, evict))

            def grant(self, *a: Any) -> None: ...
            def fail(self, *a: Any) -> None: ...
            def queue_position(self, *a: Any) -> None: ...

        plain = Plain()
        sched = Scheduler(GroupPlanner(self.groups), plain, lambda m: "ready" if m == "a" else "stopped",
                          self.limits)
        self.assertIs(sched.request(1, "b"), STARTED)
        self.assertEqual(plain.swaps, [("b", fs("a"))])

    def test_failing_effect_does_not_strand_the_others(self) -> None:
        class Boom(Recorder):
            def queue_position(self, req_id: Hashable, position: int) -> None:
                raise RuntimeError("boom")

        self.fx = Boom()
        self.sched = self.make()
        self.states["a"] = "ready"
        self.sched.request(1, "a")
        self.assertRaises(RuntimeError, self.sched.request, 2, "b")
        self.sched.serve_done(1)
        self.assertEqual(self.fx.of("start_swap"), [("b", fs("a"))])


class CollationTests(Harness):
    def run_pattern(self, pattern: str) -> list[tuple[Any, ...]]:
        for i, model in enumerate(pattern):
            self.sched.request(i, model)
            if self.sched.active_swaps().get(model):
                self.states[model] = "starting"
        while True:
            swaps = self.sched.active_swaps()
            if swaps:
                for target in swaps:
                    self.finish_swap(target)
                continue
            granted = [r for r, m in self.fx.of("grant")]
            live = [r for r in granted if r not in self.done]
            if not live:
                break
            for r in live:
                self.done.add(r)
                self.sched.serve_done(r)
        return self.fx.of("grant")

    def setUp(self) -> None:
        super().setUp()
        self.done: set[Hashable] = set()

    def test_abab_two_loads(self) -> None:
        grants = self.run_pattern("ABABAB".lower())
        self.assertEqual(len(self.fx.of("start_swap")), 2)
        self.assertEqual([m for _, m in grants], list("aaabbb"))
        self.assertEqual(self.queued(), [])

    def test_abcabc_three_loads(self) -> None:
        grants = self.run_pattern("abcabc")
        self.assertEqual([t for t, _ in self.fx.of("start_swap")], ["a", "b", "c"])
        self.assertEqual([m for _, m in grants], list("aabbcc"))

    def test_ready_model_takes_fast_path_while_others_queued(self) -> None:
        self.states["a"] = "ready"
        self.sched.request(1, "a")
        self.sched.request(2, "b")
        self.assertIs(self.sched.request(3, "a"), GRANTED)
        self.assertEqual(self.queued(), [2])


class QueueTests(Harness):
    priorities = {"c": 5, "d": -1}

    def test_priority_order_and_fifo_among_equals(self) -> None:
        self.states["a"] = "ready"
        self.sched.request("r", "a")  # a busy: every other request waits
        self.sched.request(1, "b")
        self.sched.request(2, "d")
        self.sched.request(3, "c")
        self.sched.request(4, "b")
        self.sched.request(5, "c")
        self.sched.request(6, "d")
        self.assertEqual(self.queued(), [3, 5, 1, 4, 2, 6])
        self.assertEqual([e.position for e in self.sched.queue_snapshot()], [1, 2, 3, 4, 5, 6])
        # every entry learns its current position; only changes are re-broadcast
        positions = self.fx.of("position")
        self.assertEqual(positions[:1], [(1, 1)])
        last = {}
        for r, p in positions:
            last[r] = p
        self.assertEqual(last, {3: 1, 5: 2, 1: 3, 4: 4, 2: 5, 6: 6})
        self.sched.serve_done("r")
        # c (priority 5) loads first; the other c joins; b and d keep waiting
        self.assertEqual(self.fx.of("start_swap")[-1], ("c", fs("a")))
        self.assertEqual(self.sched.active_swaps()["c"].waiters, (3, 5))
        self.assertEqual(self.queued(), [1, 4, 2, 6])

    def test_queue_bound_503(self) -> None:
        self.sched = self.make(max_queue=2)
        self.states["a"] = "ready"
        self.sched.request("r", "a")
        self.assertIs(self.sched.request(1, "b"), QUEUED)
        self.assertIs(self.sched.request(2, "b"), QUEUED)
        self.assertIs(self.sched.request(3, "b"), FAILED)
        self.assertEqual(self.fx.calls[-1], ("fail", 3, 503, MSG_QUEUE_FULL, {"Retry-After": "1"}))
        self.assertEqual(self.sched.admitted("b"), 2)
        # the fast path does not need a queue slot
        self.assertIs(self.sched.request(4, "a"), GRANTED)
        self.assertEqual(self.clock.getDelayedCalls().__len__(), 2)

    def test_concurrency_limit_429(self) -> None:
        self.sched = self.make(limits={"a": 2, "b": 2, "c": 2})
        self.states["a"] = "ready"
        self.assertIs(self.sched.request(1, "a"), GRANTED)
        self.sched.request(2, "b")
        self.assertIs(self.sched.request(3, "a"), GRANTED)
        self.assertIs(self.sched.request(4, "a"), FAILED)
        self.assertEqual(self.fx.calls[-1], ("fail", 4, 429, MSG_TOO_MANY, {"Retry-After": "1"}))
        # queued and waiting requests count too
        self.assertIs(self.sched.request(5, "b"), QUEUED)
        self.assertIs(self.sched.request(6, "b"), FAILED)
        self.sched.serve_done(1)
        self.assertIs(self.sched.request(7, "a"), GRANTED)
        self.assertEqual(self.sched.admitted("a"), 2)

    def test_cancel_while_queued(self) -> None:
        self.states["a"] = "ready"
        self.sched.request("r", "a")
        self.sched.request(1, "c")
        self.sched.request(2, "b")
        self.sched.request(3, "b")
        self.fx.take()
        self.sched.cancel(1)
        # positions re-broadcast to those that moved
        self.assertEqual(self.fx.take(), [("position", 2, 1), ("position", 3, 2)])
        self.assertEqual(self.sched.admitted("c"), 0)
        self.sched.cancel(2)
        self.sched.cancel(3)
        self.fx.take()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.sched.serve_done("r")
        # nobody is left who wanted b or c: no load for dead callers
        self.assertEqual(self.fx.take(), [])
        self.assertEqual(self.sched.active_swaps(), {})
        self.sched.cancel(1)  # twice is harmless
        self.assertEqual(self.fx.take(), [])

    def test_cancel_while_waiting_for_swap(self) -> None:
        self.sched.request(1, "a")
        self.sched.request(2, "a")
        self.sched.cancel(1)
        self.assertEqual(self.sched.active_swaps()["a"].waiters, (2,))
        self.assertEqual(self.sched.admitted("a"), 1)
        self.fx.take()
        self.finish_swap("a")
        self.assertEqual(self.fx.take(), [("grant", 2, "a")])
        self.assertEqual(self.sched.in_flight("a"), 1)

    def test_cancel_after_grant_is_serve_done(self) -> None:
        self.states["a"] = "ready"
        self.sched.request(1, "a")
        self.sched.request(2, "b")
        self.sched.cancel(1)
        self.assertEqual(self.sched.in_flight("a"), 0)
        self.assertEqual(self.fx.of("start_swap"), [("b", fs("a"))])

    def test_unload_with_waiters(self) -> None:
        self.states["s2"] = "ready"
        self.sched.request(1, "a")
        self.sched.request(2, "a")
        self.states["a"] = "starting"
        self.sched.request(3, "b")
        self.sched.request(4, "c")
        self.fx.take()
        stop = self.sched.unload(["a", "b", "s2", "nope"])
        self.assertEqual(stop, fs("a", "s2"))
        calls = self.fx.take()
        for r in (1, 2, 3):
            self.assertIn(("fail", r, 500, MSG_UNLOADED, None), calls)
        self.assertEqual(self.queued(), [4])
        self.assertEqual(self.sched.admitted("a"), 0)
        self.assertTrue(self.sched.active_swaps()["a"].cancelled)
        # the unloaded swap still holds the slot until the router reports it
        self.assertIs(self.sched.request(5, "a"), QUEUED)
        self.states["a"] = self.states["s2"] = "stopped"  # the router stopped them
        self.sched.swap_done("a", "aborted")
        calls = self.fx.take()
        self.assertNotIn(("fail", 5, 500, "unspecific error: aborted", None), calls)
        # c was ahead and starts first; a then collides and waits
        self.assertIn(("start_swap", "c", fs()), calls)
        self.assertEqual(self.queued(), [5])

    def test_shutdown_with_waiters(self) -> None:
        self.states["b"] = "ready"
        self.sched.request(0, "b")
        self.sched.request(1, "a")  # queued: b busy
        self.states["s1"] = "stopped"
        self.sched.request(2, "s1")  # starts
        self.sched.request(3, "s1")  # joins
        self.fx.take()
        self.sched.shutdown()
        calls = self.fx.take()
        self.assertEqual(sorted(c[1] for c in calls), [1, 2, 3])
        for c in calls:
            self.assertEqual(c[0::2], ("fail", 503, None))
            self.assertEqual(c[3], MSG_SHUTDOWN)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.sched.queue_snapshot(), ())
        self.assertIs(self.sched.request(4, "b"), FAILED)
        self.assertEqual(self.fx.take(), [("fail", 4, 503, MSG_SHUTDOWN, None)])
        # in-flight accounting still works after shutdown
        self.sched.serve_done(0)
        self.assertEqual(self.sched.in_flight("b"), 0)
        self.sched.swap_done("s1", None)  # late report: ignored
        self.assertEqual(self.fx.take(), [])

    def test_exact_in_flight_accounting(self) -> None:
        self.states["a"] = "ready"
        for r in range(3):
            self.sched.request(r, "a")
        self.assertEqual(self.sched.in_flight("a"), 3)
        self.sched.serve_done(0)
        self.sched.serve_done(0)  # a second report does not count twice
        self.sched.serve_done("unknown")
        self.assertEqual(self.sched.in_flight("a"), 2)
        self.assertEqual(self.sched.admitted("a"), 2)
        self.sched.request(9, "b")  # queued
        self.sched.serve_done(9)  # not granted: treated as cancel
        self.assertEqual(self.sched.in_flight("a"), 2)
        self.assertEqual(self.sched.admitted("b"), 0)
        self.assertEqual(self.queued(), [])
        self.sched.serve_done(1)
        self.sched.serve_done(2)
        self.assertEqual((self.sched.in_flight("a"), self.sched.admitted("a")), (0, 0))

    def test_duplicate_request_id_rejected(self) -> None:
        self.states["a"] = "ready"
        self.sched.request(1, "a")
        self.assertRaises(ValueError, self.sched.request, 1, "a")
        self.assertEqual(self.sched.in_flight("a"), 1)


class ReentrantEffects(Recorder):
    """Effects that call back into the scheduler synchronously."""

    sched: Scheduler

    def grant(self, req_id: Hashable, model: str) -> None:
        super().grant(req_id, model)
        self.sched.serve_done(req_id)  # e.g. the upstream connection failed at once


class ReentrancyTests(Harness):
    def test_effect_calling_back(self) -> None:
        self.fx = ReentrantEffects()
        self.sched = self.make()
        self.fx.sched = self.sched
        self.states["a"] = "ready"
        self.assertIs(self.sched.request(1, "a"), GRANTED)
        self.assertEqual(self.sched.in_flight("a"), 0)
        self.sched.request(2, "b")
        self.assertEqual(self.fx.of("start_swap"), [("b", fs("a"))])


class StarvationTests(Harness):
    max_wait = 60.0

    def test_overdue_request_blocks_fast_path_then_swaps(self) -> None:
        self.states["a"] = "ready"
        self.sched.request("a0", "a")
        self.assertIs(self.sched.request("b", "b"), QUEUED)
        self.clock.advance(30)
        self.sched.request("a1", "a")
        self.sched.serve_done("a0")
        # a1 keeps a busy; plain collation, b keeps waiting
        self.assertEqual(self.queued(), ["b"])
        self.clock.advance(29)
        self.sched.request("a2", "a")
        self.sched.serve_done("a1")
        self.clock.advance(1)  # b is now overdue
        self.assertTrue(self.sched.queue_snapshot()[0].overdue)
        self.assertIs(self.sched.request("a3", "a"), QUEUED)
        self.assertIn("reserved", self.sched.queue_snapshot()[1].blocked_by)
        self.assertEqual(self.fx.of("start_swap"), [])
        self.clock.advance(5)
        self.sched.serve_done("a2")  # a's last request in flight ends
        self.assertEqual(self.fx.of("start_swap"), [("b", fs("a"))])
        self.assertEqual(self.queued(), ["a3"])
        self.finish_swap("b")
        self.assertEqual(self.fx.of("grant")[-1], ("b", "b"))
        # a3 now waits for b; its own clock runs
        self.assertEqual(self.queued(), ["a3"])
        self.sched.serve_done("b")
        self.assertEqual(self.fx.of("start_swap")[-1], ("a", fs("b")))

    def test_overdue_request_blocks_joining_a_load_it_would_evict(self) -> None:
        self.states["a"] = "ready"
        self.sched.request("a0", "a")
        self.sched.request("b", "b")      # waits for a
        self.sched.request("c", "c")      # waits for a too
        self.clock.advance(61)            # both overdue; b is older
        self.sched.serve_done("a0")
        self.assertEqual(self.fx.of("start_swap"), [("b", fs("a"))])
        # b is loading and c (overdue) would evict it: no new work joins b
        self.assertIs(self.sched.request("b2", "b"), QUEUED)
        self.assertIn("reserved", self.sched.queue_snapshot()[-1].blocked_by)
        self.finish_swap("b")  # b's own waiter is served
        self.assertEqual(self.sched.in_flight("b"), 1)
        self.sched.serve_done("b")
        self.assertEqual(self.fx.of("start_swap")[-1], ("c", fs("b")))

    def test_overdue_request_blocks_competing_load(self) -> None:
        self.states["a"] = "ready"
        self.sched.request("a0", "a")
        self.sched.request("b", "b")
        self.clock.advance(61)
        self.states["a"] = "stopped"  # a crashed; a0's 502 is on its way
        # a new request for c would start a load that b's swap must then evict
        self.assertIs(self.sched.request("c", "c"), QUEUED)
        self.assertIn("overdue", self.sched.queue_snapshot()[-1].blocked_by)
        self.sched.model_stopped("a")
        self.assertEqual(self.fx.of("start_swap"), [("b", fs())])

    def test_overdue_goes_ahead_of_higher_priority(self) -> None:
        self.sched = self.make(priorities={"c": 9})
        self.states["a"] = "ready"
        self.sched.request("a0", "a")
        self.sched.request("b", "b")
        self.clock.advance(61)
        self.sched.request("c", "c")
        self.assertEqual(self.queued(), ["b", "c"])
        self.sched.serve_done("a0")
        self.assertEqual(self.fx.of("start_swap"), [("b", fs("a"))])

    def test_timer_cancelled_when_no_longer_needed(self) -> None:
        self.states["a"] = "ready"
        self.sched.request("a0", "a")
        self.sched.request("b", "b")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.sched.serve_done("a0")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_arrival_time_in_the_past(self) -> None:
        self.clock.advance(100)
        self.states["a"] = "ready"
        self.sched.request("a0", "a")
        self.sched.request("b", "b", now=30.0)  # waited elsewhere already
        self.assertTrue(self.sched.queue_snapshot()[0].overdue)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIs(self.sched.request("a1", "a"), QUEUED)

    def test_without_max_wait_no_timers(self) -> None:
        self.sched = self.make(max_wait=None)
        self.states["a"] = "ready"
        self.sched.request("a0", "a")
        self.sched.request("b", "b")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertIs(self.sched.request("a1", "a"), GRANTED)

    def test_overdue_requests_do_not_block_each_other(self) -> None:
        self.states["a"] = "ready"
        self.sched.request("a0", "a")
        self.sched.request("b", "b")
        self.sched.request("c", "c")
        self.clock.advance(61)
        self.sched.serve_done("a0")
        # b (older) loads; c collides with it and waits
        self.assertEqual(self.fx.of("start_swap"), [("b", fs("a"))])
        self.finish_swap("b")
        self.sched.request("b2", "b")  # b is reserved for overdue c
        self.assertEqual(self.queued(), ["c", "b2"])
        self.sched.serve_done("b")
        self.assertEqual(self.fx.of("start_swap")[-1], ("c", fs("b")))


class Simulation:
    """Drives a scheduler with a Clock: each swap takes ``load`` seconds,
    each granted request ``serve`` seconds."""

    def __init__(self, models: tuple[str, ...], load: float, serve: float,
                 max_wait: Optional[float]) -> None:
        self.clock = Clock()
        self.states: dict[str, str] = {}
        self.load, self.serve = load, serve
        self.loads: list[tuple[float, str]] = []
        self.arrived: dict[Hashable, float] = {}
        self.committed: dict[Hashable, float] = {}  # grant, or start of its own load
        self.granted: dict[Hashable, float] = {}
        self.order: list[str] = []
        self.sched = Scheduler(GroupPlanner((Group("(default)", models),)), self,
                               lambda m: self.states.get(m, "stopped"),
                               {m: 1000 for m in models}, max_wait=max_wait, clock=self.clock)

    def start_swap(self, target: str, evict: frozenset, reason: str) -> None:
        now = self.clock.seconds()
        self.loads.append((now, target))
        for r in self.sched.active_swaps()[target].waiters:
            self.committed.setdefault(r, now)
        for m in evict:
            self.states[m] = "stopped"
        self.states[target] = "starting"

        def done() -> None:
            self.states[target] = "ready"
            waiters = self.sched.active_swaps()[target].waiters
            for r in waiters:
                self.committed.setdefault(r, now)
            self.sched.swap_done(target)

        self.clock.callLater(self.load, done)

    def grant(self, req_id: Hashable, model: str) -> None:
        now = self.clock.seconds()
        self.granted[req_id] = now
        self.committed.setdefault(req_id, now)
        self.order.append(model)
        self.clock.callLater(self.serve, self.sched.serve_done, req_id)

    def fail(self, req_id: Hashable, status: int, message: str, headers: Any) -> None:
        raise AssertionError(f"request {req_id} failed: {status} {message}")

    def queue_position(self, req_id: Hashable, position: int) -> None:
        pass

    def arrive(self, at: float, req_id: Hashable, model: str) -> None:
        def go() -> None:
            self.arrived[req_id] = self.clock.seconds()
            self.sched.request(req_id, model)
        self.clock.callLater(at, go)

    def run(self, until: float) -> None:
        """Advance event by event until nothing is pending or ``until``."""
        while self.clock.getDelayedCalls():
            step = min(c.getTime() for c in self.clock.getDelayedCalls()) - self.clock.seconds()
            if self.clock.seconds() + step > until:
                break
            self.clock.advance(step)
        self.clock.advance(0)


class SimulationTests(SynchronousTestCase):
    def test_three_models_ten_requests_each_three_loads(self) -> None:
        sim = Simulation(("A", "B", "C"), load=2.0, serve=3.0, max_wait=60.0)
        for i in range(30):
            sim.arrive(0.5 * i, i, "ABC"[i % 3])
        sim.run(120)
        self.assertEqual(len(sim.granted), 30)
        self.assertEqual([m for _, m in sim.loads], ["A", "B", "C"])
        self.assertEqual(sim.order, ["A"] * 10 + ["B"] * 10 + ["C"] * 10)
        print(f"\n  3 models x 10 interleaved requests: {len(sim.loads)} loads "
              f"at {[t for t, _ in sim.loads]}")

    def steady_stream(self, max_wait: Optional[float]) -> tuple[float, float, Simulation]:
        serve, load = 5.0, 2.0
        sim = Simulation(("A", "B"), load=load, serve=serve, max_wait=max_wait)
        for i in range(400):  # one A request per second, each 5 s long
            sim.arrive(float(i), f"a{i}", "A")
        for i, t in enumerate((10.0, 100.3, 100.7, 180.0, 181.0, 300.1)):
            sim.arrive(t, f"b{i}", "B")
        sim.run(500)
        self.assertEqual(len(sim.granted), 406)
        bs = [r for r in sim.arrived if str(r).startswith("b")]
        commit = max(sim.committed[r] - sim.arrived[r] for r in bs)
        grant = max(sim.granted[r] - sim.arrived[r] for r in bs)
        return commit, grant, sim

    def test_starvation_bound(self) -> None:
        max_wait, serve, load = 30.0, 5.0, 2.0
        commit, grant, sim = self.steady_stream(max_wait)
        bound = max_wait + serve
        print(f"\n  steady A stream, max_wait={max_wait}s, A request {serve}s, load {load}s:"
              f"\n    longest B wait until its load began: {commit:.2f}s "
              f"(bound max_wait + one A request = {bound:.2f}s)"
              f"\n    longest B wait until granted: {grant:.2f}s "
              f"(bound + one load = {bound + load:.2f}s); loads: {len(sim.loads)}")
        self.assertLessEqual(commit, bound)
        self.assertLessEqual(grant, bound + load)
        # A requests are not starved either
        worst_a = max(sim.granted[r] - sim.arrived[r] for r in sim.arrived
                      if str(r).startswith("a"))
        self.assertLessEqual(worst_a, max_wait + serve + load)

    def test_without_starvation_control_b_waits_for_the_stream(self) -> None:
        commit, grant, sim = self.steady_stream(None)
        print(f"\n  steady A stream without max_wait: longest B wait {grant:.2f}s")
        self.assertGreater(grant, 300.0)
