"""Placement planner: which tensor groups of a model go to the GPU, to pinned DRAM or stay on
disk, how much memory each device needs and how fast the result will run (`hetero plan`).
`load_plan(path)` reads a saved plan for the runtime."""

from placement.errors import PlacementError
from placement.plan import PLAN_VERSION, Plan, load_plan

__all__ = ["PLAN_VERSION", "Plan", "PlacementError", "load_plan"]
