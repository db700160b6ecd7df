"""Builds benchmarks/RESULTS.md from the result files under benchmarks/results/ (never from memory)."""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
from collections import defaultdict
from pathlib import Path

from glue import (
    ABLATIONS,
    EPOCHS,
    METHODS,
    RESULTS,
    SEEDS,
    TASK_NAMES,
    TASKS,
    chosen_lr,
    planned_runs,
    mean_std,
    run_id,
    score,
)

HERE = Path(__file__).resolve().parent
# The first pass (pooler frozen) ran each method's first three learning rates; later passes extended the grid.
FIRST_PASS = {key: dataclasses.replace(m, lr_grid=m.lr_grid[:3]) for key, m in METHODS.items()}
NAMES = {"adakron16-u8": "AdaKron r=16 f=4 (default: u at lr/8, v at lr/2, B at lr)",
         "adakron16-cap": "AdaKron r=16 f=4, capped rates (u at min(lr, 5e-4), v at min(lr, 2e-3), B at lr)",
         "adakron16-half": "AdaKron r=16 f=4, previous default (u, v at lr/4, B at lr/2)",
         "adakron48-scaled": "AdaKron r=48 f=4, previous default (u, v at lr/6, B at lr/3)",
         "adakron48-u8": "AdaKron r=48 f=4 (default: u at lr/12, v at lr/3, B at 2lr/3)",
         "adakron16-down2": "AdaKron r=16 f=4, an earlier default (u, v at lr/2, B at lr)",
         "adakron48-down2": "AdaKron r=48 f=4, an earlier default unscaled (u, v at lr/2, B at lr)",
         "adakron16-down8": "AdaKron r=16 f=4, the first study default (u, v at lr/8)",
         "adakron16": "AdaKron r=16 f=4, authors' recipe", "adakron48": "AdaKron r=48 f=4, authors' recipe",
         "adapter": "Adapter r=16 (plain)",
         "lora": "LoRA r=8 q,v (peft)", "full": "Full fine-tuning"}


def _planned_ids(folder: Path) -> list[str]:
    """The ids of the grid's planned runs at the chosen lrs, each once (MRPC at the chosen lr is also a scan run)."""
    return list(dict.fromkeys(run_id(*run) for run in planned_runs(folder)))


def _missing(folder: Path) -> list[str]:
    """The planned runs (at chosen lrs) that have no result yet."""
    return [i for i in _planned_ids(folder) if not (folder / f"{i}.json").exists()]


def _planned_done(folder: Path) -> tuple[int, int]:
    """How many of the grid's planned runs (glue.planned_runs) have a result, and how many are planned in all.
    Other runs in the folder (at other lrs, or adopted from sibling studies) are not counted. Until a method's
    lr is chosen, the runs at it are counted at a stand-in lr, its first: one id per planned run either way."""
    chosen = _planned_ids(folder)
    everything = {run_id(*run) for run in planned_runs(folder, lr_of=lambda m, f: chosen_lr(m, f) or m.lr_grid[0])}
    return sum((folder / f"{i}.json").exists() for i in chosen), len(everything)


