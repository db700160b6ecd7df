"""GLUE quality benchmark: AdaKron against full fine-tuning, LoRA (peft) and the plain adapter, on the
embedded all-MiniLM-L6-v2. Resumable: every run writes its own JSON under benchmarks/results/glue/ and
is skipped when that file exists, so the grid can be completed over several sittings. Several workers may
share the grid (e.g. one per core, each with OMP_NUM_THREADS=1): a run is claimed by a lock file beside its
result, and a lock left by a worker that died is taken over.

    python benchmarks/glue.py                      # the whole grid (hours on a 2-core CPU; resumable)
    python benchmarks/glue.py --tasks rte --methods adakron16 --seeds 42
    python benchmarks/glue.py --quick              # a few hundred rows, 1 epoch: a smoke check in minutes
    python benchmarks/glue.py --render             # rebuild benchmarks/RESULTS.md from what has finished
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "glue"

TASKS = ("rte", "mrpc", "stsb", "cola", "sst2")
# The authors' convention: MRPC F1, STS-B Pearson, CoLA Matthews, accuracy elsewhere.
REPORTED = {"rte": "accuracy", "mrpc": "f1", "stsb": "pearson", "cola": "matthews_correlation", "sst2": "accuracy"}
# Epochs per task, the same for every method, sized so the whole grid fits 12 CPU-hours (see RESULTS.md).
EPOCHS = {"rte": 6, "mrpc": 5, "stsb": 5, "cola": 3, "sst2": 1}
SEEDS = (42, 43, 44)
MULTI_SEED = {("rte", "adakron16"), ("rte", "lora"), ("rte", "full"),
              ("mrpc", "adakron16"), ("mrpc", "lora"), ("mrpc", "full")}


@dataclass(frozen=True)
class Method:
    key: str
    method: str
    rank: int = 16
    kron_factor: int = 4
    init: str = "reference"
    # Extended upwards after every method's best MRPC F1 sat at the top of a two-value grid.
    lr_grid: tuple[float, ...] = (5e-4, 1e-3, 2e-3)


METHODS = {m.key: m for m in (
    Method("adakron16", "adakron", rank=16),
    Method("adakron48", "adakron", rank=48),
    Method("adapter", "adapter", rank=16, kron_factor=1),
    Method("lora", "lora"),
    Method("full", "full", lr_grid=(3e-5, 1e-4, 3e-4)),
)}
ABLATIONS = (  # on MRPC, one seed, at AdaKron r=16's chosen lr
    ("init=identity", Method("adakron16-identity", "adakron", rank=16, init="identity")),
    ("f=2", Method("adakron16-f2", "adakron", rank=16, kron_factor=2)),
    ("f=8", Method("adakron16-f8", "adakron", rank=16, kron_factor=8)),
)


def run_id(task: str, method: Method, seed: int, lr: float) -> str:
    return f"{task}-{method.key}-s{seed}-lr{lr:g}"


def run_one(task: str, method: Method, seed: int, lr: float, args, folder: Path) -> dict | None:
    """Train one configuration unless its result file exists; returns the stored result."""
    path = folder / f"{run_id(task, method, seed, lr)}.json"
    if path.exists():
        return json.loads(path.read_text())
    if not claim(path.with_suffix(".lock")):
        print(f"-- {path.stem}: another worker is running it", flush=True)
        return None
    from adakron.train import TrainArgs, fit

    scratch = HERE.parent / "runs" / "bench" / path.stem
    print(f"== {path.stem}", flush=True)
    results = fit(TrainArgs(
        task=task, data_dir=str(args.data_dir), method=method.method, rank=method.rank,
        kron_factor=method.kron_factor, init=method.init, lr=lr, seed=seed,
        epochs=1 if args.quick else EPOCHS[task], output_dir=str(scratch), overwrite=True, plot=False,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        max_length=64 if args.quick else None))
    results["method_key"] = method.key
    metrics = scratch / "metrics.jsonl"  # the per-epoch curve, kept for diagnosis (the run folder is deleted)
    results["epochs"] = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
    os.replace(tmp, path)
    path.with_suffix(".lock").unlink()
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def claim(lock: Path) -> bool:
    """Lets several workers share the grid: a run is claimed by creating its lock file, which names the
    worker's pid; a lock whose process has died (an interrupted sitting) is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(lock, "x") as f:
            f.write(str(os.getpid()))
        return True
    except FileExistsError:
        owner = lock.read_text().strip()
    if owner.isdigit() and _alive(int(owner)):
        return False
    lock.write_text(str(os.getpid()))
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def score(result: dict, task: str, which: str = "best") -> float:
    return 100 * result[which][f"dev_{REPORTED[task]}"]


def chosen_lr(method: Method, folder: Path) -> float | None:
    """The lr with the best MRPC F1 (seed 42) among the method's grid, once all grid runs exist."""
    found = {}
    for lr in method.lr_grid:
        path = folder / f"{run_id('mrpc', method, 42, lr)}.json"
        if not path.exists():
            return None
        found[lr] = score(json.loads(path.read_text()), "mrpc")
    return max(found, key=found.get)


def run_grid(args) -> None:
    folder = RESULTS / ("glue-quick" if args.quick else "glue")
    methods = [METHODS[m] for m in args.methods]
    if args.quick:
        for task in args.tasks:
            for method in methods:
                run_one(task, method, 42, method.lr_grid[0], args, folder)
        return
    for method in methods:  # 1. lr selection on MRPC
        for lr in method.lr_grid:
            run_one("mrpc", method, 42, lr, args, folder)
    for seed in args.seeds:  # 2. the grid at each method's chosen lr; seed by seed, so one full table comes first
        for task in args.tasks:
            for method in methods:
                lr = chosen_lr(method, folder)
                if lr is not None and (seed == SEEDS[0] or (task, method.key) in MULTI_SEED):
                    run_one(task, method, seed, lr, args, folder)
    lr = chosen_lr(METHODS["adakron16"], folder)
    if args.ablations and lr is not None:  # 3. ablations on MRPC
        for _, method in ABLATIONS:
            run_one("mrpc", method, 42, lr, args, folder)


def load_results(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=list(SEEDS))
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", DEFAULT_DATA)))
    parser.add_argument("--quick", action="store_true", help="128 rows, 1 epoch per run: a smoke check")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false")
    parser.add_argument("--render", action="store_true", help="only rebuild RESULTS.md")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS)) + sorted(set(args.tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown methods/tasks {unknown}; methods: {list(METHODS)}, tasks: {list(TASKS)}")
    if not args.render:
        if not (args.data_dir / "RTE").is_dir():
            print(f"GLUE data not found in {args.data_dir}; pass --data-dir or set GLUE_DIR. Nothing to run.")
            return 0
        args.max_train_samples = args.max_eval_samples = 128 if args.quick else None
        import transformers

        transformers.logging.set_verbosity_error()
        started = time.time()
        run_grid(args)
        print(f"grid pass done in {time.time() - started:.0f}s", flush=True)
    sys.path.insert(0, str(HERE))
    from render import render

    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())

