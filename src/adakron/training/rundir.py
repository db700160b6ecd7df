"""A run's output directory: what a run writes there, what --overwrite may remove and --resume must match,
and writing its files so that a reader never sees half of one."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .recipes import METHOD_FLAGS, MIN_MAX_LENGTH, OWN_DATA_RECIPE, TrainArgs

logger = logging.getLogger(__name__)

TASK_FILE = "task.json"
FULL_MODEL_DIR = "model"


RUN_ARGS = "adakron_train_args.json"  # inside checkpoints/: what a resumed run must match
CHECKPOINTS = "checkpoints"
# Everything a run writes into --output-dir (peft's save_pretrained adds its README.md model card): --overwrite
# removes these and nothing else.
EXPERTS_DIR = "experts"  # a MAdaKron run's unmerged adapter, to go on training from
RUN_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", TASK_FILE, "metrics.jsonl", "results.json",
               "curves.png", CHECKPOINTS, FULL_MODEL_DIR, EXPERTS_DIR, "README.md")


def _run_method(output_dir: Path) -> str | None:
    try:
        return json.loads((output_dir / TASK_FILE).read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None


def _is_run_output(name: str, method: str | None) -> bool:
    """A file a run writes: its outputs, and the temporary files of an atomic write it was killed in (a
    README.md only in a LoRA run, peft's model card; a model/ folder only in a full fine-tuning run)."""
    if name == "README.md":
        return method == "lora"
    if name == FULL_MODEL_DIR:
        return method == "full"
    return name in RUN_OUTPUTS or _is_temporary(name) or name == "metrics.tmp"


def _is_temporary(name: str) -> bool:
    """A file of an atomic write that was killed before its rename."""
    return name.startswith(".") and name.endswith(".tmp")


# What a run writes inside its own folders, which --overwrite removes whole: anything else there is the user's.
RUN_SUBFOLDER_OUTPUTS = {
    CHECKPOINTS: lambda n: n == RUN_ARGS or (n.startswith("checkpoint-") and n[len("checkpoint-"):].isdigit()),
    EXPERTS_DIR: lambda n: n in ("adapter_config.json", "adapter_model.safetensors"),
}


def _foreign_entries(output_dir: Path) -> list[str]:
    """What ``output_dir`` holds that no run wrote, looking inside the run's own folders too."""
    method = _run_method(output_dir)
    foreign = [n for n in sorted(p.name for p in output_dir.iterdir()) if not _is_run_output(n, method)]
    for folder, written in RUN_SUBFOLDER_OUTPUTS.items():
        if (output_dir / folder).is_dir() and not (output_dir / folder).is_symlink():
            foreign += [f"{folder}/{p.name}" for p in sorted((output_dir / folder).iterdir())
                        if not (written(p.name) or _is_temporary(p.name))]
    return foreign


def _inputs(args: TrainArgs) -> list[Path]:
    return [Path(p).resolve() for p in (args.train_file, args.validation_file, args.data_dir, args.model)
            if p and Path(p).exists()]


def read_json_object(path: Path, message: str) -> dict:
    """The JSON object in ``path`` (a file a run wrote, perhaps edited or damaged since); anything else is a
    UsageError with ``message`` formatted with the path and why."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(message.format(path=path, why=e)) from None
    if not isinstance(value, dict):
        raise UsageError(message.format(path=path, why=f"it holds a {type(value).__name__}, not an object"))
    return value


def check_parent_folders(path: Path, flag: str) -> None:
    """Refuses an output ``path`` one of whose parents is a file: it could never be created."""
    blocked = next((p for p in path.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UsageError(f"{flag} {path}: {blocked} is a file, not a folder")


def check_output_dir(output_dir: Path, args: TrainArgs) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir {output_dir} is a file")
    check_parent_folders(output_dir, "--output-dir")
    if args.resume and args.overwrite:
        raise UsageError("pass --resume or --overwrite, not both")
    if args.resume:
        saved = output_dir / CHECKPOINTS / RUN_ARGS
        if not saved.is_file():
            finished = (output_dir / "results.json").is_file()
            raise UsageError(f"nothing to resume in {output_dir}: " + (
                "that run has finished (pass --overwrite to train again)" if finished else
                "no epoch checkpoint was written yet (start again with --overwrite)"))
        before = read_json_object(saved, "cannot resume: {path} is damaged ({why}); start again with --overwrite")
        if _holds_fused_down(before):
            raise UsageError(f"cannot resume {output_dir}: its checkpoints are from before AdaKron's u and v were "
                             "parameters of their own, and their optimizer state does not fit them; train again "
                             "into a new --output-dir (or here with --overwrite)")
        now = comparable(args)
        changed = sorted(k for k in now if _read_by(k, args) and not _same_setting(k, before, now[k]))
        if changed:
            raise UsageError(f"--resume needs the same settings as the run in {output_dir}; these differ: "
                             + ", ".join(f"{k} (run: {_recorded(k, before)}, now: {now[k]})" for k in changed))
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
    method = _run_method(output_dir)
    for path in list(output_dir.iterdir()):
        if not _is_run_output(path.name, method):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# Settings added after a run may have been checkpointed (adakron 0.1.0 wrote none of these), with the values
# that run used: its checkpoint resumes when they still hold.
ADDED_SETTINGS = {"recipe": ("default", "paper"), "outer_bias": (0.0,), "down_lr_ratio": (1.0,), "up_lr_ratio": (1.0,),
                  "num_experts": (1,), "experts": ("outer",), "consistency_weight": (0.0,), "max_steps": (None,),
                  "down_lr_max": (None,), "outer_lr_max": (None,)}
PATHS = ("train_file", "validation_file", "data_dir", "model")


def comparable(args: TrainArgs) -> dict[str, Any]:
    """The settings --resume must find unchanged: everything but how the run is started and where it is (a run
    folder may be moved), with input paths resolved (relative or absolute spellings of one file are one)."""
    settings = {k: v for k, v in asdict(args).items() if k not in ("resume", "overwrite", "extra", "plot",
                                                                     "output_dir")}
    for key in PATHS:
        value = settings.get(key)
        if value and Path(value).exists():
            settings[key] = str(Path(value).resolve())
    return settings


def _read_by(key: str, args: TrainArgs) -> bool:
    """Whether the run trains by setting ``key``: a LoRA run ignores the adapter rates it records, which follow
    the default recipe and so change with it; an adapter without an outer factor (kron_factor 1) has no u."""
    if key in ("outer_lr_ratio", "outer_lr_max") and args.kron_factor == 1:
        return False
    return args.method in METHOD_FLAGS.get(key, (args.method,))


def _holds_fused_down(before: dict) -> bool:
    """A run whose checkpoints' optimizer holds AdaKron's u and v as one parameter (written before outer_lr_ratio
    existed): AdaKron with a Kronecker product and no experts, the only adapter whose parameters were split. Read
    from what the run recorded, so that no flag given now can make it look otherwise."""
    return ("outer_lr_ratio" not in before and before.get("method", "adakron") == "adakron"
            and before.get("kron_factor") != 1 and before.get("num_experts", 1) == 1)


def _recorded(key: str, before: dict) -> Any:
    """The value a run trained with, as _same_setting reads it: a setting added since is the value it had then."""
    if key in before:
        return before[key]
    if key == "outer_lr_ratio":
        return f"{_u_rate_before_its_own(before)}, v's"
    return ADDED_SETTINGS[key][0] if key in ADDED_SETTINGS else "not recorded"


def _u_rate_before_its_own(before: dict) -> float:
    """The rate u trained at in a run recorded before it had a rate of its own: v's, the down ratio."""
    return before.get("down_lr_ratio", ADDED_SETTINGS["down_lr_ratio"][0])


def _same_setting(key: str, before: dict, value: Any) -> bool:
    if key == "outer_lr_ratio" and key not in before:
        return value == _u_rate_before_its_own(before)
    if key not in before:
        return key in ADDED_SETTINGS and value in ADDED_SETTINGS[key]
    old = before[key]
    if key in PATHS and old and value and Path(old).exists() and Path(value).exists():
        return Path(old).resolve() == Path(value).resolve()
    return old == value


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
    atomic_write_text(path, "".join(json.dumps(json_safe(r), sort_keys=True) + "\n" for r in records))


# A run that recorded no max_length (written by save_adapter alone) is read with the own-data recipe's.
DEFAULT_MAX_LENGTH = OWN_DATA_RECIPE.max_length


def read_task_file(directory: Path) -> dict[str, Any]:
    """A run's task.json, every field type-checked (it may have been edited by hand); {} when there is none.
    Raises UsageError naming the file and the field, so nothing is half-loaded on a bad one."""
    path = Path(directory) / TASK_FILE
    if not path.is_file():
        return {}
    task = read_json_object(path, "{path} is not a readable JSON object ({why})")

    def check(key: str, ok, want: str) -> None:
        value = task.get(key)
        if value is not None and not ok(value):
            raise UsageError(f"{path}: {key} must be {want}, not {value!r}")

    def strings(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    check("task", lambda v: isinstance(v, str), "a task name or null")
    check("method", lambda v: isinstance(v, str), "a method name or null")
    check("base_model", lambda v: isinstance(v, str), "a model path or hub id or null")
    check("text_columns", lambda v: strings(v) and 1 <= len(v) <= 2, "a list of 1 or 2 column names")
    check("label_names", strings, "a list of label names or null")
    check("max_length", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= MIN_MAX_LENGTH,
          f"an integer >= {MIN_MAX_LENGTH}")
    return task


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it: a reader (or a run killed, or a full
    disk, mid-write) never leaves a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_is_complete(folder: Path) -> bool:
    """The Trainer writes trainer_state.json last (after the model, optimizer, scheduler and RNG states): a
    checkpoint whose state file is missing or cut short was interrupted mid-save (a kill, a full disk). Its
    weights are checked too (a safetensors header that does not parse), since resuming from them would fail."""
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((folder / "trainer_state.json").read_text())
        for weights in folder.glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
    except (OSError, ValueError, SafetensorError):
        return False
    return (folder / "optimizer.pt").is_file() and (folder / "scheduler.pt").is_file()


def latest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that was saved whole; checkpoints left half-written are removed (nothing in them
    can be resumed from), earlier complete ones are kept."""
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in found if checkpoint_is_complete(p)]
    latest = complete[-1] if complete else None
    for partial in found:
        if partial not in complete and (latest is None or int(partial.name.split("-")[-1]) > int(
                latest.name.split("-")[-1])):
            logger.warning("removing %s: it is incomplete or damaged (interrupted while being saved?)", partial)
            shutil.rmtree(partial, ignore_errors=True)
    return latest
