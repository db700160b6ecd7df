"""Why AdaKron sticks at the majority class: the adapters' output, watched during the first steps of a GLUE run.

Trains one run of the GLUE grid (benchmarks/glue.py: same data, epochs, schedule and seed) and stops it after
``--steps`` steps without shortening its schedule. Every ``--every`` steps it runs a fixed batch of dev sentences
through the model in eval mode and records, per layer, the adapter's update against the hidden state it is added
to, and how much of that update is one vector shared by every token. A collapsed run shows an update that grows
past ||h|| and is the same for every token: after the residual and LayerNorm every sentence then looks alike, the
[CLS] vectors close in on one point and the head can only predict the prior.

    OMP_NUM_THREADS=1 python benchmarks/collapse_probe.py --method adakron16-down2 --seed 43 --lr 4e-3
    python benchmarks/collapse_probe.py --render           # its section of RESULTS.md (glue.py --render)

Each of these changes the run's file name: ``--outer-lr-ratio X`` trains the outer factor u at X times ``--lr`` (v
keeps the method's rate; tried here first, the library's ``--outer-lr-ratio`` now; the runs before that scaled u's
rows' AdamW step, the same thing), and ``--update-cap C``, a remedy the library does not have, caps each token's
update at C times ||h|| (the adapter's output rescaled, as a forward hook). ``--steps`` past one epoch also records
the dev metric the run reached at each epoch.

    OMP_NUM_THREADS=1 python benchmarks/collapse_probe.py --method adakron16-down2 --outer-lr-ratio 0.125 --steps 540

One JSONL per run under benchmarks/results/collapse_probe/ (a line per probe); a finished run is skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from adakron.errors import positive_float, positive_int
import remedies
from glue import DEFAULT_DATA, METHODS, REPORTED, RESULTS, TASK_NAMES, TASKS, library_digest, run_id, train_args

FOLDER = RESULTS / "collapse_probe"
PROBE_SENTENCES = 64  # the first CoLA dev sentences, the same batch at every probe


def probe_batch(data_dir: Path, tokenizer, max_length: int = 64):
    with open(data_dir / "CoLA" / "dev.tsv", newline="") as f:
        sentences = [row[3] for row, _ in zip(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE),
                                              range(PROBE_SENTENCES))]
    return tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def measure(model, batch) -> dict:
    """Per layer: mean ||update|| / ||h|| over real tokens, and the share of the update's energy in its mean over
    tokens (1.0: the same vector everywhere); the spread of the last layer's [CLS] vectors (RMS distance to
    their mean, over their RMS norm)."""
    import torch

    from adakron.adapters.kron import KronAdapter

    mask = batch["attention_mask"].bool()
    seen, hooks = [], []

    def hook(module, inputs, output):
        h, update = inputs[0][mask], output[mask]  # (tokens, d)
        ratio = (update.norm(dim=-1) / h.norm(dim=-1)).mean()
        shared = update.mean(0).pow(2).sum() / update.pow(2).sum(-1).mean().clamp_min(1e-30)  # B = 0: 0, not NaN
        seen.append((round(ratio.item(), 4), round(shared.item(), 4)))

    for module in model.modules():
        if isinstance(module, KronAdapter):
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**{k: v.to(model.device) for k, v in batch.items()}, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    cls = out.hidden_states[-1][:, 0]
    spread = (cls - cls.mean(0)).pow(2).sum(-1).mean().sqrt() / cls.pow(2).sum(-1).mean().sqrt()
    return {"ratio": [r for r, _ in seen], "shared": [s for _, s in seen], "cls_spread": round(spread.item(), 4),
            "logit_std": round(out.logits.std(0).mean().item(), 4)}


VARIANTS = (("down", "down_lr_ratio"), ("up", "up_lr_ratio"), ("outer", "outer_lr_ratio"), ("cap", "update_cap"))


def variant_tag(**variant: float | None) -> str:
    """The part of a probe's file name that says what it changed of its method ('' for nothing): factor rates other
    than the method's, or an experimental remedy."""
    return "".join(f"-{name}{variant[key]:g}" for name, key in VARIANTS if variant.get(key) is not None)


