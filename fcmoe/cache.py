"""fcmoe's on-disk cache: ``$FCMOE_CACHE`` or ``~/.cache/fcmoe`` (offline assets, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where wheels, extracted files and compiled kernels are kept: ``$FCMOE_CACHE`` or ``~/.cache/fcmoe``."""
    return Path(os.environ.get("FCMOE_CACHE") or Path.home() / ".cache" / "fcmoe")
