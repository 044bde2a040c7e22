"""`hetero bench`: placements and peers measured side by side on one model, with the planner's
predictions beside them, written as a table, JSON and charts."""
