"""The in-process engine under faults: bad updates, partial participation, dropouts, SIGKILL and --resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fcmoe.sim.engine
from fcmoe.cli import main
from fcmoe.config import load_config
from fcmoe.runner import run_experiment
from tests.helpers import TINY

FOUR = [*TINY, "rounds=3", 'methods=["fedavg", "fcmoe"]']


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("wall_s", "eval_s")} for row in rows]


def _corrupt(monkeypatch: pytest.MonkeyPatch, client: int, how: str) -> None:
    """Client ``client``'s upload, every round: NaN in one tensor, ×100, or a tensor of the wrong shape."""
    real = fcmoe.sim.engine.client_step

    def train(exp, algo, cid, *rest):  # type: ignore[no-untyped-def]
        update = real(exp, algo, cid, *rest)
        if cid == client:
            key = next(iter(update.delta))
            if how == "nan":
                update.delta[key] = update.delta[key].clone().fill_(float("nan"))
            elif how == "scale":
                update.delta = {k: v * 100 for k, v in update.delta.items()}
            else:
                update.delta[key] = torch.zeros(3)
        return update

    monkeypatch.setattr(fcmoe.sim.engine, "client_step", train)


@pytest.mark.parametrize(("how", "reason"), [("nan", "non-finite values"), ("scale", "× the round's median"),
                                             ("shape", "has shape (3,)")])
