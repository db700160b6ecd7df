"""MAdaKron against AdaKron (issue 13): Partial (experts on the f-wide factor) and Full (both down-projections)
with 4 experts, against AdaKron at the same r=16 and the library's default recipe, on RTE, MRPC, STS-B and CoLA,
3 seeds each; and, on MRPC, Partial with AdaMix's consistency loss (weight 1, as the authors' GLUE code).

Every method picks its lr on MRPC (seed 42) from the GLUE grid's lr values, as the GLUE grid does; the epochs,
data and everything else are the grid's (benchmarks/glue.py). Evaluation, and the reported scores, use the
merged adapter (MAdaKron's experts averaged), which is a plain AdaKron adapter: the same inference cost.
Resumable and shareable like glue.py: one JSON per run under benchmarks/results/madakron-u8/ (the library's
default recipe; the studies on earlier defaults, in madakron/ and madakron-down2/, are rendered beside it).

    OMP_NUM_THREADS=1 python benchmarks/madakron.py &      # one worker per idle core
    OMP_NUM_THREADS=1 python benchmarks/madakron.py --methods madakron16-partial --seeds 42   # a first look
    python benchmarks/madakron.py --render
    python benchmarks/speed.py --models minilm --threads 1 --methods adakron,madakron   # step time and memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from glue import (
    DEFAULT_DATA,
    EPOCHS,
    METHODS,
    RESULTS,
    SEEDS,
    TASK_NAMES,
    Method,
    chosen_lr,
    full_pass,
    grid_seeds,
    mean_std,
    run_one,
    score,
)

TASKS = ("rte", "mrpc", "stsb", "cola")


@dataclass(frozen=True)
class Study:
    """One pass of this comparison on one adapter recipe, spelt out so that its keys keep their meaning when the
    library's default moves; each study has its own folder under benchmarks/results/ and the same method keys."""

    folder: str
    recipe: str  # as RESULTS.md names it
    grid_key: str  # the GLUE grid's AdaKron r=16 row on this recipe, whose factor rates the study's methods take

    @property
    def rates(self) -> dict:
        row = METHODS[self.grid_key]
        return dict(down_lr_ratio=row.down_lr_ratio, up_lr_ratio=row.up_lr_ratio, outer_lr_ratio=row.outer_lr_ratio)


# The first is what `python benchmarks/madakron.py` runs; the others ran to the end earlier and are rendered beside it.
STUDIES = {s.folder: s for s in (
    # The library's default (u at lr/8, v at lr/2, B at lr up to rank 32): AdaKron's row adopts the grid's runs
    # (glue.TWINS).
    Study("madakron-u8", "the library's default recipe (u at lr/8, v at lr/2, B at lr)", "adakron16-u8"),
    Study("madakron", "the previous default recipe (u, v at lr/4, B at lr/2)", "adakron16-half"),
    Study("madakron-down2", "an earlier default recipe (u, v at lr/2, B at lr), where AdaKron r=16 stuck at the "
          "majority class on CoLA for seeds 43 and 44", "adakron16-down2"),
)}
CURRENT = next(iter(STUDIES))
CONSISTENCY_KEY = "madakron16-partial-cw1"
CONSISTENCY_TASK = "mrpc"


def study_methods(folder: str) -> dict[str, Method]:
    """The study's methods by key: AdaKron, Partial and Full with 4 experts, and Partial with AdaMix's consistency
    loss (weight 1; MRPC only, at Partial's lr)."""
    rates = STUDIES[folder].rates
    return {m.key: m for m in (
        Method("adakron16", "adakron", recipe="default", **rates),
        Method("madakron16-partial", "adakron", recipe="default", num_experts=4, experts="outer", **rates),
        Method("madakron16-full", "adakron", recipe="default", num_experts=4, experts="both", **rates),
        Method(CONSISTENCY_KEY, "adakron", recipe="default", num_experts=4, experts="outer", consistency_weight=1.0,
               **rates),
    )}


def _lr_of(key: str, methods: dict[str, Method], folder: Path) -> float | None:
    # The consistency loss is a change of Partial, measured at Partial's lr.
    return chosen_lr(methods["madakron16-partial" if key == CONSISTENCY_KEY else key], folder)


def run(args) -> None:
    folder, methods = RESULTS / args.study, study_methods(args.study)
    folder.mkdir(parents=True, exist_ok=True)
    # AdaKron's runs come first: where the GLUE grid has them they are adopted, not trained.
    chosen = ["adakron16"] + [key for key in args.methods if key != "adakron16"]
    for key in chosen:  # 1. each method's lr on MRPC
        for lr in methods[key].lr_grid if key != CONSISTENCY_KEY else ():
            run_one("mrpc", methods[key], 42, lr, args, folder)
    for seed in args.seeds:  # 2. the tasks at the chosen lr, seed by seed
        for task in TASKS:
            for key in chosen:
                lr = _lr_of(key, methods, folder)
                if lr is not None and (key != CONSISTENCY_KEY or task == CONSISTENCY_TASK):
                    run_one(task, methods[key], seed, lr, args, folder)


def section() -> list[str]:
    lines = ["## MAdaKron against AdaKron (`python benchmarks/madakron.py`)", ""]
    for name, study in STUDIES.items():
        folder = RESULTS / name
        if name == CURRENT or folder.is_dir():
            lines += [f"On {study.recipe}, in `benchmarks/results/{name}/`:", ""] + _table(folder, study_methods(name))
    return lines + ["Epochs: " + ", ".join(f"{TASK_NAMES[t]} {EPOCHS[t]}" for t in TASKS) + ".", ""]


def _table(folder: Path, methods: dict[str, Method]) -> list[str]:
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not results:
        return ["No runs have finished yet.", ""]
    lines = ["Best-epoch dev score ×100 at each method's lr chosen on MRPC, mean ± std over the seeds that have "
              "finished (their count in brackets); the merged adapter is what is evaluated.", "",
              "| method | lr | " + " | ".join(TASK_NAMES[t] for t in TASKS) + " | avg | avg, seed 42 |",
              "|---" * (len(TASKS) + 4) + "|"]
    for method in methods.values():
        lr = _lr_of(method.key, methods, folder)
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
        lines.append(f"| `{method.key}` | {'–' if lr is None else f'{lr:g}'} | " + " | ".join(cells)
                     + f" | {avg} | {avg42} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", DEFAULT_DATA)))
    parser.add_argument("--study", choices=list(STUDIES), default=CURRENT,
                        help=f"which recipe's study to run (default: {CURRENT}, the library's default recipe)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(study_methods(CURRENT)),
                        help="a subset of the method keys (AdaKron's runs always come first)")
    parser.add_argument("--seeds", type=grid_seeds, default=list(SEEDS))
    parser.add_argument("--render", action="store_true", help="only print the results table")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(study_methods(CURRENT)))
    if unknown:
        parser.error(f"unknown methods {unknown}; methods: {list(study_methods(CURRENT))}")
    if not args.render:
        full_pass(args, run, "MAdaKron")
    print("\n".join(section()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
