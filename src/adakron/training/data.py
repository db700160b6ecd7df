"""Users' own data (CSV, TSV, JSON lines) -> examples; examples -> a tokenized dataset."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError


@dataclass
class Examples:
    texts: list[tuple[str, ...]]  # one or two texts per example
    labels: list[Any]  # class ids, floats, or raw values before encoding; None when unlabelled
    records: list[dict[str, Any]] | None = None  # every column of the user's rows, for `predict` to pass through

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> Examples:
        if n is None:
            return self
        return Examples(self.texts[:n], self.labels[:n], self.records[:n] if self.records else None)


FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
_INT = re.compile(r"[+-]?\d+")


def read_file(path: str | Path, text_columns: list[str], label_column: str | None) -> Examples:
    """Rows of a CSV/TSV (with a header) or JSON-lines file; labels stay raw (strings or JSON values)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"{path}: unknown format {path.suffix!r}; use .csv, .tsv or .jsonl")
    wanted = [*text_columns, *([label_column] if label_column else [])]
    records = _jsonl_records(path) if kind == "jsonl" else _table_records(path, kind)
    texts, labels, kept = [], [], []
    for line, record in readable(records, path):
        missing = [c for c in wanted if c not in record]
        if missing:
            where = f"{path}:{line}" if kind == "jsonl" else str(path)
            raise UsageError(f"{where}: no column {missing[0]!r}; columns present: {column_names(record)}")
        texts.append(tuple(_text(record[c], path, line, c) for c in text_columns))
        labels.append(_label(record[label_column], path, line, label_column) if label_column else None)
        kept.append(record)
    if not texts:
        raise UsageError(f"{path} holds no examples")
    return Examples(texts, labels, kept)


def column_names(columns) -> str:
    """Column names for a one-line message: a name with a line break or other control character (a quoted CSV
    header may hold one) is shown as its repr."""
    return ", ".join(repr(c) if not c.isprintable() else c for c in columns)


def readable(rows, path: Path):
    """``rows`` as they come, with a file that is not UTF-8 text or that the csv module cannot parse (a NUL
    byte, a field over its size limit) turned into one line naming the file and what to do."""
    try:
        yield from rows
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (undecodable byte 0x{e.object[e.start]:02x}); save it "
                         "as UTF-8") from None
    except csv.Error as e:
        raise UsageError(f"{path}: cannot be read as {path.suffix.lstrip('.').upper()} ({e})") from None


# A text field may be long (a document): the csv module's default limit of 128 KiB per field would refuse it.
csv.field_size_limit(2**31 - 1)


def _table_records(path: Path, kind: str):
    # TSV is taken unquoted, as GLUE writes it; CSV follows the usual quoting rules.
    quoting = csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if kind == "tsv" else ",", quoting=quoting)
        header = next(reader, None)
        if not header:
            return
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise UsageError(f"{path}: the header names {', '.join(map(repr, repeated))} more than once; give every "
                             "column its own name")
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise UsageError(f"{path}:{reader.line_num}: expected {len(header)} fields ({column_names(header)}), "
                                 f"found {len(row)}")
            yield reader.line_num, dict(zip(header, row))


def _integer_order(text: str) -> tuple:
    # Numeric order without int(): Python refuses to convert strings of more than 4300 digits.
    digits = text.lstrip("+-").lstrip("0")
    if text.startswith("-") and digits:
        return (0, -len(digits), tuple(-int(c) for c in digits), text)
    return (1, len(digits), digits, text)


def _jsonl_records(path: Path):
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{line}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise UsageError(f"{path}:{line}: JSON nested too deeply to read") from None
            if not isinstance(record, dict):
                raise UsageError(f"{path}:{line}: expected a JSON object per line")
            yield line, record


def _text(value: Any, path: Path, line: int, column: str) -> str:
    if not isinstance(value, str):
        if value is None or isinstance(value, (dict, list)):
            raise UsageError(f"{path}:{line}: column {column!r} must hold text, found {value!r}")
        value = str(value)
    if not is_valid_text(value):
        raise UsageError(f"{path}:{line}: column {column!r} is not valid Unicode text (a lone surrogate such as "
                         "\\ud800, which no UTF-8 file or tokenizer can hold)")
    return value


