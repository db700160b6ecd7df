"""speed.py's results as markdown (the tables printed, written beside the JSON as speed.md and rendered into
RESULTS.md by render.py), the goals they are checked against, and the machine they were measured on."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch
import transformers
from speed_methods import MIB

import adakron

# Goals from issue 4: (key, what is compared, upper bound on the measured ratio).
GOALS = [
    ("step_vs_gate", "adakron step time <= 1.03 x gate", 1.03),
    ("step_vs_lora", "adakron step time <= 0.90 x lora", 0.90),
    ("memory_vs_full", "adakron peak training memory increase <= 0.85 x full", 0.85),
    ("inference_vs_bare", "adakron inference latency <= 1.05 x bare backbone", 1.05),
    ("madakron_inference", "merged madakron inference latency <= 1.01 x adakron", 1.01),
]



def goals(section: dict) -> list[dict]:
    steps = section.get("step", {}).get("methods", {})
    memory = section.get("memory", {}).get("methods", {})
    infer = section.get("inference", {})
    measured = {
        "step_vs_gate": steps.get("adakron", {}).get("x_gate"),
        "step_vs_lora": steps.get("adakron", {}).get("x_lora"),
        "memory_vs_full": memory.get("adakron", {}).get("increase_x_full"),
        "inference_vs_bare": infer.get("adakron_x_bare"),
        "madakron_inference": infer.get("madakron_x_adakron"),
    }
    # What the cheapest per-layer method (gate) scores on the same ratio: no adapter can go below it.
    floor = {"step_vs_lora": steps.get("gate", {}).get("x_lora"),
             "memory_vs_full": memory.get("gate", {}).get("increase_x_full")}
    out = []
    for key, what, bound in GOALS:
        value = measured[key]
        out.append({"goal": key, "what": what, "bound": bound, "measured": value, "gate": floor.get(key),
                    "result": None if value is None else ("PASS" if value <= bound else "MISS")})
    return out




def machine(args) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__, "adakron": adakron.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu_model": cpu,
        "cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "device": args.device, "bf16": args.bf16,
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    if args.note:
        info["note"] = args.note
    return info


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def compile_line(c: dict) -> str:
    seconds = ", ".join(f"{k} {c['build_s'].get(k, 0):.1f} + {v:.1f}" for k, v in c["warmup_s"].items())
    return (f"torch.compile: {c['unique_graphs']} graphs, {c['graph_breaks']} graph breaks"
            f"{' (' + '; '.join(c['graph_break_reasons']) + ')' if c['graph_breaks'] else ''}; build + warm-up s "
            f"(the first warm-up step compiles): {seconds}.\n")


def markdown(results: dict) -> str:
    out = []
    for model_name, section in results.get("models", {}).items():
        m, s = section["machine"], section["settings"]
        gpu = f" ({m['gpu']})" if m.get("gpu") else ""
        compiled = f", {s['compile']}" if s.get("compile") else ""
        out.append(f"## {model_name}: batch {s['batch_size']} x seq {s['seq_len']}, {m['device']}{gpu}"
                   f"{' bf16 autocast' if m['bf16'] else ''}{compiled}, {m['threads']} threads, {m['cpu_model']}, "
                   f"torch {m['torch']}, {m['date']}\n")
        if m.get("note"):
            out.append(f"Note: {m['note']}\n")
        # Files written before the pooler joined the head say nothing about it.
        head = s.get("head", "the classifier only, pooler frozen (measured before the pooler joined the head; "
                             "rerun to update)")
        out.append(f"Trained head: {head}.\n")
        if s.get("loss"):
            out.append(f"Loss: {s['loss']}; LoRA targets: {s.get('lora_targets', 'peft defaults')}.\n")
        step = section.get("step")
        if step:
            rows = step["methods"]
            out.append(f"Training step (forward + backward + AdamW), {s['steps']} measured steps per method after "
                       f"{s['warmup']} warm-up, {step['order']}; load average {step['loadavg_before'][0]:.2f} before, "
                       f"{step['loadavg_after'][0]:.2f} after.\n")
            out.append("| method | trainable | median ms/step | quartiles ms | x gate | x full | x gate, paired | "
                       "x full, paired |\n|---|---:|---:|---:|---:|---:|---:|---:|")
            for k, r in rows.items():
                out.append(f"| {k} | {fmt_params(r['trainable_params'])} | {r['median_s'] * 1e3:.1f} | "
                           f"{r['q1_s'] * 1e3:.1f}-{r['q3_s'] * 1e3:.1f} | {r.get('x_gate', float('nan')):.3f} | "
                           f"{r.get('x_full', float('nan')):.3f} | {r.get('paired_x_gate', float('nan')):.3f} | "
                           f"{r.get('paired_x_full', float('nan')):.3f} |")
            out.append("\n(paired: median over rounds of the ratio within a round.)\n")
            if step.get("compile"):
                out.append(compile_line(step["compile"]))
        memory = section.get("memory")
        if memory:
            where = "in the timing process" if s.get("memory") == "in-process" else "one subprocess per method"
            out.append(f"Peak training memory, {where}, {s['memory_steps']} steps: "
                       f"{memory['how']}.\n")
            out.append("| method | loaded model MiB | peak MiB | increase MiB | increase x gate | increase x full | "
                       "peak x gate | peak x full |\n|---|---:|---:|---:|---:|---:|---:|---:|")
            for k, r in memory["methods"].items():
                out.append(f"| {k} | {r['before_bytes'] / MIB:.0f} | {r['peak_bytes'] / MIB:.0f} | "
                           f"{r['increase_bytes'] / MIB:.0f} | {r.get('increase_x_gate', float('nan')):.3f} | "
                           f"{r.get('increase_x_full', float('nan')):.3f} | "
                           f"{r.get('peak_x_gate', float('nan')):.3f} | "
                           f"{r.get('peak_x_full', float('nan')):.3f} |")
            tallied = {k: r for k, r in memory["methods"].items() if "accounted_bytes" in r}  # none if compiled
            if tallied:
                out.append("\nAllocator-independent tally (one more step after the RSS measurement): distinct "
                           "storages autograd saves for backward (parameters excluded) + gradients + AdamW state.\n")
                out.append("| method | saved activations MiB | grads MiB | optimizer state MiB | accounted MiB | "
                           "x gate | x full |\n|---|---:|---:|---:|---:|---:|---:|")
            for k, r in tallied.items():
                out.append(f"| {k} | {r['saved_activation_bytes'] / MIB:.0f} | {r['grad_bytes'] / MIB:.1f} | "
                           f"{r['optimizer_state_bytes'] / MIB:.1f} | {r['accounted_bytes'] / MIB:.0f} | "
                           f"{r.get('accounted_x_gate', float('nan')):.3f} | "
                           f"{r.get('accounted_x_full', float('nan')):.3f} |")
            out.append("")
        infer = section.get("inference")
        if infer:
            out.append("Inference (eval, no_grad), bare backbone vs adakron, interleaved; the goal uses the first "
                       "shape:\n")
            out.append("| batch x seq | reps | bare median ms | adakron median ms | adakron quartiles ms | x bare | "
                       "x bare, paired |\n|---|---:|---:|---:|---:|---:|---:|")
            for shape, r in infer["shapes"].items():
                bare, ada = r["variants"]["bare"], r["variants"]["adakron"]
                out.append(f"| {shape} | {r['reps']} | {bare['median_s'] * 1e3:.2f} | {ada['median_s'] * 1e3:.2f} | "
                           f"{ada['q1_s'] * 1e3:.2f}-{ada['q3_s'] * 1e3:.2f} | {r['adakron_x_bare']:.3f} | "
                           f"{r['paired_adakron_x_bare']:.3f} |")
            out.append("")
            merged = {shape: r for shape, r in infer["shapes"].items() if "madakron_x_adakron" in r}
            if merged:
                out.append("MAdaKron as served (its 4 experts merged into one AdaKron adapter), same rounds:\n")
                out.append("| batch x seq | madakron merged median ms | x adakron | x adakron, paired |\n"
                           "|---|---:|---:|---:|")
                for shape, r in merged.items():
                    out.append(f"| {shape} | {r['variants']['madakron merged']['median_s'] * 1e3:.2f} | "
                               f"{r['madakron_x_adakron']:.3f} | {r['paired_madakron_x_adakron']:.3f} |")
                out.append("")
        out.append("| goal | measured | gate on the same ratio | bound | result |\n|---|---:|---:|---:|---|")
        checked = goals(section)  # recomputed, so sections written by older versions show every column
        for g in checked:
            value = "n/a" if g["measured"] is None else f"{g['measured']:.3f}"
            gate = "" if g.get("gate") is None else f"{g['gate']:.3f}"
            out.append(f"| {g['what']} | {value} | {gate} | {g['bound']} | {g['result'] or 'not measured'} |")
        for g in checked:
            if g["result"] == "MISS" and (g["gate"] or 0) > g["bound"]:
                out.append(f"\n{g['what']}: missed, and out of any per-layer method's reach here: `gate` (backbone "
                           "frozen, one d-vector per adapter site, the least such a method can cost) measures "
                           f"{g['gate']:.3f} on the same ratio. Profiles: `profile-*.md` under benchmarks/results/.")
        out.append("")
    epoch = results.get("epoch_cost")
    if epoch and not epoch.get("skipped"):
        m, s = epoch["machine"], epoch["settings"]
        out.append(f"## Epoch cost, SST-2 train ({epoch['examples']} sentences), MiniLM, batch {s['batch_size']}, "
                   f"max length {s['seq_len']}, {m['threads']} threads, {m['date']}\n")
        if m.get("note"):
            out.append(f"Note: {m['note']}\n")
        out.append(f"Tokenized in {epoch['tokenize_s']:.2f} s; tokens per sentence: median "
                   f"{epoch['length_median']}, max {epoch['length_max']}. Epoch times are EXTRAPOLATED: mean time of "
                   f"a random sample of each strategy's own batches (collation + training step, strategies "
                   f"interleaved) x the epoch's batch count; +- is one standard error of that estimate.\n")
        for method, per in epoch["methods"].items():
            out.append(f"| {method}: strategy | batches | real tokens / padded slots | pads per real token | "
                       f"sampled | mean ms/batch | epoch s (extrapolated) | x pad-to-max |\n"
                       f"|---|---:|---:|---:|---:|---:|---:|---:|")
            for k, r in per.items():
                st = epoch["strategies"][k]
                out.append(f"| {k} | {st['batches']} | {st['real_per_slot']:.3f} | {st['pads_per_real_token']:.2f} | "
                           f"{st['sample_batches']} | {r['mean_s'] * 1e3:.1f} | {r['epoch_s_extrapolated']:.0f} +- "
                           f"{r['epoch_s_sem']:.0f} | {r['x_pad_to_max']:.3f} |")
            out.append("")
    return "\n".join(out)
