"""Warm clients: a ClientApp process that starts afresh reads the experiment's frozen features from the node's
disk instead of featurising again, and gets the very same tensors; a damaged cache is recomputed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
import torch

import fcmoe.experiment as experiment
from fcmoe.config import load_config
from fcmoe.fl import client_work
from fcmoe.fl.node_settings import STATE_DIR, WARM_CACHE, PhaseClock
from fcmoe.fl.node_state import NodeStateStore
from tests.helpers import TINY


@pytest.fixture
def featurize_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = experiment.featurize

    def counting(model, ids, mask, labels, **options):  # noqa: ANN001, ANN003, ANN202 - featurize's own signature
        calls.append(len(ids))
        return real(model, ids, mask, labels, **options)

    monkeypatch.setattr(experiment, "featurize", counting)
    return calls


def _new_process_experiment(config_text: str, node_config: dict) -> experiment.Experiment:
    client_work._experiment.cache_clear()  # what a fresh ClientApp process starts with
    return client_work._experiment(config_text, client_work.warm_folder(node_config, config_text))


def test_the_second_message_of_a_client_does_not_rebuild_its_features(tmp_path: Path,
                                                                        featurize_calls: list[int]) -> None:
    config_text = tomli_w.dumps(load_config(overrides=TINY).to_dict())
    node = {STATE_DIR: str(tmp_path)}
    first = _new_process_experiment(config_text, node)
    assert len(featurize_calls) == 2  # the pool and the global test set
    second = _new_process_experiment(config_text, node)
    assert len(featurize_calls) == 2  # read from the node's disk
    for a, b in [(first.global_test, second.global_test), *zip(first.client_train, second.client_train, strict=True),
                 *zip(first.client_test, second.client_test, strict=True)]:
        assert torch.equal(a.features, b.features) and torch.equal(a.mask, b.mask)
        assert torch.equal(a.labels, b.labels)
    other = tomli_w.dumps(load_config(overrides=[*TINY, "seed=1"]).to_dict())
    _new_process_experiment(other, node)
    assert len(featurize_calls) == 4  # another experiment has its own cache
    _new_process_experiment(config_text, {**node, WARM_CACHE: False})
    assert len(featurize_calls) == 6  # warm-cache = false: every process featurises
    client_work._experiment.cache_clear()


def test_a_damaged_feature_cache_is_recomputed_and_replaced(tmp_path: Path, featurize_calls: list[int]) -> None:
    config_text = tomli_w.dumps(load_config(overrides=TINY).to_dict())
    node = {STATE_DIR: str(tmp_path)}
    good = _new_process_experiment(config_text, node)
    cached = client_work.warm_folder(node, config_text) / "pool.safetensors"
    cached.write_bytes(cached.read_bytes()[:100])  # truncated, as by a full disk
    again = _new_process_experiment(config_text, node)
    assert len(featurize_calls) == 3 and torch.equal(again.client_train[0].features, good.client_train[0].features)
    _new_process_experiment(config_text, node)
    assert len(featurize_calls) == 3  # the rewritten file is good again
    assert sorted(p.name for p in cached.parent.iterdir()) == [".lock", "global-test.safetensors", "pool.safetensors"]
    client_work._experiment.cache_clear()


def test_phase_times_are_recorded_per_message(tmp_path: Path) -> None:
    clock = PhaseClock(imported_at=100.0, ready_at=103.5)
    store = NodeStateStore(tmp_path, "k", 0)
    for round_index in (1, 2):
        clock.begin()
        clock.mark("setup")
        clock.mark("work")
        store.record_phases("train", round_index, clock.finish())
    rows = [json.loads(line) for line in (store.folder / "phases.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["imports"] == 3.5
    assert rows[1]["start"] == 0.0 and rows[1]["imports"] == 0.0  # a process's start counts once
    assert set(rows[0]) == {"message", "round", "start", "imports", "setup", "work"}


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_message(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          featurize_calls: list[int]) -> None:
    def full_disk(tensors, filename) -> None:  # noqa: ANN001 - save_file's own signature
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(experiment, "save_file", full_disk)
    config_text = tomli_w.dumps(load_config(overrides=TINY).to_dict())
    node = {STATE_DIR: str(tmp_path)}
    exp = _new_process_experiment(config_text, node)
    assert len(featurize_calls) == 2 and len(exp.client_train) == 4
    assert [p.name for p in client_work.warm_folder(node, config_text).iterdir()] == [".lock"]  # no temporary
    client_work._experiment.cache_clear()


def test_a_node_keeps_the_feature_caches_of_its_last_few_experiments(tmp_path: Path) -> None:
    import os

    from fcmoe.fl.node_state import WARM_KEEP, use_warm_folder

    for age in range(WARM_KEEP + 2):  # older and older experiments' caches
        old = tmp_path / "warm" / f"old{age}"
        old.mkdir(parents=True)
        (old / "pool.safetensors").write_bytes(b"x")
        os.utime(old, (1e9 - age, 1e9 - age))
    folder = use_warm_folder(tmp_path, "new")
    kept = sorted(p.name for p in (tmp_path / "warm").iterdir())
    assert folder.is_dir() and kept == sorted(["new", *(f"old{age}" for age in range(WARM_KEEP - 1))])
    use_warm_folder(tmp_path, "old2")  # used again: it is recent now, so old1 is the least recently used
    use_warm_folder(tmp_path, "newer")
    assert sorted(p.name for p in (tmp_path / "warm").iterdir()) == ["new", "newer", "old0", "old2"]


def test_pruning_tolerates_a_cache_another_node_deletes_meanwhile(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from fcmoe.fl import node_state

    for name in ("a", "b", "c", "d", "e"):
        (tmp_path / "warm" / name).mkdir(parents=True)
    real_stat, seen = Path.stat, []

    def vanishing(self: Path, *args: object, **kwargs: object) -> object:
        if self.name == "c":  # listed as a folder, then removed by another node before its time is read
            seen.append(self)
            if len(seen) > 1:
                raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", vanishing)
    folder = node_state.use_warm_folder(tmp_path, "new")
    monkeypatch.undo()
    assert len(seen) == 2  # its time was asked for, and it was gone
    assert folder.is_dir() and not (tmp_path / "warm" / "c").exists()  # counted as the oldest: pruned


def test_nodes_take_turns_to_featurise_until_the_cache_is_complete(tmp_path: Path) -> None:
    import fcntl
    import threading

    from fcmoe.experiment import FEATURE_FILES
    from fcmoe.fl.node_state import one_featurises

    entered = threading.Event()

    def prepare() -> None:
        with one_featurises(tmp_path):
            entered.set()

    with open(tmp_path / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another node is featurising
        waiting = threading.Thread(target=prepare)
        waiting.start()
        assert not entered.wait(0.5)
    assert entered.wait(30)  # its turn once the other is done
    waiting.join()
    for name in FEATURE_FILES:
        (tmp_path / name).write_bytes(b"features")
    entered.clear()
    with open(tmp_path / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        prepare()  # a complete cache: no turn to wait for
    assert entered.is_set()
