"""Resource budgets: the budget planner (pure), the scheduler's minResident and
swapPolicy rules (Clock), the config keys, and measured footprints (fake NVML)."""

from __future__ import annotations

import os
import random
import textwrap
from types import SimpleNamespace
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError, load_config_text
from llamaswap.config.fields import format_amount, parse_amount
from llamaswap.config.types import Group
from llamaswap.perf.footprint import Footprints, GroupUsage, NvmlFootprintSampler, group_pids
from llamaswap.router.planners import (BudgetPlanner, GroupPlanner, MatrixPlanner, Usage,
                                       planner_for_config)
from llamaswap.router.scheduler import MSG_MIN_RESIDENT, Outcome, Scheduler
from llamaswap.runtime import budgets_only
from llamaswap.testing.gpu import FakeGpu

from .test_scheduler import Recorder

GiB = 1024 ** 3
STARTED, QUEUED, GRANTED, FAILED = Outcome.STARTED, Outcome.QUEUED, Outcome.GRANTED, Outcome.FAILED


def fs(*models: str) -> frozenset:
    return frozenset(models)


def together(*members: str, persistent: tuple = ()) -> GroupPlanner:
    """One ``swap: false`` group (the budget alone decides), plus a
    persistent non-exclusive group."""
    groups = [Group("g", members, swap=False, exclusive=True)]
    if persistent:
        groups.append(Group("p", persistent, swap=False, exclusive=False, persistent=True))
    return GroupPlanner(groups)


def budget(sizes: dict, capacity: Any = 24, persistent: tuple = ()) -> BudgetPlanner:
    """``sizes``: model -> vram amount, or model -> {resource: amount}."""
    declared = {m: (v if isinstance(v, dict) else {"vram": v}) for m, v in sizes.items()}
    capacity = capacity if isinstance(capacity, dict) else {"vram": capacity}
    members = tuple(m for m in sizes if m not in persistent)
    return BudgetPlanner(together(*members, persistent=persistent), capacity, declared,
                         persistent=frozenset(persistent))


def recent(*order: str) -> dict:
    """Recency keys: the first model named is the least recently used."""
    return {m: i for i, m in enumerate(order, 1)}


