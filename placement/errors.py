"""The error a user gets when no plan can be made or read: a budget too small for the parts
every token needs, a malformed size or rule, an unknown weight type, a plan of another version."""

from hetero.errors import HeteroError


class PlacementError(HeteroError):
    """No plan can be made (or read) from these inputs; the message says what would fix it."""