def test_a_bad_update_is_rejected_and_the_round_goes_on(how: str, reason: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _corrupt(monkeypatch, client=1, how=how)
    config = load_config(overrides=FOUR)
    run_experiment(config, tmp_path, show_progress=False)
    rows = _rows(tmp_path)
    assert len(rows) == 6
    for row in rows:
        assert len(row["rejected"]) == 1 and row["rejected"][0].startswith("client 1:")
        assert reason in row["rejected"][0] and not row["skipped"]
        assert row["clients"] == [0, 2, 3]  # aggregated: the other three
        assert 0.0 <= row["global_acc"] <= 1.0
    final = load_file(str(tmp_path / "model-fcmoe.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_too_few_accepted_updates_keep_the_global_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _corrupt(monkeypatch, client=0, how="nan")
    config = load_config(overrides=[*FOUR, 'methods=["fedavg"]', "robust.min_clients=4", "rounds=1"])
    run_experiment(config, tmp_path, show_progress=False)
    (row,) = _rows(tmp_path)
    assert row["skipped"] and row["bytes_up"] == 0
    from fcmoe.experiment import prepare_experiment

    initial = prepare_experiment(config).initial_state
    final = load_file(str(tmp_path / "model-fedavg.safetensors"))
    assert all(torch.equal(final[k], initial[k]) for k in initial)


def test_partial_participation_and_dropouts_are_seeded_and_absent_clients_keep_their_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    finished: list[tuple[int, int]] = []
    real_finish = fcmoe.sim.engine.finish_client

    def spy(algo, state, old, new, message):  # type: ignore[no-untyped-def]
        finished.append((algo.name, state["seed"] % 1000))
        return real_finish(algo, state, old, new, message)

    monkeypatch.setattr(fcmoe.sim.engine, "finish_client", spy)
    overrides = [*FOUR, 'methods=["fcmoe"]', "rounds=4", "participation.fraction=0.5", "participation.dropout=0.3"]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run_experiment(load_config(overrides=overrides), tmp_path / "a", show_progress=False)
    rows = _rows(tmp_path / "a")
    for row in rows:
        assert len(row["participants"]) == 2  # half of 4 clients
        assert set(row["failed"]) <= set(row["participants"])
        assert row["clients"] == [c for c in row["participants"] if c not in row["failed"]]
    assert sorted(c for _, c in finished) == sorted(c for row in rows for c in row["clients"])  # only aggregated
    assert any(row["failed"] for row in rows) and len({tuple(r["participants"]) for r in rows}) > 1
    again = tmp_path / "b"
    run_experiment(load_config(overrides=overrides), again, show_progress=False)
    assert _without_time(_rows(again)) == _without_time(rows)  # same seed, same draws, same numbers


def test_sigkill_at_a_random_round_then_resume_is_bit_identical(tmp_path: Path) -> None:
    overrides = [*TINY, "rounds=6", 'methods=["fedavg", "fcmoe"]']
    reference = tmp_path / "reference"
    reference.mkdir()
    run_experiment(load_config(overrides=overrides), reference, show_progress=False)

    kill_at = random.Random().choice([("fedavg", 4), ("fcmoe", 1), ("fcmoe", 3), ("fcmoe", 5)])
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "fcmoe.cli", "run", "--quiet", "--out", str(out),
               *[arg for item in overrides for arg in ("--set", item)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # same threads: same sums
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    order = ["fedavg", "fcmoe"]
    try:
        while time.monotonic() < deadline and process.poll() is None:
            progress = list(out.glob("*/checkpoint/progress.json"))
            if progress:
                try:
                    state = json.loads(progress[0].read_text())
                except (json.JSONDecodeError, OSError):
                    continue
                if (order.index(state["method"]), state["round"]) >= (order.index(kill_at[0]), kill_at[1]):
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished (or failed) before it could be killed"
    (run_dir,) = out.iterdir()
    assert not (run_dir / "summary.json").is_file() or "fcmoe" not in json.loads(
        (run_dir / "summary.json").read_text())["methods"]
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    for method in ("fedavg", "fcmoe"):
        got, expected = (load_file(str(d / f"model-{method}.safetensors")) for d in (run_dir, reference))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), method
    assert _without_time(_rows(run_dir)) == _without_time(_rows(reference))
    summaries = [json.loads((d / "summary.json").read_text())["methods"] for d in (run_dir, reference)]
    for method in ("fedavg", "fcmoe"):
        for key in ("global_acc", "local_acc_mean", "local_acc_std", "local_model_global_acc_mean"):
            assert summaries[0][method][key] == summaries[1][method][key], (method, key)
    assert not (run_dir / "checkpoint").exists()


def test_resume_refuses_other_settings_and_a_folder_that_is_not_a_run(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--resume", str(tmp_path), "--set", "rounds=2"]) == 2
    assert "drop --set" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "is it a run folder?" in capsys.readouterr().err


def test_attack_injection_is_screened_unless_screening_is_off(tmp_path: Path) -> None:
    attacked = [*FOUR, 'methods=["fedavg"]', "rounds=1", 'attack.kind="scale"', "attack.clients=[2]"]
    (tmp_path / "on").mkdir(), (tmp_path / "off").mkdir()
    run_experiment(load_config(overrides=attacked), tmp_path / "on", show_progress=False)
    (row,) = _rows(tmp_path / "on")
    assert row["clients"] == [0, 1, 3] and "client 2: update norm" in row["rejected"][0]
    run_experiment(load_config(overrides=[*attacked, "robust.max_norm_ratio=0"]), tmp_path / "off",
                   show_progress=False)
    (row,) = _rows(tmp_path / "off")
    assert row["clients"] == [0, 1, 2, 3] and row["rejected"] == []


def test_checkpoint_round_trip_keeps_shared_tensors_trees_scalars_and_the_rng(tmp_path: Path) -> None:
    from fcmoe.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    shared = torch.randn(3, 2)
    clients = [{"seed": 7, "residual": {"a": shared, "b": shared[1]}}, {"seed": 8, "flag": True}]
    torch.manual_seed(123)
    save_checkpoint(tmp_path, Checkpoint("fcmoe/no-retention", 4, {"w": torch.ones(2)}, clients, {"round": 4}))
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    loaded = load_checkpoint(tmp_path, "fcmoe/no-retention")
    assert loaded is not None and loaded.round == 4 and loaded.row == {"round": 4}
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the checkpoint left it
    assert torch.equal(loaded.global_state["w"], torch.ones(2))
    assert loaded.client_states[1] == {"seed": 8, "flag": True}
    assert torch.equal(loaded.client_states[0]["residual"]["a"], shared)
    assert torch.equal(loaded.client_states[0]["residual"]["b"], shared[1])
    assert load_checkpoint(tmp_path, "fedavg") is None  # another method's checkpoint is not resumed
    save_checkpoint(tmp_path, Checkpoint("fcmoe/no-retention", 5, {"w": torch.zeros(2)}, clients, {}))
    save_checkpoint(tmp_path, Checkpoint("fcmoe/no-retention", 6, {"w": torch.full((2,), 6.0)}, clients, {}))
    assert sorted(p.name for p in tmp_path.glob("state-r*.safetensors")) == ["state-r5.safetensors",
                                                                             "state-r6.safetensors"]


def test_a_truncated_checkpoint_falls_back_to_the_round_before_and_a_lost_one_is_named(tmp_path: Path) -> None:
    from fcmoe.checkpoint import Checkpoint, CheckpointError, checkpointed_round, load_checkpoint, save_checkpoint

    for round_index in (1, 2):
        save_checkpoint(tmp_path, Checkpoint("fcmoe", round_index, {"w": torch.full((4,), float(round_index))},
                                             [{"seed": round_index}], {"round": round_index}))
    newest = tmp_path / "state-r2.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])  # a full disk or a bad copy after the write
    assert checkpointed_round(tmp_path) == ("fcmoe", 1)  # so rows after round 1 are dropped on resume
    loaded = load_checkpoint(tmp_path, "fcmoe")
    assert loaded.round == 1 and loaded.row == {"round": 1} and torch.equal(loaded.global_state["w"], torch.ones(4))
    (tmp_path / "state-r1.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match=r"state-r2.safetensors is damaged .*delete .*--resume"):
        load_checkpoint(tmp_path, "fcmoe")
    (tmp_path / "progress.json").write_text('{"method": "fcm')
    with pytest.raises(CheckpointError, match=r"progress.json is damaged"):
        checkpointed_round(tmp_path)


def test_a_method_variants_final_model_is_one_file_in_the_run_folder(tmp_path: Path) -> None:
    from fcmoe.runs import save_final_model

    path = save_final_model(tmp_path, "fcmoe/no-projection", {"w": torch.ones(2)})
    assert path == tmp_path / "model-fcmoe_no-projection.safetensors"
    assert torch.equal(load_file(str(path))["w"], torch.ones(2))
