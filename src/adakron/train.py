"""Fine-tuning on transformers.Trainer: the recipe, the method (AdaKron, plain adapter, LoRA, full),
per-epoch evaluation with the best epoch kept, and the run's files (adapter, metrics, results, plot)."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import ProgressCallback, TrainerCallback

from . import __version__
from .config import AdaKronConfig
from .data import Examples, LabelSpace, UsageError, encode_labels, infer_label_space, read_file, tokenize
from .glue import get_task, load_glue
from .inject import trainable_parameters
from .metrics import MAIN_METRIC, compute, predictions_from_logits
from .optim import DOWN_LR_RATIO, UP_LR_RATIO

logger = logging.getLogger(__name__)

METHODS = ("adakron", "adapter", "lora", "full")
TASK_FILE = "task.json"
FULL_MODEL_DIR = "model"


@dataclass(frozen=True)
class Recipe:
    lr: float  # for adakron, adapter and lora; full fine-tuning uses FULL_LR
    epochs: int
    batch_size: int
    max_length: int


# Per-task defaults, sized for a 2-core CPU (the paper runs 20-80 epochs on a GPU); see README.
RECIPES = {
    "cola": Recipe(5e-4, 10, 32, 64),
    "sst2": Recipe(5e-4, 2, 32, 64),
    "mrpc": Recipe(5e-4, 10, 32, 128),
    "qqp": Recipe(5e-4, 1, 32, 128),
    "stsb": Recipe(5e-4, 10, 32, 128),
    "mnli": Recipe(5e-4, 1, 32, 128),
    "qnli": Recipe(5e-4, 1, 32, 128),
    "rte": Recipe(5e-4, 10, 32, 256),
    "wnli": Recipe(5e-4, 5, 32, 128),
}
OWN_DATA_RECIPE = Recipe(5e-4, 5, 32, 128)
FULL_LR = 5e-5


@dataclass(frozen=True)
class AdapterRecipe:
    """How an AdaKron adapter starts and how fast each of its factors learns (relative to ``--lr``)."""

    init: str
    outer_bias: float
    down_lr_ratio: float
    up_lr_ratio: float


_CONFIG_DEFAULTS = {f.name: f.default for f in fields(AdaKronConfig)}
ADAPTER_RECIPES = {
    # The library's defaults, set from benchmarks/recipe.py: read from where they are defined.
    "default": AdapterRecipe(_CONFIG_DEFAULTS["init"], _CONFIG_DEFAULTS["outer_bias"], DOWN_LR_RATIO, UP_LR_RATIO),
    # The authors' code (DetectiveMB/AdaKron): every adapter weight N(0, 0.02), zero biases, one lr.
    "paper": AdapterRecipe("reference", 0.0, 1.0, 1.0),
}


@dataclass
class TrainArgs:
    """Everything a run depends on; saved in results.json."""

    task: str | None = None
    model: str | None = None
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str = "label"
    task_type: str | None = None  # classification | regression; None = inferred from the labels
    method: str = "adakron"
    rank: int = 16
    kron_factor: int = 4
    # The adapter recipe: None = from --recipe ("default": AdaKronConfig's and optim's defaults; "paper": the
    # authors' code, i.e. their init and one learning rate for everything).
    recipe: str = "default"
    init: str | None = None
    outer_bias: float | None = None
    down_lr_ratio: float | None = None
    up_lr_ratio: float | None = None
    placement: str = "ffn"
    lora_r: int = 8
    lora_alpha: int = 16
    epochs: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_length: int | None = None
    warmup_ratio: float = 0.06
    weight_decay: float = 0.1
    seed: int = 42
    output_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_steps: int | None = None  # evaluate (and checkpoint) every N steps instead of every epoch
    pad_to_max_length: bool = False
    # Measured (benchmarks/speed.py --epoch-cost): an SST-2 epoch costs 0.34x of random batches.
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    resume: bool = False
    overwrite: bool = False
    plot: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """A run's validated inputs: nothing is written before all of this succeeds."""

    args: TrainArgs
    name: str
    train: Examples
    devs: dict[str, Examples]
    labels: LabelSpace
    text_columns: list[str]
    metric: str
    output_dir: Path

    @property
    def main_key(self) -> str:
        """The metric that picks the best epoch, as the Trainer names it (first dev split)."""
        return f"{next(iter(self.devs))}_{MAIN_METRIC[self.metric]}"


