"""The recipe study's pre-screen: which AdaKron recipes are worth the full screen (benchmarks/recipe.py).

CoLA (the task where AdaKron collapsed), AdaKron r=16, seed 42, the GLUE grid's 8-epoch schedule (warmup and
linear decay over 8 epochs) stopped after 2 epochs, at lr 4e-3 (where the collapse is) and 1e-3 or 5e-4 (where
slow learning shows). About 3 CPU-minutes a run. Each run is one JSON under
benchmarks/results/recipe-prescreen/ (skipped when present): the per-epoch train loss and dev Matthews.

    OMP_NUM_THREADS=1 python benchmarks/recipe_prescreen.py [--data-dir ../shared/data/glue]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "results" / "recipe-prescreen"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "glue"
STOP_AFTER = 2  # epochs, of the 8 the schedule spans

# name -> the `adakron train` flags that differ from the authors' recipe; and the lrs each ran at.
_PAPER = dict(recipe="paper")  # every candidate changes the authors' recipe, whatever the library's default is
CANDIDATES = {
    "paper": dict(_PAPER),
    "identity": dict(_PAPER, init="identity"),
    "id+bias1": dict(_PAPER, init="identity", outer_bias=1.0),
    "id+down.125": dict(_PAPER, init="identity", down_lr_ratio=0.125),
    "id+bias1+down.125": dict(_PAPER, init="identity", outer_bias=1.0, down_lr_ratio=0.125),
    "ref+down.125": dict(_PAPER, init="reference", down_lr_ratio=0.125),
    "id+bias1+down.03": dict(_PAPER, init="identity", outer_bias=1.0, down_lr_ratio=1 / 32),
    "id+bias1+down.25": dict(_PAPER, init="identity", outer_bias=1.0, down_lr_ratio=0.25),
    "id+bias1+down.125+up2": dict(_PAPER, init="identity", outer_bias=1.0, down_lr_ratio=0.125, up_lr_ratio=2.0),
    "lora": dict(method="lora"),
    # After the GLUE grid's AdaKron r=48 with the default recipe collapsed on CoLA at lr 4e-3 (issue 12): does
    # giving the adapter's factors rates scaled by 16/r (r=16's, per output of B) keep r=48 learning there?
    # `r48` is that grid run's first two epochs (glue.py's schedule is this one), not run again. The rates are
    # spelt out: the default recipe has scaled them by 16/r above rank 16 since (`r48+adapter.33`'s rule).
    "r48": dict(rank=48, down_lr_ratio=0.5, up_lr_ratio=1.0),
    "r48+up.33": dict(rank=48, down_lr_ratio=0.5, up_lr_ratio=1 / 3),
    "r48+adapter.33": dict(rank=48, down_lr_ratio=1 / 6, up_lr_ratio=1 / 3),
}
R48_GRID_RUN = HERE / "results" / "glue" / "cola-adakron48-down2-s42-lr0.004.json"
FIRST = ("paper", "identity", "id+bias1", "id+down.125", "id+bias1+down.125", "ref+down.125", "lora")
RUNS = [(c, lr) for lr in (4e-3, 1e-3) for c in FIRST] + [
    (c, lr) for lr in (4e-3, 5e-4) for c in ("id+bias1+down.03", "id+bias1+down.25", "id+bias1+down.125+up2")] + [
    (c, 5e-4) for c in ("paper", "id+bias1+down.125", "lora")] + [
    (c, 4e-3) for c in ("r48+up.33", "r48+adapter.33")]


def path(candidate: str, lr: float) -> Path:
    return FOLDER / f"{candidate}-lr{lr:g}.json"


def run(candidate: str, lr: float, data_dir: Path) -> None:
    from transformers import TrainerCallback

    from adakron.training.recipes import TrainArgs
    from adakron.training.trainer import fit

    class Stop(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch >= STOP_AFTER - 1e-6:
                control.should_training_stop = True

    scratch = HERE.parent / "runs" / "bench" / "recipe-prescreen" / path(candidate, lr).stem
    fit(TrainArgs(task="cola", data_dir=str(data_dir), lr=lr, epochs=8, seed=42, plot=False, output_dir=str(scratch),
                  overwrite=True, **CANDIDATES[candidate]), callbacks=[Stop()])
    epochs = [json.loads(line) for line in (scratch / "metrics.jsonl").read_text().splitlines()]
    tmp = path(candidate, lr).with_suffix(".tmp")
    tmp.write_text(json.dumps({"cand": candidate, "lr": lr, "epochs": epochs}))
    os.replace(tmp, path(candidate, lr))
    shutil.rmtree(scratch, ignore_errors=True)


def section() -> list[str]:
    """A table for RESULTS.md: dev Matthews ×100 after epochs 1 and 2 (train loss of epoch 2 in brackets)."""
    found = {(r["cand"], r["lr"]): r for r in (json.loads(p.read_text()) for p in sorted(FOLDER.glob("*.json")))}
    if R48_GRID_RUN.exists():
        found["r48", 4e-3] = {"cand": "r48", "lr": 4e-3, "epochs": json.loads(R48_GRID_RUN.read_text())["epochs"]}
    if not found:
        return []
    lrs = sorted({lr for _, lr in found}, reverse=True)
    lines = ["### Pre-screen (`python benchmarks/recipe_prescreen.py`)", "",
             f"CoLA, seed 42, the 8-epoch schedule stopped after {STOP_AFTER} epochs: dev Matthews ×100 after epoch "
             "1 / 2 (epoch 2's train loss). It picked the screen's candidates; the screen, not this, decides. "
             "The `r48` rows are AdaKron r=48 on the default recipe, `r48` itself the GLUE grid's run; `.33` "
             "scales the named factors' rates by 16/48.", "",
             "| recipe | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for candidate in CANDIDATES:
        cells = []
        for lr in lrs:
            r = found.get((candidate, lr))
            if r is None or len(r["epochs"]) < STOP_AFTER:
                cells.append("–")
                continue
            mcc = [100 * e["dev"]["dev_matthews_correlation"] for e in r["epochs"][:STOP_AFTER]]
            cells.append(" / ".join(f"{m:.1f}" for m in mcc) + f" ({r['epochs'][STOP_AFTER - 1]['train_loss']:.3f})")
        if any(c != "–" for c in cells):
            lines.append(f"| `{candidate}` | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", DEFAULT_DATA)))
    args = parser.parse_args(argv)
    if not (args.data_dir / "CoLA").is_dir():
        print(f"GLUE data not found in {args.data_dir}; pass --data-dir or set GLUE_DIR. Nothing to run.")
        return 0
    FOLDER.mkdir(parents=True, exist_ok=True)
    for candidate, lr in RUNS:
        if not path(candidate, lr).exists():
            print(f"== {candidate} lr {lr:g}", flush=True)
            run(candidate, lr, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
