"""Instruction data (``task = "sft"``): prompt/response records from the user's files or the hub.

Three record formats, the ones the ecosystem ships (one file may mix them; each record is read by its keys):

- Alpaca: ``instruction``, optional ``input``, ``output`` → prompt = instruction (+ a blank line + input);
- ``prompt`` / ``completion``;
- chat ``messages``: a list of ``{"role", "content"}`` whose last message is the assistant's answer (the response).
  An optional system message and earlier turns become the prompt: a system message first, then the turns as
  ``User: …`` / ``Assistant: …`` lines when there is more than one (a single user turn is the prompt as it is).

Optional per record: ``task`` (default "all": the unit of task partitions and per-task scores) and ``metric``
("rouge" = ROUGE-L, the default; "exact" = exact match, for label-word answers). Files are JSON Lines, JSON (a list
of records, or an object holding one under ``data``), CSV or Parquet (a ``messages`` cell in CSV is JSON text).
Every malformed record, missing field or empty response stops loading with one line naming the file, the line (or
row) and the fix.

The corpus is a :class:`~fcmoe.data.corpus.TextCorpus` whose texts are the prompts, ``responses`` the answers, labels
the tasks (so per-class subsampling is per task, and a Dirichlet partition over labels is one over tasks) and groups
"task" and "metric".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcmoe.data.corpus import DataError, TextCorpus, hold_out
from fcmoe.data.hub import load_dataset_dict
from fcmoe.data.local import file_line, read_table
from fcmoe.errors import first_line

METRICS = ("rouge", "exact")
DEFAULT_TASK = "all"
INSTRUCT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def record_fields(record: Mapping[str, Any], where: str) -> tuple[str, str, str, str]:
    """(prompt, response, task, metric) of one record in any of the three formats; ``where`` names it in errors.
    A field that is null counts as absent (a dataset's rows carry every column)."""
    record = {key: value for key, value in record.items() if value is not None}
    if "messages" in record:
        prompt, response = _chat(record["messages"], where)
    elif "instruction" in record or "output" in record:
        prompt = _text(record.get("instruction"), "instruction", where)
        extra = _optional(record.get("input"))
        prompt = f"{prompt}\n\n{extra}" if extra else prompt
        response = _text(record.get("output"), "output", where)
    elif "prompt" in record or "completion" in record:
        prompt = _text(record.get("prompt"), "prompt", where)
        response = _text(record.get("completion"), "completion", where)
    else:
        have = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: no instruction fields (has {have}); give each record instruction/input/output, "
                        "prompt/completion, or messages")
    task = _optional(record.get("task")) or DEFAULT_TASK
    metric = _optional(record.get("metric")) or METRICS[0]
    if metric not in METRICS:
        raise DataError(f"{where}: metric {metric!r}; use 'rouge' (ROUGE-L) or 'exact' (exact match)")
    return prompt, response, task, metric


def records_corpus(records: Sequence[Mapping[str, Any]], source: str, where: Callable[[int], str],
                   task_names: Sequence[str] | None = None) -> TextCorpus:
    """The instruction corpus of ``records`` (``task_names``: the task set and order of a training corpus, for its
    test corpus; a task the training data lacks is an error)."""
    if not records:
        raise DataError(f"{source} has no records; add prompt/response records")
    rows = []
    for number, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"{source} {where(number)}: a record must be an object with named fields, not "
                            f"{type(record).__name__}")
        rows.append(record_fields(record, f"{source} {where(number)}"))
    tasks = [task for _, _, task, _ in rows]
    names = list(task_names) if task_names is not None else sorted(set(tasks))
    unknown = sorted(set(tasks) - set(names))
    if unknown:
        raise DataError(f"{source}: task {unknown[0]!r} does not occur in the training data (tasks: "
                        f"{', '.join(names)}); fix the record or add the task to the training file")
    index = {name: i for i, name in enumerate(names)}
    metric_of: dict[str, str] = {}
    for number, (_, _, task, metric) in enumerate(rows):
        if metric_of.setdefault(task, metric) != metric:
            raise DataError(f"{source} {where(number)}: task {task!r} is scored by {metric_of[task]!r} elsewhere and "
                            f"{metric!r} here; give every record of a task the same metric")
    return TextCorpus([p for p, _, _, _ in rows], np.array([index[t] for t in tasks], dtype=np.int64), names,
                      {"task": np.array(tasks, dtype=object), "metric": np.array([m for *_, m in rows], dtype=object)},
                      [r for _, r, _, _ in rows])