class BudgetPlannerTests(SynchronousTestCase):
    def test_lru_idle_model_goes_first(self) -> None:
        planner = budget({"A": 10, "B": 10, "C": 10})
        plan = planner.plan("C", fs("A", "B"), Usage(recency=recent("B", "A")))
        self.assertEqual(plan.evict, fs("B"))
        self.assertIn("least recently used idle model", plan.why("B"))
        self.assertIn("vram 30 > 24", plan.why("B"))
        self.assertEqual(planner.plan("C", fs("A", "B"), Usage(recency=recent("A", "B"))).evict, fs("A"))

    def test_nothing_evicted_when_it_fits(self) -> None:
        planner = budget({"A": 10, "B": 4, "C": 10})
        plan = planner.plan("C", fs("A", "B"), Usage(recency=recent("A", "B")))
        self.assertEqual(plan.evict, fs())
        self.assertEqual(plan.infeasible, "")

    def test_lru_not_cheapest_set(self) -> None:
        # A is older and bigger; B alone would free enough, but LRU order decides
        planner = budget({"A": 10, "B": 2, "C": 14})
        self.assertEqual(planner.plan("C", fs("A", "B"), Usage(recency=recent("A", "B"))).evict, fs("A"))
        # greedy until it fits: several small old models before a big new one
        planner = budget({"a": 3, "b": 3, "c": 3, "big": 12, "T": 12})
        usage = Usage(recency=recent("a", "b", "c", "big"))
        self.assertEqual(planner.plan("T", fs("a", "b", "c", "big"), usage).evict, fs("a", "b", "c"))

    def test_never_used_counts_as_oldest(self) -> None:
        planner = budget({"A": 10, "B": 10, "C": 10})
        self.assertEqual(planner.plan("C", fs("A", "B"), Usage(recency={"A": 5})).evict, fs("B"))

    def test_fit_across_several_resources(self) -> None:
        planner = budget({"A": {"ram": 10}, "B": {"vram": 12, "ram": 4}, "C": {"vram": 8},
                          "D": {"vram": 8}, "E": {"vram": 8, "ram": 20}},
                         capacity={"vram": 24, "ram": 32})
        usage = Usage(recency=recent("A", "B", "C"))
        # only vram is short: A (the oldest) frees none of it and stays
        plan = planner.plan("D", fs("A", "B", "C"), usage)
        self.assertEqual(plan.evict, fs("B"))
        self.assertIn("vram 28 > 24", plan.why("B"))
        # both short: A frees the ram, B then the vram
        plan = planner.plan("E", fs("A", "B", "C"), usage)
        self.assertEqual(plan.evict, fs("A", "B"))
        self.assertIn("ram 34 > 32", plan.reason)

    def test_in_flight_models_last(self) -> None:
        planner = budget({"A": 10, "B": 10, "C": 10, "D": 16})
        usage = Usage(in_flight={"A": 1}, recency=recent("A", "B"))
        self.assertEqual(planner.plan("C", fs("A", "B"), usage).evict, fs("B"))
        # both must go: the busy one is in the plan (the scheduler waits for it), last
        plan = planner.plan("D", fs("A", "B"), usage)
        self.assertEqual(plan.evict, fs("A", "B"))
        self.assertIn("waits", plan.why("A"))
        self.assertIn("idle", plan.why("B"))

    def test_min_resident_models_after_idle_ones(self) -> None:
        planner = budget({"A": 10, "B": 10, "C": 10})
        usage = Usage(young={"A": 12.0}, recency=recent("A", "B"))
        self.assertEqual(planner.plan("C", fs("A", "B"), usage).evict, fs("B"))
        usage = Usage(young={"A": 12.0, "B": 3.0}, recency=recent("A", "B"))
        self.assertEqual(planner.plan("C", fs("A", "B"), usage).evict, fs("A"))  # then LRU again

    def test_persistent_members_last(self) -> None:
        planner = budget({"p1": 10, "a": 10, "c": 10}, persistent=("p1",))
        usage = Usage(recency=recent("p1", "a"))
        self.assertEqual(planner.plan("c", fs("p1", "a"), usage).evict, fs("a"))
        # a busy non-persistent model still goes before a persistent idle one
        self.assertEqual(planner.plan("c", fs("p1", "a"), Usage(in_flight={"a": 2}, recency=recent("p1", "a"))).evict,
                         fs("a"))
        # ... and a persistent member goes when nothing else frees enough
        planner = budget({"p1": 12, "a": 2, "c": 14}, persistent=("p1",))
        plan = planner.plan("c", fs("p1", "a"), usage)
        self.assertEqual(plan.evict, fs("p1", "a"))
        self.assertIn("persistent", plan.why("p1"))

    def test_inner_evictions_free_room_first(self) -> None:
        # the default group swaps: the inner planner already evicts everything
        planner = BudgetPlanner(GroupPlanner([Group("(default)", ("A", "B"))]), {"vram": 24},
                                {"A": {"vram": 20}, "B": {"vram": 20}})
        plan = planner.plan("B", fs("A"))
        self.assertEqual(plan.evict, fs("A"))
        self.assertNotIn("resources.capacity", plan.reason)

    def test_running_target_evicts_nothing_more(self) -> None:
        planner = budget({"A": 10, "B": 10, "C": 10})
        measured = {"A": {"vram": 16}}
        self.assertEqual(planner.plan("A", fs("A", "B"), Usage(measured=measured)).evict, fs())

    def test_measured_footprint_counts_when_larger(self) -> None:
        planner = budget({"A": 8, "B": 8, "C": 8})
        usage = Usage(recency=recent("A", "B"))
        self.assertEqual(planner.plan("C", fs("A", "B"), usage).evict, fs())
        usage = Usage(recency=recent("A", "B"), measured={"B": {"vram": 12}})
        self.assertEqual(planner.footprint("B", usage), {"vram": 12})
        self.assertEqual(planner.plan("C", fs("A", "B"), usage).evict, fs("A"))
        usage = Usage(measured={"B": {"vram": 2}})  # smaller than declared: declared wins
        self.assertEqual(planner.footprint("B", usage), {"vram": 8})

    def test_infeasible(self) -> None:
        planner = budget({"A": 10, "B": 30}, capacity={"vram": 24})
        plan = planner.plan("B", fs("A"))
        self.assertIn("'B' needs 30 of vram (declared), more than resources.capacity.vram (24)", plan.infeasible)
        plan = planner.plan("A", fs(), Usage(measured={"A": {"vram": 25}}))
        self.assertIn("(measured)", plan.infeasible)
        self.assertEqual(planner.plan("A", fs()).infeasible, "")
        # a model already running is served as it is
        self.assertEqual(planner.plan("A", fs("A"), Usage(measured={"A": {"vram": 25}})).infeasible, "")

    def test_sized_amounts_in_messages(self) -> None:
        planner = BudgetPlanner(together("A", "B"), {"vram": 24 * GiB}, {"A": {"vram": 16 * GiB}, "B": {"vram": 16 * GiB}},
                                sized={"vram"})
        self.assertIn("vram 32 GiB > 24 GiB", planner.plan("B", fs("A")).why("A"))

    def test_matrix_inner(self) -> None:
        from llamaswap.config.types import Matrix, MatrixSet
        from types import MappingProxyType

        m = Matrix(MappingProxyType({}), MappingProxyType({}),
                   (MatrixSet("s", "A & B & C", (fs("A", "B", "C"),)),))
        planner = BudgetPlanner(MatrixPlanner(m), {"vram": 24}, {"A": {"vram": 10}, "B": {"vram": 10}, "C": {"vram": 10}})
        self.assertEqual(planner.plan("C", fs("A", "B"), Usage(recency=recent("B", "A"))).evict, fs("B"))

    def test_trim(self) -> None:
        planner = budget({"A": 8, "B": 8, "C": 8})
        usage = Usage(in_flight={"A": 1}, recency=recent("A", "B", "C"))
        self.assertEqual(planner.trim(fs("A", "B", "C"), usage), ())
        planner.capacity["vram"] = 20
        self.assertEqual(planner.trim(fs("A", "B", "C"), usage), ("B",))  # A is busy: never trimmed
        planner.capacity["vram"] = 5
        self.assertEqual(planner.trim(fs("A", "B", "C"), usage), ("B", "C"))
        young = Usage(recency=recent("A", "B", "C"), young={"A": 12.0})
        planner.capacity["vram"] = 20
        self.assertEqual(planner.trim(fs("A", "B", "C"), young), ("B",))  # A within minResident
        # kept models (a swap's target) count towards the use but are never chosen
        self.assertEqual(planner.trim(fs("A", "B", "C"), Usage(recency=recent("A", "B", "C")), keep=fs("A")), ("B",))

    def test_can_coexist(self) -> None:
        planner = budget({"A": 10, "B": 10, "C": 10})
        self.assertTrue(planner.can_coexist(fs("A", "B")))
        self.assertFalse(planner.can_coexist(fs("A", "B", "C")))

    def test_planner_for_config(self) -> None:
        config = load_config_text(textwrap.dedent("""
            resources: {capacity: {vram: 24}}
            groups:
              g: {swap: false, members: [A]}
              p: {persistent: true, exclusive: false, members: [P]}
            models:
              A: {cmd: x, proxy: "http://h:1", resources: {vram: 10}}
              P: {cmd: x, proxy: "http://h:1", resources: {vram: 4}}
              N: {cmd: x, proxy: "http://h:1"}
        """), environ={})
        planner = planner_for_config(config)
        self.assertIsInstance(planner, BudgetPlanner)
        self.assertEqual(planner.persistent, fs("P"))
        self.assertEqual(planner.footprint("N"), {"vram": 0})
        plain = load_config_text("models: {A: {cmd: x, proxy: 'http://h:1'}}\n", environ={})
        self.assertIsInstance(planner_for_config(plain), GroupPlanner)


