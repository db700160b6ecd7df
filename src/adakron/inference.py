"""Using a trained run: load it back (any method), evaluate it on labelled data, predict on new data."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CONFIG_NAME, AdapterLoadError, load_adapter, read_adapter
from .data import FORMATS, Examples, LabelSpace, UsageError, encode_labels, read_file, tokenize
from .glue import get_task, load_glue
from .metrics import compute, predictions_from_logits
from .train import FULL_MODEL_DIR, TASK_FILE


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
    from .backbone import load_classifier, load_tokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"adapter dir {run_dir} does not exist")
    info = json.loads((run_dir / TASK_FILE).read_text()) if (run_dir / TASK_FILE).is_file() else {}
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
        model = PeftModel.from_pretrained(load_classifier(base, labels.num_labels), run_dir)
        tokenizer = load_tokenizer(base)
    else:
        try:
            config, metadata, _ = read_adapter(run_dir)
            base = base or metadata.get("base_model_name_or_path") or None
            model = load_classifier(base, config.num_labels)
            load_adapter(model, run_dir)
        except AdapterLoadError as e:
            raise UsageError(str(e)) from None
        tokenizer = load_tokenizer(base)
        labels = LabelSpace(None if config.problem_type == "regression" else tuple(config.label_names))
    return Trained(model.eval(), tokenizer, labels, info.get("text_columns"), info.get("max_length", 128),
                   info.get("task"))


def _detect_method(run_dir: Path) -> str:
    if (run_dir / FULL_MODEL_DIR / "config.json").is_file():
        return "full"
    config_path = run_dir / CONFIG_NAME
    if config_path.is_file() and "peft_type" in json.loads(config_path.read_text()):
        return "lora"
    return "adakron"


@torch.no_grad()
def run_model(trained: Trained, examples: Examples, batch_size: int = 64) -> np.ndarray:
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
             max_samples: int | None = None, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Dev metrics of a trained run, per dev split."""
    trained = load_trained(run_dir, model_name)
    task = task or (trained.task if not validation_file else None)
    if task:
        glue_task = get_task(task)
        if glue_task.labels != trained.labels.names:
            raise UsageError(f"this adapter predicts {trained.labels.names or 'a score'}, but {glue_task.name} has "
                             f"labels {glue_task.labels or 'that are scores'}; evaluate it on the task it was "
                             "trained for")
        _, devs = load_glue(glue_task, data_dir, train=False)
        metric = glue_task.metric
    elif validation_file:
        columns = text_columns or trained.text_columns
        if not columns:
            raise UsageError("pass --text-columns: this adapter does not record which columns hold the text")
        raw = read_file(validation_file, columns, label_column)
        devs = {"dev": encode_labels(raw, trained.labels, validation_file)}
        metric = "correlation" if trained.labels.regression else "accuracy"
    else:
        raise UsageError("pass --task NAME or --validation-file FILE to evaluate on")
    results = {}
    for split, examples in devs.items():
        examples = examples.head(max_samples)
        predictions = predictions_from_logits(run_model(trained, examples, batch_size), trained.labels.regression)
        results[split] = compute(metric, predictions, np.asarray(examples.labels))
    return results


def predict(run_dir: str, input_file: str, output_file: str, text_columns: list[str] | None = None,
            model_name: str | None = None, overwrite: bool = False, batch_size: int = 64) -> int:
    """Write each input row with its prediction (label name, or score for regression); returns the row count."""
    output = Path(output_file)
    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    if Path(output_file).suffix.lower() not in FORMATS:
        raise UsageError(f"{output}: unknown format {output.suffix!r}; use .csv, .tsv or .jsonl")
    trained = load_trained(run_dir, model_name)
    columns = text_columns or trained.text_columns
    if not columns:
        raise UsageError("pass --text-columns: this adapter does not record which columns hold the text")
    examples = read_file(input_file, columns, None)
    logits = run_model(trained, examples, batch_size)
    rows = []
    for record, row_logits in zip(examples.records, logits):
        row = dict(record)  # every input column passes through (ids, for one)
        if trained.labels.regression:
            row["prediction"] = float(row_logits[0])
        else:
            probs = torch.softmax(torch.from_numpy(row_logits), -1)
            row["prediction"] = trained.labels.names[int(probs.argmax())]
            row["score"] = round(float(probs.max()), 6)
        rows.append(row)
    _write_rows(output, rows)
    return len(rows)


def _write_rows(path: Path, rows: list[dict]) -> None:
    kind = FORMATS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if kind == "jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",",
                                    quoting=csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL, escapechar="\\")
            writer.writeheader()
            writer.writerows(rows)
    tmp.replace(path)