def read_records(path: str | Path) -> tuple[list[Any], Callable[[int], str]]:
    """The records of an instruction file and how to name record i in errors (its line, or its index)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data file {str(file)!r} does not exist; set data.path to your instruction file "
                        f"({', '.join(INSTRUCT_SUFFIXES)})")
    suffix = file.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _json_lines(file)
        if suffix == ".json":
            return _json_document(file), "record {}".format
        if suffix in (".csv", ".parquet"):
            frame = read_table(file, suffix[1:])
            where = file_line(suffix[1:])
            # a table has every column in every row: a record holds only its non-empty cells
            records = [{k: v for k, v in row.items() if _optional(v)} for row in frame.to_dict("records")]
            for number, record in enumerate(records):
                messages = record.get("messages")
                if isinstance(messages, str):  # CSV: JSON text
                    record["messages"] = _json_cell(messages, f"{file} {where(number)}")
                elif isinstance(messages, np.ndarray):  # Parquet's list column: an array of {role, content}
                    record["messages"] = messages.tolist()
            return records, where
    except UnicodeDecodeError:
        raise DataError(f"data file {str(file)!r} is not UTF-8 text; save it as UTF-8") from None
    raise DataError(f"data file {str(file)!r}: unknown suffix {suffix!r}; instruction files are "
                    f"{', '.join(INSTRUCT_SUFFIXES)}")


def load_instruct_files(path: str, test_path: str, holdout_fraction: float, seed: int,
                        ) -> tuple[TextCorpus, TextCorpus]:
    """(train, test) instruction corpora from the user's files (test: ``test_path``, or ``holdout_fraction`` of each
    task held out, drawn with ``seed``)."""
    if not path:
        raise DataError("data.path is empty: data.name = 'instruct-file' reads your own instruction file, e.g. "
                        "--set data.path=train.jsonl")
    records, where = read_records(path)
    train = records_corpus(records, str(path), where)
    if not test_path:
        return hold_out(train, holdout_fraction, seed)
    records, where = read_records(test_path)
    return train, records_corpus(records, str(test_path), where, train.label_names)


def load_instruct_hub(source: str, holdout_fraction: float, seed: int) -> tuple[TextCorpus, TextCorpus]:
    """An instruction dataset by hub id (or a local folder laid out like one): its ``train`` split, and its
    ``test`` split when it has one (else ``holdout_fraction`` of each task held out)."""
    if not source:
        raise DataError("data.path is empty: data.name = 'instruct-hub' reads a hub dataset, e.g. "
                        "--set data.path=vicgalle/alpaca-gpt4")
    dataset = load_dataset_dict(source, "set data.path to a local copy, or use data.name = 'instruct' (offline)")
    if "train" not in dataset:
        raise DataError(f"dataset {source!r} has no 'train' split (it has {', '.join(dataset)})")
    train = records_corpus(list(dataset["train"]), source, "row {}".format)
    if "test" not in dataset:
        return hold_out(train, holdout_fraction, seed)
    return train, records_corpus(list(dataset["test"]), f"{source} [test]", "row {}".format, train.label_names)


def _chat(messages: Any, where: str) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    turns = []
    for number, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {number} is not a {{role, content}} object")
        turns.append((str(message["role"]), _optional(message["content"])))
    role, response = turns[-1]
    if role != "assistant" or not response:
        raise DataError(f"{where}: the last message must be the assistant's non-empty answer (it is {role!r}"
                        f"{'' if response else ', empty'}); end each conversation with the response to learn")
    system = [text for r, text in turns[:-1] if r == "system"]
    dialogue = [(r, text) for r, text in turns[:-1] if r != "system"]
    if not dialogue or not any(r == "user" for r, _ in dialogue):
        raise DataError(f"{where}: no user message before the answer; add the user's prompt")
    if len(dialogue) == 1:
        body = dialogue[0][1]
    else:
        body = "\n".join(f"{r.capitalize()}: {text}" for r, text in dialogue)
    return "\n\n".join([*system, body]), response


def _text(value: Any, name: str, where: str) -> str:
    text = _optional(value)
    if not text:
        raise DataError(f"{where}: {'no' if value is None else 'empty'} {name!r}; fill it or remove the record")
    return text


def _optional(value: Any) -> str:
    return "" if _missing(value) else str(value).strip()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _json_lines(file: Path) -> tuple[list[Any], Callable[[int], str]]:
    records, lines = [], []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{file} line {number}: not JSON ({err.msg}); one JSON object per line") from None
        lines.append(number)
    return records, lambda i: f"line {lines[i]}"


def _json_document(file: Path) -> list[Any]:
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{file} line {err.lineno}: not JSON ({err.msg}); JSON Lines files end in .jsonl") from None
    if isinstance(document, Mapping) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(f"{file}: a JSON instruction file holds a list of records (or {{\"data\": [...]}})")
    return document


def _json_cell(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: the messages cell is not JSON ({first_line(err)}); write it as a JSON list of "
                        "{role, content} objects") from None
