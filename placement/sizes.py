"""Memory sizes as users write them (`24GiB`, `24G`, `512MB`, `80%`) and as the planner prints
them (GiB with one decimal)."""

from __future__ import annotations

import re

from placement.errors import PlacementError

MIB = 1024**2
GIB = 1024**3
# Single letters are binary, as in docker and ulimit: memory is sold in GiB.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*|%)\s*$", re.IGNORECASE)


def parse_size(text: str, whole_bytes: int | None = None, what: str = "size") -> int:
    """Bytes in `text`: a number with an optional unit, or a percentage of `whole_bytes`."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or (unit != "%" and unit not in _UNITS):
        raise PlacementError(
            f"malformed {what} {text!r}; write e.g. 24GiB, 24G, 512MiB, 64GB or 80%"
        )
    value = float(match.group(1))
    if unit == "%":
        if whole_bytes is None:
            raise PlacementError(f"{what} {text!r}: a percentage needs a known total")
        if value > 100:
            raise PlacementError(f"{what} {text!r} is more than 100%")
        return int(whole_bytes * value / 100)
    return int(value * _UNITS[unit])


def gib(nbytes: float) -> str:
    """`nbytes` for messages and tables: GiB with one decimal ('12.3 GiB'); sizes under a
    GiB in MiB or KiB, so a tiny model's figures do not read as zero."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return "0 GiB" if nbytes == 0 else f"{nbytes:.0f} B"