def run(task: str, key: str, seed: int, lr: float, steps: int, every: int, data_dir: Path,
        down_lr_ratio: float | None = None, up_lr_ratio: float | None = None, outer_lr_ratio: float | None = None,
        update_cap: float | None = None) -> Path:
    from transformers import TrainerCallback

    from adakron.training.trainer import fit

    method = METHODS[key]
    rates = {k: v for k, v in (("down_lr_ratio", down_lr_ratio), ("up_lr_ratio", up_lr_ratio),
                               ("outer_lr_ratio", outer_lr_ratio)) if v is not None}
    method = replace(method, **rates)
    tag = variant_tag(down_lr_ratio=down_lr_ratio, up_lr_ratio=up_lr_ratio, outer_lr_ratio=outer_lr_ratio,
                      update_cap=update_cap)
    path = FOLDER / f"{run_id(task, method, seed, lr)}-{steps}steps{tag}.jsonl"
    if path.exists():
        print(f"-- {path.name} exists", flush=True)
        return path
    cli = argparse.Namespace(data_dir=data_dir, quick=False, max_train_samples=None, max_eval_samples=None)
    scratch = Path(__file__).resolve().parent.parent / "runs" / "probe" / path.stem
    lines = []

    class Probe(TrainerCallback):
        def __init__(self):
            self.batch = None

        def _record(self, state, model):
            from adakron.models import load_tokenizer

            if self.batch is None:
                self.batch = probe_batch(data_dir, load_tokenizer(None))
            lines.append({"step": state.global_step, **measure(model, self.batch)})
            print(json.dumps(lines[-1]), flush=True)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics:
                lines.append({"step": state.global_step, "eval": {k: round(v, 4) for k, v in metrics.items()
                                                                  if isinstance(v, float)}})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                self._record(state, model)
            if state.global_step >= steps:
                control.should_training_stop = True  # stop without changing the schedule's length

    fit(train_args(task, method, seed, lr, cli, scratch), callbacks=[remedies.callback(update_cap), Probe()])
    FOLDER.mkdir(parents=True, exist_ok=True)
    header = {"task": task, "method_key": key, "seed": seed, "lr": lr, "steps": steps, "every": every,
              **dict(zip(("down_lr_ratio", "up_lr_ratio"), remedies.factor_rates(method))), "outer_lr_ratio": outer_lr_ratio,
              "update_cap": update_cap, "library_digest": library_digest()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(json.dumps(x) for x in [header, *lines]) + "\n")
    os.replace(tmp, path)
    shutil.rmtree(scratch, ignore_errors=True)
    return path


