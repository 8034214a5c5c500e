"""The paper's datasets from the Hugging Face hub: AG News and MMLU (``datasets.load_dataset``).

``data.path`` may name another hub id or a local folder laid out like the hub repository (e.g. ``train.jsonl`` and
``test.jsonl``, or ``data/train-*.parquet``): ``load_dataset`` reads both the same way, which is how these loaders
are tested offline. With the hub unreachable and no local copy, loading stops with one line naming the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from fcmoe.data.corpus import DataError, TextCorpus, encode_labels
from fcmoe.data.mmlu import MMLU_CHOICES, MMLUQuestion, mmlu_corpus, subject_key
from fcmoe.errors import first_line, why_hub_failed

AGNEWS_ID = "fancyzhx/ag_news"
AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
MMLU_ID = "cais/mmlu"


def load_dataset_dict(source: str, offline_hint: str, config_name: str | None = None) -> Any:
    """``load_dataset`` with one clear error for every way it fails (offline, missing folder, wrong layout)."""
    local = Path(source).expanduser()
    try:
        if local.exists():
            return datasets.load_dataset(str(local))
        return datasets.load_dataset(source, config_name)
    except Exception as err:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError…)
        reason = first_line(err) if local.exists() else why_hub_failed(err)
        raise DataError(f"cannot load dataset {source!r}: {reason}; or {offline_hint}") from None


def _split(dataset: Any, name: str, source: str) -> Any:
    if name not in dataset:
        raise DataError(f"dataset {source!r} has no {name!r} split (it has {', '.join(dataset)}); "
                        f"name the files train.* and test.*")
    return dataset[name]


def _columns(split: Any, required: tuple[str, ...], source: str) -> None:
    missing = [c for c in required if c not in split.column_names]
    if missing:
        raise DataError(f"dataset {source!r} has no column {missing[0]!r} (columns: {', '.join(split.column_names)})")


def load_agnews(path: str = "", seed: int = 0) -> tuple[TextCorpus, TextCorpus]:
    """AG News (120,000 train / 7,600 test news articles, 4 topics), official splits.

    Labels are integers 0–3 (World, Sports, Business, Sci/Tech) or, in a local copy, those names.
    """
    source = path or AGNEWS_ID
    dataset = load_dataset_dict(source, "set data.path to a local copy (a folder with train/test files holding "
                                "'text' and 'label'), or use an offline source such as data.name = 'bbc4'")
    out = []
    for name in ("train", "test"):
        split = _split(dataset, name, source)
        _columns(split, ("text", "label"), source)
        values = [AGNEWS_CLASSES[v] if isinstance(v, int) and 0 <= v < 4 else str(v) for v in split["label"]]
        labels, _ = encode_labels(values, AGNEWS_CLASSES, f"{source} [{name}]", require_every_class=name == "train")
        out.append(TextCorpus([str(t) for t in split["text"]], labels, list(AGNEWS_CLASSES)))
    return out[0], out[1]


def load_mmlu(path: str = "", seed: int = 0) -> tuple[TextCorpus, TextCorpus]:
    """MMLU ``all`` configuration, its test split (14,042 questions), carved like ``mmlu-offline``.

    Rows have ``question``, ``subject``, ``choices`` (4 strings) and ``answer`` (0–3 or a letter).
    """
    source = path or MMLU_ID
    dataset = load_dataset_dict(source, "set data.path to a local copy (a folder with a test file holding "
                                "question, subject, choices, answer), or use data.name = 'mmlu-offline'", "all")
    split = _split(dataset, "test", source)
    _columns(split, ("question", "subject", "choices", "answer"), source)
    questions = []
    for row_number, row in enumerate(split):
        answer = row["answer"]
        letter = MMLU_CHOICES[answer] if isinstance(answer, int) and 0 <= answer < 4 else str(answer)
        if letter not in MMLU_CHOICES or len(row["choices"]) != 4:
            raise DataError(f"{source} [test] row {row_number}: answer {answer!r} with {len(row['choices'])} "
                            "choices; MMLU rows need 4 choices and an answer 0–3 or A–D")
        questions.append(MMLUQuestion(row["question"], tuple(row["choices"]), letter, subject_key(row["subject"])))
    return mmlu_corpus(questions, seed)
