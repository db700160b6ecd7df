"""What a run shows and records as it goes: one line and one metrics.jsonl record per evaluation, under a
progress bar without the Trainer's raw log dicts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import ProgressCallback, TrainerCallback

from .rundir import write_jsonl


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

    def __init__(self, output_dir: Path, last_split: str):
        self.output_dir, self.last_split = output_dir, last_split
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
            write_jsonl(self.output_dir / "metrics.jsonl", records)
            self._print(records[-1], state)

    def _is_last_split(self, entry: dict) -> bool:
        return f"eval_{self.last_split}_runtime" in entry

    def _print(self, record: dict, state) -> None:
        from tqdm.auto import tqdm

        loss = f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-"
        dev = "  ".join(f"{k} {v:.4f}" for k, v in record["dev"].items())
        tqdm.write(f"epoch {record['epoch']:.2f}/{state.num_train_epochs}  loss {loss}  {dev}  "
                   f"{record['seconds']:.1f}s")