class Budget(SynchronousTestCase):
    """A scheduler with a budget planner over a dict of states and a Clock."""

    sizes = {"A": 10, "B": 10, "C": 10, "D": 10, "E": 14}
    capacity = 24

    def setUp(self) -> None:
        self.clock = Clock()
        self.states: dict[str, str] = {}
        self.fx = Recorder()
        self.measured: dict = {}
        self.sched = self.make()

    def make(self, **kw: Any) -> Scheduler:
        args: dict[str, Any] = dict(max_wait=60.0, clock=self.clock, measured=self.measured)
        args.update(kw)
        return Scheduler(budget(self.sizes, self.capacity), self.fx, lambda m: self.states.get(m, "stopped"),
                         {m: 10 for m in self.sizes}, **args)

    def finish_swap(self, target: str) -> None:
        swap = self.sched.active_swaps()[target]
        for model in swap.evict:
            self.states[model] = "stopped"
        self.states[target] = "ready"
        self.sched.swap_done(target)

    def serve(self, req: Any, model: str) -> Outcome:
        """One request, served to the end (loading its model when needed)."""
        outcome = self.sched.request(req, model)
        if outcome is STARTED:
            self.finish_swap(model)
        self.sched.serve_done(req)
        return outcome


class SchedulerBudgetTests(Budget):
    def test_a_b_a_c_evicts_b_keeps_a(self) -> None:
        for i, model in enumerate("ABA"):
            self.serve(i, model)
        self.assertEqual(self.fx.of("start_swap"), [("A", fs()), ("B", fs())])
        self.serve(3, "C")
        self.assertEqual(self.fx.of("start_swap")[-1], ("C", fs("B")))
        self.assertIn("least recently used", dict(self.fx.of("evicting"))["B"])
        self.assertEqual({m for m, s in self.states.items() if s == "ready"}, {"A", "C"})

    def test_in_flight_model_never_evicted(self) -> None:
        self.serve(0, "A")
        self.serve(1, "B")
        self.sched.request("busy", "A")  # granted: A now has a request in flight; B is the LRU... no: A is newer
        self.sched.request("busy-b", "B")
        self.assertEqual(self.sched.in_flight("B"), 1)
        # both are busy: C must wait for the least recently used one
        self.assertIs(self.sched.request("c", "C"), QUEUED)
        self.assertIn("in flight", self.sched.queue_snapshot()[0].blocked_by)
        self.sched.serve_done("busy-b")  # B is now idle and the least recently used idle model
        self.assertEqual(self.fx.of("start_swap")[-1], ("C", fs("B")))
        self.assertEqual(self.sched.in_flight("A"), 1)

    def test_min_resident_waits_then_swaps(self) -> None:
        self.sched = self.make(min_resident={m: 30.0 for m in self.sizes})
        self.serve(0, "A")
        self.clock.advance(5)
        self.serve(1, "B")
        self.clock.advance(5)
        self.assertIs(self.sched.request("c", "C"), QUEUED)
        self.assertIn("minResident", self.sched.queue_snapshot()[0].blocked_by)
        self.assertEqual(len(self.fx.of("start_swap")), 2)
        self.clock.advance(19.5)  # A (loaded at 0) is still young
        self.assertEqual(len(self.fx.of("start_swap")), 2)
        self.clock.advance(0.5)  # t=30: A may go; the wake-up call re-plans at once
        self.assertEqual(self.fx.of("start_swap")[-1], ("C", fs("A")))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_min_resident_bounded_by_max_wait(self) -> None:
        self.sched = self.make(min_resident={m: 500.0 for m in self.sizes}, max_wait=60.0)
        self.serve(0, "A")
        self.serve(1, "B")
        self.assertIs(self.sched.request("c", "C"), QUEUED)
        self.clock.advance(59)
        self.assertEqual(len(self.fx.of("start_swap")), 2)
        self.clock.advance(1)  # overdue: minResident no longer holds it back
        self.assertEqual(self.fx.of("start_swap")[-1], ("C", fs("A")))
        self.sched.shutdown()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refuse_policy_503_with_retry_after(self) -> None:
        self.sched = self.make(min_resident={m: 30.0 for m in self.sizes}, swap_policy="refuse")
        self.serve(0, "A")
        self.clock.advance(2.5)
        self.serve(1, "B")
        self.assertIs(self.sched.request("c", "C"), FAILED)
        _, req, status, message, headers = self.fx.calls[-1]
        self.assertEqual((req, status, headers), ("c", 503, {"Retry-After": "28"}))
        self.assertIn(MSG_MIN_RESIDENT, message)
        self.assertIn("'A'", message)
        self.assertEqual(self.sched.admitted("C"), 0)
        # models that fit, and loaded models, are still served at once
        self.assertIs(self.sched.request("a", "A"), GRANTED)
        self.clock.advance(30.5)  # neither is young now
        self.sched.serve_done("a")
        self.assertIs(self.sched.request("c2", "C"), STARTED)
        self.assertEqual(self.fx.of("start_swap")[-1], ("C", fs("B")))  # A was used more recently

    def test_min_resident_also_guards_group_swaps(self) -> None:
        sched = Scheduler(GroupPlanner([Group("(default)", ("A", "B"))]), self.fx,
                          lambda m: self.states.get(m, "stopped"), {"A": 5, "B": 5}, clock=self.clock,
                          min_resident={"A": 10.0})
        self.sched = sched
        self.serve(0, "A")
        self.assertIs(sched.request(1, "B"), QUEUED)
        self.clock.advance(10)
        self.assertEqual(self.fx.of("start_swap")[-1], ("B", fs("A")))

    def test_infeasible_after_measurement_is_503(self) -> None:
        self.serve(0, "A")
        self.measured["E"] = {"vram": 30}
        self.assertIs(self.sched.request(1, "E"), FAILED)
        _, _, status, message, _ = self.fx.calls[-1]
        self.assertEqual(status, 503)
        self.assertIn("resources.capacity.vram", message)

    def test_measured_footprint_changes_the_next_plan(self) -> None:
        self.serve(0, "A")
        self.serve(1, "E")  # 10 + 14 = 24: fits
        self.assertEqual(self.fx.of("start_swap")[-1], ("E", fs()))
        self.states["E"] = "stopped"
        self.sched.model_stopped("E")
        self.measured["A"] = {"vram": 12}  # A turned out bigger than declared
        self.serve(2, "E")
        self.assertEqual(self.fx.of("start_swap")[-1], ("E", fs("A")))

    def test_queued_request_fails_when_it_becomes_infeasible(self) -> None:
        self.serve(0, "A")
        self.serve(1, "B")
        self.sched.request("a", "A")
        self.sched.request("b", "B")
        self.assertIs(self.sched.request("e", "E"), QUEUED)  # both busy
        self.measured["E"] = {"vram": 99}
        self.sched.serve_done("a")
        self.assertEqual(self.fx.of("fail")[-1][:2], ("e", 503))
        self.assertEqual(self.sched.queue_snapshot(), ())

    def test_budgets_reloaded_and_trim(self) -> None:
        for i, model in enumerate("AB"):
            self.serve(i, model)
        self.sched.request("busy", "A")
        limits = {m: 10 for m in self.sizes}  # the same models: a reload that changed budgets only
        self.sched.apply(budget(self.sizes, 12), limits, max_wait=60.0)
        self.assertEqual(self.sched.trim(), fs("B"))  # A is busy
        self.sched.apply(budget(self.sizes, 24), limits, max_wait=60.0, min_resident={"A": 5.0},
                         swap_policy="refuse")
        self.assertEqual(self.sched.trim(), fs())