def prepare(args: TrainArgs) -> Prepared:
    if args.method not in METHODS:
        raise UsageError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.task and args.train_file:
        raise UsageError("pass either --task (GLUE) or --train-file (your own data), not both")
    if args.task:
        task = get_task(args.task)
        train, devs = load_glue(task, args.data_dir)
        labels = LabelSpace(task.labels)
        name, text_columns, metric = task.name, list(task.hub_text_columns), task.metric
        recipe = RECIPES[task.name]
    elif args.train_file:
        if not args.validation_file:
            raise UsageError("--train-file needs --validation-file (labelled rows to evaluate each epoch on)")
        if not args.text_columns:
            raise UsageError("--train-file needs --text-columns (one column, or two comma-separated: a,b)")
        if len(args.text_columns) > 2:
            raise UsageError(f"--text-columns takes one or two columns, got {len(args.text_columns)}")
        raw_train = read_file(args.train_file, args.text_columns, args.label_column)
        raw_dev = read_file(args.validation_file, args.text_columns, args.label_column)
        labels = infer_label_space(raw_train.labels, args.task_type)
        train = encode_labels(raw_train, labels, args.train_file)
        devs = {"dev": encode_labels(raw_dev, labels, args.validation_file)}
        name, text_columns = Path(args.train_file).stem, list(args.text_columns)
        metric = "correlation" if labels.regression else "accuracy"
        recipe = OWN_DATA_RECIPE
    else:
        raise UsageError("nothing to train on: pass --task NAME (a GLUE task) or --train-file/--validation-file")
    args = _with_recipe(args, recipe)
    output_dir = Path(args.output_dir or f"runs/{name}-{args.method}")
    args = TrainArgs(**{**asdict(args), "output_dir": str(output_dir)})
    _check_output_dir(output_dir, args)
    train = train.head(args.max_train_samples)
    devs = {k: v.head(args.max_eval_samples) for k, v in devs.items()}
    return Prepared(args, name, train, devs, labels, text_columns, metric, output_dir)


def _with_recipe(args: TrainArgs, recipe: Recipe) -> TrainArgs:
    """Fill what the user left open from the task's recipe, then check every number."""
    if args.recipe not in ADAPTER_RECIPES:
        raise UsageError(f"unknown --recipe {args.recipe!r}; choose one of {', '.join(ADAPTER_RECIPES)}")
    adapter_recipe = ADAPTER_RECIPES[args.recipe]
    chosen = dict(
        **{k: getattr(adapter_recipe, k) if getattr(args, k) is None else getattr(args, k)
           for k in asdict(adapter_recipe)},
        epochs=recipe.epochs if args.epochs is None else args.epochs,
        lr=(FULL_LR if args.method == "full" else recipe.lr) if args.lr is None else args.lr,
        batch_size=recipe.batch_size if args.batch_size is None else args.batch_size,
        max_length=recipe.max_length if args.max_length is None else args.max_length,
    )
    numbers = {**{k: getattr(args, k) for k in ("rank", "kron_factor", "lora_r", "max_train_samples",
                                                "max_eval_samples", "eval_steps")},
               **{k: v for k, v in chosen.items() if k not in ("init", "outer_bias")}}
    for key, value in numbers.items():
        if value is not None and not value > 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {value}")
    if not 0 <= args.warmup_ratio < 1:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.method in ("adakron", "adapter"):
        adakron_config(TrainArgs(**{**asdict(args), **chosen}))  # a UsageError now, not after tokenizing
    return TrainArgs(**{**asdict(args), **chosen})


def adakron_config(args: TrainArgs, method: str | None = None) -> AdaKronConfig:
    """The adapter of ``--method adakron`` (or ``adapter``: the one-factor case) from the run's flags."""
    recipe = ADAPTER_RECIPES.get(args.recipe, ADAPTER_RECIPES["default"])
    try:
        return AdaKronConfig(rank=args.rank, kron_factor=1 if (method or args.method) == "adapter" else
                             args.kron_factor, placement=args.placement,
                             init=recipe.init if args.init is None else args.init,
                             outer_bias=recipe.outer_bias if args.outer_bias is None else args.outer_bias)
    except ValueError as e:
        raise UsageError(str(e)) from None


