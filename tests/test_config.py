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
