"""Pathological and natural partitions, their errors, and the partition heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fcmoe.config import ConfigError, PartitionConfig, load_config
from fcmoe.data.corpus import DataError
from fcmoe.data.partition import partition_pool
from fcmoe.plots import partition_heatmap

LABELS = np.repeat(np.arange(5), 40)  # 200 documents, 5 classes


def _client_rows(part) -> list[np.ndarray]:  # noqa: ANN001
    return [np.concatenate([c.train, c.test]) for c in part.clients]


def test_pathological_gives_each_client_exactly_k_classes() -> None:
    part = partition_pool(LABELS, PartitionConfig("pathological", num_clients=5, classes_per_client=2), 0.2, seed=0)
    for rows in _client_rows(part):
        assert np.unique(LABELS[rows]).size == 2
    every = np.concatenate(_client_rows(part))
    assert np.unique(every).size == every.size  # no document twice


def test_pathological_needs_that_many_classes() -> None:
    with pytest.raises(DataError, match="classes_per_client = 6 exceeds the 5 classes"):
        partition_pool(LABELS, PartitionConfig("pathological", num_clients=5, classes_per_client=6), 0.2, seed=0)


def test_natural_gives_each_group_its_own_client() -> None:
    groups = {"site": np.array([f"site-{i % 4}" for i in range(LABELS.size)], dtype=object)}
    part = partition_pool(LABELS, PartitionConfig("natural", num_clients=4, by="site"), 0.2, seed=0, groups=groups)
    for cid, rows in enumerate(_client_rows(part)):
        assert set(groups["site"][rows]) == {f"site-{cid}"}  # client id = rank of the sorted group value
    assert sum(r.size for r in _client_rows(part)) == LABELS.size


def test_natural_errors_name_the_fix() -> None:
    groups = {"site": np.array([f"site-{i % 4}" for i in range(LABELS.size)], dtype=object)}
    with pytest.raises(DataError, match=r"partition.by = 'topic'.*this source has: site"):
        partition_pool(LABELS, PartitionConfig("natural", num_clients=4, by="topic"), 0.2, seed=0, groups=groups)
    with pytest.raises(ConfigError, match="partition.by is empty"):
        PartitionConfig("natural", num_clients=4)


def test_an_impossible_dirichlet_draw_names_the_fix() -> None:
    labels = np.repeat(np.arange(4), 100)  # 4 classes at α = 0.1: most draws starve some of 10 clients
    with pytest.raises(DataError, match="raise partition.alpha, lower partition.min_partition_size"):
        partition_pool(labels, PartitionConfig(num_clients=10, alpha=0.1, min_partition_size=10), 0.2, seed=0)


def test_a_client_left_without_training_data_is_named() -> None:
    groups = {"site": np.array(["big"] * (LABELS.size - 1) + ["lonely"], dtype=object)}
    with pytest.raises(DataError, match="left client 1 with 1 document"):
        partition_pool(LABELS, PartitionConfig("natural", num_clients=2, by="site", min_partition_size=2), 0.2,
                       seed=0, groups=groups)


@pytest.mark.parametrize(("override", "match"), [
    ("partition.alpha=0", "partition.alpha = 0"),
    ("partition.kind='shards'", "partition.kind = 'shards'"),
    ("data.name='imdb'", "data.name = 'imdb'"),
    ("data.name='csv'", "data.path is empty"),
    ("data.path='x.csv'", "does not apply to the offline source '20ng'"),
    ("data.labels=['a']", "apply to local files only"),
    ("data.name='csv' data.path='x.csv' data.labels=['a','a']", "lists a class twice"),
    ("data.holdout_fraction=1.5", "data.holdout_fraction = 1.5"),
])
def test_bad_data_and_partition_config_is_one_line(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=override.split(" "))


def test_partition_heatmap_is_a_png(tmp_path: Path) -> None:
    counts = np.array([[5, 0, 1], [0, 7, 2]])
    path = partition_heatmap(counts, ["a", "b", "c"], tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2_000
    with pytest.raises(ValueError, match="counts must be"):
        partition_heatmap(counts, ["a", "b"], tmp_path / "q.png")
