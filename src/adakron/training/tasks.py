"""The GLUE tasks: where their text and labels are, how they are scored, and how to load them
(from a local folder in the standard GLUE layout, or from the hub)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .data import Examples, column_names, readable


@dataclass(frozen=True)
class GlueTask:
    name: str  # our spelling, as on the hub: "sst2"
    folder: str  # the GLUE folder: "SST-2"
    text_columns: tuple[str, ...]  # TSV header names (CoLA has no header: column numbers)
    label_column: str
    labels: tuple[str, ...] | None  # class names by id; None = regression
    metric: str  # a key of metrics.MAIN_METRIC
    hub_text_columns: tuple[str, ...]
    dev_files: tuple[str, ...] = ("dev.tsv",)
    hub_dev_splits: tuple[str, ...] = ("validation",)
    # In these TSVs the label column holds the class id, not its name.
    numeric_labels: bool = True


TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "CoLA", ("3",), "1", ("unacceptable", "acceptable"), "matthews", ("sentence",)),
    GlueTask("sst2", "SST-2", ("sentence",), "label", ("negative", "positive"), "accuracy", ("sentence",)),
    GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent"), "f1",
             ("sentence1", "sentence2")),
    GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate"), "f1",
             ("question1", "question2")),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, "correlation", ("sentence1", "sentence2")),
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
             "accuracy", ("premise", "hypothesis"), dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
             hub_dev_splits=("validation_matched", "validation_mismatched"), numeric_labels=False),
    GlueTask("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), "accuracy",
             ("question", "sentence"), numeric_labels=False),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), "accuracy",
             ("sentence1", "sentence2"), numeric_labels=False),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("not_entailment", "entailment"), "accuracy",
             ("sentence1", "sentence2")),
)}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise UsageError(f"unknown task {name!r}; GLUE tasks: {', '.join(TASKS)} (or pass --train-file for your "
                         "own data)")
    return TASKS[key]


def glue_dir(data_dir: str | None) -> Path | None:
    chosen = data_dir or os.environ.get("GLUE_DIR")
    return Path(chosen) if chosen else None


def load_glue(task: GlueTask, data_dir: str | None,
              train: bool = True) -> tuple[Examples | None, dict[str, Examples]]:
    """(train, {dev split name: dev}) from ``data_dir`` (or $GLUE_DIR), else from the hub. Dev splits are
    named after the GLUE files either way: dev, or dev_matched and dev_mismatched. ``train=False`` skips
    the training split (evaluation needs only dev)."""
    folder = glue_dir(data_dir)
    if folder is not None:
        return _load_tsv(task, folder, train)
    try:
        return _load_hub(task, train)
    except Exception as e:  # offline, hub down, datasets missing: all mean the same to the user
        raise UsageError(
            f"GLUE data for {task.folder} not found: pass --data-dir DIR (a folder holding {task.folder}/train.tsv "
            f"and {task.folder}/{task.dev_files[0]}, e.g. ../shared/data/glue) or set GLUE_DIR=DIR; the hub "
            f"(nyu-mll/glue) could not be reached ({type(e).__name__})"
        ) from None


def dev_names(task: GlueTask) -> list[str]:
    return [Path(f).stem for f in task.dev_files]


def _load_tsv(task: GlueTask, folder: Path, train: bool) -> tuple[Examples | None, dict[str, Examples]]:
    if not folder.is_dir():
        raise UsageError(f"data dir {folder} does not exist; pass the folder that holds {task.folder}/train.tsv")
    devs = {name: read_split(task, folder / task.folder / f) for name, f in zip(dev_names(task), task.dev_files)}
    return (read_split(task, folder / task.folder / "train.tsv") if train else None), devs


def read_split(task: GlueTask, path: Path) -> Examples:
    """One GLUE TSV of ``task`` (its columns, its label encoding), e.g. a dev.tsv kept elsewhere."""
    if not path.is_file():
        raise UsageError(f"{path} does not exist; a GLUE data dir holds <TASK>/train.tsv and <TASK>/dev.tsv")
    # GLUE TSVs are unquoted: a stray '"' is text (QNLI, MRPC, SST-2), so csv quoting must be off.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(readable(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), path))
    if not rows:
        raise UsageError(f"{path} is empty; a GLUE TSV has a header line (for most tasks) and one example per line")
    has_header = not task.text_columns[0].isdigit()
    header = rows[0] if has_header else [str(i) for i in range(len(rows[0]) if rows else 0)]
    body = rows[1:] if has_header else rows
    columns = [_column(header, c, path) for c in (*task.text_columns, task.label_column)]
    texts, labels = [], []
    for line, row in enumerate(body, start=2 if has_header else 1):
        if len(row) < len(header):
            raise UsageError(f"{path}:{line}: expected {len(header)} tab-separated fields, found {len(row)}")
        texts.append(tuple(row[c] for c in columns[:-1]))
        labels.append(_label(task, row[columns[-1]], path, line))
    if not texts:
        raise UsageError(f"{path} holds no examples")
    return Examples(texts, labels)


def _column(header: list[str], name: str, path: Path) -> int:
    if name not in header:
        raise UsageError(f"{path}: no column {name!r}; columns present: {column_names(header)}")
    return header.index(name)


def _label(task: GlueTask, value: str, path: Path, line: int) -> int | float:
    try:
        if task.labels is None:
            return float(value)
        if task.numeric_labels:
            label = int(value)
            if not 0 <= label < len(task.labels):
                raise ValueError
            return label
        return task.labels.index(value)
    except ValueError:
        expected = "a number" if task.labels is None else (
            f"0..{len(task.labels) - 1}" if task.numeric_labels else ", ".join(task.labels))
        raise UsageError(f"{path}:{line}: label {value!r} is not one of {expected}") from None


def _load_hub(task: GlueTask, train: bool) -> tuple[Examples | None, dict[str, Examples]]:
    from datasets import load_dataset

    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "") and not _hub_reachable():
        # Without this, an offline machine spends half a minute in the hub client's retries.
        raise ConnectionError("no network")

    data = load_dataset("nyu-mll/glue", task.name)

    def convert(split: str) -> Examples:
        rows = data[split]
        return Examples(list(zip(*(rows[c] for c in task.hub_text_columns))), list(rows["label"]))

    devs = {name: convert(split) for name, split in zip(dev_names(task), task.hub_dev_splits)}
    return (convert("train") if train else None), devs


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False