def glue_section(folder: Path, heading: str = "## GLUE dev (all-MiniLM-L6-v2, CPU)", first_pass: bool = False
                 ) -> list[str]:
    """The GLUE tables of one grid; ``first_pass`` renders the superseded frozen-pooler grid kept for the record."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    lines = [heading, ""]
    if not results:
        return lines + ["No runs have finished yet: `python benchmarks/glue.py`.", ""]
    methods = FIRST_PASS if first_pass else METHODS
    chosen = {key: chosen_lr(m, folder) for key, m in methods.items()}
    by_cell = defaultdict(list)
    for r in results:
        key, task, lr = r["method_key"], r["task"], r["hyperparameters"]["lr"]
        if key in chosen and lr == chosen[key]:
            by_cell[key, task].append(r)
    if first_pass:
        done = (f"{len(results)} PEFT runs finished before the pass was stopped (full fine-tuning trains the pooler "
                "anyway: its runs are in the table above).")
    else:
        missing = _missing(folder)
        done = "{} of {} planned runs have finished{}.".format(
            *_planned_done(folder), f" (to come: {', '.join(missing)})" if missing else "")
    lines += [f"{done} Best-epoch dev score "
              "(last-epoch in brackets), mean ± std over seeds where there are several (3 unless a cell says); "
              "MRPC F1, STS-B Pearson, CoLA Matthews, accuracy elsewhere; ×100. \"avg, seed 42\" averages the "
              "seed-42 runs alone, the same seeds for every method.", "",
              "| method | lr | " + " | ".join(TASK_NAMES[t] for t in TASKS) + " | avg | avg, seed 42 | trainable params | "
              "of which the method's own | wall s/run |", "|---" * (len(TASKS) + 7) + "|"]
    head_parts = _head_parameters(with_pooler=not first_pass)
    head = sum(head_parts.values())
    points = []
    for key in METHODS:
        if first_pass and not any(r["method_key"] == key for r in results):
            continue
        cells, means, firsts, params, walls = [], [], [], None, []
        for task in TASKS:
            runs = by_cell[key, task]
            best = [score(r, task) for r in runs]
            firsts += [score(r, task) for r in runs if r["seed"] == SEEDS[0]]
            last = [score(r, task, "last") for r in runs]
            seeds = "" if len(runs) in (1, len(SEEDS)) else f" [{len(runs)} seeds]"  # a cell short of the plan
            cells.append(f"{mean_std(best)} ({mean_std(last)}){seeds}" if runs else "–")
            if runs:
                means.append(statistics.mean(best))
                # With a two-label head (the tasks' heads differ: 770 for two labels, 385 for STS-B's one output).
                params = params or (runs[0]["trainable_params"], runs[0]["trainable_percent"])
                walls += [r["wall_seconds"] for r in runs]
        complete = len(means) == len(TASKS)
        avg = f"{statistics.mean(means):.1f}" if complete else "–"
        avg_first = f"{statistics.mean(firsts):.1f}" if len(firsts) == len(TASKS) else "–"
        if complete:
            points.append((params[0], statistics.mean(means), NAMES[key]))
        param_text = f"{params[0]:,} ({params[1]:.2f}%) | {params[0] - head:,}" if params else "– | –"
        wall = f"{statistics.mean(walls):.0f}" if walls else "–"
        lr = f"{chosen[key]:g}" if chosen[key] else "(pending)"
        if chosen[key] == max(methods[key].lr_grid):
            lr += " (top of its grid)"
        lines.append(f"| {NAMES[key]} | {lr} | " + " | ".join(cells) + f" | {avg} | {avg_first} | {param_text} | {wall} |")
    # A row's run that another row of this grid trained identically (glue.same_training) is counted once.
    trained = [r for r in results if not str(r.get("reused_from", "")).startswith(f"{folder.name}/")]
    lines += ["", *_recipe_table(results)]
    lines += ["Epochs per task (the same for every method): " +
              ", ".join(f"{TASK_NAMES[t]} {e}" for t, e in EPOCHS.items()) +
              ". Trainable parameters include the head every method trains alike: "
              + " and ".join(f"`{name}` ({count:,})" for name, count in head_parts.items())
              + f", {head:,} in all with a two-label classifier (STS-B's one output has 385 fewer). The method's own "
              "column leaves the head out.",
              "", f"Compute: the {len(trained)} finished runs (the planned ones and the extra rows' and lrs') took "
              f"{sum(r['wall_seconds'] for r in trained) / 3600:.1f} hours of wall time summed over runs (here: "
              "one torch thread per run, two runs at a time on the 2 cores). The epochs were chosen so the whole "
              "grid fits a budget of 12 CPU-hours.", ""]
    if points:
        plot = folder.parent / "glue_params.png"
        _plot(points, plot)
        lines += [f"![average GLUE score against trainable parameters]({plot.relative_to(HERE).as_posix()})", ""]
    lines += _lr_table(results, methods), ""
    lines += _ablation_table(folder, chosen.get("adakron16"))
    lines += _loss_curves(results)
    return lines


def _recipe_table(results: list[dict]) -> list[str]:
    """The recipe every method ran under, read back from the runs' recorded hyperparameters."""
    keys = {"epochs": "epochs", "batch_size": "batch", "max_length": "max length", "warmup_ratio": "warm-up ratio",
            "weight_decay": "weight decay", "group_by_length": "length-grouped batches"}
    lines = ["Recipe, as recorded in each run's result file (AdamW, linear decay after the warm-up; lr: each "
             "method's choice on MRPC, below):", "",
             "| task | " + " | ".join(keys.values()) + " |", "|---" * (len(keys) + 1) + "|"]
    for task in TASKS:
        runs = [r["hyperparameters"] for r in results if r["task"] == task]
        if runs:
            cells = [", ".join(sorted({str(h[k]) for h in runs})) for k in keys]
            lines.append(f"| {TASK_NAMES[task]} | " + " | ".join(cells) + " |")
    return lines + [""]


