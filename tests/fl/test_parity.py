"""The Flower engine (simulation runtime, Ray) gives the in-process engine's results: same algorithms, same math."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fcmoe.config import load_config
from fcmoe.experiment import prepare_experiment
from fcmoe.runner import run_experiment
from fcmoe.sim.engine import run_method
from tests.helpers import FLOWER_TINY

EVERY_METHOD = "methods=['fedavg','fcmoe','fedadam','fedmoe','hfedmoe','localexperts','fcmoe/pairwise','pflmoe']"
SPARSE_METHODS = "methods=['fedavg','fcmoe','fedmoe','localexperts']"  # those whose uploads sparsity changes


# the sparse variant and the participation test are Flower simulations too (Ray, ~2 min each): make test-slow
@pytest.mark.parametrize("sparse", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["dense", "sparse-uploads"])
def test_flower_simulation_equals_in_process(sparse: bool, tmp_path: Path) -> None:
    config = load_config(overrides=[*FLOWER_TINY, f"sparse_uploads={str(sparse).lower()}",
                                    SPARSE_METHODS if sparse else EVERY_METHOD])
    exp = prepare_experiment(config)
    in_process = {m: run_method(exp, m, tmp_path / "in-process.jsonl")[1] for m in config.methods}
    flower_dir = tmp_path / "flower"
    flower_dir.mkdir()
    progress: list[tuple[str, int, int]] = []
    summaries = run_experiment(dataclasses.replace(config, engine="flower"), flower_dir, show_progress=False,
                               on_progress=lambda *step: progress.append(step))
    assert [s.method for s in summaries] == list(config.methods)
    assert all(s.device == "cpu" for s in summaries)  # the simulated clients train on this machine
    assert {(m, t) for m, t, c in progress if c == exp.num_clients} == {
        (m, t) for m in config.methods for t in range(1, config.rounds + 1)}  # the bar moves every round
    for method, expected in in_process.items():
        got = load_file(str(flower_dir / f"model-{method.replace('/', '_')}.safetensors"))
        assert set(got) == set(expected)
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 1e-6, f"{method}: max |Δθ| = {worst}"
        assert any(not torch.equal(expected[k], exp.initial_state[k]) for k in expected)  # it did train
    lines = (flower_dir / "metrics.jsonl").read_text().splitlines()
    rows = {(r["method"], r["round"]): r for r in map(json.loads, lines)}
    reference = {(r["method"], r["round"]): r
                 for r in map(json.loads, (tmp_path / "in-process.jsonl").read_text().splitlines())}
    assert set(rows) == set(reference)
    for key, row in rows.items():
        assert row["engine"] == "flower" and row["rejected"] == [] and not row["skipped"]
        for field in ("global_acc", "local_acc", "train_loss", "bytes_up", "bytes_down"):
            assert row[field] == reference[key][field], (key, field)
    for method, field in (("fcmoe", "conflict_rate_per_layer"), ("fcmoe/pairwise", "conflict_rate_per_layer"),
                          ("fedmoe", "experts_per_client"), ("pflmoe", "deployed_global_acc")):
        if method in config.methods:
            assert rows[(method, 2)][field] == reference[(method, 2)][field], (method, field)


@pytest.mark.slow
def test_flower_participation_and_dropouts_match_in_process(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the clients drawn per round, 30 % dropping out mid-round: the Flower server messages the clients the
    in-process engine trains, and aggregates the same ones; with ``eval.every = 2`` round 1 is not scored, and the
    clients still apply their messages (the final models agree)."""
    overrides = [*FLOWER_TINY, "partition.num_clients=4", "rounds=3", "methods=['fcmoe']", "participation.fraction=0.5",
                 "participation.dropout=0.3", "eval.every=2"]
    config = load_config(overrides=overrides)
    exp = prepare_experiment(config)
    _, expected = run_method(exp, "fcmoe", tmp_path / "in-process.jsonl")
    flower_dir = tmp_path / "flower"
    flower_dir.mkdir()
    run_experiment(dataclasses.replace(config, engine="flower"), flower_dir, show_progress=False)
    got = load_file(str(flower_dir / "model-fcmoe.safetensors"))
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6
    reference = [json.loads(line) for line in (tmp_path / "in-process.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (flower_dir / "metrics.jsonl").read_text().splitlines()]
    for row, ref in zip(rows, reference, strict=True):
        assert (row["participants"], row["failed"], row["clients"]) == (ref["participants"], ref["failed"],
                                                                       ref["clients"])
        assert row["rejected"] == ref["rejected"] == []  # the server never messaged a failing client
        scored = row["round"] != 1  # eval.every = 2 over 3 rounds: rounds 2 and 3
        assert math.isnan(row["global_acc"]) != scored and (row["local_acc"] == [None] * 4) != scored
    assert any(r["failed"] for r in rows)
