"""A SuperNode's settings (its ``--node-config``) and its ClientApp process clock: stdlib and psutil only.

Kept apart from :mod:`fcmoe.fl.node_state` (safetensors, torch) because the ClientApp process that only forwards
a message to the node's worker (:mod:`fcmoe.fl.node_worker`) imports this and nothing heavy: Flower starts one
such process per message, so every import here is paid per message.

Node config keys (``flower-supernode --node-config "partition-id=0 state-dir='/srv/fcmoe'"``):

- ``partition-id``: which client this node is (Flower's simulation sets it too);
- ``state-dir``: where the node keeps its clients' state, its warm caches and its worker's socket (default
  ``<fcmoe cache>/node-state``);
- ``warm-cache``: ``false`` = every ClientApp process featurises the experiment again;
- ``warm-worker``: ``true`` = a node-resident worker process holds the prepared experiment and the ClientApp only
  forwards to it; ``false`` = the ClientApp process does the work itself. Default: a worker exactly where Flower
  starts a process per message (the ``flwr-clientapp`` program); Flower's simulation keeps its ClientApp in a
  long-lived Ray actor, which needs none;
- ``worker-idle-s``: a worker with no message for this long exits (default 1800); it also exits when its SuperNode
  does.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from fcmoe.cache import cache_dir

PARTITION_ID = "partition-id"
STATE_DIR = "state-dir"
WARM_CACHE = "warm-cache"
WARM_WORKER = "warm-worker"
WORKER_IDLE_S = "worker-idle-s"
NODE_STATE = "node-state"  # context.state (not node config): where this node keeps its client's state (small metadata)
DEFAULT_WORKER_IDLE_S = 1800.0
_FALSE = {"false", "0", "no", "off"}


def node_config(client_id: int, num_clients: int) -> str:
    """A SuperNode's ``--node-config`` for client ``client_id`` of ``num_clients``."""
    return f"{PARTITION_ID}={client_id} num-partitions={num_clients}"


def partition_id(node_config: Mapping[str, Any]) -> int:
    """The client a node is, from its node config (Flower's simulation sets it; a SuperNode is started with
    ``--node-config "partition-id=N"``)."""
    if PARTITION_ID not in node_config:
        raise ValueError(f"this node has no {PARTITION_ID!r} in its node config: start the SuperNode with "
                         f'--node-config "{PARTITION_ID}=N"')
    return _number(node_config, PARTITION_ID, int, "a client index, e.g. partition-id=0")


def node_root(node_config: Mapping[str, Any]) -> Path:
    """The node's state folder: node config ``state-dir``, else ``<fcmoe cache>/node-state``."""
    return Path(str(node_config.get(STATE_DIR) or cache_dir() / "node-state"))


def _flag(node_config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = node_config.get(key, default)
    return value if isinstance(value, bool) else str(value).strip().lower() not in _FALSE


def warm_cache_enabled(node_config: Mapping[str, Any]) -> bool:
    """Whether this node caches the experiment's frozen features (node config ``warm-cache``, default true)."""
    return _flag(node_config, WARM_CACHE, True)


def warm_worker_enabled(node_config: Mapping[str, Any]) -> bool:
    """Whether this ClientApp forwards to the node's worker (node config ``warm-worker``; default: only in a
    process Flower started for this one message)."""
    return _flag(node_config, WARM_WORKER, os.name == "posix" and Path(sys.argv[0]).name == "flwr-clientapp")


def worker_idle_s(node_config: Mapping[str, Any]) -> float:
    """Seconds without a message after which the node's worker exits (node config ``worker-idle-s``)."""
    return _number({WORKER_IDLE_S: DEFAULT_WORKER_IDLE_S, **node_config}, WORKER_IDLE_S, float,
                   "seconds, e.g. worker-idle-s=1800")


def _number(node_config: Mapping[str, Any], key: str, kind: type, expected: str) -> Any:  # noqa: ANN401 - kind
    """``kind(node_config[key])``; a value that is not one is a ValueError naming the key and what it takes."""
    value = node_config[key]
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"node config {key} = {value!r}: expected {expected}") from None


class PhaseClock:
    """Seconds per phase of one ClientApp message.

    ``start`` (process creation to the first fcmoe import) and ``imports`` are counted on a process's first
    message only; ``begin``/``mark``/``finish`` time the rest. A worker's clock begins each message with the phases
    its forwarding ClientApp process measured (``begin(pending)``).
    """

    def __init__(self, imported_at: float, ready_at: float) -> None:
        self._pending = {"start": max(imported_at - process_started_at(), 0.0), "imports": ready_at - imported_at}
        self._phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def pending(self) -> dict[str, float]:
        """What the next message will count for this process's start and imports (then zero)."""
        pending, self._pending = self._pending, {"start": 0.0, "imports": 0.0}
        return pending

    def begin(self, pending: Mapping[str, float] | None = None) -> None:
        self._phases = dict(self.pending() if pending is None else pending)
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self._phases[phase] = now - self._last
        self._last = now

    def finish(self) -> dict[str, float]:
        return dict(self._phases)


def process_started_at() -> float:
    """When this process was created (seconds since the epoch)."""
    return psutil.Process().create_time()
