"""Time to accuracy: training time until SST-2 dev accuracy first reaches a target (default 85%), for
AdaKron, LoRA (peft) and full fine-tuning, each at the learning rate the quality grid chose on MRPC
(benchmarks/glue.py) and the SST-2 recipe of `adakron train` (2 epochs, batch 32, length-grouped batches).

The dev set is evaluated every --eval-steps steps and the run stops at the first evaluation at or above
the target. Reported per method: the step and epoch where it was crossed, the training seconds up to that
step (wall time minus the time spent evaluating and checkpointing, which depend on how often one
evaluates, not on the method), the wall seconds up to the end of that evaluation, and the whole curve.
Each method's result is its own JSON under benchmarks/results/time_to_accuracy/ and is skipped when
present, so the runs can be spread over sittings.

    python benchmarks/time_to_accuracy.py                        # adakron, lora, full (about an hour, 1 core)
    python benchmarks/time_to_accuracy.py --methods adakron --target 0.8
    python benchmarks/time_to_accuracy.py --methods adakron,lora --again   # a new measurement, interleaved

`adakron` is the library's default recipe, `adakron-paper` the authors' (`adakron train --recipe paper`),
`adakron-down2` and `adakron-down8` earlier defaults (u, v at lr/2 and B at lr; u, v at lr/8), `adakron-capped`
`adakron train --recipe capped`.
Timings on a shared machine move with its load: compare methods measured in one sitting (`--again`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from glue import DEFAULT_DATA, METHODS, RESULTS, chosen_lr
from glue import train_args as glue_train_args
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent
OUT = RESULTS / "time_to_accuracy"
# Each method's row of the quality grid: it trains as that row does (method and recipe), at the lr the row chose
# on MRPC. `adakron` is the default recipe (u at lr/8, v at lr/2, B at lr), `adakron-half` the one before (u, v at
# lr/4, B at lr/2; its run was stored as `adakron` when it was the default), `adakron-down2` an earlier one (u, v at
# lr/2, B at lr), `adakron-down8` the first; `adakron-capped` is `adakron train --recipe capped` (u at min(lr, 5e-4),
# v at min(lr, 2e-3), B at lr).
GRID_KEYS = {"adakron": "adakron16-u8", "adakron-capped": "adakron16-cap", "adakron-half": "adakron16-half",
             "adakron-down2": "adakron16-down2", "adakron-paper": "adakron16", "adakron-down8": "adakron16-down8",
             "lora": "lora", "full": "full"}


class StopAtTarget(TrainerCallback):
    """Keeps a curve of (step, training seconds, wall seconds, accuracy) and stops at the target."""

    def __init__(self, target: float):
        self.target, self.curve = target, []
        self.started = self.step_ended = time.time()
        self.overhead = 0.0  # evaluation and checkpointing: from the end of an evaluated step to the next step
        self.evaluated = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.step_ended = time.time()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.evaluated:
            self.overhead += time.time() - self.step_ended
            self.evaluated = False

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ended = time.time()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        accuracy = metrics["eval_dev_accuracy"]
        self.evaluated = True
        self.curve.append({"step": state.global_step, "epoch": round(state.epoch, 4), "accuracy": accuracy,
                           "train_seconds": round(self.step_ended - self.started - self.overhead, 2),
                           "wall_seconds": round(time.time() - self.started, 2)})
        if accuracy >= self.target:
            control.should_training_stop = True


def run(method: str, lr: float, args) -> dict:
    from adakron.training.trainer import fit

    scratch = HERE.parent / "runs" / "time_to_accuracy" / method
    stopper = StopAtTarget(args.target)
    print(f"== {method} lr {lr:g}", flush=True)
    # When the run began and ended, and the machine's load then: which runs shared the cores (a comparison's
    # sitting) can be read from the files themselves.
    started, load_before = _now(), os.getloadavg()[0]
    results = fit(train_args(method, lr, args, scratch), callbacks=[stopper])
    finished, load_after = _now(), os.getloadavg()[0]
    shutil.rmtree(scratch, ignore_errors=True)
    reached = next((point for point in stopper.curve if point["accuracy"] >= args.target), None)
    import torch

    return {"method": method, "recipe": _recipe(method), "date": time.strftime("%Y-%m-%d"), "lr": lr,
            "started": started, "finished": finished, "load_average": [round(load_before, 2), round(load_after, 2)],
            "target": args.target, "eval_steps": args.eval_steps,
            "seed": args.seed, "threads": torch.get_num_threads(), "trainable_params": results["trainable_params"],
            "reached": reached, "curve": stopper.curve,
            # The run's resolved settings (the factor rates among them): "recipe" names a recipe whose values move.
            "hyperparameters": results["hyperparameters"]}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _recipe(method: str) -> str | None:
    row = METHODS[GRID_KEYS[method]]
    if row.outer_lr_cap is not None or row.down_lr_cap is not None:
        return "capped"  # spelt out in the grid, its rates resolved per lr (glue.at_lr): --recipe capped's
    return row.recipe if row.method in ("adakron", "adapter") else None


def train_args(method: str, lr: float, args, scratch: Path):
    """`adakron train`'s arguments: the grid row's run (glue.train_args), but with SST-2's own recipe (epochs,
    batch, length) and an evaluation every --eval-steps."""
    grid = SimpleNamespace(data_dir=args.data_dir, quick=False, max_train_samples=None, max_eval_samples=None)
    row = glue_train_args("sst2", METHODS[GRID_KEYS[method]], args.seed, lr, grid, scratch)
    return dataclasses.replace(row, epochs=None, eval_steps=args.eval_steps)


def result_path(method: str, lr: float, args) -> Path:
    """The run's file; with --again the first free one of -2, -3, ... after the original."""
    stem = f"sst2-{method}-lr{lr:g}-target{args.target:g}-s{args.seed}"
    path, n = OUT / f"{stem}.json", 1
    while args.again and path.exists():
        n += 1
        path = OUT / f"{stem}-{n}.json"
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(GRID_KEYS))
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--again", action="store_true",
                        help="measure again beside the stored results (a new file each), e.g. to compare in one "
                        "sitting")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", DEFAULT_DATA)))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(GRID_KEYS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(GRID_KEYS)}")
    if not (args.data_dir / "SST-2").is_dir():
        print(f"SST-2 not found in {args.data_dir}; pass --data-dir or set GLUE_DIR. Nothing to run.")
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    OUT.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        lr = chosen_lr(METHODS[GRID_KEYS[method]], RESULTS / "glue")
        if lr is None:
            print(f"skipping {method}: its MRPC learning-rate runs have not finished (python benchmarks/glue.py)")
            continue
        path = result_path(method, lr, args)
        if path.exists():
            continue
        result = run(method, lr, args)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)
        reached = result["reached"]
        print(f"{method}: " + (f"{reached['accuracy']:.4f} at step {reached['step']}, "
                               f"{reached['train_seconds']:.0f} s training" if reached else "target not reached"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
