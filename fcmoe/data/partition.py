"""Non-IID partitions of the training pool over clients (flwr-datasets partitioners), saved for reuse.

The partition is computed once per experiment and shared by every method: the same documents on the same
clients, each client's share split train / test (80 / 20 by default) with a fixed seed.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

log = logging.getLogger(__name__)


@dataclass
class ClientSplit:
    """Row indices into the training pool of one client."""

    train: np.ndarray
    test: np.ndarray


@dataclass
class Partition:
    """Every client's rows and the label histograms that describe the skew."""

    clients: list[ClientSplit]
    num_labels: int

    def histograms(self, labels: np.ndarray) -> dict[str, list[list[int]]]:
        """Per client, counts of each label in its train and test rows."""
        def hist(rows: np.ndarray) -> list[int]:
            return np.bincount(labels[rows], minlength=self.num_labels).tolist()
        return {"train": [hist(c.train) for c in self.clients], "test": [hist(c.test) for c in self.clients]}

    def save(self, path: Path, labels: np.ndarray, label_names: list[str]) -> None:
        payload = {"label_names": label_names,
                   "clients": [{"train": c.train.tolist(), "test": c.test.tolist()} for c in self.clients],
                   "histograms": self.histograms(labels)}
        path.write_text(json.dumps(payload))


def partition_pool(labels: np.ndarray, kind: str, num_clients: int, alpha: float, min_partition_size: int,
                   test_fraction: float, seed: int) -> Partition:
    """Split the pool's rows over clients, then each client's rows into train / test.

    Parameters
    ----------
    labels
        ``[n]`` integer labels of the training pool.
    kind
        "dirichlet": per-class Dirichlet(α·1_N) proportions (flwr-datasets ``DirichletPartitioner``, redrawn until
        every client has ``min_partition_size`` rows); "iid": uniform (``IidPartitioner``).
    test_fraction
        Share of each client's rows held out as its local test split (at least one row each side).

    Raises
    ------
    ValueError
        More clients than rows, or a client left without train or test data.
    """
    if num_clients * min_partition_size > labels.size:
        raise ValueError(f"partition.num_clients = {num_clients} × min_partition_size {min_partition_size} exceeds "
                         f"the {labels.size} documents of the pool; lower num_clients or raise data.train_per_class")
    dataset = datasets.Dataset.from_dict({"label": labels.tolist(), "row": list(range(labels.size))})
    if kind == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha,
                                           min_partition_size=min_partition_size, self_balancing=False,
                                           shuffle=True, seed=seed)
    else:
        partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = dataset
    with warnings.catch_warnings():  # flwr-datasets warns each time it redraws to honour min_partition_size
        warnings.simplefilter("ignore", UserWarning)
        rows_per_client = [np.array(partitioner.load_partition(cid)["row"], dtype=np.int64)
                           for cid in range(num_clients)]
    rng = np.random.default_rng(seed)
    clients = []
    for cid in range(num_clients):
        rows = rng.permutation(rows_per_client[cid])
        n_test = int(round(test_fraction * rows.size))
        if rows.size < 2:
            raise ValueError(f"client {cid} got {rows.size} documents; raise partition.min_partition_size")
        n_test = min(max(n_test, 1), rows.size - 1)
        clients.append(ClientSplit(train=np.sort(rows[n_test:]), test=np.sort(rows[:n_test])))
    return Partition(clients, int(labels.max()) + 1)
