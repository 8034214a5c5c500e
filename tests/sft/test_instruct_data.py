"""Instruction data: every record format in every file type, every malformed case as one line, the mixture, the
hub path, task partitions, per-source pool defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fcmoe.config import load_config
from fcmoe.data.corpus import DataError
from fcmoe.data.instruct import load_instruct_files, load_instruct_hub, read_records, records_corpus
from fcmoe.data.partition import natural_clients, partition_pool

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "task": "math", "metric": "exact"}
COMPLETION = {"prompt": "Name a colour.", "completion": "Blue.", "task": "chat"}
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}], "task": "chat"}
MULTI_TURN = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]}
RECORDS = [ALPACA, COMPLETION, MESSAGES, MULTI_TURN]


def write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        frame = pd.DataFrame([{k: json.dumps(v) if k == "messages" else v for k, v in r.items()} for r in records])
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_in_every_file_type(tmp_path: Path, suffix: str) -> None:
    records, where = read_records(write(tmp_path / f"train{suffix}", RECORDS))
    corpus = records_corpus(records, "train", where)
    assert corpus.texts == ["Add the numbers.\n\n2 and 3", "Name a colour.", "Be brief.\n\nHi",
                            "User: Hi\nAssistant: Hello\nUser: Bye"]
    assert corpus.responses == ["5", "Blue.", "Hello!", "Goodbye"]
    assert corpus.label_names == ["all", "chat", "math"]
    assert [corpus.label_names[i] for i in corpus.labels] == ["math", "chat", "chat", "all"]
    assert corpus.groups["metric"].tolist() == ["exact", "rouge", "rouge", "rouge"]


MALFORMED = [
    ({"instruction": "Do it", "output": ""}, "line 2: empty 'output'"),
    ({"instruction": "Do it"}, "line 2: no 'output'"),
    ({"prompt": "Q"}, "line 2: no 'completion'"),
    ({"text": "Q", "label": "A"}, "line 2: no instruction fields (has text, label)"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "line 2: the last message must be the assistant's"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "line 2: no user message before the answer"),
    ({"messages": "Hi"}, "line 2: messages must be a non-empty list"),
    ({"prompt": "Q", "completion": "A", "metric": "bleu"}, "line 2: metric 'bleu'"),
    ({"prompt": "Q", "completion": "A", "task": "math", "metric": "rouge"}, "task 'math' is scored by 'exact'"),
]


@pytest.mark.parametrize(("bad", "message"), MALFORMED)
def test_a_malformed_record_is_one_line_naming_file_and_line(tmp_path: Path, bad: dict, message: str) -> None:
    path = write(tmp_path / "train.jsonl", [ALPACA, bad])
    with pytest.raises(DataError) as caught:
        load_instruct_files(str(path), "", 0.2, 0)
    text = str(caught.value)
    assert message in text and str(path) in text and "\n" not in text


def test_broken_json_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps(ALPACA) + "\n{not json\n")
    with pytest.raises(DataError, match=r"a.jsonl line 2: not JSON"):
        read_records(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text('[{"prompt": "x",\n "completion": }]')
    with pytest.raises(DataError, match=r"b.json line 2: not JSON"):
        read_records(tmp_path / "b.json")
    frame = pd.DataFrame([{"messages": "[{oops", "task": "t"}])
    frame.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DataError, match=r"c.csv line 2: the messages cell is not JSON"):
        read_records(tmp_path / "c.csv")


def test_a_test_file_with_an_unknown_task_is_refused(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", [ALPACA, COMPLETION])
    test = write(tmp_path / "test.jsonl", [{**COMPLETION, "task": "poetry"}])
    with pytest.raises(DataError, match="task 'poetry' does not occur in the training data"):
        load_instruct_files(str(train), str(test), 0.2, 0)
    good = write(tmp_path / "good.jsonl", [COMPLETION])
    _, held = load_instruct_files(str(train), str(good), 0.2, 0)
    assert held.label_names == ["chat", "math"] and held.labels.tolist() == [0]


def test_a_hub_dataset_folder_loads_like_a_hub_id(tmp_path: Path) -> None:
    """``instruct-hub`` goes through ``datasets.load_dataset``: a local folder laid out like a hub repository."""
    folder = tmp_path / "alpaca"
    folder.mkdir()
    write(folder / "train.jsonl", [dict(ALPACA, task="math")] * 5 + [COMPLETION] * 5)
    train, test = load_instruct_hub(str(folder), 0.2, 0)
    assert len(train) + len(test) == 10 and set(train.label_names) == {"chat", "math"}
    with pytest.raises(DataError, match="cannot load dataset"):
        load_instruct_hub(str(tmp_path / "missing" / "x"), 0.2, 0)


def test_natural_partition_by_task_with_more_and_fewer_clients() -> None:
    tasks = np.array(["a"] * 30 + ["b"] * 30 + ["c"] * 30, dtype=object)
    six = natural_clients(tasks, 6, seed=0)
    for client in range(6):  # each client one task, each task two clients, rows dealt evenly
        held = set(tasks[six == client])
        assert held == {"abc"[client % 3]} and (six == client).sum() == 15
    assert np.array_equal(six, natural_clients(tasks, 6, seed=0))
    assert not np.array_equal(six, natural_clients(tasks, 6, seed=1))
    two = natural_clients(tasks, 2, seed=0)  # a few tasks each
    assert set(tasks[two == 0]) == {"a", "c"} and set(tasks[two == 1]) == {"b"}
    assert np.array_equal(natural_clients(tasks, 3, seed=5), np.repeat([0, 1, 2], 30))


def test_instruct_partitions_by_task_and_dirichlet_over_tasks() -> None:
    config = load_config(overrides=["data.name=instruct", "partition.kind=natural", "partition.by=task"])
    labels = np.repeat(np.arange(5), 250)  # the source's pool default: 250 a task
    groups = {"task": np.array([f"t{i}" for i in labels], dtype=object)}
    part = partition_pool(labels, config.partition, 0.2, 0, groups)
    for cid, client in enumerate(part.clients):  # 10 clients over 5 tasks: one task each, two clients a task
        assert set(labels[np.concatenate([client.train, client.test])].tolist()) == {cid % 5}
    skewed = partition_pool(labels, load_config(overrides=["data.name=instruct"]).partition, 0.2, 0, groups)
    held = [len(set(labels[c.train].tolist())) for c in skewed.clients]
    assert min(held) < 5  # α = 0.1 over tasks: clients miss some tasks


@pytest.mark.parametrize("name", ["20ng", "20ng4", "reuters8", "bbc4", "mmlu-offline", "instruct"])
def test_every_offline_source_partitions_at_its_defaults(name: str) -> None:
    """``--set data.name=X`` alone: the source's own pool default gives the default Dirichlet draw 10 clients."""
    from fcmoe.data.corpus import subsample_per_class
    from fcmoe.data.sources import load_source

    config = load_config(overrides=[f"data.name={name}"])
    train, _ = load_source(config.data, config.seed)
    pool = subsample_per_class(train, config.data.train_per_class, config.seed)
    part = partition_pool(pool.labels, config.partition, config.data.local_test_fraction, config.seed, pool.groups)
    assert len(part.clients) == 10 and min(c.train.size for c in part.clients) >= 1


