"""A user's own labelled text: CSV, JSON Lines or Parquet files with a column mapping.

``data.path`` is the training file; ``data.test_path`` the global test file (optional: without it,
``data.holdout_fraction`` of each class of the training file is held out with a fixed seed). Columns are mapped by
``data.text_column``, ``data.label_column`` and, for natural partitions, ``data.group_column`` (exposed as group
"group"). Labels may be strings or integers, any number of classes; ``data.labels`` fixes the class set and order,
otherwise the sorted distinct training labels are the classes. Every problem stops before training with one line
naming the file, the row or column, and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fcmoe.data.corpus import DataError, TextCorpus, encode_labels, hold_out
from fcmoe.errors import first_line

LOCAL_FORMATS = ("csv", "jsonl", "parquet")


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns hold the text, the label and (optionally) the natural group."""

    text: str = "text"
    label: str = "label"
    group: str = ""


def read_table(path: str | Path, fmt: str) -> pd.DataFrame:
    """The file as a DataFrame of strings; a missing, empty or unparsable file is a :class:`DataError`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data file {str(file)!r} does not exist; set data.path (and data.test_path) to your "
                        f"{fmt} file")
    try:
        if fmt == "csv":
            frame = pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8")
        elif fmt == "jsonl":
            frame = pd.read_json(file, lines=True, dtype=False)
        elif fmt == "parquet":
            frame = pd.read_parquet(file)
        else:
            raise DataError(f"data format {fmt!r}: choose one of {', '.join(LOCAL_FORMATS)}")
    except DataError:
        raise
    except UnicodeDecodeError as err:
        raise DataError(f"data file {str(file)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                        f"{err.start}; Latin-1 or Windows-1252?); save it as UTF-8, e.g. "
                        f"iconv -f latin1 -t utf-8 {file.name} > utf8-{file.name}") from None
    except Exception as err:  # pandas / pyarrow raise many parser error types
        reason = first_line(err)
        raise DataError(f"data file {str(file)!r} is not valid {fmt} ({reason}); fix the file or data.name") from None
    if frame.empty:
        raise DataError(f"data file {str(file)!r} has no rows")
    return frame


def file_line(fmt: str) -> Callable[[int], str]:
    """Row index of a table read from a ``fmt`` file → where a person finds it: the file's line (CSV: after the
    header; JSON Lines: one row a line; a quoted CSV cell spanning lines shifts it) or the row's number."""
    first = {"csv": 2, "jsonl": 1}.get(fmt)
    return (lambda row: f"line {row + first}") if first else (lambda row: f"row {row + 1}")


def corpus_from_table(frame: pd.DataFrame, columns: ColumnMapping, label_names: Sequence[str] | None, source: str,
                      require_every_class: bool = True, where: Callable[[int], str] = "row {}".format,
                      ) -> TextCorpus:
    """Map columns to a :class:`TextCorpus`; rows with an empty text or label are errors, not silently dropped.
    ``where`` names a row in errors (:func:`file_line`)."""
    for role, column in (("text", columns.text), ("label", columns.label), ("group", columns.group)):
        if column and column not in frame.columns:
            have = ", ".join(map(str, frame.columns))
            raise DataError(f"{source}: no column {column!r} for the {role} (columns: {have}); set "
                            f"data.{role}_column{_separator_hint(frame)}")
    texts = [_cell(v) for v in frame[columns.text]]
    values = [_cell(v) for v in frame[columns.label]]
    for role, cells in (("text", texts), ("label", values)):
        empty = [i for i, c in enumerate(cells) if not c]
        if empty:
            raise DataError(f"{source}: {where(empty[0])} has an empty {role} ({len(empty)} such rows); fill or "
                            "remove them")
    labels, names = encode_labels(values, label_names, source, require_every_class, where)
    groups = {"group": np.array([_cell(v) for v in frame[columns.group]], dtype=object)} if columns.group else {}
    return TextCorpus(texts, labels, names, groups)


def load_local(fmt: str, path: str, test_path: str, columns: ColumnMapping, label_names: Sequence[str] | None,
               holdout_fraction: float, seed: int) -> tuple[TextCorpus, TextCorpus]:
    """(train, test) corpora from local files; see the module docstring."""
    if not path:
        raise DataError(f"data.path is empty: data.name = {fmt!r} reads your own file, e.g. "
                        f"--set data.path=train.{fmt}")
    train = corpus_from_table(read_table(path, fmt), columns, label_names, str(path), where=file_line(fmt))
    if not test_path:
        return hold_out(train, holdout_fraction, seed)
    test = corpus_from_table(read_table(test_path, fmt), columns, train.label_names, str(test_path),
                             require_every_class=False, where=file_line(fmt))
    return train, test


def _separator_hint(frame: pd.DataFrame) -> str:
    """A hint when a CSV was read as one column because its fields are separated by something else."""
    if len(frame.columns) != 1:
        return ""
    header = str(frame.columns[0])
    found = [name for sep, name in ((";", "';'"), ("\t", "tabs"), ("|", "'|'")) if sep in header]
    return f"; the file looks separated by {found[0]}, not commas: save it comma-separated" if found else ""


def _cell(value: object) -> str:
    """A cell as stripped text; integers stay integers ("3", not "3.0"), missing values become ""."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()
