"""The prepared check for a lent GPU machine (one H200, 16 cores, no network, minutes of device time in all):
the CUDA tests, then training-step time, peak training memory and inference latency of gate, AdaKron, LoRA and
full fine-tuning in bf16 on a random BERT-base and a random SmolLM2-sized LLaMA, eager and torch.compile'd
(speed.py's machinery, with --memory-in-process).

Why it is shaped so: a lease is short and one command is all it gets, so every part is its own subprocess with a
time budget inside one overall deadline, most useful parts first; a part that fails or runs out of time is
recorded and the next one runs; speed.py writes its JSON after each phase, and the summary (summary.json,
summary.md) is rewritten after every part and copied, with a tarball of everything measured, to $OUT, so what
was measured comes back even if the command is killed. This script needs only the standard library: a broken
torch there shows up in the steps, not as a missing summary.

    bash benchmarks/gpu_check.sh                    # on the GPU machine: wheels, PYTHONPATH, then this script
    python benchmarks/gpu_check.py --cpu-smoke      # here: the same steps at tiny sizes on CPU (aot_eager)
    python benchmarks/gpu_check.py --list           # the steps and their command lines

Results: benchmarks/results/gpu/ (smoke: a temporary folder), and $OUT/{summary.md, summary.json,
gpu_results.tar.gz}; unpack the tarball into benchmarks/results/ to get benchmarks/results/gpu/ here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from speed_headline import headline, headline_markdown

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "gpu"
METHODS = "gate,adakron,lora,full"
MODELS = {"gpu": ("bert-base", "llama-smollm2"), "cpu-smoke": ("tiny", "tiny-llama")}
# speed.py sizes: the brief's batch 32 x 128 on the GPU; the smallest that still runs every phase on the CPU.
SPEED_SIZES = {
    "gpu": ["--device", "cuda", "--batch-size", "32", "--seq-len", "128", "--steps", "30", "--warmup", "3",
            "--memory-steps", "3", "--infer-reps", "30", "--infer-warmup", "3"],
    "cpu-smoke": ["--device", "cpu", "--threads", "1", "--batch-size", "2", "--seq-len", "16", "--steps", "2",
                  "--warmup", "1", "--memory-steps", "1", "--infer-reps", "2", "--infer-warmup", "1",
                  "--infer-extra", "", "--compile-backend", "aot_eager"],  # a 2nd shape would compile again
}
# What the test steps select: on the GPU the CUDA file whole and `-m gpu` over every module (the carried wheels
# let tests/test_serve*.py collect); in the smoke run only enough to exercise the same commands.
TESTS = {
    "gpu": {"tests-cuda": ["tests/test_precision.py"],
            "tests-gpu-marked": ["-m", "gpu", "--continue-on-collection-errors", "tests"]},
    "cpu-smoke": {"tests-cuda": ["-k", "cuda", "tests/test_precision.py"],
                  "tests-gpu-marked": ["-m", "gpu", "tests/test_gpu_check.py"]},
}
# Seconds per step on the GPU, guessed from CPU runs and the H200's rates; the deadline caps the sum anyway.
BUDGETS = {"env": 40, "nvidia-smi": 20, "tests-cuda": 75, "tests-gpu-marked": 75, "eager": 100, "compiled": 170}
ENV_SNIPPET = r"""
import json, os, platform, importlib
info = {"python": platform.python_version(), "executable": os.sys.executable, "cpu_count": os.cpu_count()}
for name in ("torch", "transformers", "peft", "accelerate", "triton", "pytest", "fastapi", "uvicorn", "adakron"):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "?") + " " + os.path.dirname(module.__file__)
    except Exception as e:  # a missing or broken package is a finding, not a failure of this step
        info[name] = f"unavailable: {type(e).__name__}: {e}"
