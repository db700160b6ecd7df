"""Using a trained run: load it back (any method), evaluate it on labelled data, predict on new data."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters.checkpoint import CONFIG_NAME, AdapterLoadError, load_adapter, read_adapter
from ..errors import UsageError, first_line
from .data import FORMATS, Examples, LabelSpace, encode_labels, read_file, tokenize
from .metrics import compute, predictions_from_logits
from .rundir import DEFAULT_MAX_LENGTH, FULL_MODEL_DIR, check_parent_folders, read_task_file
from .tasks import get_task, load_glue, read_split


PREDICTION_COLUMN, SCORE_COLUMN = "prediction", "score"  # the columns `predict` adds (names can be changed)
BATCH_SIZE = 64  # rows per forward pass in eval and predict


@dataclass
class Trained:
    model: torch.nn.Module
    tokenizer: Any
    labels: LabelSpace
    text_columns: list[str] | None
    max_length: int
    task: str | None


def load_trained(run_dir: str | Path, model_name: str | None = None) -> Trained:
    """A run directory written by `adakron train` (or save_adapter), ready for inference."""
    from ..models import load_classifier, load_tokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"adapter dir {run_dir} " + ("is a file: pass the folder a run (or save_adapter) wrote"
                                                       if run_dir.exists() else "does not exist"))
    info = read_task_file(run_dir)
    if info.get("objective") == "causal-lm":
        raise UsageError(f"{run_dir} is a causal-LM run (instruction tuning): use `adakron generate --adapter "
                         f"{run_dir} PROMPT`, or `adakron serve` for its OpenAI-compatible routes")
    method = info.get("method") or _detect_method(run_dir)
    base = model_name or info.get("base_model")
    if method == "full":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(run_dir / FULL_MODEL_DIR)
        tokenizer = load_tokenizer(str(run_dir / FULL_MODEL_DIR))
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        labels = LabelSpace(None if model.config.problem_type == "regression" else tuple(names))
    elif method == "lora":
        from peft import PeftConfig, PeftModel

        names = info.get("label_names")
        labels = LabelSpace(tuple(names) if names else None)
        base = base or PeftConfig.from_pretrained(run_dir).base_model_name_or_path
        classifier = load_classifier(base, labels.num_labels)
        try:
            model = PeftModel.from_pretrained(classifier, run_dir)
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. a size mismatch: another base model
            first = first_line(e)
            raise UsageError(f"the LoRA adapter in {run_dir} does not fit the base model {base!r} ({first}); "
                             "pass the model it was trained on with --model") from None
        tokenizer = load_tokenizer(base)
    else:
        try:
            config, metadata, _ = read_adapter(run_dir)
            base = base or metadata.get("base_model_name_or_path") or None
            model = load_classifier(base, config.num_labels)
            load_adapter(model, run_dir, merge_experts=True)  # MAdaKron serves merged, as it evaluates
        except AdapterLoadError as e:
            raise UsageError(str(e)) from None
        tokenizer = load_tokenizer(base)
        labels = LabelSpace(None if config.problem_type == "regression" else tuple(config.label_names))
    from ..models import capped_length

    max_length = capped_length(info.get("max_length") or DEFAULT_MAX_LENGTH, model, tokenizer)
    return Trained(model.eval(), tokenizer, labels, info.get("text_columns"), max_length, info.get("task"))


def _detect_method(run_dir: Path) -> str:
    if (run_dir / FULL_MODEL_DIR / "config.json").is_file():
        return "full"
    config_path = run_dir / CONFIG_NAME
    try:
        is_peft = config_path.is_file() and "peft_type" in json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise UsageError(f"{config_path} cannot be read as an adapter config ({type(e).__name__}: {e})") from None
    return "lora" if is_peft else "adakron"


def check_batch_size(batch_size: int) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size}")


@torch.no_grad()
def run_model(trained: Trained, examples: Examples, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Logits for every example, in order."""
    from transformers import DataCollatorWithPadding

    dataset = tokenize(Examples(examples.texts, [None] * len(examples)), trained.tokenizer, trained.max_length)
    collate = DataCollatorWithPadding(trained.tokenizer)
    device = next(trained.model.parameters()).device
    outputs = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        outputs.append(trained.model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    return torch.cat(outputs).numpy()


def evaluate(run_dir: str, task: str | None = None, data_dir: str | None = None, validation_file: str | None = None,
             text_columns: list[str] | None = None, label_column: str = "label", model_name: str | None = None,
             max_samples: int | None = None, batch_size: int = BATCH_SIZE) -> dict[str, dict[str, float]]:
    """Dev metrics of a trained run, per dev split.

    ``validation_file`` is what is evaluated whenever it is given. With a GLUE task (``task``, or the task the
    adapter was trained on) a ``.tsv`` is read as that task's GLUE file and scored with its metric; any other
    file is read by ``text_columns``, and a GLUE task's labels may be given as names or as its class ids."""
    check_batch_size(batch_size)
    if max_samples is not None and not (isinstance(max_samples, int) and max_samples >= 1):
        raise UsageError(f"--max-eval-samples must be a positive integer, got {max_samples}")
    trained = load_trained(run_dir, model_name)
    glue_task = get_task(task or trained.task) if (task or trained.task) else None
    if task and glue_task.labels != trained.labels.names:
        raise UsageError(f"this adapter predicts {trained.labels.names or 'a score'}, but {glue_task.name} has "
                         f"labels {glue_task.labels or 'that are scores'}; evaluate it on the task it was "
                         "trained for")
    if validation_file and glue_task and Path(validation_file).suffix.lower() == ".tsv":
        devs = {"dev": read_split(glue_task, Path(validation_file))}
    elif validation_file:
        columns = check_text_columns(text_columns or trained.text_columns, trained)
        raw = read_file(validation_file, columns, label_column)
        ids = glue_task is not None and glue_task.numeric_labels
        devs = {"dev": encode_labels(raw, trained.labels, validation_file, accept_ids=ids)}
    elif glue_task:
        _, devs = load_glue(glue_task, data_dir, train=False)
    else:
        raise UsageError("pass --task NAME or --validation-file FILE to evaluate on")
    metric = glue_task.metric if glue_task else ("correlation" if trained.labels.regression else "accuracy")
    results = {}
    for split, examples in devs.items():
        examples = examples.head(max_samples)
        predictions = predictions_from_logits(run_model(trained, examples, batch_size), trained.labels.regression)
        results[split] = compute(metric, predictions, np.asarray(examples.labels))
    return results


def check_text_columns(columns: list[str] | None, trained: Trained) -> list[str]:
    """The text columns to read: one or two, as many as the adapter was trained on."""
    if not columns:
        raise UsageError("pass --text-columns: this adapter does not record which columns hold the text")
    if len(columns) > 2:
        raise UsageError(f"--text-columns takes one or two columns (a text, or a pair), got {len(columns)}: "
                         f"{', '.join(columns)}")
    if trained.text_columns and len(columns) != len(trained.text_columns):
        kind = "pairs of texts" if len(trained.text_columns) == 2 else "single texts"
        raise UsageError(f"this adapter was trained on {kind} ({', '.join(trained.text_columns)}); "
                         f"--text-columns gave {len(columns)} column(s): {', '.join(columns)}")
    return list(columns)




def predict(run_dir: str, input_file: str, output_file: str, text_columns: list[str] | None = None,
            model_name: str | None = None, overwrite: bool = False, batch_size: int = BATCH_SIZE,
            prediction_column: str = PREDICTION_COLUMN, score_column: str = SCORE_COLUMN) -> int:
    """Write each input row, its fields unchanged, with its prediction (label name, or score for regression)
    and, for classification, the predicted class's probability; returns the row count.

    The two added columns never replace one of the input's: a name the input already uses is refused (pass
    another with ``prediction_column`` / ``score_column``)."""
    check_batch_size(batch_size)
    output = Path(output_file)
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; name the file to write")
    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    check_parent_folders(output, "--output")
    if Path(output_file).suffix.lower() not in FORMATS:
        raise UsageError(f"{output}: unknown format {output.suffix!r}; use .csv, .tsv or .jsonl")
    if output.resolve() == Path(input_file).resolve():
        raise UsageError(f"--output {output} is the input file; write the predictions to another file")
    trained = load_trained(run_dir, model_name)
    columns = check_text_columns(text_columns or trained.text_columns, trained)
    examples = read_file(input_file, columns, None)
    added = [prediction_column] + ([] if trained.labels.regression else [score_column])
    if len(set(added)) < len(added):
        raise UsageError(f"--prediction-column and --score-column are both {prediction_column!r}; name them apart")
    fields = _field_names(examples.records)
    taken = [name for name in added if name in fields]
    if taken:
        flag = "--prediction-column" if taken[0] == prediction_column else "--score-column"
        raise UsageError(f"{input_file} already has a column {taken[0]!r}; pass {flag} NAME to name the output "
                         "column otherwise (the input's columns are never overwritten)")
    if FORMATS[output.suffix.lower()] == "tsv":
        _check_tsv_fields(examples.records, [*fields, *added], trained.labels.names or ())
    logits = run_model(trained, examples, batch_size)
    rows = []
    for record, row_logits in zip(examples.records, logits):
        row = dict(record)  # every input column passes through (ids, for one)
        if trained.labels.regression:
            row[prediction_column] = float(row_logits[0])
        else:
            probs = torch.softmax(torch.from_numpy(row_logits), -1)
            row[prediction_column] = trained.labels.names[int(probs.argmax())]
            row[score_column] = round(float(probs.max()), 6)
        rows.append(row)
    _write_rows(output, rows, [*fields, *added])
    return len(rows)


def _check_tsv_fields(records: list[dict], fields: list[str], label_names) -> None:
    """A field TSV cannot hold unquoted (a tab or line break, from a CSV or JSON-lines input) is refused before
    the model runs, rather than escaped into different text."""
    def bad(text) -> bool:
        return any(c in str(text) for c in "\t\r\n")

    culprit = next((f"column name {key!r}" for key in fields if bad(key)), None) or next(
        (f"row {n}, column {key!r}" for n, record in enumerate(records, start=1) for key, value in record.items()
         if bad(value)), None) or next((f"label name {name!r}" for name in label_names if bad(name)), None)
    if culprit:
        raise UsageError(f"{culprit} holds a tab or line break, which TSV cannot hold unquoted; write .csv or "
                         ".jsonl instead")


def _field_names(records: list[dict]) -> list[str]:
    """Every key of every row, in order of first appearance (JSON-lines rows may differ in their keys)."""
    return list(dict.fromkeys(key for record in records for key in record))


def _write_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    """CSV with standard quoting, TSV unquoted as GLUE writes it, or JSON lines: each field as it came in."""
    kind = FORMATS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if kind == "jsonl":
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            else:
                tsv = kind == "tsv"
                writer = csv.DictWriter(f, fieldnames=fields, restval="", delimiter="\t" if tsv else ",",
                                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
                                        quotechar=None if tsv else '"', lineterminator="\n")
                writer.writeheader()
                writer.writerows(rows)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