class BudgetSimulationTests(Budget):
    """Random requests over five models; the router's stops and starts take
    time on the Clock.  At every state change the models not stopped (starting,
    ready, stopping) fit the capacity."""

    sizes = {"A": 6, "B": 8, "C": 10, "D": 12, "E": 14}

    def test_never_over_budget(self) -> None:
        rng = random.Random(14)
        worst: list[int] = [0]
        loads: list[str] = []

        def check() -> None:
            used = sum(self.sizes[m] for m, s in self.states.items() if s != "stopped")
            worst[0] = max(worst[0], used)
            self.assertLessEqual(used, self.capacity, dict(self.states))

        class Router(Recorder):
            def start_swap(fx, target: str, evict: frozenset, reason: str) -> None:
                super().start_swap(target, evict, reason)
                for m in evict:
                    self.states[m] = "stopping"
                check()

                def stopped() -> None:
                    for m in evict:
                        self.states[m] = "stopped"
                    check()
                    self.states[target] = "starting" if self.states.get(target) != "ready" else "ready"
                    loads.append(target)
                    check()
                    self.clock.callLater(rng.uniform(0.5, 2.0), ready)

                def ready() -> None:
                    self.states[target] = "ready"
                    check()
                    self.sched.swap_done(target)

                self.clock.callLater(rng.uniform(0.1, 0.5), stopped)

            def grant(fx, req_id: Any, model: str) -> None:
                super().grant(req_id, model)
                self.clock.callLater(rng.uniform(0.05, 1.0), self.sched.serve_done, req_id)

            def fail(fx, req_id: Any, status: int, message: str, headers: Optional[dict]) -> None:
                raise AssertionError(f"{req_id} failed: {status} {message}")

        self.fx = Router()
        self.sched = self.make(min_resident={m: 1.0 for m in self.sizes})
        for i in range(200):
            self.clock.callLater(rng.uniform(0, 60), self.sched.request, i, rng.choice("ABCDE"))
        for _ in range(100000):
            calls = self.clock.getDelayedCalls()
            if not calls:
                break
            self.clock.advance(max(0.0, min(c.getTime() for c in calls) - self.clock.seconds()))
        self.assertEqual(len(self.fx.of("grant")), 200)
        self.assertEqual(self.sched.queue_snapshot(), ())
        self.assertLessEqual(worst[0], self.capacity)
        self.assertGreater(len(loads), 5)