RUN_ARGS = "adakron_train_args.json"  # inside checkpoints/: what a resumed run must match
CHECKPOINTS = "checkpoints"
# Everything a run writes into --output-dir (peft's save_pretrained adds its README.md model card): --overwrite
# removes these and nothing else.
RUN_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", TASK_FILE, "metrics.jsonl", "results.json",
               "curves.png", CHECKPOINTS, FULL_MODEL_DIR, "README.md")


def _foreign_entries(output_dir: Path) -> list[str]:
    """What ``output_dir`` holds that no run wrote (a README.md counts as a run's only beside its task.json)."""
    names = sorted(p.name for p in output_dir.iterdir())
    run_dir = (output_dir / TASK_FILE).is_file() or (output_dir / "results.json").is_file()
    return [n for n in names if n not in RUN_OUTPUTS or (n == "README.md" and not run_dir)]


def _inputs(args: TrainArgs) -> list[Path]:
    return [Path(p).resolve() for p in (args.train_file, args.validation_file, args.data_dir, args.model)
            if p and Path(p).exists()]


def _check_output_dir(output_dir: Path, args: TrainArgs) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir {output_dir} is a file")
    if args.resume and args.overwrite:
        raise UsageError("pass --resume or --overwrite, not both")
    if args.resume:
        saved = output_dir / CHECKPOINTS / RUN_ARGS
        if not saved.is_file():
            finished = (output_dir / "results.json").is_file()
            raise UsageError(f"nothing to resume in {output_dir}: " + (
                "that run has finished (pass --overwrite to train again)" if finished else
                "no epoch checkpoint was written yet (start again with --overwrite)"))
        before = json.loads(saved.read_text())
        now = _comparable(args)
        changed = sorted(k for k in now if before.get(k) != now[k])
        if changed:
            raise UsageError(f"--resume needs the same settings as the run in {output_dir}; these differ: "
                             f"{', '.join(changed)}")
    elif output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite:
        raise UsageError(f"output dir {output_dir} exists and is not empty; pass --overwrite to replace it "
                         f"or --resume to continue its run")
    elif args.overwrite and output_dir.is_dir():
        inside = [p for p in _inputs(args) if p == output_dir.resolve() or output_dir.resolve() in p.parents]
        if inside:
            raise UsageError(f"--output-dir {output_dir} holds this run's input {inside[0]}; write the run elsewhere")
        foreign = _foreign_entries(output_dir)
        if foreign:
            raise UsageError(f"--overwrite replaces only what adakron train writes, but {output_dir} also holds "
                             f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}; pick another "
                             "--output-dir")


def _remove_run_outputs(output_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _comparable(args: TrainArgs) -> dict[str, Any]:
    return {k: v for k, v in asdict(args).items() if k not in ("resume", "overwrite", "extra", "plot")}


def fit(args: TrainArgs, callbacks: list | None = None) -> dict[str, Any]:
    """Train, keep the best epoch, and write the run's files; returns results.json's content."""
    prepared = prepare(args)
    args, output_dir = prepared.args, prepared.output_dir
    started = time.time()
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from .backbone import load_tokenizer, resolve_model

    try:
        training_args = _training_arguments(args, output_dir / CHECKPOINTS, prepared.main_key)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    total_steps = math.ceil(len(prepared.train) / args.batch_size) * args.epochs
    if args.eval_steps and args.eval_steps > total_steps:
        raise UsageError(f"--eval-steps {args.eval_steps} is more than the run's {total_steps:.0f} steps")
    set_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    model = _build_model(args, prepared.labels)
    from .backbone import capped_length

    # A longer --max-length than the model takes is capped (with a warning): the run records what it used.
    requested = args  # what --resume compares with: the flags as given
    args = prepared.args = TrainArgs(**{**asdict(args), "max_length": capped_length(args.max_length, model,
                                                                                    tokenizer)})
    train_data = tokenize(prepared.train, tokenizer, args.max_length, args.pad_to_max_length)
    dev_data = {k: tokenize(v, tokenizer, args.max_length, args.pad_to_max_length) for k, v in prepared.devs.items()}
    with training_args.main_process_first(local=False, desc="preparing the output dir"):
        if training_args.process_index == 0:  # one process (of torchrun's) touches the folder
            if args.overwrite and output_dir.exists():
                _remove_run_outputs(output_dir)
            (output_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            (output_dir / CHECKPOINTS / RUN_ARGS).write_text(json.dumps(_comparable(requested), sort_keys=True))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=dev_data,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_metric_function(prepared),
        callbacks=[EpochReport(output_dir, prepared), *(callbacks or [])],
        optimizers=(_optimizer(model, args), None),
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(BarOnlyProgress())
    resume = args.resume and any((output_dir / CHECKPOINTS).glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    if trainer.is_world_process_zero():
        results = _finish(trainer, prepared, resolve_model(args.model), time.time() - started)
        shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)
        return results
    return {}


def _optimizer(model, args: TrainArgs):
    """AdamW with a learning rate per adapter factor for AdaKron and the plain adapter (None: the Trainer's own,
    the same AdamW with one lr, for LoRA and full fine-tuning)."""
    if args.method not in ("adakron", "adapter"):
        return None
    from .optim import parameter_groups

    return torch.optim.AdamW(parameter_groups(model, args.lr, args.weight_decay, args.down_lr_ratio,
                                              args.up_lr_ratio))


def _build_model(args: TrainArgs, labels: LabelSpace):
    from .backbone import load_classifier

    names = labels.names or ("score",)
    model = load_classifier(args.model, labels.num_labels, id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)},
                            problem_type="regression" if labels.regression else "single_label_classification")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_method(model, args.method, args)


