"""Config: defaults, overrides, and one-line errors naming the key and the fix."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fcmoe.algorithms.fcmoe import FCMoEConfig
from fcmoe.config import ConfigError, ExperimentConfig, load_config


def test_defaults_are_the_embedded_benchmark() -> None:
    cfg = load_config()
    assert cfg.methods == ("fedavg", "fedmoe", "pflmoe", "fcmoe")
    assert cfg.data.name == "20ng" and cfg.partition.alpha == 0.1 and cfg.partition.num_clients == 10
    assert cfg.train.lr == 1e-4 and cfg.train.local_epochs == 1
    assert isinstance(cfg.algorithm_config("fcmoe"), FCMoEConfig)
    assert cfg.algorithm_config("fcmoe").retention == 0.5


def test_overrides_and_toml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(overrides=["partition.alpha=0.5", "fcmoe.tau=-0.2", "model.moe_layers=[5]",
                                 "methods=['fedavg','fcmoe']", "data.name=bbc4"])
    assert cfg.partition.alpha == 0.5 and cfg.algorithm_config("fcmoe").tau == -0.2
    assert cfg.model.moe_layers == (5,) and cfg.methods == ("fedavg", "fcmoe") and cfg.data.name == "bbc4"
    path = tmp_path / "config.toml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert tomllib.loads(path.read_text())["fcmoe"]["tau"] == -0.2


def test_config_is_frozen() -> None:
    cfg = ExperimentConfig()
    with pytest.raises(AttributeError):
        cfg.rounds = 3  # type: ignore[misc]


@pytest.mark.parametrize(("override", "match"), [
    ("partition.alpha=0", r"partition.alpha = 0.*must be > 0"),
    ("partition.alpha=-1", r"partition.alpha = -1"),
    ("train.lr=0", r"train.lr = 0"),
    ("partition.num_clients=0", r"partition.num_clients = 0"),
    ("fcmoe.retention=-0.5", r"fcmoe.retention = -0.5"),
    ("data.bogus=1", r"unknown key data.bogus"),
    ("bogus=1", r"unknown config key 'bogus'"),
    ("rounds='three'", r"rounds = 'three': expected int"),
    ("methods=['fedavg','magic']", r"unknown method 'magic'"),
    ("model.name=gpt5", r"model.name = 'gpt5'"),
    ("fcmoe.importance=bogus", r"fcmoe.importance = 'bogus'"),
    ("robust.max_norm_ratio=0.5", r"robust.max_norm_ratio = 0.5: must be > 1"),
    ("robust.aggregator=mode", r"robust.aggregator = 'mode': choose one of mean, trimmed_mean, median"),
    ("robust.min_clients=0", r"robust.min_clients = 0: must be >= 1"),
    ("participation.fraction=0", r"participation.fraction = 0.0: must be in \(0, 1\]"),
    ("participation.dropout=1", r"participation.dropout = 1.0: must be in \[0, 1\)"),
    ("attack.clients=[12]", r"attack.clients = \[12\]: client 12 does not exist"),
    ("attack.kind=steal", r"attack.kind = 'steal'"),
    ("sparse_uploads=1", r"sparse_uploads = 1: expected bool"),
    ("server.memory_budget=0", r"memory_budget = 0: expected str, got int; quote it: server.memory_budget = '0'"),
])
def test_bad_values_are_named(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.toml"))


def test_default_toml_is_the_builtin_default() -> None:
    assert load_config(CONFIGS[0].parent / "default.toml") == load_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize("args", [
    ["--set", "partition.alpha=0"], ["--set", "train.lr=-1"], ["--set", "robust.clip=-2"],
    ["--set", "model.name=tiny-bert-moe", "--set", "model.finetune=lora"], ["--set", "nonsense.key=1"],
    ["--set", "rounds=0"], ["--methods", "fedavg,fcmoe/no-such"],
])
def test_cli_config_errors_exit_2_with_one_line_and_write_nothing(args: list[str], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from fcmoe.cli import main

    assert main(["run", *args, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fcmoe: config error: ") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