import torch
info["cuda_available"] = torch.cuda.is_available()
info["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported())
print(json.dumps(info))
"""


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    budget_s: float
    outputs: list[str] = field(default_factory=list)  # files (relative to the results dir) the step writes


def plan(mode: str, results: Path) -> list[Step]:
    """The steps in the order they run: the cheap ones that say whether anything works first, then the eager
    speed runs (the figures wanted most), then the compiled ones (the costliest)."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    steps = [
        Step("env", "versions, GPU properties, which packages import", [py, "-c", ENV_SNIPPET], BUDGETS["env"]),
        Step("nvidia-smi", "GPU, driver, clocks and memory as found",
             ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,"
              "temperature.gpu,power.draw", "--format=csv"], BUDGETS["nvidia-smi"]),
        Step("tests-cuda", "tests/test_precision.py (bf16/fp16, torch.compile, CUDA placement)",
             [*pytest, *TESTS[mode]["tests-cuda"]], BUDGETS["tests-cuda"]),
        Step("tests-gpu-marked", "every test marked gpu (pytest -m gpu)",
             [*pytest, *TESTS[mode]["tests-gpu-marked"]], BUDGETS["tests-gpu-marked"]),
    ]
    for compiled in (False, True):
        for model in MODELS[mode]:
            tag = f"{model}-{'compiled' if compiled else 'eager'}"
            out = f"speed-{tag}.json"
            argv = [py, str(HERE / "speed.py"), "--bf16", "--models", model, "--methods", METHODS,
                    "--memory-in-process", *SPEED_SIZES[mode], "--out", str(results / out),
                    "--note", f"benchmarks/gpu_check.py ({mode})"]
            if compiled:
                # No second inference shape: it would compile both inference models again, for dynamic shapes.
                argv += ["--compile", "layers", "--infer-extra", ""]
            what = (f"{model}: step time, peak memory, inference vs bare, bf16, "
                    f"{'torch.compile per layer' if compiled else 'eager'}")
            steps.append(Step(f"speed-{tag}", what, argv, BUDGETS["compiled" if compiled else "eager"],
                              [out, out.replace(".json", ".md")]))
    return steps


def run_step(step: Step, timeout_s: float, log_path: Path, env: dict) -> dict:
    """Runs one step in its own process group (so a timeout also ends what it started: inductor's compile
    workers), stdout and stderr into its log."""
    row = {"name": step.name, "what": step.what, "budget_s": step.budget_s, "timeout_s": round(timeout_s, 1),
           "log": f"logs/{log_path.name}", "command": shown(step)}
    if shutil.which(step.argv[0]) is None and not Path(step.argv[0]).exists():
        return {**row, "status": "skipped", "note": f"{step.argv[0]} not found", "seconds": 0.0}
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 or (step.name.startswith("tests") and rc == 5) else "failed"  # 5: none collected
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "timeout"
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
    # The last line says what a failure was and what tests did; a speed run's is only its last table row.
    note = tail[-1][:200] if tail and (status != "ok" or not step.outputs) else ""
    return {**row, "status": status, "rc": rc, "seconds": round(time.monotonic() - start, 1), "note": note,
            "tail": tail}


def shown(step: Step) -> str:
    """The command line, with an inline ``python -c`` program left out."""
    return " ".join(step.argv[:2] + ["<ENV_SNIPPET>"] if step.argv[1:2] == ["-c"] else step.argv)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def child_env() -> dict:
    """The project's src/ on the path (the GPU machine runs it uninstalled), no hub, unbuffered output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    return env


def run_all(steps: list[Step], results: Path, deadline_s: float, out_dir: Path | None, mode: str) -> dict:
    """Runs every step within the overall deadline, writing the summary (and exporting it) after each one."""
    (results / "logs").mkdir(parents=True, exist_ok=True)
    started, env = time.monotonic(), child_env()
    summary = {"mode": mode, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "deadline_s": deadline_s,
               "results_dir": str(results), "steps": []}
    for step in steps:
        left = deadline_s - (time.monotonic() - started) - 5  # 5 s kept for the last summary and export
        if left < 10:
            row = {"name": step.name, "what": step.what, "status": "skipped", "seconds": 0.0,
                   "budget_s": step.budget_s, "note": f"deadline {deadline_s:.0f} s reached"}
        else:
            print(f"[gpu_check] {step.name}: {step.what} (up to {min(step.budget_s, left):.0f} s)", flush=True)
            try:
                row = run_step(step, min(step.budget_s, left), results / "logs" / f"{step.name}.log", env)
            except Exception as e:  # a fault here must cost one step, not the rest of the lease
                row = {"name": step.name, "what": step.what, "status": "error", "seconds": 0.0,
                       "budget_s": step.budget_s, "note": f"gpu_check: {type(e).__name__}: {e}"}
        row["outputs"] = [o for o in step.outputs if (results / o).exists()]
        if step.name == "env" and row["status"] == "ok":
            try:
                info = summary["env"] = json.loads(row["tail"][-1])
                row["note"] = (f"torch {info['torch'].split()[0]}, CUDA {info['torch_cuda']}, "
                               f"{info.get('gpu', 'no GPU')}")
            except (ValueError, IndexError, KeyError):
                pass
        summary["steps"].append(row)
        print(f"[gpu_check] {step.name}: {row['status']} in {row['seconds']} s; {row.get('note', '')}", flush=True)
        summary["elapsed_s"] = round(time.monotonic() - started, 1)
        write_summary(summary, results, out_dir)
    return summary


def write_summary(summary: dict, results: Path, out_dir: Path | None) -> None:
    summary["headline"] = headline(results, produced(summary))
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / "summary.md").write_text(summary_markdown(summary, results) + "\n")
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("summary.md", "summary.json"):
        shutil.copyfile(results / name, out_dir / name)
    partial = out_dir / "gpu_results.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(results, arcname=results.name)
    os.replace(partial, out_dir / "gpu_results.tar.gz")  # a kill mid-write leaves the previous tarball whole


def produced(summary: dict) -> list[str]:
    """The files this run's steps wrote (not older results in the same folder)."""
    return [name for r in summary["steps"] for name in r.get("outputs", [])]