def _head_parameters(with_pooler: bool) -> dict[str, int]:
    """The head every method trains alike, module by module, counted on the bare backbone with two labels."""
    parts, pooler = _bare_head()
    return {name: count for name, count in parts.items() if with_pooler or name != pooler}


@functools.cache
def _bare_head() -> tuple[dict[str, int], str | None]:
    """(parameters per head module, the pooler's path): the backbone is loaded once per render, not per grid."""
    from adakron import AdaKronConfig
    from adakron.adapters.inject import head_names, pooler_path
    from adakron.models import load_classifier

    model = load_classifier(None, 2)
    names = head_names(model, AdaKronConfig())
    parts = {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names}
    return parts, pooler_path(model)


def _lr_table(results: list[dict], methods: dict) -> str:
    rows = ["### Learning-rate selection (MRPC F1, seed 42)", "",
            "The PEFT grid grew upward (to 4e-3) while every PEFT method's best sat at its top; a method still at "
            "the top is flagged in the table above.", "", "| method | lr | F1 |", "|---|---|---|"]
    spreads = defaultdict(list)
    for key, method in methods.items():
        for r in sorted(results, key=lambda r: r["hyperparameters"]["lr"]):
            if r["method_key"] == key and r["task"] == "mrpc" and r["seed"] == 42 \
                    and r["hyperparameters"]["lr"] in method.lr_grid:
                rows.append(f"| {NAMES[key]} | {r['hyperparameters']['lr']:g} | {score(r, 'mrpc'):.1f} |")
                spreads[key].append(score(r, "mrpc"))
    # A choice at the top of a grid matters less when the whole grid scores alike (compare the seed spread above).
    done = [f"{NAMES[k]} {max(f1) - min(f1):.1f}" for k, f1 in spreads.items() if len(f1) == len(methods[k].lr_grid)]
    if done:
        rows += ["", "F1 spread across each finished grid (best − worst lr), in points: " + "; ".join(done) + "."]
    return "\n".join(rows)


def _loss_curves(results: list[dict], lr: float = 2e-3) -> list[str]:
    """Train loss per epoch of the MRPC runs at one shared lr: how fast each method starts to learn."""
    runs = [r for r in results if r["task"] == "mrpc" and r["seed"] == 42 and r["hyperparameters"]["lr"] == lr
            and r.get("epochs") and r["method_key"] in METHODS]
    if not runs:
        return []
    return [f"### MRPC train loss per epoch at lr {lr:g} (seed 42; every run at that lr, so no full fine-tuning)",
            "", *_per_epoch_table(runs, lambda e: f"{e['train_loss']:.3f}")]


def _per_epoch_table(runs: list[dict], cell, show_lr: bool = False) -> list[str]:
    """One row per run, ordered by method, lr and seed (so a re-render never reorders rows), one
    ``cell(epoch record)`` per epoch; with ``show_lr`` the lr and seed get columns of their own."""
    epochs = max(len(r["epochs"]) for r in runs)
    head = " lr | seed |" if show_lr else ""
    lines = [f"| method |{head} " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |",
             "|---" * (epochs + 1 + 2 * show_lr) + "|"]
    order = list(METHODS)
    for r in sorted(runs, key=lambda r: (order.index(r["method_key"]), -r["hyperparameters"]["lr"], r["seed"])):
        lr_seed = f" {r['hyperparameters']['lr']:g} | {r['seed']} |" if show_lr else ""
        lines.append(f"| {NAMES[r['method_key']]} |{lr_seed} " + " | ".join(cell(e) for e in r["epochs"]) + " |")
    return lines + [""]


