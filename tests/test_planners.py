"""Tests for llamaswap.router.planners."""

from types import MappingProxyType

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config.types import Group, Matrix, MatrixSet, Routing
from llamaswap.router.planners import GroupPlanner, MatrixPlanner, Plan, planner_for


def fs(*models: str) -> frozenset:
    return frozenset(models)


def matrix(*sets: tuple, costs: dict | None = None) -> Matrix:
    return Matrix(
        vars=MappingProxyType({}),
        evict_costs=MappingProxyType(costs or {}),
        sets=tuple(MatrixSet(name, name, tuple(frozenset(a) for a in alts))
                   for name, alts in sets),
    )


class GroupPlannerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.groups = (
            Group("swapper", ("a1", "a2", "a3"), swap=True, exclusive=True),
            Group("together", ("b1", "b2"), swap=False, exclusive=True),
            Group("side", ("c1", "c2"), swap=True, exclusive=False),
            Group("pinned", ("p1", "p2"), swap=True, exclusive=False, persistent=True),
            Group("(default)", ("d1", "d2"), swap=True, exclusive=True),
        )
        self.planner = GroupPlanner(self.groups)

    def test_swap_within_group(self) -> None:
        plan = self.planner.plan("a1", fs("a2", "a3"))
        self.assertEqual(plan.evict, fs("a2", "a3"))
        self.assertIn("swaps", plan.why("a2"))

    def test_target_itself_never_evicted(self) -> None:
        self.assertEqual(self.planner.plan("a1", fs("a1")).evict, fs())

    def test_no_swap_keeps_group_members(self) -> None:
        self.assertEqual(self.planner.plan("b1", fs("b2")).evict, fs())

    def test_exclusive_evicts_other_groups(self) -> None:
        plan = self.planner.plan("b1", fs("b2", "a1", "c1", "d1"))
        self.assertEqual(plan.evict, fs("a1", "c1", "d1"))
        self.assertIn("exclusive", plan.why("c1"))

    def test_persistent_shielded_from_other_groups(self) -> None:
        self.assertEqual(self.planner.plan("a1", fs("p1", "a2")).evict, fs("a2"))
        self.assertEqual(self.planner.plan("d1", fs("p1", "p2")).evict, fs())

    def test_persistent_still_swaps_within_its_group(self) -> None:
        self.assertEqual(self.planner.plan("p1", fs("p2", "a1")).evict, fs("p2"))

    def test_non_exclusive_evicts_nothing_outside(self) -> None:
        # one-way: loading from a non-exclusive group leaves the others alone
        self.assertEqual(self.planner.plan("c1", fs("a1", "d1", "b1")).evict, fs())
        self.assertEqual(self.planner.plan("c1", fs("c2", "a1")).evict, fs("c2"))

    def test_exclusive_evicts_non_exclusive_one_way(self) -> None:
        # ... but loading from an exclusive group, "(default)" too, evicts them
        self.assertEqual(self.planner.plan("d1", fs("c1")).evict, fs("c1"))
        self.assertEqual(self.planner.plan("a1", fs("c2")).evict, fs("c2"))

    def test_default_group(self) -> None:
        self.assertEqual(self.planner.plan("d1", fs("d2", "a1", "p1")).evict, fs("d2", "a1"))

    def test_target_in_no_group_runs_alone(self) -> None:
        plan = self.planner.plan("x", fs("a1", "c1", "p1", "d1"))
        self.assertEqual(plan.evict, fs("a1", "c1", "d1"))
        self.assertIn("no group", plan.reason)

    def test_running_model_in_no_group_evicted_by_exclusive(self) -> None:
        self.assertEqual(self.planner.plan("a1", fs("x")).evict, fs("x"))
        self.assertEqual(self.planner.plan("c1", fs("x")).evict, fs())

    def test_plan_explains_itself(self) -> None:
        plan = self.planner.plan("a1", fs("a2", "d1"))
        self.assertIsInstance(plan, Plan)
        self.assertEqual(plan.target, "a1")
        self.assertIn("'a2'", plan.reason)
        self.assertIn("'d1'", plan.reason)
        self.assertEqual(plan.why("b1"), "")
        self.assertIn("evict 'a2'", plan.explain())
        self.assertIn("nothing", self.planner.plan("a1", fs()).reason)

    def test_can_coexist(self) -> None:
        self.assertTrue(self.planner.can_coexist(fs("b1", "b2")))
        self.assertTrue(self.planner.can_coexist(fs("b1", "p1")))
        self.assertFalse(self.planner.can_coexist(fs("a1", "a2")))
        self.assertFalse(self.planner.can_coexist(fs("c1", "d1")))  # d1 evicts c1


