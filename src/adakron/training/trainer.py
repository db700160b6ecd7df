"""Fine-tuning on transformers.Trainer: the method (AdaKron, plain adapter, LoRA, full), per-epoch evaluation
with the best epoch kept, and the run's files (adapter, metrics, results, plot)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import ProgressCallback

from .._version import __version__
from ..adapters.inject import trainable_parameters
from ..errors import UsageError, first_line
from . import causal
from ..models import DEFAULT_MODEL, is_causal_lm
from .consistency import ConsistencyTrainer
from .report import BarOnlyProgress, EpochReport, epoch_records
from .data import Examples, LabelSpace, encode_labels, infer_label_space, read_file, tokenize
from .metrics import MAIN_METRIC, compute, predictions_from_logits
from .recipes import CAUSAL_LM_RECIPE, METHODS, OWN_DATA_RECIPE, RECIPES, TrainArgs, adakron_config, with_recipe
from .rundir import (CHECKPOINTS, EXPERTS_DIR, FULL_MODEL_DIR, RUN_ARGS, TASK_FILE, atomic_write_text,
                     check_output_dir, comparable, json_safe, latest_complete_checkpoint, remove_run_outputs,
                     write_jsonl)
from .tasks import get_task, load_glue

logger = logging.getLogger(__name__)

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
    def causal_lm(self) -> bool:
        return self.metric == causal.METRIC

    @property
    def main_key(self) -> str:
        """The metric that picks the best epoch, as the Trainer names it (first dev split)."""
        return f"{next(iter(self.devs))}_{causal.METRIC if self.causal_lm else MAIN_METRIC[self.metric]}"

    @property
    def greater_is_better(self) -> bool:
        return not self.causal_lm  # a loss, else an accuracy, F1 or correlation


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
    elif args.train_file and not args.text_columns and args.model and is_causal_lm(args.model):
        # A decoder with text columns named is a classifier of them (GPT-2, LLaMA heads); without, instruction data.
        if args.consistency_weight:
            raise UsageError("--consistency-weight is for classification (MAdaKron's consistency loss compares "
                             "class distributions), not for causal-LM training")
        args = with_recipe(args, CAUSAL_LM_RECIPE, causal_lm=True)
        data = causal.read_data(args.train_file, args.validation_file, args.max_train_samples, args.max_eval_samples)
        output_dir = Path(args.output_dir or f"runs/{Path(args.train_file).stem}-{args.method}")
        args = TrainArgs(**{**asdict(args), "output_dir": str(output_dir)})
        check_output_dir(output_dir, args)
        return Prepared(args, Path(args.train_file).stem, data.train, {"dev": data.dev}, None, [], causal.METRIC,
                        output_dir)
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
    args = with_recipe(args, recipe)
    output_dir = Path(args.output_dir or f"runs/{name}-{args.method}")
    args = TrainArgs(**{**asdict(args), "output_dir": str(output_dir)})
    check_output_dir(output_dir, args)
    train = train.head(args.max_train_samples)
    devs = {k: v.head(args.max_eval_samples) for k, v in devs.items()}
    return Prepared(args, name, train, devs, labels, text_columns, metric, output_dir)


def fit(args: TrainArgs, callbacks: list | None = None) -> dict[str, Any]:
    """Train, keep the best epoch, and write the run's files; returns results.json's content."""
    prepared = prepare(args)
    args, output_dir = prepared.args, prepared.output_dir
    started = time.time()
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from ..models import load_tokenizer, resolve_model

    try:
        training_args = _training_arguments(args, output_dir / CHECKPOINTS, prepared.main_key,
                                            prepared.greater_is_better)
    except ValueError as e:
        raise UsageError(first_line(e)) from None
    total_steps = args.max_steps or math.ceil(len(prepared.train) / args.batch_size) * args.epochs
    if args.eval_steps and args.eval_steps > total_steps:
        raise UsageError(f"--eval-steps {args.eval_steps} is more than the run's {total_steps:.0f} steps")
    set_seed(args.seed)
    if prepared.causal_lm:
        from ..models import load_causal_lm

        model, tokenizer = load_causal_lm(args.model)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = causal.prepare_model(model, args.method, args, adakron_config)
    else:
        tokenizer = load_tokenizer(args.model)
        model = _build_model(args, prepared.labels)
    from ..models import capped_length

    # A longer --max-length than the model takes is capped (with a warning): the run records what it used.
    requested = args  # what --resume compares with: the flags as given
    args = prepared.args = TrainArgs(**{**asdict(args), "max_length": capped_length(args.max_length, model,
                                                                                    tokenizer)})
    if prepared.causal_lm:
        train_data, dev_data, collate = causal.datasets(causal.CausalData(prepared.train, prepared.devs["dev"]),
                                                        tokenizer, args.max_length)
        metrics, preprocess = causal.compute_metrics, causal.nll_sums
    else:
        train_data = tokenize(prepared.train, tokenizer, args.max_length, args.pad_to_max_length)
        dev_data = {k: tokenize(v, tokenizer, args.max_length, args.pad_to_max_length)
                    for k, v in prepared.devs.items()}
        collate, metrics, preprocess = DataCollatorWithPadding(tokenizer), _metric_function(prepared), None
    # Everything that can refuse the run's settings happens before --overwrite removes the previous run.
    optimizer = _optimizer(model, args)
    with training_args.main_process_first(local=False, desc="preparing the output dir"):
        if training_args.process_index == 0:  # one process (of torchrun's) touches the folder
            if args.overwrite and output_dir.exists():
                remove_run_outputs(output_dir)
            (output_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            atomic_write_text(output_dir / CHECKPOINTS / RUN_ARGS, json.dumps(comparable(requested), sort_keys=True))
    trainer_class = ConsistencyTrainer if args.consistency_weight else Trainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=dev_data,
        processing_class=tokenizer,
        data_collator=collate,
        compute_metrics=metrics,
        preprocess_logits_for_metrics=preprocess,
        callbacks=[EpochReport(output_dir, list(prepared.devs)[-1]), *(callbacks or [])],
        optimizers=(optimizer, None),
    )
    if args.consistency_weight:
        trainer.consistency_weight = args.consistency_weight
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(BarOnlyProgress())
    # A checkpoint cut short (killed mid-save, full disk) is skipped: the run goes on from the last whole one.
    resume = latest_complete_checkpoint(output_dir / CHECKPOINTS) if args.resume else None
    if args.resume and resume is None:  # the settings matched, but no checkpoint of the run can be read
        logger.warning("no complete checkpoint in %s: the run starts again from step 0", output_dir / CHECKPOINTS)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as a RuntimeError ("unexpected pos ..."): name the real cause.
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT) or not _disk_full(output_dir):
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(output_dir)) from None
    if trainer.is_world_process_zero():
        results = _finish(trainer, prepared, resolve_model(args.model), time.time() - started)
        shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)
        return results
    return {}


def _disk_full(folder: Path, margin: int = 2**20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def _optimizer(model, args: TrainArgs):
    """AdamW with a learning rate per adapter factor for AdaKron and the plain adapter (None: the Trainer's own,
    the same AdamW with one lr, for LoRA and full fine-tuning)."""
    if args.method not in ("adakron", "adapter"):
        return None
    from ..adapters.optim import parameter_groups

    return torch.optim.AdamW(parameter_groups(model, args.lr, args.weight_decay, args.down_lr_ratio,
                                              args.up_lr_ratio, args.outer_lr_ratio, args.down_lr_max,
                                              args.outer_lr_max))


def _build_model(args: TrainArgs, labels: LabelSpace):
    from ..models import load_classifier

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
    from ..adapters.inject import pooler_path

    pooler = pooler_path(model)
    if method in ("adakron", "adapter"):
        from ..adapters.inject import add_adapter, head_names

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


def _training_arguments(args: TrainArgs, checkpoints: Path, main_key: str, greater_is_better: bool = True):
    from transformers import TrainingArguments

    every = "steps" if args.eval_steps else "epoch"
    return TrainingArguments(
        output_dir=str(checkpoints),
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
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
        greater_is_better=greater_is_better,
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
        # Frozen weights are not DDP parameters and every trainable one gets a gradient, except MAdaKron's experts
        # that a step did not draw.
        ddp_find_unused_parameters=args.num_experts > 1,
        disable_tqdm=False,
    )


def _metric_function(prepared: Prepared):
    def compute_metrics(eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = predictions_from_logits(np.asarray(logits), prepared.labels.regression)
        return compute(prepared.metric, predictions, np.asarray(eval_pred.label_ids))

    return compute_metrics


def _orderable(value: float | None) -> float:
    # A correlation is undefined (NaN) when every prediction is the same: such an epoch never wins.
    return float("-inf") if value is None or math.isnan(value) else value


def _finish(trainer, prepared: Prepared, base_model: str, wall: float) -> dict[str, Any]:
    args, output_dir = prepared.args, prepared.output_dir
    model = trainer.model
    records = epoch_records(trainer.state.log_history)
    main_key = prepared.main_key
    # The epoch whose weights are saved: the one the Trainer kept (load_best_model_at_end), else the last.
    kept = trainer.state.best_global_step
    best = next((r for r in records if r["step"] == kept), records[-1])
    save_trained(model, args.method, output_dir, trainer.processing_class)
    task_info = {"task": args.task and prepared.name, "method": args.method, "text_columns": prepared.text_columns,
                 "max_length": args.max_length, "base_model": _portable(args.model),
                 "label_names": list(prepared.labels.names) if prepared.labels and prepared.labels.names else None}
    if prepared.causal_lm:  # what `adakron generate` needs to render prompts as training did
        task_info.update(objective="causal-lm", template="auto", text_columns=None)
    atomic_write_text(output_dir / TASK_FILE, json.dumps(task_info, indent=2))
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
    atomic_write_text(output_dir / "results.json", json.dumps(json_safe(results), indent=2, sort_keys=True))
    write_jsonl(output_dir / "metrics.jsonl", records)
    if args.plot:
        from .plots import plot_curves

        plot_curves(records, main_key, output_dir / "curves.png", title=f"{prepared.name} · {args.method}")
    return results


def _portable(model: str | None) -> str:
    """How task.json names the base model so that eval/serve find it from any directory: a local folder as an
    absolute path, a hub id (or the embedded default's name) as given."""
    if model is None:
        return DEFAULT_MODEL
    return str(Path(model).resolve()) if Path(model).exists() else model


def save_trained(model, method: str, output_dir: Path, tokenizer) -> None:
    if method in ("adakron", "adapter"):
        from ..adapters.checkpoint import save_adapter
        from ..adapters.state import state_of

        # The run's adapter is the one to serve: MAdaKron's experts merged (as evaluation used them), and kept
        # apart, unmerged, for whoever wants to go on training them.
        save_adapter(model, output_dir, merge_experts=True)
        if state_of(model).configs[state_of(model).active].num_experts > 1:
            save_adapter(model, output_dir / EXPERTS_DIR)
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
