"""Routing: swap planners, the swap scheduler, and (elsewhere) the routers
that carry out the scheduler's effects."""

from llamaswap.router.planners import (BudgetPlanner, GroupPlanner, MatrixPlanner, Plan, Planner, Usage,
                                       planner_for, planner_for_config)
from llamaswap.router.scheduler import Effects, Outcome, QueueEntry, Scheduler, SwapInfo

__all__ = [
    "BudgetPlanner", "Effects", "GroupPlanner", "MatrixPlanner", "Outcome", "Plan", "Planner",
    "QueueEntry", "Scheduler", "SwapInfo", "Usage", "planner_for", "planner_for_config",
]