class MatrixPlannerTests(SynchronousTestCase):
    def test_target_running_evicts_nothing(self) -> None:
        planner = MatrixPlanner(matrix(("s", [{"a"}, {"b"}])))
        plan = planner.plan("a", fs("a", "b"))
        self.assertEqual(plan.evict, fs())
        self.assertIn("already running", plan.reason)

    def test_minimum_cost(self) -> None:
        planner = MatrixPlanner(matrix(
            ("s1", [{"t", "a"}]),
            ("s2", [{"t", "b", "c"}]),
            costs={"a": 1, "b": 5, "c": 5},
        ))
        # s1 evicts b + c (10); s2 evicts a (1)
        plan = planner.plan("t", fs("a", "b", "c"))
        self.assertEqual(plan.evict, fs("a"))
        self.assertEqual(plan.alternative, fs("t", "b", "c"))
        self.assertEqual(plan.alternative_of, "s2")
        self.assertEqual(plan.cost, 1)
        self.assertIn("s2", plan.why("a"))

    def test_default_evict_cost_is_one(self) -> None:
        planner = MatrixPlanner(matrix(
            ("s1", [{"t", "a"}]),
            ("s2", [{"t", "b", "c"}]),
            costs={"a": 3},
        ))
        self.assertEqual(planner.plan("t", fs("a", "b", "c")).evict, fs("b", "c"))

    def test_tie_goes_to_first_set(self) -> None:
        planner = MatrixPlanner(matrix(
            ("first", [{"t", "a"}]),
            ("second", [{"t", "b"}]),
        ))
        plan = planner.plan("t", fs("a", "b"))
        self.assertEqual(plan.evict, fs("b"))
        self.assertEqual(plan.alternative_of, "first")

    def test_tie_goes_to_first_alternative(self) -> None:
        planner = MatrixPlanner(matrix(("s", [{"t", "b"}, {"t", "a"}])))
        plan = planner.plan("t", fs("a", "b"))
        self.assertEqual(plan.evict, fs("a"))
        self.assertEqual(plan.alternative, fs("t", "b"))

    def test_subset_semantics(self) -> None:
        planner = MatrixPlanner(matrix(("s", [{"t", "a", "b"}, {"c"}])))
        plan = planner.plan("t", fs("c"))
        # only c goes; a and b are not started (they are not part of the evict set
        # and nothing else is reported to start)
        self.assertEqual(plan.evict, fs("c"))
        self.assertEqual(plan.alternative, fs("t", "a", "b"))
        self.assertEqual(planner.plan("t", fs("a")).evict, fs())

    def test_target_in_no_set_evicts_all(self) -> None:
        planner = MatrixPlanner(matrix(("s", [{"a", "b"}])))
        plan = planner.plan("x", fs("a", "b"))
        self.assertEqual(plan.evict, fs("a", "b"))
        self.assertIsNone(plan.alternative)
        self.assertIn("no matrix set", plan.reason)

    def test_nothing_running(self) -> None:
        planner = MatrixPlanner(matrix(("s", [{"a"}])))
        self.assertEqual(planner.plan("a", fs()).evict, fs())

    def test_can_coexist(self) -> None:
        planner = MatrixPlanner(matrix(("s", [{"a", "b"}, {"c"}])))
        self.assertTrue(planner.can_coexist(fs("a", "b")))
        self.assertTrue(planner.can_coexist(fs("a")))
        self.assertFalse(planner.can_coexist(fs("a", "c")))


class PlannerForTests(SynchronousTestCase):
    def test_group(self) -> None:
        groups = (Group("g", ("a",)),)
        planner = planner_for(Routing(router="group", groups=groups))
        self.assertIsInstance(planner, GroupPlanner)
        self.assertEqual(planner.groups, groups)

    def test_matrix(self) -> None:
        m = matrix(("s", [{"a"}]))
        planner = planner_for(Routing(router="matrix", matrix=m))
        self.assertIsInstance(planner, MatrixPlanner)

    def test_matrix_missing(self) -> None:
        self.assertRaises(ValueError, planner_for, Routing(router="matrix"))

    def test_unknown(self) -> None:
        self.assertRaises(ValueError, planner_for, Routing(router="magic"))
