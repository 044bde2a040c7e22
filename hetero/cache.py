"""Where hetero keeps what it writes for itself (the demo model, `hetero probe` results)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$HETERO_CACHE, else ~/.cache/hetero."""
    return Path(os.environ.get("HETERO_CACHE") or Path.home() / ".cache" / "hetero")
