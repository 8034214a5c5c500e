"""Client states off the heap (issue 31): written per round as the round touched them, read back when drawn, the
same results as states kept in memory, and a bit-identical resume from the incremental checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fcmoe.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fcmoe.config import load_config
from fcmoe.experiment import prepare_experiment
from fcmoe.sim import engine
from fcmoe.sim.client_states import ClientStates
from fcmoe.sim.engine import run_method

TINY = ["model.name=tiny-bert-moe", "model.num_experts=4", "model.trainable_layers=2", "data.train_per_class=8",
        "data.test_per_class=3", "data.max_length=32", "partition.num_clients=4", "partition.min_partition_size=6",
        "rounds=4", "train.batch_size=8", "participation.fraction=0.5", "fcmoe.decay=0.3"]
METHODS = ["fcmoe", "localexperts", "pflmoe", "fedmoe"]


@pytest.fixture(scope="module")
def exp():  # type: ignore[no-untyped-def]
    return prepare_experiment(load_config(overrides=[*TINY, f"methods={METHODS!r}"]))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_states_on_disk_give_the_results_of_states_in_memory(exp, tmp_path: Path, method: str) -> None:  # type: ignore[no-untyped-def]
    """Two of four clients a round: with a checkpoint folder the others' states live on disk; the final model and
    every row's scores equal those of a run that keeps every state in memory; each round's clients file holds the
    clients it drew or scored, and nobody else."""
    _, in_memory = run_method(exp, method, tmp_path / "memory.jsonl")
    writes: list[tuple[set[int], set[int], set[int]]] = []
    real = engine.save_checkpoint

    def save(folder: Path, checkpoint: Checkpoint) -> None:
        real(folder, checkpoint)
        name = f"clients-r{checkpoint.round}.safetensors"
        written = set()  # a clients file no state refers to (no tensors in it) is not kept
        if (folder / name).is_file():
            with safe_open(str(folder / name), "pt") as file:
                written = {int(k.split("/")[0].removeprefix("client")) for k in file.keys()}
        row = checkpoint.row
        touched = set(row["participants"]) | {c for c, acc in enumerate(row["local_acc"]) if acc is not None}
        holders = {c for c, f in enumerate(checkpoint.client_files or []) if f == name}
        writes.append((written, touched, holders))

    engine.save_checkpoint = save
    try:
        _, on_disk = run_method(exp, method, tmp_path / "disk.jsonl", checkpoint_dir=tmp_path / "checkpoint")
    finally:
        engine.save_checkpoint = real
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in in_memory)
    keys = ("global_acc", "local_acc", "train_loss", "participants")
    assert [{k: r[k] for k in keys} for r in _rows(tmp_path / "disk.jsonl")] == \
        [{k: r[k] for k in keys} for r in _rows(tmp_path / "memory.jsonl")]
    for written, touched, holders in writes[1:]:  # round 1 also writes everyone's initial (tensor-free) state
        assert written <= touched and written == holders


def test_a_resume_from_incremental_checkpoints_is_bit_identical(exp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Stopped after round 2's checkpoint, resumed: the same final model and rows as an uninterrupted run."""
    _, whole = run_method(exp, "fcmoe", tmp_path / "whole.jsonl", checkpoint_dir=tmp_path / "a")
    real = engine.save_checkpoint

    def stop_after_round_2(folder: Path, checkpoint: Checkpoint) -> None:
        real(folder, checkpoint)
        if checkpoint.round == 2:
            raise KeyboardInterrupt

    engine.save_checkpoint = stop_after_round_2
    try:
        with pytest.raises(KeyboardInterrupt):
            run_method(exp, "fcmoe", tmp_path / "resumed.jsonl", checkpoint_dir=tmp_path / "b")
    finally:
        engine.save_checkpoint = real
    assert load_checkpoint(tmp_path / "b", "fcmoe").client_files is not None
    _, resumed = run_method(exp, "fcmoe", tmp_path / "resumed.jsonl", checkpoint_dir=tmp_path / "b")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert [r["local_acc"] for r in _rows(tmp_path / "resumed.jsonl")] == \
        [r["local_acc"] for r in _rows(tmp_path / "whole.jsonl")]


def test_a_client_drawn_after_50_rounds_away_gets_its_state_back(tmp_path: Path) -> None:
    """Client 3's state, written in round 1, is read back whole in round 52 after 50 rounds of others; only
    the files the newest checkpoint and the one before refer to are kept (each client's newest, and client 0's
    before its newest, which round 50's entry names)."""
    store = ClientStates([{"seed": i} for i in range(5)], folder=tmp_path, resident=False)
    mine = {"seed": 3, "head": {"w": torch.randn(3, 4), "b": torch.arange(3)}, "step": 7}
    store[3].update(mine)
    save_checkpoint(tmp_path, store.checkpoint(Checkpoint("m", 1, {"g": torch.zeros(1)}, [], {})))
    assert store.in_memory == 0
    for round_index in range(2, 52):
        cid = round_index % 3  # clients 0, 1, 2 take turns
        store[cid]["head"] = {"w": torch.full((3, 4), float(round_index)), "b": torch.zeros(3)}
        save_checkpoint(tmp_path, store.checkpoint(Checkpoint("m", round_index, {"g": torch.zeros(1)}, [], {})))
    back = store[3]
    assert back["seed"] == 3 and back["step"] == 7
    assert torch.equal(back["head"]["w"], mine["head"]["w"]) and torch.equal(back["head"]["b"], mine["head"]["b"])
    kept = sorted(p.name for p in tmp_path.glob("clients-r*.safetensors"))
    assert kept == [f"clients-r{t}.safetensors" for t in (1, 48, 49, 50, 51)]  # round 50's entry had r48
    resumed = load_checkpoint(tmp_path, "m")
    again = ClientStates(resumed.client_states, resumed.client_files, tmp_path, resident=False)[3]
    assert torch.equal(again["head"]["w"], mine["head"]["w"])
