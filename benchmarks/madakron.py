"""MAdaKron against AdaKron (issue 13): Partial (experts on the f-wide factor) and Full (both down-projections)
with 4 experts, against AdaKron at the same r=16 and the library's default recipe, on RTE, MRPC, STS-B and CoLA,
3 seeds each; and, on MRPC, Partial with AdaMix's consistency loss (weight 1, as the authors' GLUE code).

Every method picks its lr on MRPC (seed 42) from the GLUE grid's lr values, as the GLUE grid does; the epochs,
data and everything else are the grid's (benchmarks/glue.py). Evaluation, and the reported scores, use the
merged adapter (MAdaKron's experts averaged), which is a plain AdaKron adapter: the same inference cost.
Resumable and shareable like glue.py: one JSON per run under benchmarks/results/madakron/.

    OMP_NUM_THREADS=1 python benchmarks/madakron.py &      # one worker per idle core
    python benchmarks/madakron.py --render
    python benchmarks/speed.py --models minilm --threads 1 --methods adakron,madakron   # step time and memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from glue import (
    DEFAULT_DATA,
    EPOCHS,
    RESULTS,
    SEEDS,
    TASK_NAMES,
    Method,
    chosen_lr,
    full_pass,
    mean_std,
    run_one,
    score,
)

FOLDER = RESULTS / "madakron"
# The study as it first ran, to the end, on the default recipe of its time (u, v at lr/2, B at lr): kept and rendered
# beside the rerun on the current default. Its rows are the same methods, under the same keys.
PREVIOUS = RESULTS / "madakron-down2"
TASKS = ("rte", "mrpc", "stsb", "cola")
# Every row on the recipe the study ran with, the library's default of its time, spelt out so that its keys keep
# their meaning when the default moves (u, v at lr/4, B at lr/2: the GLUE grid's `adakron16-half`, whose runs
# AdaKron's row adopts where they exist, glue.TWINS). MAdaKron on a later default is not measured here.
STUDY_RATES = dict(down_lr_ratio=0.25, up_lr_ratio=0.5)
METHODS = {m.key: m for m in (
    Method("adakron16", "adakron", recipe="default", **STUDY_RATES),
    Method("madakron16-partial", "adakron", recipe="default", num_experts=4, experts="outer", **STUDY_RATES),
    Method("madakron16-full", "adakron", recipe="default", num_experts=4, experts="both", **STUDY_RATES),
)}
CONSISTENCY = Method("madakron16-partial-cw1", "adakron", recipe="default", num_experts=4, experts="outer",
                     consistency_weight=1.0, **STUDY_RATES)
CONSISTENCY_TASK = "mrpc"
PREVIOUS_METHODS = {key: replace(m, down_lr_ratio=0.5, up_lr_ratio=1.0) for key, m in METHODS.items()}


def run(args) -> None:
    for method in METHODS.values():  # 1. each method's lr on MRPC
        for lr in method.lr_grid:
            run_one("mrpc", method, 42, lr, args, FOLDER)
    for seed in SEEDS:  # 2. the tasks at the chosen lr, seed by seed
        for task in TASKS:
            for method in METHODS.values():
                lr = chosen_lr(method, FOLDER)
                if lr is not None:
                    run_one(task, method, seed, lr, args, FOLDER)
        lr = chosen_lr(METHODS["madakron16-partial"], FOLDER)
        if lr is not None:  # 3. the consistency loss, at Partial's lr
            run_one(CONSISTENCY_TASK, CONSISTENCY, seed, lr, args, FOLDER)


def section() -> list[str]:
    lines = ["## MAdaKron against AdaKron (`python benchmarks/madakron.py`)", "",
             "On the library's default recipe (u, v at lr/4, B at lr/2):", ""]
    lines += _table(FOLDER)
    if PREVIOUS.is_dir():
        lines += ["On the default recipe before it (u, v at lr/2, B at lr; `benchmarks/results/madakron-down2/`), "
                  "where AdaKron r=16 stuck at the majority class on CoLA for seeds 43 and 44:", ""]
        lines += _table(PREVIOUS)
    return lines + ["Epochs: " + ", ".join(f"{TASK_NAMES[t]} {EPOCHS[t]}" for t in TASKS) + ".", ""]


def _table(folder: Path) -> list[str]:
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not results:
        return ["No runs have finished yet.", ""]
    lines = ["Best-epoch dev score ×100 at each method's lr chosen on MRPC, mean ± std over the seeds that have "
              "finished (their count in brackets); the merged adapter is what is evaluated.", "",
              "| method | lr | " + " | ".join(TASK_NAMES[t] for t in TASKS) + " | avg | avg, seed 42 |",
              "|---" * (len(TASKS) + 4) + "|"]
    for method in [*METHODS.values(), CONSISTENCY]:
        base = METHODS["madakron16-partial"] if method is CONSISTENCY else method
        lr = chosen_lr(base, folder)
        cells, means, first = [], [], []
        for task in TASKS:
            runs = [r for r in results if r["method_key"] == method.key and r["task"] == task
                    and r["hyperparameters"]["lr"] == lr]
            values = [score(r, task) for r in runs]
            cells.append(mean_std(values, count=True))
            if values:
                means.append(statistics.mean(values))
            first += [score(r, task) for r in runs if r["seed"] == SEEDS[0]]
        avg = f"{statistics.mean(means):.1f}" if len(means) == len(TASKS) else "–"
        # The same seed for every method, while the seeds of the mean above differ from row to row.
        avg42 = f"{statistics.mean(first):.1f}" if len(first) == len(TASKS) else "–"
        lines.append(f"| `{method.key}` | {lr if lr is None else f'{lr:g}'} | " + " | ".join(cells)
                     + f" | {avg} | {avg42} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", DEFAULT_DATA)))
    parser.add_argument("--render", action="store_true", help="only print the results table")
    args = parser.parse_args(argv)
    if not args.render:
        full_pass(args, run, "MAdaKron")
    print("\n".join(section()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
