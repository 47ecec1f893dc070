"""Routing: swap planners, the swap scheduler, and (elsewhere) the routers
that carry out the scheduler's effects."""

from llamaswap.router.planners import GroupPlanner, MatrixPlanner, Plan, Planner, planner_for
from llamaswap.router.scheduler import Effects, Outcome, QueueEntry, Scheduler, SwapInfo

__all__ = [
    "Effects", "GroupPlanner", "MatrixPlanner", "Outcome", "Plan", "Planner",
    "QueueEntry", "Scheduler", "SwapInfo", "planner_for",
]
