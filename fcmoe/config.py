"""Experiment configuration: the composer and loader of the frozen, validated sections, saved with every run.

Each section sits beside the code that reads it (``fcmoe.data.config``, ``fcmoe.models.config``,
``fcmoe.training.config``, ``fcmoe.algorithms.robust``, each algorithm's file; the round's in
``fcmoe.config_sections``); this module composes them into :class:`ExperimentConfig` and reads TOML files.

Every value has a default (the embedded offline benchmark); a TOML file or ``--set key=value`` overrides it.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` with one line naming the key, the
value and the fix, before any work starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fcmoe.algorithms import ALGORITHMS, Algorithm, AlgorithmConfig
from fcmoe.algorithms.build import build_algorithm, method_config, split_method
from fcmoe.algorithms.robust import RobustConfig
from fcmoe.config_sections import (
    AttackConfig,
    ConfigError,
    EvalConfig,
    ParticipationConfig,
    ServerConfig,
    SweepConfig,
    TrackingConfig,
    _positive,
)
from fcmoe.data.catalog import FILE_SOURCES, INSTRUCT_SOURCES
from fcmoe.data.config import DataConfig, PartitionConfig
from fcmoe.models.catalog import DEFAULT_MODEL, SFT_MODELS
from fcmoe.models.config import ModelConfig
from fcmoe.models.layout import ExpertLayout
from fcmoe.training.config import TrainConfig


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: every listed method on the same data, partition, model initialisation and budget."""

    methods: tuple[str, ...] = ("fedavg", "fedmoe", "pflmoe", "fcmoe")
    # classify (a head over C classes) | sft (a language model's response-token loss) | auto = sft for instruction data
    task: str = "auto"
    rounds: int = 5
    seed: int = 0
    out_dir: str = "runs"
    engine: str = "inprocess"  # inprocess | flower (Flower's simulation runtime, the same algorithms)
    # clients leave out the experts they routed no token to; the server treats those as absent, not zero (FedAvg
    # then averages each expert over the clients that sent it). Off by default: the paper's FedAvg counts zeros.
    sparse_uploads: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    algorithms: Mapping[str, AlgorithmConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("methods is empty: list at least one of " + ", ".join(ALGORITHMS.names()))
        for method in self.methods:
            split_method(method)  # raises on an unknown name or variant
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods = {list(self.methods)} lists a method twice")
        _positive("rounds", self.rounds)
        bad = [c for c in self.attack.clients if not 0 <= c < self.partition.num_clients]
        if bad:
            raise ConfigError(f"attack.clients = {list(self.attack.clients)}: client {bad[0]} does not exist "
                              f"(partition.num_clients = {self.partition.num_clients})")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine = {self.engine!r}: choose one of {', '.join(ENGINES)}")
        self._resolve_task()
        full = {name: self.algorithms.get(name) or ALGORITHMS.get(name).config_class()
                for name in ALGORITHMS.names()}
        object.__setattr__(self, "algorithms", types.MappingProxyType(full))

    def _resolve_task(self) -> None:
        """``task = "auto"`` and ``model.name = ""`` become the data's task and that task's default model; a
        model or data source the task cannot use is refused."""
        instruct = self.data.name in INSTRUCT_SOURCES
        task = ("sft" if instruct else "classify") if self.task == "auto" else self.task
        if task not in TASKS:
            raise ConfigError(f"task = {self.task!r}: choose one of auto, {', '.join(TASKS)}")
        if instruct != (task == "sft"):
            raise ConfigError(f"task = {task!r} with data.name = {self.data.name!r}: " + (
                "instruction data trains task = 'sft'" if instruct else
                f"task = 'sft' reads prompt/response data: data.name = {', '.join(INSTRUCT_SOURCES)}"))
        object.__setattr__(self, "task", task)
        if not self.model.name:
            object.__setattr__(self, "model", dataclasses.replace(self.model, name=DEFAULT_MODEL[task]))
        if task == "sft" and self.model.name not in SFT_MODELS:
            raise ConfigError(f"task = 'sft' trains a language model: model.name = {self.model.name!r} is not one; "
                              f"choose one of {', '.join(SFT_MODELS)}")
        if task != "sft" and self.model.train_lm_head:
            raise ConfigError("model.train_lm_head = true trains a language model's head: it needs task = 'sft' (a "
                              "classifier's head is always trained)")
        if task == "sft" and self.partition.concept_shift > 0:
            raise ConfigError(f"partition.concept_shift = {self.partition.concept_shift} permutes class labels; "
                              "instruction data has none (its labels are tasks): set it to 0 with task = 'sft'")

    def algorithm_config(self, method: str) -> AlgorithmConfig:
        """The config of ``method`` ("name" or "name/variant": the named switches applied to ``[name]``)."""
        return method_config(self.algorithms, method)

    def make_algorithm(self, method: str, layout: ExpertLayout) -> Algorithm:
        """An instance of ``method``'s algorithm with its (variant) config, on ``layout``."""
        return build_algorithm(self.algorithms, method, layout)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (TOML-serialisable) with every resolved value."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "algorithms":
                out.update({name: _plain(dataclasses.asdict(cfg)) for name, cfg in value.items()})
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                out[f.name] = _plain(dataclasses.asdict(value))
            else:
                out[f.name] = _plain(value)
        return out

    def save(self, path: Path) -> None:
        path.write_text(tomli_w.dumps(self.to_dict()))


ENGINES = ("inprocess", "flower")
TASKS = ("classify", "sft")
LOCAL_FILE_SOURCES = (*FILE_SOURCES, "instruct-file")  # data.path is a file (else maybe a hub id)
_TOP_LEVEL = ("methods", "task", "rounds", "seed", "out_dir", "engine", "sparse_uploads")
_SECTIONS: dict[str, type] = {"data": DataConfig, "partition": PartitionConfig, "model": ModelConfig,
                              "train": TrainConfig, "robust": RobustConfig,
                              "participation": ParticipationConfig, "server": ServerConfig, "attack": AttackConfig,
                              "eval": EvalConfig,
                              "tracking": TrackingConfig,
                              "sweep": SweepConfig}


def build_config(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested dict (as read from TOML) into an :class:`ExperimentConfig`."""
    top: dict[str, Any] = {}
    algorithms: dict[str, AlgorithmConfig] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            top[key] = _build_dataclass(_SECTIONS[key], value, key)
        elif key in ALGORITHMS.names():
            algorithms[key] = _build_dataclass(ALGORITHMS.get(key).config_class, value, key)
        elif key in _TOP_LEVEL:
            top[key] = value
        else:
            allowed = [*_TOP_LEVEL, *_SECTIONS, *ALGORITHMS.names()]
            raise ConfigError(f"unknown config key {key!r}; allowed top-level keys: {', '.join(allowed)}")
    top = _coerce_fields(ExperimentConfig, top, "")
    try:
        return ExperimentConfig(**top, algorithms=algorithms)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a TOML file (or the defaults), apply ``key=value`` overrides, validate; relative file and folder paths
    (``data.path``, ``data.test_path``, a local ``model.path``) become absolute, taken from the current folder, so
    the run folder's saved config reloads from anywhere."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a folder; pass a TOML file to --config "
                              f"(e.g. one of {str(p / '*.toml')!r})")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing TOML file to --config")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(p)!r} is not a text file (not UTF-8); pass a TOML file to "
                              "--config") from None
        except PermissionError:
            raise ConfigError(f"config file {str(p)!r} cannot be read (permission denied)") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from None
    for item in overrides:
        _apply_override(raw, item)
    return _absolute_paths(build_config(raw))


def _absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    def absolute(value: str, must_exist: bool = False) -> str:
        local = Path(value).expanduser()
        if not value or local.is_absolute() or (must_exist and not local.exists()):
            return value
        return str(local.resolve())

    data = dataclasses.replace(config.data, path=absolute(config.data.path, config.data.name not in LOCAL_FILE_SOURCES),
                               test_path=absolute(config.data.test_path))
    model = dataclasses.replace(config.model, path=absolute(config.model.path, must_exist=True))  # else a hub id
    return dataclasses.replace(config, data=data, model=model)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set partition.alpha=0.5")
    key, text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words are strings: --set data.name=bbc4
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _build_dataclass(cls: type, value: Any, section: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{section}] must be a table of key = value, got {value!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}; allowed in [{section}]: {', '.join(sorted(names))}")
    try:
        return cls(**_coerce_fields(cls, dict(value), section + "."))
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def _coerce_fields(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        out[name] = _coerce(hints[name], value, prefix + name)
    return out


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) or origin is Mapping:
        return value  # already built
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: expected a list, e.g. {key} = [4, 5]")
        item_type = typing.get_args(hint)[0]
        return tuple(_coerce(item_type, v, key) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        fix = f"; quote it: {key} = '{value}'" if hint is str else ""
        raise ConfigError(f"{key} = {value!r}: expected {hint.__name__}, got {type(value).__name__}{fix}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
