"""Non-IID partitions of the training pool over clients (flwr-datasets partitioners), saved for reuse.

The partition is computed once per experiment and shared by every method: the same documents on the same
clients, each client's share split train / test (80 / 20 by default) with a fixed seed.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from fcmoe.data.config import PartitionConfig
from fcmoe.data.corpus import DataError

log = logging.getLogger(__name__)


class PartitionError(DataError):
    """The draw of this seed and α cannot give every client enough documents (another cell of a sweep may)."""


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
    # concept shift: client id → its label map ([num_labels], canonical label → the label this client sees)
    label_maps: dict[int, np.ndarray] = field(default_factory=dict)

    def client_labels(self, client: int, labels: np.ndarray) -> np.ndarray:
        """``labels`` as client ``client`` sees them (unchanged unless it is concept-shifted)."""
        mapping = self.label_maps.get(client)
        return labels if mapping is None else mapping[labels]

    def histograms(self, labels: np.ndarray) -> dict[str, list[list[int]]]:
        """Per client, counts of each label in its train and test rows."""
        def hist(rows: np.ndarray) -> list[int]:
            return np.bincount(labels[rows], minlength=self.num_labels).tolist()
        return {"train": [hist(c.train) for c in self.clients], "test": [hist(c.test) for c in self.clients]}

    def save(self, path: Path, labels: np.ndarray, label_names: list[str]) -> None:
        payload = {"label_names": label_names,
                   "clients": [{"train": c.train.tolist(), "test": c.test.tolist()} for c in self.clients],
                   "histograms": self.histograms(labels),
                   "concept_shift": {str(cid): {label_names[a]: label_names[b] for a, b in enumerate(m.tolist())
                                                if a != b} for cid, m in sorted(self.label_maps.items())}}
        path.write_text(json.dumps(payload))


def partition_pool(labels: np.ndarray, config: PartitionConfig, test_fraction: float, seed: int,
                   groups: Mapping[str, np.ndarray] | None = None) -> Partition:
    """Split the pool's rows over clients, then each client's rows into train / test.

    Parameters
    ----------
    labels
        ``[n]`` integer labels of the training pool.
    config
        ``kind`` "dirichlet": per-class Dirichlet(α·1_N) proportions (``DirichletPartitioner``, redrawn until every
        client has ``min_partition_size`` rows); "iid": uniform (``IidPartitioner``); "pathological": exactly
        ``classes_per_client`` classes each (``PathologicalPartitioner``, first class deterministic as in Li et
        al. 2021, rows of classes no client drew are left out); "natural": clients split by the group column ``by``
        (``NaturalIdPartitioner``): one group each, a few groups each, or a group shared by a few clients, as
        ``num_clients`` compares with the number of groups (:func:`natural_clients`).
    test_fraction
        Share of each client's rows held out as its local test split (at least one row each side).
    seed
        Seeds the partitioner and the train / test split.
    groups
        The corpus's group columns (``TextCorpus.groups``), for "natural".

    Raises
    ------
    DataError
        More clients than rows, a natural partition whose group column does not exist, or a client left with fewer
        than 2 rows (no train or no test data).
    """
    num_clients = config.num_clients
    if num_clients * config.min_partition_size > labels.size:
        raise DataError(f"partition.num_clients = {num_clients} × min_partition_size {config.min_partition_size} "
                        f"exceeds the {labels.size} documents of the pool; lower num_clients or raise "
                        "data.train_per_class")
    columns: dict[str, list] = {"label": labels.tolist(), "row": list(range(labels.size))}
    partitioner = _partitioner(config, labels, groups or {}, seed, columns)
    partitioner.dataset = datasets.Dataset.from_dict(columns)
    with warnings.catch_warnings():  # flwr-datasets warns each time it redraws to honour min_partition_size
        warnings.simplefilter("ignore", UserWarning)
        try:
            rows_per_client = [np.array(partitioner.load_partition(cid)["row"], dtype=np.int64)
                               for cid in range(num_clients)]
        except ValueError as err:  # DirichletPartitioner gives up after 10 draws below min_partition_size
            if "max number of attempts" not in str(err):
                raise
            raise PartitionError(f"partition: 10 Dirichlet draws with alpha = {config.alpha} all left a client "
                                 f"below min_partition_size = {config.min_partition_size} ({labels.size} documents, "
                                 f"{np.unique(labels).size} classes, {num_clients} clients); raise partition.alpha, "
                                 "lower partition.min_partition_size or add data (data.train_per_class)") from None
    rng = np.random.default_rng(seed)
    clients = []
    for cid in range(num_clients):
        rows = rng.permutation(rows_per_client[cid])
        if rows.size < 2:
            raise PartitionError(f"partition.kind = {config.kind!r} left client {cid} with {rows.size} "
                                 "document(s), too few to train and test; use fewer clients, more data "
                                 "(data.train_per_class) or a larger partition.alpha")
        n_test = min(max(int(round(test_fraction * rows.size)), 1), rows.size - 1)
        clients.append(ClientSplit(train=np.sort(rows[n_test:]), test=np.sort(rows[:n_test])))
    num_labels = int(labels.max()) + 1
    return Partition(clients, num_labels, concept_shift_maps(clients, labels, num_labels, config.concept_shift, seed))


def concept_shift_maps(clients: list[ClientSplit], labels: np.ndarray, num_labels: int, share: float,
                       seed: int) -> dict[int, np.ndarray]:
    """Feature–label conflict: ``round(share · N)`` clients (at least one when ``share > 0``), drawn with ``seed``,
    each get a derangement of the labels it holds in its train split.

    A shifted client's labels are put in a seeded random order and each is renamed to the next one in that
    order (a cycle, so every label it holds changes and the documents of one class stay together). A client that
    holds a single label swaps it with a random other label. Returns client id → ``[num_labels]`` map.
    """
    if share <= 0 or num_labels < 2:
        return {}
    rng = np.random.default_rng([seed, 0x5EED])  # its own stream: the partition itself is unchanged by the shift
    count = max(1, int(round(share * len(clients))))
    maps = {}
    for cid in sorted(rng.choice(len(clients), size=count, replace=False).tolist()):
        held = np.unique(labels[clients[cid].train])
        if held.size < 2:
            others = np.setdiff1d(np.arange(num_labels), held)
            held = np.concatenate([held, rng.choice(others, size=1)])
        order = rng.permutation(held)
        mapping = np.arange(num_labels)
        mapping[order] = np.roll(order, -1)  # order[j] → order[j + 1]
        maps[cid] = mapping
    return maps


def _partitioner(config: PartitionConfig, labels: np.ndarray, groups: Mapping[str, np.ndarray], seed: int,
                 columns: dict[str, list]) -> Partitioner:
    """The flwr-datasets partitioner of ``config.kind``; "natural" adds its group column to ``columns``."""
    if config.kind == "dirichlet":
        return DirichletPartitioner(num_partitions=config.num_clients, partition_by="label", alpha=config.alpha,
                                    min_partition_size=config.min_partition_size, self_balancing=False,
                                    shuffle=True, seed=seed)
    if config.kind == "iid":
        return IidPartitioner(num_partitions=config.num_clients)
    if config.kind == "pathological":
        num_classes = int(np.unique(labels).size)
        if config.classes_per_client > num_classes:
            raise DataError(f"partition.classes_per_client = {config.classes_per_client} exceeds the {num_classes} "
                            "classes of the data; lower it")
        return PathologicalPartitioner(num_partitions=config.num_clients, partition_by="label",
                                       num_classes_per_partition=config.classes_per_client,
                                       class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
    if config.by not in groups:
        have = ", ".join(groups) or "none"
        raise DataError(f"partition.by = {config.by!r}: natural partitions need a group column of the data "
                        f"(this source has: {have}; local files: set data.group_column)")
    columns["client"] = natural_clients(groups[config.by], config.num_clients, seed).tolist()
    return NaturalIdPartitioner(partition_by="client")


def natural_clients(values: np.ndarray, num_clients: int, seed: int) -> np.ndarray:
    """``[n]`` client of each row when clients are split by the group ``values`` (sorted distinct values g = 0…G−1).

    N = G: client c holds group c. N < G: client c holds the groups g with g mod N = c (a few each). N > G: group g
    is shared by the clients c with c mod G = g, its rows dealt to them in a seeded random order (each client one
    group, each group ⌊N/G⌋ or ⌈N/G⌉ clients); a group with fewer than 2 rows per client is a :class:`DataError`.
    """
    distinct = sorted(set(values.tolist()))
    group = np.array([distinct.index(v) for v in values.tolist()], dtype=np.int64)  # [n] g of each row
    if num_clients <= len(distinct):
        return group % num_clients
    rng = np.random.default_rng([seed, 0xC11E])
    clients = np.empty_like(group)
    for g in range(len(distinct)):
        owners = np.arange(g, num_clients, len(distinct))  # the clients of group g
        rows = rng.permutation(np.flatnonzero(group == g))
        if rows.size < 2 * owners.size:
            raise PartitionError(f"partition.kind = 'natural': group {distinct[g]!r} has {rows.size} document(s) for "
                                 f"{owners.size} clients (at least 2 each); use fewer clients or more data")
        clients[rows] = owners[np.arange(rows.size) % owners.size]
    return clients
