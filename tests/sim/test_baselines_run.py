"""The new baselines end to end in the in-process engine: what each one's rounds record, and bit-identical resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fcmoe.config import load_config
from fcmoe.experiment import Experiment, prepare_experiment
from fcmoe.sim import engine
from tests.helpers import TINY, stop_after_round_two_and_resume

RESUMED = ["fedmoe", "hfedmoe", "localexperts", "fcmoe/pairwise", "pflmoe"]


@pytest.fixture(scope="module")
def exp() -> Experiment:
    return prepare_experiment(load_config(overrides=[*TINY, "rounds=3", f"methods={RESUMED!r}"]))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fedmoe_assigns_sub_moes_in_round_one_and_aggregates_over_holders(exp: Experiment, tmp_path: Path) -> None:
    engine.run_method(exp, "fedmoe", tmp_path / "m.jsonl")
    rows = _rows(tmp_path / "m.jsonl")
    budget = int(0.25 * 8)  # 2 MoE layers × 4 experts, ρ = 0.25
    assert rows[0]["sub_moes_assigned"] == exp.num_clients and rows[0]["mean_holders_per_expert"] == exp.num_clients
    assert all(r["experts_per_client"] <= budget and r["expert_budget"] == budget for r in rows)
    assert rows[1]["mean_holders_per_expert"] < exp.num_clients  # sub-MoEs: not every client holds every expert


def test_local_experts_upload_less_and_leave_the_global_experts_alone(exp: Experiment, tmp_path: Path) -> None:
    _, final = engine.run_method(exp, "localexperts", tmp_path / "l.jsonl")
    engine.run_method(exp, "fedavg", tmp_path / "f.jsonl")
    layout = exp.built.layout
    assert all(torch.equal(final[k], exp.initial_state[k]) for k in (*layout.expert_keys, *layout.router_keys))
    assert any(not torch.equal(final[k], exp.initial_state[k]) for k in layout.shared_keys)
    local, fedavg = _rows(tmp_path / "l.jsonl")[-1], _rows(tmp_path / "f.jsonl")[-1]
    assert local["bytes_up"] < fedavg["bytes_up"]


def test_pflmoe_reports_its_mixtures_on_the_global_test_set_in_the_final_round(exp: Experiment,
                                                                              tmp_path: Path) -> None:
    engine.run_method(exp, "pflmoe", tmp_path / "p.jsonl")
    rows = _rows(tmp_path / "p.jsonl")
    assert all("deployed_global_acc" not in r for r in rows[:-1])
    scores = rows[-1]["deployed_global_acc"]
    assert len(scores) == exp.num_clients and rows[-1]["deployed_global_acc_mean"] == pytest.approx(
        sum(scores) / len(scores))
    docs = len(exp.global_test)
    assert all(abs(s * docs - round(s * docs)) < 1e-6 for s in scores)  # counts of the global test documents


@pytest.mark.parametrize("method", RESUMED)
def test_a_run_stopped_after_round_two_resumes_bit_identical(method: str, exp: Experiment, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Server state (FedMoE's sub-MoEs and records) and client state (masks, own experts, residuals, heads) come
    back from the checkpoint: the resumed run ends where the uninterrupted one does, metrics included."""
    _, uninterrupted = engine.run_method(exp, method, tmp_path / "a.jsonl")
    resumed = stop_after_round_two_and_resume(exp, method, tmp_path, monkeypatch)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    final, reference = _rows(tmp_path / "b.jsonl")[-1], _rows(tmp_path / "a.jsonl")[-1]
    assert final["local_acc"] == reference["local_acc"] and final["global_acc"] == reference["global_acc"]


