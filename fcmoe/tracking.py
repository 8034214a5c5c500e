"""Experiment tracking: the rows of ``metrics.jsonl`` mirrored to TensorBoard as they are written.

``metrics.jsonl`` stays the record; a tracker reads the rows appended since it last looked (:meth:`sync`) and logs
every number of each as a scalar at step = the row's round, one TensorBoard run per method
(``<run folder>/tensorboard/<method>``). Nested values become tags of their own: ``conflict_rate_per_layer/<layer>``,
``local_acc/client_<i>``; text, booleans, missing and NaN values are skipped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fcmoe.config_sections import ConfigError, TrackingConfig

_ID_LISTS = frozenset({"clients", "participants", "failed"})  # client ids, not per-client values


class TensorBoardTracker:
    """Logs new ``metrics.jsonl`` rows of a run folder to TensorBoard event files under ``<run>/tensorboard/``.

    Parameters
    ----------
    run_dir
        The run folder; its ``metrics.jsonl`` is read, ``tensorboard/`` written.
    """

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tracking.backend = 'tensorboard' needs the tensorboard package: pip install "
                              "tensorboard (or fcmoe[tracking])") from None
        self._writer_class = SummaryWriter
        self._metrics = run_dir / "metrics.jsonl"
        self._folder = run_dir / "tensorboard"
        self._writers: dict[str, Any] = {}
        # rows already in the file belong to an earlier process, which logged them
        self._offset = self._metrics.stat().st_size if self._metrics.is_file() else 0

    def sync(self) -> int:
        """Log the rows appended since the last call; return how many."""
        if not self._metrics.is_file():
            return 0
        with open(self._metrics, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a row still being written waits for the next call
        self._offset += len(complete)
        rows = [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
        for row in rows:
            writer = self._writer(str(row.get("method", "run")))
            for tag, value in scalars(row):
                writer.add_scalar(tag, value, global_step=int(row.get("round", 0)))
        for writer in self._writers.values():
            writer.flush()
        return len(rows)

    def close(self) -> None:
        self.sync()
        for writer in self._writers.values():
            writer.close()

    def _writer(self, method: str) -> Any:
        if method not in self._writers:
            self._writers[method] = self._writer_class(str(self._folder / re.sub(r"[^A-Za-z0-9._-]", "_", method)))
        return self._writers[method]


def scalars(row: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite number in ``row``, nested mappings and lists flattened into tags."""
    for key, value in row.items():
        if key in ("round", "method") or key in _ID_LISTS:
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                yield tag, float(value)
        elif isinstance(value, Mapping):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, list) and all(isinstance(v, (int, float)) or v is None for v in value):
            yield from scalars({f"client_{i}": v for i, v in enumerate(value)}, f"{tag}/")


def make_tracker(config: TrackingConfig, run_dir: Path) -> TensorBoardTracker | None:
    """The tracker ``config`` asks for (``None``: no tracking)."""
    return TensorBoardTracker(run_dir) if config.backend == "tensorboard" else None
