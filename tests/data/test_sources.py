"""Every data source: the offline corpora as they really are, hub loaders on local copies, users' own files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fcmoe.config import DataConfig
from fcmoe.data.catalog import SOURCE_NAMES
from fcmoe.data.corpus import DataError
from fcmoe.data.hub import AGNEWS_CLASSES, load_agnews, load_mmlu
from fcmoe.data.mmlu import MMLU_CATEGORY
from fcmoe.data.offline import load_20ng, load_20ng4, load_mmlu_offline, load_reuters8
from fcmoe.data.sources import SOURCES, load_source


def test_catalog_lists_every_loader() -> None:
    assert tuple(SOURCES) == SOURCE_NAMES


def test_20ng4_merges_groups_into_four_hierarchies() -> None:
    train20, test20 = load_20ng()
    train, test = load_20ng4()
    assert train.label_names == ["comp", "rec", "sci", "talk"]
    for four, twenty in ((train, train20), (test, test20)):
        for c, top in enumerate(four.label_names):
            members = [i for i, n in enumerate(twenty.label_names) if n.startswith(top + ".")]
            assert (four.labels == c).sum() == np.isin(twenty.labels, members).sum()
    dropped = [i for i, n in enumerate(train20.label_names) if n.split(".")[0] not in ("comp", "rec", "sci", "talk")]
    assert len(dropped) == 3  # alt.atheism, misc.forsale, soc.religion.christian
    assert len(train) == len(train20) - np.isin(train20.labels, dropped).sum()


def test_reuters8_is_the_real_imbalanced_corpus() -> None:
    train, test = load_reuters8()
    assert (len(train), len(test)) == (5_485, 2_189)
    assert len(train.label_names) == 8
    counts = dict(zip(train.label_names, np.bincount(train.labels).tolist(), strict=True))
    assert counts["earn"] == 2_840 and counts["grain"] == 41


def test_mmlu_offline_has_57_subjects_in_4_categories() -> None:
    train, test = load_mmlu_offline()
    assert len(train) + len(test) == 14_042
    assert abs(len(test) / 14_042 - 0.2) < 0.01
    subjects = set(train.groups["subject"]) | set(test.groups["subject"])
    assert len(subjects) == 57 and subjects == set(MMLU_CATEGORY)
    assert set(train.groups["category"]) == {"STEM", "humanities", "social sciences", "other"}
    assert train.label_names == ["A", "B", "C", "D"] and all(t.endswith("\nAnswer:") for t in train.texts[:50])
    again, _ = load_mmlu_offline(seed=0)
    assert again.texts == train.texts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_agnews_loader_reads_a_local_copy_in_the_hub_schema(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", [{"text": f"story {i}", "label": i % 4} for i in range(12)])
    _write_jsonl(tmp_path / "test.jsonl", [{"text": "market news", "label": 2}, {"text": "goal", "label": 1}])
    train, test = load_agnews(str(tmp_path))
    assert train.label_names == list(AGNEWS_CLASSES) and np.bincount(train.labels).tolist() == [3, 3, 3, 3]
    assert test.labels.tolist() == [2, 1] and test.texts == ["market news", "goal"]


def test_agnews_loader_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot load dataset 'fancyzhx/ag_news'.*set data.path"):
        load_agnews()  # HF_DATASETS_OFFLINE=1: the hub is unreachable
    _write_jsonl(tmp_path / "train.jsonl", [{"body": "x", "label": 0}])
    _write_jsonl(tmp_path / "test.jsonl", [{"body": "y", "label": 0}])
    with pytest.raises(DataError, match="no column 'text'"):
        load_agnews(str(tmp_path))


def test_mmlu_loader_reads_a_local_copy_in_the_hub_schema(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "subject": "college_physics" if i % 2 else "world_religions",
             "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(40)]
    pd.DataFrame(rows).to_parquet(tmp_path / "test.parquet")
    train, test = load_mmlu(str(tmp_path))
    assert len(train) + len(test) == 40 and len(test) == 8  # 20 % of each answer class
    assert set(train.groups["category"]) == {"STEM", "humanities"}
    assert train.texts[0].startswith("q") and "\nA. w\nB. x\nC. y\nD. z\nAnswer:" in train.texts[0]
    pd.DataFrame([{**rows[0], "answer": 7}]).to_parquet(tmp_path / "test.parquet")
    with pytest.raises(DataError, match="row 0: answer 7"):
        load_mmlu(str(tmp_path))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_local_files_with_a_column_mapping(tmp_path: Path, fmt: str) -> None:
    frame = pd.DataFrame({"body": [f"doc {i}" for i in range(30)], "y": [str(i % 3) for i in range(30)],
                          "site": [f"s{i % 5}" for i in range(30)]})
    path = tmp_path / f"train.{fmt}"
    {"csv": lambda: frame.to_csv(path, index=False), "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "parquet": lambda: frame.to_parquet(path)}[fmt]()
    cfg = DataConfig(name=fmt, path=str(path), text_column="body", label_column="y", group_column="site")
    train, test = load_source(cfg, seed=0)
    assert train.label_names == ["0", "1", "2"] and len(train) + len(test) == 30 and len(test) == 6
    assert sorted(set(train.groups["group"])) == ["s0", "s1", "s2", "s3", "s4"]
    ordered = load_source(DataConfig(name=fmt, path=str(path), text_column="body", label_column="y",
                                     labels=("2", "1", "0")), seed=0)
    assert ordered[0].label_names == ["2", "1", "0"]

    def named(corpora: tuple) -> set[tuple[str, str]]:  # (text, label name) over train and test
        return {(t, c.label_names[y]) for c in corpora for t, y in zip(c.texts, c.labels, strict=True)}

    assert named(ordered) == named((train, test)) == set(zip(frame.body, frame.y, strict=True))


def _csv(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.mark.parametrize(("files", "overrides", "match"), [
    ({}, {}, r"data file '.*missing.csv' does not exist"),
    ({"train.csv": "text,label\na,x\n"}, {"label_column": "topic"}, r"no column 'topic' for the label"),
    ({"train.csv": "text,label\na,x\nb,y\n", "test.csv": "text,label\nc,z\n"}, {"test_path": "test.csv"},
     r"test.csv: label 'z' \(line 2\) is not one of the classes"),
    ({"train.csv": "text,label\na,x\nb,y\n"}, {"labels": ("x", "y", "w")}, r"class 'w' has no examples"),
    ({"train.csv": "text,label\na,x\nb,y\nc,q\n"}, {"labels": ("x", "y")}, r"label 'q' \(line 4\)"),
    ({"train.csv": "text,label\na,x\n,y\n"}, {}, r"line 3 has an empty text"),
    ({"train.csv": "text;label\na;x\nb;y\n"}, {}, r"no column 'text' .*separated by ';', not commas"),
    ({"train.csv": b"text,label\ncaf\xe9,x\nb,y\n"}, {}, r"is not UTF-8 text \(byte 0xe9 .*iconv -f latin1"),
    ({"train.csv": "text,label\n"}, {}, r"has no rows"),
    ({"train.csv": 'text,label\n"a,x\n'}, {}, r"is not valid csv"),
])
def test_bad_local_data_stops_with_one_line_naming_the_fix(tmp_path: Path, files: dict[str, str | bytes],
                                                           overrides: dict, match: str) -> None:
    for name, text in files.items():
        _csv(tmp_path / name, text)
    train = "train.csv" if files else "missing.csv"
    fields = {"name": "csv", "path": str(tmp_path / train), **overrides}
    if "test_path" in fields:
        fields["test_path"] = str(tmp_path / fields["test_path"])
    with pytest.raises(DataError, match=match) as info:
        load_source(DataConfig(**fields), seed=0)
    assert "\n" not in str(info.value)


def test_malformed_jsonl_and_parquet_are_named(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "ok", "label": 1}\n{not json\n')
    with pytest.raises(DataError, match="is not valid jsonl"):
        load_source(DataConfig(name="jsonl", path=str(tmp_path / "a.jsonl")), seed=0)
    (tmp_path / "a.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(DataError, match="is not valid parquet"):
        load_source(DataConfig(name="parquet", path=str(tmp_path / "a.parquet")), seed=0)