def _ablation_table(folder: Path, lr: float | None) -> list[str]:
    """One column per learning rate at which any ablation ran; the grid's chosen lr is marked."""
    lines = ["### Ablations on MRPC (F1 best / last epoch, seed 42, AdaKron r=16, each a change of the authors' "
             "recipe)", ""]
    variants = [("authors' recipe (reference init, f=4)", METHODS["adakron16"])] + list(ABLATIONS)
    lrs = sorted({lr_ for _, m in ABLATIONS for lr_ in METHODS["adakron16"].lr_grid
                  if (folder / f"{run_id('mrpc', m, 42, lr_)}.json").exists()} | ({lr} if lr else set()))
    if not lrs:
        return lines + ["Pending the learning-rate selection.", ""]
    heads = [f"lr {x:g}" + (" (chosen)" if x == lr else "") for x in lrs]
    lines += ["| variant | " + " | ".join(heads) + " |", "|---" * (len(lrs) + 1) + "|"]
    for label, method in variants:
        cells = []
        for x in lrs:
            path = folder / f"{run_id('mrpc', method, 42, x)}.json"
            if path.exists():
                r = json.loads(path.read_text())
                cells.append(f"{score(r, 'mrpc'):.1f} / {score(r, 'mrpc', 'last'):.1f}")
            else:
                cells.append("(pending)" if x == lr else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _plot(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for params, avg, name in points:
        ax.scatter(params, avg)
        ax.annotate(name, (params, avg), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set(xscale="log", xlabel="trainable parameters (log)", ylabel="average GLUE dev score",
           title="all-MiniLM-L6-v2 on 5 GLUE tasks")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed_section() -> list[str]:
    path = RESULTS / "speed.json"
    if not path.exists():
        return ["## Speed and memory", "", "Not measured yet: `python benchmarks/speed.py`.", ""]
    from speed import markdown  # rendered from the JSON, so the tables follow the current format

    return ["## Speed and memory (`python benchmarks/speed.py`)", "", markdown(json.loads(path.read_text())), ""]


def serving_section() -> list[str]:
    lines = ["## Many adapters on one backbone", ""]
    mixed = RESULTS / "mixed_batch.json"
    if mixed.exists():
        m = json.loads(mixed.read_text())
        r = m["results"]
        lines += [f"Mixed-adapter batch (`{m['command']}`, or `python benchmarks/speed.py --mixed-batch`): "
                  f"{m['model']}, {m['batch']} rows x {m['seq_len']} tokens spread over {m['adapters']} adapters "
                  f"(heads of {sorted(set(m['head_widths']))} outputs), {m['threads']} thread(s), median of "
                  f"{m['rounds']} interleaved rounds.", "",
                  "| batch | median s | rows/s |", "|---|---:|---:|",
                  f"| one adapter | {r['single']['median_s']:.3f} | {r['single']['rows_per_s']:.1f} |",
                  f"| {m['adapters']} adapters, {m['batch'] // m['adapters']} rows each | "
                  f"{r['mixed']['median_s']:.3f} | {r['mixed']['rows_per_s']:.1f} |", "",
                  f"Mixed throughput = **{m['mixed_over_single']:.3f} x** single-adapter (goal >= {m['goal']}).", ""]
    runs = [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob("serve*.json"))]
    if runs:
        lines += ["`adakron serve` over loopback HTTP (`python benchmarks/serve.py`; client and server on the same "
                  "2 cores):", "", "| file | model | clients | max batch | req/s | p50 ms | p99 ms | rows per "
                  "forward | errors |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for path, d in runs:
            lines.append(f"| {path.name} | {d['model']} | {d['clients']} | {d['max_batch']} | "
                         f"{d['requests_per_s']:.1f} | {d['latency_ms']['p50']:.0f} | {d['latency_ms']['p99']:.0f} | "
                         f"{d['server']['rows_per_forward_pass']:.1f} | {d['errors']} |")
        lines.append("")
    return lines


def cola_section() -> list[str]:
    """CoLA's per-epoch curves in the grid, and its first, 3-epoch runs kept for the record."""
    lines = ["### CoLA per epoch: dev Matthews ×100 / train loss", ""]
    for title, folder in (("the grid's runs", RESULTS / "glue"), ("the first, 3-epoch runs (superseded; "
                          "`benchmarks/results/cola-3-epochs/`)", RESULTS / "cola-3-epochs")):
        runs = [json.loads(p.read_text()) for p in folder.glob("cola-*.json")]
        if runs:
            lines += [f"In {title}:", "", *_per_epoch_table(
                runs, lambda e: f"{100 * e['dev']['dev_matthews_correlation']:.1f} / {e['train_loss']:.3f}", True)]
    return lines + [
        "CoLA first ran 3 epochs; its runs take about a minute an epoch and every method was still climbing at "
        f"the end, so it now runs {EPOCHS['cola']}. A train loss near 0.61 is the entropy of CoLA's 70/30 label "
        "split: the model predicts the prior. The authors' recipe and an earlier default (u, v at lr/2, B at lr) "
        "stay there at the lr they chose on MRPC (the earlier default on two seeds of three), while in the "
        "3-epoch run, whose lr decayed 2.7 times sooner, the authors' recipe at r=16 learned; the default recipe "
        "learns in every run (3 seeds at its lr, seed 42 at every lr of the grid). See \"Open problems\" in the "
        "README.", ""]


def pooler_section() -> list[str]:
    """Why the pooler trains with every PEFT method's head: the probe, then the superseded first pass."""
    lines = ["## The pooler belongs to the head", "",
             "BERT's sequence classifier reads the pooler (dense + tanh over the first token), which lives inside "
             "the backbone, so a frozen backbone froze it too (peft's LoRA default does the same). all-MiniLM-L6-v2 "
             "was trained with mean pooling and ships an untrained pooler (zero bias, weights of std 0.009): frozen, "
             "it hands the classifier a small random projection of the first token. In a first pass of the grid "
             "(below) AdaKron and LoRA fell far behind the plain adapter on STS-B, and AdaKron on CoLA too. The probe "
             "below isolates the pooler: frozen, AdaKron and LoRA stay near zero Pearson for 300 steps; trained, "
             "every method learns within the first 100. The pooler's 147,840 parameters outweigh AdaKron's 57,648; "
             "every method carries the same head, so the trainable-parameter column grows by the same amount for "
             "each. RoBERTa, ELECTRA and DeBERTa heads carry that dense layer themselves and train it (so "
             "does the AdaMix code the authors built on, for RoBERTa); so now every method's head is the pooler plus "
             "the classifier (`adakron.adapters.inject.pooler_path`; LoRA gets it through peft's `modules_to_save`), "
             "in the grid above and in every section of this file that does not say the pooler was frozen.",
             ""]
    all_probes = [json.loads(p.read_text()) for p in sorted((RESULTS / "pooler_probe").glob("*.json"))]
    for length in sorted({r["steps"] for r in all_probes}):
        probes = [r for r in all_probes if r["steps"] == length]
        steps = [point["step"] for point in probes[0]["curve"]]
        lines += [f"`python benchmarks/pooler_probe.py`: STS-B, batch {probes[0]['batch']}, seed {probes[0]['seed']}, "
                  f"dev Pearson ×100 on the first {probes[0]['dev_rows']} dev rows, each method at its first-pass lr, "
                  "AdamW with 6% warm-up and linear decay over the steps shown.", "",
                  "| method | lr | pooler | trainable params | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|---:|---|---:|" + "---:|" * len(steps)]
        for r in sorted(probes, key=lambda r: (r["method"], r["train_pooler"])):
            lines.append(f"| {r['method']} | {r['lr']:g} | {'trained' if r['train_pooler'] else 'frozen'} | "
                         f"{r['trainable_params']:,} | "
                         + " | ".join(f"{100 * p['dev_pearson']:.1f}" for p in r["curve"]) + " |")
        lines.append("")
    first = RESULTS / "frozen-pooler"
    lines += ["<details><summary>First pass of the grid, pooler frozen (superseded)</summary>", ""]
    lines += glue_section(first / "glue", "### GLUE dev, pooler frozen", first_pass=True)
    lines += time_to_accuracy_section(first / "time_to_accuracy", first / "glue",
                                      "### Time to accuracy (SST-2), pooler frozen (full fine-tuning: see below)",
                                      FIRST_PASS)
    return lines + ["</details>", ""]


def time_to_accuracy_section(folder: Path = RESULTS / "time_to_accuracy", grid: Path = RESULTS / "glue",
                              heading: str = "## Time to accuracy (SST-2)", methods: dict = METHODS) -> list[str]:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    lines = [heading, ""]
    if not runs:
        return lines + ["Not measured yet: `python benchmarks/time_to_accuracy.py`.", ""]
    lines += ["`python benchmarks/time_to_accuracy.py`: training until SST-2 dev accuracy first reaches the target "
              "(batch 32, length-grouped batches, 2-epoch linear schedule, each method at the lr chosen on MRPC). "
              "Training seconds leave out evaluation and checkpointing. Runs here had another 1-thread job on the "
              "machine's other core.",
              "`adakron` is the library's default recipe (u at lr/8, v at lr/2, B at lr), `adakron-paper` the "
              "authors' (what `adakron` ran before the recipe study set the default), `adakron-half`, "
              "`adakron-down2` and `adakron-down8` earlier defaults (u, v at lr/4 and B at lr/2; u, v at lr/2 and "
              "B at lr; u, v at lr/8). Compare rows of one sitting (the same date): the machine's load moves every "
              "timing.",
              "", "| method | lr | seed | measured | target | eval every | threads | reached at step (epoch) | "
              "accuracy then | training s | wall s incl. eval | s/step |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    from time_to_accuracy import GRID_KEYS

    for r in runs:
        hit = r["reached"]
        method = methods[GRID_KEYS[r["method"]]]
        # Full fine-tuning's runs serve both passes (it always trained the pooler), so they stay in the current grid.
        chosen = chosen_lr(method, grid) or chosen_lr(method, RESULTS / "glue")
        name = r["method"]
        if chosen != r["lr"]:
            name += " (lr selection unfinished)" if chosen is None else f" (superseded: the grid chose {chosen:g})"
        setting = (f"| {name} | {r['lr']:g} | {r['seed']} | {r.get('date', 'earlier')} | {100 * r['target']:g}% | "
                   f"{r['eval_steps']} | {r['threads']} |")
        if hit:
            lines.append(f"{setting} {hit['step']} ({hit['epoch']:.2f}) | "
                         f"{100 * hit['accuracy']:.1f} | {hit['train_seconds']:.0f} | {hit['wall_seconds']:.0f} | "
                         f"{hit['train_seconds'] / hit['step']:.3f} |")
        else:
            best = max(point["accuracy"] for point in r["curve"])
            lines.append(f"{setting} not reached (best {100 * best:.1f}) | | | | |")
    plot = folder.parent / "time_to_accuracy.png"
    _plot_curves(runs, plot)
    return lines + ["", *_steps_by_seed(runs), *_curves_by_step([r for r in runs if r["seed"] == 42]),
                    f"![SST-2 dev accuracy against training time]({plot.relative_to(HERE).as_posix()})", ""]


def _first_sittings(runs: list[dict]) -> dict[tuple, dict]:
    """The first run of each method, lr and seed, which stands for all its sittings: runs are deterministic, so
    later sittings of one differ only in their seconds."""
    first: dict[tuple, dict] = {}
    for r in runs:
        first.setdefault((r["method"], r["lr"], r["seed"]), r)
    return first


def _steps_by_seed(runs: list[dict]) -> list[str]:
    """The step at which each method first reached the target, a column per seed: steps, unlike seconds, do not move
    with the machine's load, so seeds measured in different sittings compare."""
    steps: dict[str, dict[int, int | None]] = {}
    for (method, lr, seed), r in _first_sittings(runs).items():
        steps.setdefault(f"{method} (lr {lr:g})", {})[seed] = r["reached"]["step"] if r["reached"] else None
    seeds = sorted({seed for by_seed in steps.values() for seed in by_seed})
    if seeds == [42]:
        return []
    lines = ["Steps to the target by seed (\"not reached\": not within the 2 epochs):", "",
             "| method | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for name, by_seed in steps.items():
        cells = [("not reached" if by_seed[s] is None else str(by_seed[s])) if s in by_seed else "" for s in seeds]
        hits = [step for step in by_seed.values() if step is not None]
        mean = f"{sum(hits) / len(hits):.0f}" if len(hits) == len(seeds) else ""  # only over every seed
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return lines + [""]


def _curves_by_step(runs: list[dict]) -> list[str]:
    """Dev accuracy at each evaluated step, a column per method: a run is deterministic (every sitting of a method
    gives the same curve, only its seconds move), so this compares learning speed free of the machine's load."""
    curves = {}
    for (method, lr, _), r in _first_sittings(runs).items():  # runs of one seed: a column per method and lr
        curves[f"{method} (lr {lr:g})"] = {p["step"]: p["accuracy"] for p in r["curve"]}
    steps = sorted({step for curve in curves.values() for step in curve})
    lines = ["Dev accuracy (%) at each evaluated step (seed 42), until each method's run reached the target:", "",
             "| step | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    for step in steps:
        cells = [f"{100 * c[step]:.1f}" if step in c else "" for c in curves.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines + [""]


def _plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # more lines than the default cycle's 10 colours
    for (method, lr, seed), r in _first_sittings(runs).items():
        ax.plot([p["train_seconds"] for p in r["curve"]], [100 * p["accuracy"] for p in r["curve"]], marker=".",
                label=f"{method} (lr {lr:g}, seed {seed})")
    for target in {r["target"] for r in runs}:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="training seconds (1 CPU thread)", ylabel="SST-2 dev accuracy (%)", title="Time to accuracy")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render() -> Path:
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/glue.py --render` from the files in `benchmarks/results/`; "
             "every figure comes from a run of the scripts in `benchmarks/` on the machine named in it.", ""]
    lines += glue_section(RESULTS / "glue")
    from recipe import section as recipe_section

    lines += recipe_section()
    from collapse_probe import section as collapse_section

    lines += collapse_section()
    lines += cola_section()
    lines += pooler_section()
    quick = RESULTS / "glue-quick"
    if any(quick.glob("*.json")):
        lines += ["<details><summary>Quick mode (128 rows, 1 epoch): a smoke check, not a result</summary>", ""]
        lines += [f"- {p.stem}: {json.loads(p.read_text())['best']}" for p in sorted(quick.glob("*.json"))]
        lines += ["", "</details>", ""]
    lines += speed_section()
    profiles = sorted(RESULTS.glob("profile-*.md"))
    if (RESULTS / "profile-bert-base-adakron-lora.md").exists():  # the reading below is of that profile
        lines += ["Where the time goes (torch.profiler, below): in every method the frozen backbone's matmuls "
                  "(`aten::addmm`, `aten::mm`, `aten::bmm`) are most of the step. What LoRA adds over AdaKron is its "
                  "own matmuls (more `aten::mm` calls), a dropout mask on the input of each of its 2 sites per layer "
                  "(`aten::bernoulli_`) and the scaling multiplies (`aten::mul`); AdaKron adds one small down/up pair "
                  "per layer and no dropout, which is why it sits at `gate`'s cost. The profile ran with the pooler "
                  "frozen, before it joined the head; it adds the same one dense layer to both. Profiles run beside "
                  "other jobs (workers at low priority), and the profiler's own overhead inflates all ops alike.", ""]
    for path in profiles:
        lines += [f"<details><summary>{path.name}</summary>", "", path.read_text().rstrip(), "", "</details>", ""]
    lines += time_to_accuracy_section()
    lines += serving_section()
    from llm_report import section as llm_section
    from madakron import section as madakron_section

    lines += madakron_section()
    lines += llm_section()
    out = HERE / "RESULTS.md"
    out.write_text("\n".join(lines))
    return out


if __name__ == "__main__":
    print(render())
