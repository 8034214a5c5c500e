"""The data sections of an experiment: which corpus (``[data]``) and how it is split over clients (``[partition]``).

Read by :mod:`fcmoe.data.sources` and :mod:`fcmoe.data.partition`; the rules of :mod:`fcmoe.config` apply: frozen
dataclasses, validated on construction, one-line :class:`~fcmoe.config_sections.ConfigError` naming key, value, fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from fcmoe.config_sections import ConfigError, _positive
from fcmoe.data.catalog import FILE_SOURCES, OFFLINE_SOURCES, PARTITION_KINDS, SOURCE_NAMES

# data.name → (train_per_class, test_per_class, max_length) where they are -1; "" = every other source. Four
# classes at the default Dirichlet α = 0.1 over 10 clients need ~500 documents a class for a draw that gives every
# client 10 (100 fails: measured in tests/data/test_sources.py); instruction prompts hold 120-word documents.
SOURCE_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "": (100, 40, 64), "20ng4": (500, 40, 64), "mmlu-offline": (500, 40, 64), "bbc4": (500, 40, 64),
    "instruct": (250, 40, 256), "instruct-file": (0, 0, 256), "instruct-hub": (0, 0, 256)}
PATH_SOURCES = ("instruct-file", "instruct-hub")  # instruction sources that read data.path
PATH_EXAMPLES = {"instruct-file": "train.jsonl", "instruct-hub": "vicgalle/alpaca-gpt4"}


@dataclass(frozen=True)
class DataConfig:
    """Which corpus, how much of it, and how it is tokenised (sources: :mod:`fcmoe.data.sources`)."""

    # 20ng | 20ng4 | reuters8 | bbc4 | mmlu-offline | agnews | mmlu | csv | jsonl | parquet (classify);
    # instruct | instruct-file | instruct-hub (sft)
    name: str = "20ng"
    # csv/jsonl/parquet/instruct-file: the training file; agnews/mmlu: another hub id or a local copy (folder);
    # instruct-hub: the dataset's hub id or local copy
    path: str = ""
    test_path: str = ""  # csv/jsonl/parquet/instruct-file: the global test file; empty = hold out holdout_fraction
    text_column: str = "text"  # local files: column mapping
    label_column: str = "label"
    group_column: str = ""  # local files: the column natural partitions split by (partition.by = "group")
    labels: tuple[str, ...] = ()  # local files: the class set and order (empty = the sorted training labels)
    holdout_fraction: float = 0.2  # share of each class held out as the test set where a source has none
    # documents per class (instruction data: per task) drawn from the training / test split (0 = all); tokens per
    # document (prompt + response). -1 = the source's default (SOURCE_DEFAULTS: enough documents for the default
    # Dirichlet partition of 10 clients, prompts long enough for instruction data)
    train_per_class: int = -1
    test_per_class: int = -1
    max_length: int = -1
    local_test_fraction: float = 0.2  # each client's data is split train / test 80 / 20

    def __post_init__(self) -> None:
        if self.name not in SOURCE_NAMES:
            raise ConfigError(f"data.name = {self.name!r}: choose one of {', '.join(SOURCE_NAMES)}")
        defaults = SOURCE_DEFAULTS.get(self.name, SOURCE_DEFAULTS[""])
        for key, value in zip(("train_per_class", "test_per_class", "max_length"), defaults, strict=True):
            if getattr(self, key) == -1:
                object.__setattr__(self, key, value)
        if self.name in (*FILE_SOURCES, *PATH_SOURCES) and not self.path:
            raise ConfigError(f"data.path is empty: data.name = {self.name!r} reads your own file, e.g. "
                              f"--set data.path={PATH_EXAMPLES.get(self.name, f'train.{self.name}')}")
        if self.name in (*OFFLINE_SOURCES, "instruct") and self.path:
            own = "'instruct-file'" if self.name == "instruct" else "'csv', 'jsonl' or 'parquet'"
            raise ConfigError(f"data.path = {self.path!r} does not apply to the offline source {self.name!r}; for your "
                              f"own file use data.name = {own}")
        if self.name not in FILE_SOURCES and (self.group_column or self.labels):
            raise ConfigError(f"data.group_column / labels apply to local files only (data.name = "
                              f"{', '.join(FILE_SOURCES)}), not to {self.name!r}")
        if self.test_path and self.name not in (*FILE_SOURCES, "instruct-file"):
            raise ConfigError(f"data.test_path applies to local files only (data.name = {', '.join(FILE_SOURCES)}, "
                              f"instruct-file), not to {self.name!r}")
        if not self.text_column or not self.label_column:
            raise ConfigError("data.text_column and data.label_column must name columns, e.g. 'text' and 'label'")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"data.labels = {list(self.labels)} lists a class twice")
        if self.train_per_class < 0 or self.test_per_class < 0:
            raise ConfigError(f"data.train_per_class = {self.train_per_class}, test_per_class = "
                              f"{self.test_per_class}: must be >= 0 (0 = every document, -1 = the source's default)")
        if not 8 <= self.max_length <= 512:
            raise ConfigError(f"data.max_length = {self.max_length}: must be in [8, 512] tokens (-1 = the source's "
                              "default)")
        for key in ("local_test_fraction", "holdout_fraction"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"data.{key} = {getattr(self, key)}: must be in (0, 1), e.g. 0.2")


@dataclass(frozen=True)
class PartitionConfig:
    """How the training pool is split over clients (flwr-datasets partitioners, :mod:`fcmoe.data.partition`)."""

    kind: str = "dirichlet"  # dirichlet | iid | pathological | natural
    num_clients: int = 10
    alpha: float = 0.1  # dirichlet: concentration over labels, small = more skewed
    min_partition_size: int = 10  # dirichlet: redraw until every client has this many documents
    classes_per_client: int = 2  # pathological: exactly this many classes per client
    by: str = ""  # natural: the group column, e.g. "subject" or "category" (MMLU), "group" (local files)
    # feature–label conflict: this share of the clients (seeded) sees a permutation of the labels it holds, in its
    # train and local test splits alike; the global test set keeps the canonical labels
    concept_shift: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PARTITION_KINDS:
            raise ConfigError(f"partition.kind = {self.kind!r}: choose one of {', '.join(PARTITION_KINDS)}")
        _positive("partition.num_clients", self.num_clients)
        if not self.alpha > 0:
            raise ConfigError(f"partition.alpha = {self.alpha}: the Dirichlet concentration must be > 0, e.g. 0.1")
        if self.min_partition_size < 2:
            raise ConfigError(f"partition.min_partition_size = {self.min_partition_size}: must be >= 2 "
                              "(each client needs a train and a test example)")
        _positive("partition.classes_per_client", self.classes_per_client)
        if not 0 <= self.concept_shift < 1:
            raise ConfigError(f"partition.concept_shift = {self.concept_shift}: must be in [0, 1) (the share of "
                              "clients whose labels are permuted; 0 = off)")
        if self.kind == "natural" and not self.by:
            raise ConfigError("partition.by is empty: a natural partition needs a group column, e.g. "
                              "--set partition.by=subject (MMLU), partition.by=group (local files) or "
                              "partition.by=task (instruction data)")


