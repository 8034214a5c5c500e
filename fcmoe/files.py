"""Writing files safely: so that a reader never sees one half-written, whoever else writes it at the same time, and
secrets so that only their owner can read them."""

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


def write_private(path: Path, data: bytes) -> None:
    """Write a secret (a private key, an authentication key) readable by its owner only: mode 0600 from the
    moment the file exists, whatever the umask."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
        fh.write(data)