def apply_method(model, method: str, args: TrainArgs, train_pooler: bool = True):
    """The model, made ready to train with ``method`` (in place where the method allows).

    ``train_pooler=False`` leaves the base model's pooler frozen, as peft's LoRA does by default; only
    benchmarks/pooler_probe.py asks for it, to show what that costs."""
    from .inject import pooler_path

    pooler = pooler_path(model)
    if method in ("adakron", "adapter"):
        from .inject import add_adapter, head_names

        config = adakron_config(args, method)
        if pooler and not train_pooler:
            config = config.replace(head_modules=tuple(h for h in head_names(model, config) if h != pooler))
        return add_adapter(model, config)
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        # The same head as AdaKron's: peft trains the classifier; the pooler must be asked for.
        head = [pooler] if pooler and train_pooler else None
        return get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=args.lora_r, lora_alpha=args.lora_alpha,
                                                lora_dropout=0.1, modules_to_save=head))
    return model  # full fine-tuning: everything trains


def _training_arguments(args: TrainArgs, checkpoints: Path, main_key: str):
    from transformers import TrainingArguments

    every = "steps" if args.eval_steps else "epoch"
    return TrainingArguments(
        output_dir=str(checkpoints),
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size * 2,
        warmup_steps=args.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=args.weight_decay,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        eval_strategy=every,
        save_strategy=every,
        logging_strategy=every,
        eval_steps=args.eval_steps,
        save_steps=args.eval_steps,
        logging_steps=args.eval_steps,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model=main_key,
        greater_is_better=True,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        seed=args.seed,
        bf16=args.bf16,
        fp16=args.fp16,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA, multi-process runs (torchrun, accelerate launch) are DDP over gloo on the CPU.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
        # Classification losses are per-example means: DDP's gradient average is already the global mean.
        average_tokens_across_devices=False,
        ddp_find_unused_parameters=False,  # frozen weights are not DDP parameters; all trainable ones get grads
        disable_tqdm=False,
    )