def steps_markdown(summary: dict) -> str:
    out = ["| step | status | seconds (budget) | what | last line |", "|---|---|---:|---|---|"]
    for r in summary["steps"]:
        note = str(r.get("note", "")).replace("|", "/")
        out.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} ({r['budget_s']:.0f}) | {r['what']} | "
                   f"{note} |")
    return "\n".join(out)


def summary_markdown(summary: dict, results: Path) -> str:
    """Everything in one file: what ran, the headline figures, then each speed run's own tables (speed-*.md)."""
    env = summary.get("env", {})
    machine = ", ".join(f"{k} {env[k]}" for k in ("gpu", "capability", "gpu_memory_gib", "torch_cuda", "python")
                        if k in env)
    versions = ", ".join(f"{k} {str(env[k]).split()[0]}" for k in ("torch", "transformers", "peft") if k in env)
    out = [f"# gpu_check ({summary['mode']}), {summary['date']}, {summary.get('elapsed_s', 0):.0f} s of "
           f"{summary['deadline_s']:.0f}", "", f"Machine: {machine or 'unknown'}; {versions}.", "",
           steps_markdown(summary), "", "## Headline", "", headline_markdown(summary["headline"]), ""]
    for md in (results / name for name in produced(summary) if name.endswith(".md")):
        out += [f"## {md.stem}", "", re.sub(r"(?m)^## ", "### ", md.read_text()), ""]
    return "\n".join(out)


def console_table(summary: dict) -> str:
    """What the command prints last (the device tool returns only the output's tail)."""
    return "\n".join(["", steps_markdown(summary), "", headline_markdown(summary["headline"])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="the same steps at tiny sizes on CPU, aot_eager")
    p.add_argument("--deadline-s", type=float, default=None, help="overall limit (default 450 on GPU, 300 smoke)")
    p.add_argument("--results-dir", default=None, help=f"default {RESULTS.relative_to(ROOT)}; smoke: a temp dir")
    p.add_argument("--out", default=os.environ.get("OUT"), help="also copy the summary and a tarball here ($OUT)")
    p.add_argument("--only", default=None, help="comma list of step names to run (see --list)")
    p.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    args = p.parse_args(argv)
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    if args.results_dir:
        results = Path(args.results_dir).resolve()
    elif args.cpu_smoke:
        results = Path(tempfile.mkdtemp(prefix="gpu_check_smoke_")) / "gpu"
    else:
        results = RESULTS
    steps = plan(mode, results)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            raise SystemExit(f"--only: unknown steps {unknown}; choose from {', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in wanted]
    if args.list:
        for s in steps:
            print(f"{s.name} ({s.budget_s:.0f} s): {s.what}\n    {shown(s)}")
        return 0
    deadline = args.deadline_s or (300.0 if args.cpu_smoke else 450.0)
    results.mkdir(parents=True, exist_ok=True)
    summary = run_all(steps, results, deadline, Path(args.out) if args.out else None, mode)
    print(console_table(summary), flush=True)
    print(f"[gpu_check] results in {results}" + (f"; copied to {args.out}" if args.out else ""), flush=True)
    return 0 if all(r["status"] == "ok" for r in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
