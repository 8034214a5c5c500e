"""One line for every failure the command line can meet: what went wrong, which value or file, and the fix.

:func:`explain` turns an exception into that line and an exit code (2: the input is wrong and nothing ran; 1: the
work stopped); :func:`progress_line` says how far a run folder got and how to continue it. ``FCMOE_DEBUG=1`` in
the environment shows the traceback instead, for a bug report. A stop from outside (:func:`stops_interrupt`: a
scheduler's SIGTERM) ends a command the way Ctrl-C does, and :func:`interruption` words both.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from fcmoe.checkpoint import CheckpointError, checkpointed_round
from fcmoe.config import ConfigError
from fcmoe.data.assets import AssetError
from fcmoe.errors import Stopped, first_line

DEBUG_VARIABLE = "FCMOE_DEBUG"


def debugging() -> bool:
    """Whether the user asked for tracebacks (``FCMOE_DEBUG=1``)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip() not in {"", "0", "false", "no"}


STOP_SIGNALS = (signal.SIGTERM,)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    for stop in STOP_SIGNALS:  # a second signal during the clean-up would cut the one line short
        signal.signal(stop, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def stops_interrupt() -> Iterator[None]:
    """Within: a :data:`STOP_SIGNALS` signal raises :class:`Stopped` (the main thread only: elsewhere nothing
    changes); the previous handlers come back on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {stop: signal.signal(stop, _raise_stopped) for stop in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def interruption(err: KeyboardInterrupt) -> tuple[str, int]:
    """(the start of the stderr line, exit code) of an interrupted command: Ctrl-C is "interrupted" (130), a stop
    signal names itself (128 + its number: 143 for SIGTERM, as a shell reports it)."""
    if isinstance(err, Stopped):
        return f"fcmoe: stopped by {signal.Signals(err.signum).name}", 128 + err.signum
    return "fcmoe: interrupted", 130


def explain(err: BaseException) -> tuple[str, int]:
    """(one line for stderr, exit code) for ``err``; the line starts with ``fcmoe:``."""
    if isinstance(err, ConfigError):
        return f"fcmoe: config error: {err}", 2
    if isinstance(err, CheckpointError):
        return f"fcmoe: error: {err}", 1
    if isinstance(err, OSError) or _disk_full(err):
        return f"fcmoe: error: {describe_os_error(err)}", 1
    if isinstance(err, (ValueError, FileNotFoundError, LookupError, AssetError)):
        return f"fcmoe: error: {first_line(err)}", 1
    return (f"fcmoe: internal error: {type(err).__name__}: {first_line(err)} (rerun with {DEBUG_VARIABLE}=1 for "
            "the traceback, and please report it)"), 1


def describe_os_error(err: BaseException) -> str:
    """A file-system failure in words: the path, what the system said, and what to do about it."""
    path = getattr(err, "filename", None)
    where = f" {path}" if path else ""
    if _disk_full(err):
        return f"no space left on the device while writing{where}; free some space and run the command again"
    code = getattr(err, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: permission denied; choose a folder you can write (--out DIR)"
    if code == errno.ENOENT:
        return f"no such file or folder:{where or ' (unnamed)'}"
    if code == errno.EISDIR:
        return f"{path} is a folder where a file was expected"
    reason = getattr(err, "strerror", None) or first_line(err)
    return f"could not read or write{where}: {reason}"


def progress_line(run_dir: Path, command: str = "fcmoe run") -> str:
    """How far the run in ``run_dir`` got, and the command (``command --resume``) that continues it."""
    from fcmoe.runs import load_summaries  # the run-folder reader, only when there is a folder to read

    try:
        done = list(load_summaries(run_dir))
        checkpoint = checkpointed_round(run_dir / "checkpoint")
    except (CheckpointError, ValueError, OSError):
        done, checkpoint = [], None
    parts = []
    if done:
        parts.append(f"finished: {', '.join(done)}")
    if checkpoint:
        parts.append(f"{checkpoint[0]} checkpointed after round {checkpoint[1]}")
    where = f" ({'; '.join(parts)})" if parts else ""
    return f"run folder {run_dir}{where}; continue with: {command} --resume {run_dir}"


def _disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)
