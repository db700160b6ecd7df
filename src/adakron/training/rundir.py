"""A run's output directory: what a run writes there, what --overwrite may remove and --resume must match,
and writing its files so that a reader never sees half of one."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .recipes import TrainArgs

TASK_FILE = "task.json"
FULL_MODEL_DIR = "model"


RUN_ARGS = "adakron_train_args.json"  # inside checkpoints/: what a resumed run must match
CHECKPOINTS = "checkpoints"
# Everything a run writes into --output-dir (peft's save_pretrained adds its README.md model card): --overwrite
# removes these and nothing else.
EXPERTS_DIR = "experts"  # a MAdaKron run's unmerged adapter, to go on training from
RUN_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", TASK_FILE, "metrics.jsonl", "results.json",
               "curves.png", CHECKPOINTS, FULL_MODEL_DIR, EXPERTS_DIR, "README.md")


def _foreign_entries(output_dir: Path) -> list[str]:
    """What ``output_dir`` holds that no run wrote (a README.md counts as a run's only beside its task.json)."""
    names = sorted(p.name for p in output_dir.iterdir())
    run_dir = (output_dir / TASK_FILE).is_file() or (output_dir / "results.json").is_file()
    return [n for n in names if n not in RUN_OUTPUTS or (n == "README.md" and not run_dir)]


def _inputs(args: TrainArgs) -> list[Path]:
    return [Path(p).resolve() for p in (args.train_file, args.validation_file, args.data_dir, args.model)
            if p and Path(p).exists()]


def check_output_dir(output_dir: Path, args: TrainArgs) -> None:
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
        now = comparable(args)
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


def remove_run_outputs(output_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def comparable(args: TrainArgs) -> dict[str, Any]:
    return {k: v for k, v in asdict(args).items() if k not in ("resume", "overwrite", "extra", "plot")}


def json_safe(value: Any) -> Any:
    """NaN becomes null, so the files stay standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(json_safe(r), sort_keys=True) + "\n" for r in records))
    os.replace(tmp, path)
