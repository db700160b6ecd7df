"""The decoder-LLM benchmark's markdown, rendered from its result files only (never from memory), so
benchmarks/results/llm.md and RESULTS.md can be rebuilt at any time: ``section()`` returns its lines.

Light to import (no torch): render.py imports it to include the section.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "results" / "llm"
PARTS = ("sst2", "alpaca", "throughput", "memory")
# The methods each part runs, in the order of its table.
METHODS = {"sst2": ("base", "adakron", "adapter", "lora"), "alpaca": ("base", "adakron", "lora"),
           "throughput": ("adakron",), "memory": ("adakron", "lora", "full")}
NAMES = {"base": "untrained (zero-shot)", "adakron": "AdaKron r=16", "adapter": "Adapter r=16 (plain, f=1)",
         "lora": "LoRA r=8 q,v (peft)", "full": "Full fine-tuning"}
SETTING_NAMES = {"bare": "bare model (no adapter wrappers)", "one": "one adapter (`use_adapter`)",
                 "one_routed": "one adapter, routed per row", "mixed": "8 adapters mixed, one per row"}
MIB = 1024 * 1024


def markdown_path(folder: Path) -> Path:
    """benchmarks/results/llm -> benchmarks/results/llm.md (llm-quick -> llm-quick.md)."""
    return folder.with_suffix(".md")


def load(folder: Path) -> dict[str, list[dict]]:
    """The finished results of each part."""
    found = defaultdict(list)
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        found[result["part"]].append(result)
    return found


def section(folder: Path = FOLDER) -> list[str]:
    """The whole results section, part by part; parts with no result yet say how to run them."""
    found = load(folder)
    runs = [r for part in found.values() for r in part]
    model = runs[0]["model"] if runs else "SmolLM2-135M-Instruct"
    lines = [f"## Decoder LLM: {model.split(' (')[0]} on a CPU (`python benchmarks/llm.py`)", ""]
    if runs and "--quick" in model:
        lines += ["A `--quick` smoke run: a tiny random LLaMA and a handful of rows; the numbers mean nothing.", ""]
    planned = sum(len(METHODS[p]) for p in PARTS)
    hours = sum(r["wall_seconds"] for r in runs) / 3600
    threads = ", ".join(str(t) for t in sorted({r["threads"] for r in runs})) or "–"
    summary = (f"{len(runs)} of {planned} planned runs have finished, taking {hours:.2f} hours of wall time in all "
               f"(torch threads per run: {threads}). Every result file records the command that made it "
               "(`command`) and the one that reruns it alone once the file is moved away (`rerun`).")
    lines += [summary, ""]
    for part, render in (("sst2", sst2_lines), ("alpaca", alpaca_lines), ("throughput", throughput_lines),
                         ("memory", memory_lines)):
        lines += render(found.get(part, []))
    return lines


def _pending(part: str) -> list[str]:
    return [f"Not run yet: `OMP_NUM_THREADS=1 python benchmarks/llm.py --parts {part}`.", ""]


def _name(result: dict) -> str:
    config = result.get("adapter_config")
    if result["method"] == "adakron" and config:
        return f"AdaKron r={config['rank']} f={config['kron_factor']}"
    return NAMES[result["method"]]


def _params(result: dict) -> str:
    return f"{result['trainable_params']:,} ({result['trainable_percent']:.2f}%)"


def _groups(results: list[dict]) -> dict[tuple, list[dict]]:
    """Trained runs by (steps, batch, lr), each group with the untrained run first."""
    base = [r for r in results if r["method"] == "base"]
    groups = defaultdict(list)
    for r in results:
        if r["method"] != "base":
            groups[r["recipe"]["steps"], r["recipe"]["batch_size"], r["recipe"]["lr"]].append(r)
    if not groups:
        return {None: base}
    return {key: base + sorted(runs, key=lambda r: METHODS[r["part"]].index(r["method"]))
            for key, runs in sorted(groups.items())}


def _recipe_line(runs: list[dict]) -> list[str]:
    trained = [r for r in runs if r["method"] != "base"]
    if not trained:
        return []
    recipe = trained[0]["recipe"]
    adapter = recipe["adapter_recipe"]
    default = recipe["library_default_lr"]
    which = "the library's default" if recipe["lr"] == default else f"--lr; the library's default is {default:g}"
    text = (f"Training: {recipe['steps']} steps × batch {recipe['batch_size']} (the same seeded, length-grouped "
            f"batches for every method), lr {recipe['lr']:g} for every method ({which}), linear warm-up over "
            f"{recipe['warmup_steps']} steps then linear decay, weight decay {recipe['weight_decay']:g}, "
            f"gradient norm clipped at {recipe['max_grad_norm']:g}; {recipe['optimizer']}. AdaKron and the adapter "
            f"ran the library's default adapter recipe: init `{adapter['init']}`, outer bias "
            f"{adapter['outer_bias']:g}, down/up-projection lr × {adapter['down_lr_ratio']:g} / "
            f"{adapter['up_lr_ratio']:g}; no head trains (the LM head is tied to the embeddings).")
    return [text, ""]


def _train_cells(r: dict) -> str:
    """Training time, and the loss at the first step (the method's starting point) and over the last 10."""
    if r["method"] == "base":
        return "– | –"
    losses = r["losses"]
    return (f"{r['train_seconds']:.0f} ({r['train_seconds'] / len(losses):.2f}) | "
            f"{losses[0]:.3f} → {statistics.mean(losses[-10:]):.3f}")


def sst2_lines(results: list[dict]) -> list[str]:
    lines = ["### SST-2 as generation", ""]
    if not results:
        return lines + _pending("sst2")
    first = results[0]
    prompt = first["prompt"].replace("\n", " ")
    how = (f"Prompt (a user turn in the chat template): “{prompt}”; the reply is `{first['labels'][1]}` or "
           f"`{first['labels'][0]}`. Scored on {first['dev_rows']} dev rows (a fixed subset drawn with seed "
           f"{first['dev_subset_seed']}): each label is scored as the reply, by the summed log-probability of its "
           "tokens (the end-of-turn tokens included), and the likelier label is the prediction, so every answer is "
           "a label.")
    header = ("| method | dev accuracy % | predicted positive % | mean margin (nats) | trainable params | "
              "train s (s/step) | train loss: first step → last 10 | eval s |")

    def row(r: dict, runs: list[dict]) -> str:
        return (f"| {_name(r)} | {100 * r['dev_accuracy']:.1f} | {100 * r['predicted_share']['positive']:.0f} | "
                f"{r['mean_margin_nats']:.2f} | {_params(r)} | {_train_cells(r)} | {r['eval_seconds']:.0f} |")

    return [*lines, how, "", *_tables(_groups(results).values(), header, row)]


def alpaca_lines(results: list[dict]) -> list[str]:
    lines = ["### Alpaca: held-out loss and generations", ""]
    if not results:
        return lines + _pending("alpaca")
    first = results[0]
    how = (f"`{first['data']}` (see its PROVENANCE.md): {first['held_out_examples']} examples held out with seed "
           f"{first['held_out_seed']} (`training/lm.py` `held_out_split`), the rest to train on. Held-out loss: the "
           f"token-mean NLL of the completions ({first['held_out_tokens']:,} tokens), given their prompts.")
    header = ("| method | held-out loss | vs untrained | trainable params | train s (s/step) | "
              "train loss: first step → last 10 |")

    def row(r: dict, runs: list[dict]) -> str:
        base = next((b["held_out_loss"] for b in runs if b["method"] == "base"), None)
        delta = f"{r['held_out_loss'] - base:+.3f}" if base is not None else "–"
        return f"| {_name(r)} | {r['held_out_loss']:.3f} | {delta} | {_params(r)} | {_train_cells(r)} |"

    groups = _groups(results)
    return [*lines, how, "", *_tables(groups.values(), header, row), *_samples(list(groups.values())[-1])]


def _tables(groups, header: str, row) -> list[str]:
    """One table per recipe the runs were made with: that recipe, the header, then ``row(run, its group)``."""
    columns = header.count("|") - 1
    return [line for runs in groups
            for line in (*_recipe_line(runs), header, "|---" * columns + "|", *(row(r, runs) for r in runs), "")]


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def _samples(runs: list[dict]) -> list[str]:
    """Each held-out prompt with its reference and every model's greedy reply, one table per prompt."""
    with_samples = [r for r in runs if r.get("samples")]
    if not with_samples:
        return []
    tokens = with_samples[0]["sizes"]["sample_tokens"]
    lines = [f"Greedy replies (at most {tokens} new tokens) to the same held-out prompts:", ""]
    for i, sample in enumerate(with_samples[0]["samples"]):
        lines += [f"**Prompt {i + 1}.** {_cell(sample['prompt'])}", "", "| | reply |", "|---|---|",
                  f"| reference | {_cell(sample['reference'])} |"]
        lines += [f"| {_name(r)} | {_cell(r['samples'][i]['reply'])} |" for r in with_samples]
        lines.append("")
    return lines


def throughput_lines(results: list[dict]) -> list[str]:
    lines = ["### Generation throughput", ""]
    if not results:
        return lines + _pending("throughput")
    r = results[0]
    how = (f"{r['rows']} rows, exactly {r['new_tokens']} new tokens each (greedy, the end of sequence held back), "
           f"AdaKron r=16 adapters with random weights; medians of {r['rounds']} interleaved rounds, the order "
           "rotating each round. First-token latency: the same batch with 1 new token (the prefill).")
    header = "| setting | tokens/s | batch latency s | first-token latency s | decode ms/token | vs one adapter |"
    lines += [how, "", header, "|---" * 6 + "|"]
    one = r["settings"]["one"]["tokens_per_second"]
    for key, name in SETTING_NAMES.items():
        s = r["settings"][key]
        lines.append(f"| {name} | {s['tokens_per_second']:.1f} | {s['batch_latency_s']:.2f} | "
                     f"{s['first_token_latency_s']:.2f} | {s['decode_ms_per_token']:.1f} | "
                     f"{s['tokens_per_second'] / one:.2f} |")
    ratios = r["ratios"]
    verdict = "met" if ratios["mixed_vs_one"] >= 0.85 else "not met"
    summary = (f"Mixed batch: {ratios['mixed_vs_one']:.2f}× the throughput of one adapter (goal ≥ 0.85: "
               f"{verdict}), {ratios['mixed_vs_one_routed']:.2f}× one adapter routed per row; one adapter runs at "
               f"{ratios['one_vs_bare']:.2f}× the bare model.")
    lines += ["", summary, ""]
    return lines


def memory_lines(results: list[dict]) -> list[str]:
    lines = ["### Peak training memory", ""]
    if not results:
        return lines + _pending("memory")
    r = results[0]
    how = (f"{r['steps']} training steps on one batch of {r['batch_size']} × {r['seq_len']} tokens (loss on every "
           "token), AdamW over `adakron.parameter_groups`, each method in a fresh process: the peak RSS during the "
           f"steps minus the RSS just before them ({r['how']}).")
    lines += [how, "", "| method | trainable params | peak RSS increase MiB | s/step after the first |",
              "|---" * 4 + "|"]
    for r in sorted(results, key=lambda r: METHODS["memory"].index(r["method"])):
        later = r["step_seconds"][1:] or r["step_seconds"]
        lines.append(f"| {_name(r)} | {_params(r)} | {r['increase_bytes'] / MIB:,.0f} | "
                     f"{statistics.median(later):.2f} |")
    return lines + [""]
