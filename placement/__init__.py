"""Placement planner: memory and cost model, expert popularity, plans (`hetero plan`)."""
