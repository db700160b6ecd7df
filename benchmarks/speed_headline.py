"""One row per model section of speed.py's JSON files: the figures a reader wants first (step time per method,
AdaKron's ratios, training-memory increase, inference against the bare model), for gpu_check's summary and the
end of its output. Standard library only: it must still work where torch is broken."""

from __future__ import annotations

import json
from pathlib import Path

MIB = 1024 * 1024
METHODS = ("gate", "adakron", "lora", "full")


def headline(results_dir: Path, names: list[str] | None = None) -> list[dict]:
    """Rows for the named JSON files in results_dir (default: every ``speed-*.json``); a section cut short by a
    timeout gives what it has."""
    rows = []
    paths = [Path(results_dir) / n for n in names if n.endswith(".json")] if names is not None \
        else sorted(Path(results_dir).glob("speed-*.json"))
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            rows.append({"file": path.name, "error": f"{type(e).__name__}: {e}"})
            continue
        for model, section in data.get("models", {}).items():
            rows.append(row(path.name, model, section))
    return rows


def row(file: str, model: str, section: dict) -> dict:
    steps = section.get("step", {}).get("methods", {})
    memory = section.get("memory", {}).get("methods", {})
    infer = section.get("inference", {})
    shapes = infer.get("shapes", {})
    ada_step, ada_memory = steps.get("adakron", {}), memory.get("adakron", {})
    compile_info = section.get("step", {}).get("compile")
    return {
        "file": file, "model": model, "compile": section.get("settings", {}).get("compile", "eager"),
        "step_ms": {m: steps[m]["median_s"] * 1e3 for m in METHODS if m in steps},
        "adakron_x_gate": ada_step.get("x_gate"), "adakron_x_lora": ada_step.get("x_lora"),
        "memory_increase_mib": {m: memory[m]["increase_bytes"] / MIB for m in METHODS if m in memory},
        "adakron_memory_x_full": ada_memory.get("increase_x_full"),
        "inference_x_bare": {shape: r.get("adakron_x_bare") for shape, r in shapes.items()},
        "graphs": compile_info and compile_info.get("unique_graphs"),
        "graph_breaks": compile_info and compile_info.get("graph_breaks"),
    }


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def headline_markdown(rows: list[dict]) -> str:
    """A compact table: one line per model and compile mode."""
    out = ["| model | compile | step ms gate / adakron / lora / full | adakron x gate | adakron x lora | "
           "train memory +MiB gate / adakron / lora / full | adakron memory x full | inference adakron x bare |",
           "|---|---|---|---:|---:|---|---:|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['file']} | unreadable: {r['error']} | | | | | | |")
            continue
        steps = " / ".join(_f(r["step_ms"].get(m), 1) for m in METHODS)
        memory = " / ".join(_f(r["memory_increase_mib"].get(m), 0) for m in METHODS)
        infer = ", ".join(f"{shape} {_f(v)}" for shape, v in r["inference_x_bare"].items()) or "-"
        compiled = r["compile"] + (f" ({r['graphs']} graphs, {r['graph_breaks']} breaks)" if r["graphs"] else "")
        out.append(f"| {r['model']} | {compiled} | {steps} | {_f(r['adakron_x_gate'])} | {_f(r['adakron_x_lora'])} "
                   f"| {memory} | {_f(r['adakron_memory_x_full'])} | {infer} |")
    return "\n".join(out)