def _metric_function(prepared: Prepared):
    def compute_metrics(eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = predictions_from_logits(np.asarray(logits), prepared.labels.regression)
        return compute(prepared.metric, predictions, np.asarray(eval_pred.label_ids))

    return compute_metrics


def epoch_records(log_history: list[dict]) -> list[dict[str, Any]]:
    """One record per evaluation: epoch, step, train loss since the previous one, dev metrics of every
    split (the Trainer logs each split as its own entry), seconds."""
    records: dict[int, dict[str, Any]] = {}
    loss = None
    for entry in log_history:
        if "loss" in entry:
            loss = entry["loss"]
        dev = {k[len("eval_"):]: v for k, v in entry.items() if k.startswith("eval_") and not k.endswith(
            ("_runtime", "_per_second", "_loss"))}
        if dev:
            record = records.setdefault(entry["step"], {"epoch": round(entry["epoch"], 4), "step": entry["step"],
                                                        "train_loss": loss, "dev": {}, "seconds": None})
            record["dev"].update(dev)
            record["seconds"] = entry.get("seconds", record["seconds"])
    return list(records.values())


class BarOnlyProgress(ProgressCallback):
    """The progress bar, without the raw log dicts printed under it (EpochReport prints one line)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class EpochReport(TrainerCallback):
    """Prints a line per evaluation and keeps metrics.jsonl current (rebuilt from the trainer's log
    history, which a resumed run restores, so the file never holds a half-run's duplicates)."""

    def __init__(self, output_dir: Path, prepared: Prepared):
        self.output_dir, self.prepared = output_dir, prepared
        self.since = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.since = time.time()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not state.log_history:
            return
        if "seconds" not in state.log_history[-1] and self._is_last_split(state.log_history[-1]):
            state.log_history[-1]["seconds"] = round(time.time() - self.since, 3)
            self.since = time.time()
            records = epoch_records(state.log_history)
            _write_jsonl(self.output_dir / "metrics.jsonl", records)
            self._print(records[-1], state)

    def _is_last_split(self, entry: dict) -> bool:
        return f"eval_{list(self.prepared.devs)[-1]}_runtime" in entry

    def _print(self, record: dict, state) -> None:
        from tqdm.auto import tqdm

        loss = f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-"
        dev = "  ".join(f"{k} {v:.4f}" for k, v in record["dev"].items())
        tqdm.write(f"epoch {record['epoch']:.2f}/{state.num_train_epochs}  loss {loss}  {dev}  "
                   f"{record['seconds']:.1f}s")


def _orderable(value: float | None) -> float:
    # A correlation is undefined (NaN) when every prediction is the same: such an epoch never wins.
    return float("-inf") if value is None or math.isnan(value) else value


def _json_safe(value: Any) -> Any:
    """NaN becomes null, so the files stay standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(_json_safe(r), sort_keys=True) + "\n" for r in records))
    os.replace(tmp, path)


def _finish(trainer, prepared: Prepared, base_model: str, wall: float) -> dict[str, Any]:
    args, output_dir = prepared.args, prepared.output_dir
    model = trainer.model
    records = epoch_records(trainer.state.log_history)
    main_key = prepared.main_key
    best = max(records, key=lambda r: _orderable(r["dev"][main_key]))
    save_trained(model, args.method, output_dir, trainer.processing_class)
    task_info = {"task": args.task and prepared.name, "method": args.method, "text_columns": prepared.text_columns,
                 "max_length": args.max_length, "base_model": args.model or "all-MiniLM-L6-v2",
                 "label_names": list(prepared.labels.names) if prepared.labels.names else None}
    (output_dir / TASK_FILE).write_text(json.dumps(task_info, indent=2))
    trainable, total = trainable_parameters(model)
    results = {
        "task": prepared.name,
        "method": args.method,
        "base_model": base_model,
        "main_metric": main_key,
        "best": {"epoch": best["epoch"], **best["dev"]},
        "last": {"epoch": records[-1]["epoch"], **records[-1]["dev"]},
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "train_examples": len(prepared.train),
        "wall_seconds": round(sum(r["seconds"] or 0 for r in records), 2),
        "process_seconds": round(wall, 1),
        "seed": args.seed,
        "hyperparameters": {k: v for k, v in asdict(args).items() if k not in ("resume", "overwrite", "extra")},
        "versions": _versions(),
    }
    (output_dir / "results.json").write_text(json.dumps(_json_safe(results), indent=2, sort_keys=True))
    _write_jsonl(output_dir / "metrics.jsonl", records)
    if args.plot:
        from .plots import plot_curves

        plot_curves(records, main_key, output_dir / "curves.png", title=f"{prepared.name} · {args.method}")
    return results


def save_trained(model, method: str, output_dir: Path, tokenizer) -> None:
    if method in ("adakron", "adapter"):
        from .checkpoint import save_adapter

        save_adapter(model, output_dir)
    elif method == "lora":
        model.save_pretrained(output_dir)
    else:
        model.save_pretrained(output_dir / FULL_MODEL_DIR)
        tokenizer.save_pretrained(output_dir / FULL_MODEL_DIR)


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"adakron": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}