def _label(value: Any, path: Path, line: int, column: str) -> Any:
    if value is None or isinstance(value, (dict, list)) or (isinstance(value, str) and not value.strip()):
        raise UsageError(f"{path}:{line}: column {column!r} must hold a label (a class name or a number), found "
                         f"{value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{path}:{line}: label {value!r} is not a finite number")
    if isinstance(value, str) and not is_valid_text(value):
        raise UsageError(f"{path}:{line}: column {column!r} is not valid Unicode text")
    return value


def is_valid_text(text: str) -> bool:
    """False for strings UTF-8 cannot encode: lone surrogates, which JSON's \\ud800 escapes can produce."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class LabelSpace:
    names: tuple[str, ...] | None  # class names by id; None = regression

    @property
    def num_labels(self) -> int:
        return 1 if self.names is None else len(self.names)

    @property
    def regression(self) -> bool:
        return self.names is None


def infer_label_space(values: list[Any], task_type: str | None = None) -> LabelSpace:
    """Integers (or any strings) are classes, sorted; other numbers mean regression, unless overridden."""
    as_text = [str(v) for v in values]
    numbers = _floats(as_text)
    if task_type is None:
        task_type = "regression" if numbers is not None and not all(_INT.fullmatch(t) for t in as_text) \
            else "classification"
    if task_type == "regression":
        if numbers is None:
            bad = next(t for t in as_text if _floats([t]) is None)
            raise UsageError(f"regression needs numeric labels; found {bad!r}")
        bad = next((t for t, x in zip(as_text, numbers) if not math.isfinite(x)), None)
        if bad is not None:
            raise UsageError(f"regression labels must be finite numbers; found {bad!r}")
        return LabelSpace(None)
    unique = sorted(set(as_text), key=_integer_order) if all(_INT.fullmatch(t) for t in as_text) \
        else sorted(set(as_text))
    if len(unique) < 2:
        raise UsageError(f"classification needs at least two distinct labels; found only {unique}")
    return LabelSpace(tuple(unique))


def _floats(texts: list[str]) -> list[float] | None:
    try:
        return [float(t) for t in texts]
    except ValueError:
        return None


def encode_labels(examples: Examples, space: LabelSpace, source: str, accept_ids: bool = False) -> Examples:
    """Raw labels -> class ids (or floats); labels the space does not know are an error naming them.

    ``accept_ids``: a label may also be a class id (0 .. n-1), as in GLUE files whose label names the adapter
    knows only because they were given to the ids."""
    if space.regression:
        numbers = _floats([str(v) for v in examples.labels])
        if numbers is None or not all(math.isfinite(x) for x in numbers):
            raise UsageError(f"{source}: regression labels must be finite numbers")
        return Examples(examples.texts, numbers, examples.records)
    index = {name: i for i, name in enumerate(space.names)}
    if accept_ids:
        index = {**{str(i): i for i in range(len(space.names))}, **index}
    unseen = sorted({str(v) for v in examples.labels} - set(index))
    if unseen:
        raise UsageError(f"{source}: labels not seen in training: {', '.join(unseen[:10])}")
    return Examples(examples.texts, [index[str(v)] for v in examples.labels], examples.records)


def tokenize(examples: Examples, tokenizer, max_length: int, pad_to_max_length: bool = False):
    """A datasets.Dataset of input_ids/attention_mask(/labels); padding is left to the collator unless asked."""
    from datasets import Dataset

    columns = {f"text_{i}": [t[i] for t in examples.texts] for i in range(len(examples.texts[0]))}
    has_labels = examples.labels and examples.labels[0] is not None
    if has_labels:
        columns["labels"] = examples.labels
    dataset = Dataset.from_dict(columns)
    text_keys = [k for k in columns if k.startswith("text_")]

    def encode(batch):
        return tokenizer(*(batch[k] for k in text_keys), truncation=True, max_length=max_length,
                         padding="max_length" if pad_to_max_length else False)

    return dataset.map(encode, batched=True, remove_columns=text_keys, desc="Tokenizing")