class ConfigTests(SynchronousTestCase):
    def load(self, text: str):
        return load_config_text(textwrap.dedent(text), environ={})

    def errors(self, text: str) -> list[str]:
        with self.assertRaises(ConfigError) as ctx:
            self.load(text)
        return ctx.exception.errors

    def test_amounts(self) -> None:
        self.assertEqual(parse_amount(24), (24, False))
        self.assertEqual(parse_amount("24GiB"), (24 * GiB, True))
        self.assertEqual(parse_amount("1.5 gib"), (int(1.5 * GiB), True))
        self.assertEqual(parse_amount("8GB"), (8 * 10 ** 9, True))
        self.assertEqual(parse_amount("512KiB"), (512 * 1024, True))
        self.assertEqual(parse_amount("-1"), (-1, False))
        for bad in ("x", "3 XB", "", True, None, [1]):
            self.assertIsNone(parse_amount(bad), bad)
        self.assertEqual(format_amount(24 * GiB, True), "24 GiB")
        self.assertEqual(format_amount(7, False), "7")

    def test_keys_load(self) -> None:
        c = self.load("""
            resources:
              capacity: {vram: 24GiB, ram: 64GB, slots: 3}
            swapPolicy: refuse
            models:
              a: {cmd: x, proxy: "http://h:1", resources: {vram: 10GiB, slots: 1}, minResident: 30s}
              b: {cmd: x, proxy: "http://h:1", minResident: 5}
              c: {cmd: x, proxy: "http://h:1"}
        """)
        self.assertEqual(dict(c.resources.capacity), {"vram": 24 * GiB, "ram": 64 * 10 ** 9, "slots": 3})
        self.assertEqual(c.resources.sized, fs("vram", "ram"))
        self.assertEqual(c.swap_policy, "refuse")
        self.assertEqual(dict(c.models["a"].resources), {"vram": 10 * GiB, "slots": 1})
        self.assertEqual((c.models["a"].min_resident, c.models["b"].min_resident), (30.0, 5.0))
        self.assertEqual((dict(c.models["c"].resources), c.models["c"].min_resident), ({}, 0.0))
        self.assertEqual(c.warnings, ())
        default = self.load("models: {}\n")
        self.assertEqual((default.swap_policy, bool(default.resources)), ("wait", False))

    def test_located_errors(self) -> None:
        errors = self.errors("""
            resources:
              capacity: {vram: 24, ram: -2, "bad name": 1}
            swapPolicy: sometimes
            models:
              a:
                cmd: x
                proxy: "http://h:1"
                resources: {vram: 30, disk: 1, slots: 2 XB}
                minResident: soon
              b: {cmd: x, proxy: "http://h:1", resources: {vram: -1}, minResident: -3}
        """)
        self.assertEqual(errors, [
            "resources.capacity.ram (line 3): must be >= 0 (got -2)",
            "resources.capacity.bad name (line 3): resource name 'bad name' must be 1-64 letters, digits, "
            "'_', '.' or '-'",
            "swapPolicy (line 4): must be one of: wait, refuse (got 'sometimes')",
            "models.a.resources.slots (line 9): must be a number or a size such as 24GiB, 512MiB, 8GB "
            "(got '2 XB')",
            "models.a.resources.vram (line 9): 'a' alone needs 30 of vram, more than resources.capacity.vram (24)",
            "models.a.resources.disk (line 9): unknown resource 'disk' (resources.capacity defines: vram)",
            "models.a.minResident (line 10): must be a number of seconds or a duration such as 30s, 2m "
            "(got 'soon')",
            "models.b.resources.vram (line 11): must be >= 0 (got -1)",
            "models.b.minResident (line 11): must be >= 0",
        ])

    def test_resources_without_capacity(self) -> None:
        errors = self.errors("models: {a: {cmd: x, proxy: 'http://h:1', resources: {vram: 1}}}\n")
        self.assertEqual(errors, ["models.a.resources.vram (line 1): unknown resource 'vram' "
                                  "(resources.capacity defines: none)"])

    def test_unit_mismatch_and_plain_vram_warn(self) -> None:
        c = self.load("""
            resources: {capacity: {vram: 24, gpu1: 12GiB}}
            models:
              a: {cmd: x, proxy: "http://h:1", resources: {gpu1: 10}}
        """)
        self.assertEqual(len(c.warnings), 2)
        self.assertIn("resources.capacity.vram (line 2): is a plain number (24): GPU memory measured", c.warnings[0])
        self.assertIn("models.a.resources.gpu1 (line 4): is a plain number but resources.capacity.gpu1 has a "
                      "size suffix", c.warnings[1])

    def test_budgets_only_reload_detection(self) -> None:
        base = """
            resources: {capacity: {vram: %s}}
            models:
              a: {cmd: %s, proxy: "http://h:1", resources: {vram: %s}}
        """
        old = self.load(base % (24, "x", 10))
        self.assertTrue(budgets_only(old, self.load(base % (20, "x", 12))))
        self.assertFalse(budgets_only(old, self.load(base % (24, "x", 10))))
        self.assertFalse(budgets_only(old, self.load(base % (20, "y", 10))))
        self.assertTrue(budgets_only(old, self.load((base % (24, "x", 10)) + "    swapPolicy: refuse\n")))


