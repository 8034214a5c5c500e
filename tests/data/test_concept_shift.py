"""partition.concept_shift: a seeded share of clients sees permuted labels in train and local test, never in the
global test set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fcmoe.config import ConfigError, PartitionConfig, load_config
from fcmoe.data.partition import Partition, partition_pool
from fcmoe.experiment import prepare_experiment
from tests.helpers import TINY

LABELS = np.repeat(np.arange(5), 80)  # 400 rows, 5 classes


def _partition(seed: int, share: float = 0.3) -> Partition:
    config = PartitionConfig(num_clients=10, alpha=1.0, min_partition_size=5, concept_shift=share)
    return partition_pool(LABELS, config, 0.2, seed=seed)


def _maps(seed: int) -> dict[int, list[int]]:
    part = _partition(seed)
    return {cid: m.tolist() for cid, m in part.label_maps.items()}


def test_the_shift_is_seeded_and_moves_every_label_a_shifted_client_holds() -> None:
    assert _maps(0) == _maps(0) and _maps(0) != _maps(1)
    part = _partition(0)
    assert len(part.label_maps) == 3  # round(0.3 · 10) clients
    for cid, mapping in part.label_maps.items():
        assert sorted(mapping.tolist()) == list(range(5))  # a permutation of the labels
        held = np.unique(LABELS[part.clients[cid].train])
        assert all(mapping[label] != label for label in held)  # every label it holds changes
        assert all(mapping[label] == label for label in set(range(5)) - set(held.tolist()) - set(mapping[held]))
    unshifted = _partition(0, share=0.0)
    assert not unshifted.label_maps
    # the shift does not change who holds which documents
    for a, b in zip(part.clients, unshifted.clients, strict=True):
        assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)


def test_concept_shift_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"partition.concept_shift = 1.0: must be in \[0, 1\)"):
        load_config(overrides=["partition.concept_shift=1.0"])


def test_shift_applies_to_train_and_local_test_alike_and_never_to_the_global_test(tmp_path: Path) -> None:
    shifted = prepare_experiment(load_config(overrides=[*TINY, "partition.concept_shift=0.5"]))
    plain = prepare_experiment(load_config(overrides=TINY))
    maps = shifted.partition.label_maps
    assert len(maps) == 2
    assert torch.equal(shifted.global_test.labels, plain.global_test.labels)  # canonical labels
    for cid in range(4):
        for ours, theirs in ((shifted.client_train[cid], plain.client_train[cid]),
                             (shifted.client_test[cid], plain.client_test[cid])):
            expected = torch.from_numpy(maps[cid][theirs.labels.numpy()]) if cid in maps else theirs.labels
            assert torch.equal(ours.labels, expected)
            assert torch.equal(ours.features, theirs.features)
        if cid in maps:
            assert not torch.equal(shifted.client_train[cid].labels, plain.client_train[cid].labels)
    shifted.partition.save(tmp_path / "partition.json", shifted.pool.labels, shifted.pool.label_names)
    saved = json.loads((tmp_path / "partition.json").read_text())["concept_shift"]
    assert sorted(int(c) for c in saved) == sorted(maps)  # the run folder says which clients were shifted