def test_the_offline_mixture() -> None:
    from fcmoe.data.mixture import METRIC, TASKS, TEMPLATES, load_instruct

    train, test = load_instruct(0)
    assert train.label_names == list(TASKS) == test.label_names
    for corpus in (train, test):
        assert set(corpus.labels.tolist()) == set(range(len(TASKS)))
        assert all(r.strip() for r in corpus.responses) and all(p.strip() for p in corpus.texts)
        assert [METRIC[t] for t in corpus.groups["task"]] == corpus.groups["metric"].tolist()
    topic = [r for r, t in zip(train.responses, train.groups["task"], strict=True) if t == "bbc-category"]
    assert set(topic) == {"business", "entertainment", "politics", "sport", "tech"}
    for task in TASKS:  # several templates of each task are in use
        prompts = [p for p, t in zip(train.texts, train.groups["task"], strict=True) if t == task][:60]
        marks = [max(re.split(r"\{\w+\}", template), key=len) for template in TEMPLATES[task]]
        assert sum(any(mark in p for p in prompts) for mark in marks) >= 2, task
    # the BBC tasks share their held-out articles: no test headline is a training headline
    train_heads = {r for r, t in zip(train.responses, train.groups["task"], strict=True) if t == "bbc-headline"}
    test_heads = {r for r, t in zip(test.responses, test.groups["task"], strict=True) if t == "bbc-headline"}
    assert test_heads and not train_heads & test_heads
    assert load_instruct(0)[0].texts == train.texts != load_instruct(1)[0].texts  # the template choice is seeded


def test_parquet_chat_records_in_their_native_list_column(tmp_path: Path) -> None:
    """Parquet files exported by datasets / pandas hold messages as a list column, not JSON text."""
    pd.DataFrame([MESSAGES, MULTI_TURN]).to_parquet(tmp_path / "chat.parquet")
    records, where = read_records(tmp_path / "chat.parquet")
    corpus = records_corpus(records, "chat", where)
    assert corpus.responses == ["Hello!", "Goodbye"] and corpus.texts[0] == "Be brief.\n\nHi"


def test_a_task_too_small_for_its_clients_is_one_line() -> None:
    from fcmoe.data.partition import PartitionError

    tasks = np.array(["a"] * 30 + ["b"] * 3, dtype=object)
    with pytest.raises(PartitionError, match="group 'b' has 3 document"):
        natural_clients(tasks, 4, seed=0)


def test_sft_refuses_a_concept_shift_and_names_instruct_file_for_a_path() -> None:
    from fcmoe.config_sections import ConfigError

    with pytest.raises(ConfigError, match="instruction data has none"):
        load_config(overrides=["data.name=instruct", "partition.concept_shift=0.2"])
    with pytest.raises(ConfigError, match="use data.name = 'instruct-file'"):
        load_config(overrides=["data.name=instruct", "data.path=x.jsonl"])
    with pytest.raises(ConfigError, match="model.finetune = 'lora' with model.name = 'smollm2-moe'"):
        load_config(overrides=["data.name=instruct", "model.finetune=lora"])