def section() -> list[str]:
    """RESULTS.md's section: per run, every 100 steps, the largest per-layer ||update||/||h|| (its layer, and the
    share of its energy that is one vector for every token), then the [CLS] spread."""
    rows, everys = [], set()
    for path in sorted(FOLDER.glob("*.jsonl")):
        header, *lines = [json.loads(x) for x in path.read_text().splitlines()]
        everys.add(header.get("every", 25))  # the first probes ran every 25 steps, before the header said so
        probes = [x for x in lines if "ratio" in x]
        dev = [x["eval"] for x in lines if "eval" in x]
        cells = []
        for line in (x for x in probes if x["step"] % 100 == 0):
            worst = max(range(len(line["ratio"])), key=line["ratio"].__getitem__)
            cells.append(f"{line['ratio'][worst]:.2f} (L{worst + 1}, {line['shared'][worst]:.2f}) / "
                         f"{line['cls_spread']:.2f}")
        tag = variant_tag(**{k: header.get(k) for _, k in VARIANTS[2:]})
        down = "v" if header.get("outer_lr_ratio") is not None else "u, v"  # u's own rate is in the tag
        own = dict(zip(("down_lr_ratio", "up_lr_ratio"), remedies.factor_rates(METHODS[header["method_key"]])))
        rates = "".join(f", {name} lr×{header[k]:g}" for name, k in ((down, "down_lr_ratio"), ("B", "up_lr_ratio"))
                        if header.get(k) is not None and header[k] != own[k])
        metric = f"eval_dev_{REPORTED[header['task']]}"
        # One evaluation per finished epoch, and one where the probe stopped the run (in brackets).
        scores = [f"{100 * d[metric]:.1f}" if float(d.get("epoch", 0)).is_integer() else f"({100 * d[metric]:.1f})"
                  for d in dev if metric in d]
        rows.append((f"{TASK_NAMES[header['task']]} `{header['method_key']}{tag}`{rates} s{header['seed']} "
                     f"lr {header['lr']:g}, {header.get('steps', 400)} steps", cells, " / ".join(scores) or "–"))
    if not rows:
        return []
    width = max(len(c) for _, c, _ in rows)
    out = ["### Inside a collapse (`python benchmarks/collapse_probe.py`)", "",
           f"The GLUE grid's run stopped early (its schedule unchanged); every {'/'.join(map(str, sorted(everys)))} "
           f"steps the first {PROBE_SENTENCES} CoLA dev sentences go through the model in eval mode. Cells, every "
           "100 steps: the largest per-layer mean ||update|| / ||h|| over real tokens (in brackets its layer and "
           "the share of the update's energy in its mean over tokens: 1.00 is the same vector for every token), "
           "then the spread of the last "
           "layer's [CLS] vectors (RMS distance to their mean over their RMS norm). The last column is the dev "
           "metric after each finished epoch (CoLA's epoch is 268 steps), in brackets where the probe stopped the run. Runs named `-outerX` train the outer "
           "factor u at X times the lr (v keeps the method's rate; the library's `--outer-lr-ratio` since), "
           "and `-capC` cap each token's update at C × ||h|| (not in the library); `u, v lr×`/`v lr×`/`B lr×` "
           "name factor rates "
           "other than the method's. All the probes are in `benchmarks/results/collapse_probe/`.", "",
           "| run | " + " | ".join(f"step {100 * i}" for i in range(width)) + " | dev metric ×100 by epoch |",
           "|---" * (width + 2) + "|"]
    out += [f"| {name} | " + " | ".join(cells + ["–"] * (width - len(cells))) + f" | {dev} |"
            for name, cells, dev in rows]
    return out + [""]


# The probe reads each layer's adapter, so it runs the methods that have one.
PROBED = sorted(key for key, m in METHODS.items() if m.method in ("adakron", "adapter"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The default is the previous default recipe (u, v at lr/2, B at lr): the one that collapsed on CoLA seed 43.
    parser.add_argument("--method", default="adakron16-down2", choices=PROBED,
                        help="a GLUE-grid method with adapters (default: %(default)s, the previous default recipe)")
    parser.add_argument("--task", default="cola", choices=TASKS, help="the run to train; the probe batch is CoLA's")
    parser.add_argument("--seed", type=int, default=43)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--steps", type=positive_int, default=400)
    parser.add_argument("--every", type=positive_int, default=25)
    parser.add_argument("--down-lr-ratio", type=positive_float, help="u, v's rate over --lr (default: the method's)")
    parser.add_argument("--up-lr-ratio", type=positive_float, help="B's rate over --lr (default: the method's)")
    parser.add_argument("--outer-lr-ratio", type=positive_float,
                        help="experimental: u's rate as a multiple of --lr, v keeping its own (not in the library)")
    parser.add_argument("--update-cap", type=positive_float,
                        help="experimental: cap each token's update at this multiple of ||h|| (not in the library)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", DEFAULT_DATA)))
    parser.add_argument("--render", action="store_true", help="print RESULTS.md's section of finished probes")
    args = parser.parse_args(argv)
    if args.render:
        print("\n".join(section()))
        return 0
    if not all((args.data_dir / folder).is_dir() for folder in {"CoLA", TASK_NAMES[args.task]}):
        print(f"GLUE data not found in {args.data_dir}; pass --data-dir or set GLUE_DIR. Nothing to run.")
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    run(args.task, args.method, args.seed, args.lr, args.steps, args.every, args.data_dir, args.down_lr_ratio,
        args.up_lr_ratio, args.outer_lr_ratio, args.update_cap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
