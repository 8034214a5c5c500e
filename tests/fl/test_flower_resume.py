"""A Flower run whose ServerApp dies after a random round resumes from its checkpoint, with the clients' state on
their nodes, and ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fcmoe.config import load_config
from fcmoe.fl import server_app
from fcmoe.runner import run_experiment
from tests.helpers import FLOWER_TINY


class ServerDied(RuntimeError):
    """The ServerApp's death, injected after a round's checkpoint."""


@pytest.mark.slow
def test_a_killed_flower_server_resumes_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [*FLOWER_TINY, "rounds=3", "methods=['fcmoe']", "partition.num_clients=4", "partition.alpha=0.1"]
    config = dataclasses.replace(load_config(overrides=overrides), engine="flower")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir(), resumed.mkdir()
    run_experiment(config, whole, show_progress=False)
    kill_after = random.Random(19).randint(1, config.rounds - 1)
    save = server_app.save_checkpoint

    def save_then_die(folder: Path, checkpoint: object) -> None:
        save(folder, checkpoint)
        if checkpoint.round == kill_after:  # type: ignore[attr-defined]
            raise ServerDied(f"killed after round {kill_after}")

    with monkeypatch.context() as patch:
        patch.setattr(server_app, "save_checkpoint", save_then_die)
        with pytest.raises(RuntimeError):
            run_experiment(config, resumed, show_progress=False)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, kill_after + 1))  # it died where we killed it
    assert not (resumed / "summary.json").is_file()
    run_experiment(config, resumed, show_progress=False)  # the same folder again: the runner resumes it
    expected = load_file(str(whole / "model-fcmoe.safetensors"))
    got = load_file(str(resumed / "model-fcmoe.safetensors"))
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    reference = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row, ref in zip(rows, reference, strict=True):
        for field in ("global_acc", "local_acc", "train_loss", "bytes_up", "bytes_down", "conflict_rate_per_layer",
                      "retention_ratio_per_layer"):
            assert row[field] == ref[field], (row["round"], field)
    # the round after the kill started from a residual: it can only have come back from the node's disk
    assert any(v > 0 for v in reference[kill_after]["retention_ratio_per_layer"].values())