class FakeProcess:
    def __init__(self, model: str, pid: Optional[int], state: str = "ready") -> None:
        self.model = SimpleNamespace(id=model)
        self.pid = pid
        self.state = state


class FootprintTests(SynchronousTestCase):
    config_text = """
        resources: {capacity: {vram: 24GiB, gpu1: 16GiB, ram: 64GiB, slots: 4}}
        models:
          A: {cmd: x, proxy: "http://h:1", resources: {vram: 8GiB}}
          B: {cmd: x, proxy: "http://h:1"}
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.config = load_config_text(textwrap.dedent(self.config_text), environ={})
        self.processes = {"A": FakeProcess("A", 100), "B": FakeProcess("B", 200)}
        self.usage = {100: {0: 6 * GiB, 1: 6 * GiB}, 200: {}}
        self.gpu = FakeGpu(lambda pgid: self.usage.get(pgid), linger=3)
        self.events: list = []
        self.fp = Footprints(self.clock, self.config, self.processes, self.gpu,
                             publish=lambda kind, data: self.events.append((kind, data)))
        self.addCleanup(self.fp.close)

    def test_sampled_when_ready_and_periodically(self) -> None:
        self.fp.ready(self.processes["A"])
        self.assertEqual(self.fp.measured["A"], {"vram": 12 * GiB, "gpu1": 6 * GiB})
        self.assertEqual(self.fp.planned("A"), {"vram": 12 * GiB, "gpu1": 6 * GiB, "ram": 0, "slots": 0})
        self.assertEqual(self.fp.record("A")["measured"], {"vram": 12 * GiB, "gpu0": 6 * GiB, "gpu1": 6 * GiB})
        self.assertEqual(self.fp.record("A")["declared"], {"vram": 8 * GiB})
        self.assertEqual(self.events[0][0], "footprint")
        self.assertNotIn("measured", self.fp.record("B"))
        self.usage[100] = {0: 9 * GiB}  # grows: the peak per GPU is kept
        self.clock.advance(30)
        self.assertEqual(self.fp.measured["A"]["vram"], 15 * GiB)
        self.assertEqual(self.gpu.samples, [100, 100, 200])

    def test_outgrowing_the_declaration_is_logged_once(self) -> None:
        from twisted.logger import globalLogPublisher

        seen: list = []
        observer = lambda event: seen.append(event) if "more than it declares" in event.get("log_format", "") else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.fp.ready(self.processes["A"])
        self.fp.ready(self.processes["A"])
        self.clock.advance(30)
        # gpu1 too: A declares none of it
        self.assertEqual([(e["model"], e["resource"]) for e in seen], [("A", "vram"), ("A", "gpu1")])

    def test_start_waits_for_released_memory(self) -> None:
        self.fp.ready(self.processes["A"])
        self.assertTrue(self.fp.released().called)  # nothing stopped: at once
        self.fp.stopped("A")
        d = self.fp.released()
        self.assertFalse(d.called)  # NVML still lists A's process
        self.clock.advance(0.1)
        self.clock.advance(0.1)
        self.assertFalse(d.called)
        self.clock.advance(0.1)  # the fake driver let go after three polls
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # only the periodic sampling
        self.assertTrue(self.fp.released().called)

    def test_release_wait_is_bounded(self) -> None:
        self.gpu.linger = 10 ** 6  # never let go
        self.fp.ready(self.processes["A"])
        self.fp.stopped("A")
        d = self.fp.released()
        self.clock.pump([0.1] * 48)
        self.assertFalse(d.called)
        self.clock.pump([0.1] * 2)  # 5 s after the stop
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # only the periodic sampling

    def test_release_wait_bounded_when_nvml_never_answers(self) -> None:
        from twisted.internet.defer import Deferred

        self.fp.ready(self.processes["A"])
        self.fp.stopped("A")
        self.gpu.holding = lambda pids: Deferred()  # a wedged driver: no answer, ever
        d = self.fp.released()
        self.clock.advance(4.9)
        self.assertFalse(d.called)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))

    def test_no_new_sample_while_one_is_pending(self) -> None:
        from twisted.internet.defer import Deferred

        pending: list = []
        self.gpu.sample = lambda pid: pending.append(pid) or Deferred()
        self.fp.ready(self.processes["A"])
        self.clock.advance(30)
        self.clock.advance(30)
        self.assertEqual(pending, [100, 200])  # one each, never piled up

    def test_cancel_and_close(self) -> None:
        self.gpu.linger = 10 ** 6
        self.fp.ready(self.processes["A"])
        self.fp.stopped("A")
        first, second = self.fp.released(), self.fp.released()
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.fp.close()
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_sampler_or_no_capacity_measures_nothing(self) -> None:
        fp = Footprints(self.clock, self.config, self.processes, None)
        fp.ready(self.processes["A"])
        self.assertEqual(fp.measured, {})
        plain = load_config_text("models: {A: {cmd: x, proxy: 'http://h:1'}}\n", environ={})
        fp = Footprints(self.clock, plain, self.processes, self.gpu)
        fp.ready(self.processes["A"])
        self.assertEqual((fp.measured, fp.record("A"), self.gpu.samples), ({}, None, []))

    def test_sampler_unavailable(self) -> None:
        gpu = FakeGpu(lambda pgid: None)
        fp = Footprints(self.clock, self.config, self.processes, gpu)
        fp.ready(self.processes["A"])
        fp.stopped("A")
        self.assertEqual(fp.measured, {})
        self.assertTrue(fp.released().called)
        fp.close()


class FakeNvml:
    """Just enough of pynvml for the sampler."""

    class NVMLError(Exception):
        pass

    NVML_VALUE_NOT_AVAILABLE_ulonglong = 2 ** 64 - 1

    def __init__(self, devices: list, fail_init: bool = False) -> None:
        self.devices = devices  # per GPU: (compute [(pid, bytes)], graphics [(pid, bytes)])
        self.fail_init = fail_init
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def _procs(self, pairs: list) -> list:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in pairs]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list:
        return self._procs(self.devices[handle][0])

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list:
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return self._procs(self.devices[handle][1])


def run_now(f, *args):
    """``run_blocking`` for tests: call at once."""
    return defer.maybeDeferred(f, *args)


class NvmlSamplerTests(SynchronousTestCase):
    def test_sums_the_process_group_per_gpu(self) -> None:
        nvml = FakeNvml([
            ([(10, 4 * GiB), (11, 1 * GiB), (99, 7 * GiB)], [(10, 4 * GiB)]),  # 10 in both lists: once
            ([(11, 2 * GiB), (12, None)], []),
            ([(99, 1 * GiB)], []),
        ])
        sampler = NvmlFootprintSampler(nvml, run_now, find_pids=lambda pgid: frozenset({10, 11, 12}))
        usage = self.successResultOf(sampler.sample(10))
        self.assertEqual(usage, GroupUsage(frozenset({10, 11, 12}), {0: 5 * GiB, 1: 2 * GiB}))
        self.assertEqual(usage.total, 7 * GiB)
        self.assertEqual(self.successResultOf(sampler.holding(frozenset({12, 13}))), frozenset({12}))
        self.assertEqual(nvml.inits, 1)

    def test_degrades_without_nvml(self) -> None:
        nvml = FakeNvml([], fail_init=True)
        sampler = NvmlFootprintSampler(nvml, run_now, find_pids=lambda pgid: frozenset())
        self.assertIsNone(self.successResultOf(sampler.sample(1)))
        self.assertIsNone(self.successResultOf(sampler.sample(1)))
        self.assertEqual(self.successResultOf(sampler.holding(frozenset({1}))), frozenset())
        self.assertEqual(nvml.inits, 1)  # the failure is remembered

    def test_real_pynvml_on_this_machine_degrades_cleanly(self) -> None:
        sampler = NvmlFootprintSampler(run_blocking=run_now)
        usage = self.successResultOf(sampler.sample(os.getpgrp()))
        self.assertTrue(usage is None or isinstance(usage, GroupUsage))

    def test_group_pids(self) -> None:
        self.assertIn(os.getpid(), group_pids(os.getpgrp()))
