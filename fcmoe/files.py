"""Writing a file so that a reader never sees it half-written, whoever else writes it at the same time."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, flushed to disk, then renamed over ``path``.

    The temporary name is this call's own (process id and a random part, ending ``.tmp``), so two processes
    writing the same file — nodes sharing a cache folder — never write into each other's; a failed write leaves
    no temporary file behind.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
