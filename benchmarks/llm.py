"""Decoder-LLM benchmark: AdaKron against LoRA (peft), the plain adapter and the untrained model on the embedded
SmolLM2-135M-Instruct, on a CPU. Parts:

* sst2: GLUE SST-2 as generation (a chat prompt asking for the sentiment, the reply `positive` or `negative`),
  scored on a seeded dev subset by each label word's likelihood;
* alpaca: held-out completion loss on a seeded split of the Alpaca 5,000, and greedy generations to compare;
* throughput: generation on the bare model, one adapter and 8 adapters mixed in one batch;
* memory: peak training memory (RSS increase) of AdaKron, LoRA and full fine-tuning, a process per method.

Resumable like glue.py: every run writes its own JSON (atomically) under benchmarks/results/llm/ and is skipped
when that file exists; a run is claimed by a lock file beside its result, so workers can share the parts and a
killed run leaves nothing to clean up. Each result records the command that made it and the one that reruns it.

    OMP_NUM_THREADS=1 python benchmarks/llm.py                 # everything (about 3 CPU-hours; resumable)
    OMP_NUM_THREADS=1 python benchmarks/llm.py --parts sst2 --methods base,adakron
    python benchmarks/llm.py --quick                           # a tiny random LLaMA, a few rows: under a minute
    python benchmarks/llm.py --render                          # rebuild benchmarks/results/llm.md only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from glue import claimed, library_digest, require_same_library
from llm_report import METHODS, PARTS, markdown_path, section

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHARED = HERE.parent.parent / "shared" / "data"


@dataclass(frozen=True)
class Sizes:
    """How big each part is. The full sizes keep the whole benchmark to about 3 hours on one thread of this
    2-core CPU while another job runs, where a SmolLM2 step at batch 8 took about 6.5 s on SST-2 (prompts of
    60-110 tokens) and 12-18 s on Alpaca (length-grouped, up to 256 tokens), scoring about 0.4 s a row."""

    steps: int = 150
    batch_size: int = 8
    sst2_max_length: int = 128  # the longest dev prompt with its reply is 112 SmolLM2 tokens (train: 113 of 3,000)
    alpaca_max_length: int = 256  # 2% of Alpaca examples are longer: cut, as training and scoring cut them
    dev_rows: int = 400  # of SST-2's 872
    held_out: int = 200  # of Alpaca's 5,000
    alpaca_limit: int | None = None
    eval_batch_size: int = 16
    samples: int = 4  # held-out prompts generated from by each model
    sample_tokens: int = 96
    throughput_rows: int = 8
    throughput_tokens: int = 32
    throughput_rounds: int = 7  # timings on a shared CPU are noisy: medians of 7
    adapters: int = 8
    memory_batch_size: int = 8
    memory_seq_len: int = 128
    memory_steps: int = 3


# The tiny tokenizer spends a token on almost every byte: hence the longer SST-2 limit.
QUICK = Sizes(steps=3, batch_size=4, sst2_max_length=512, dev_rows=12, held_out=6, alpaca_limit=40, eval_batch_size=8,
              samples=2, sample_tokens=6, throughput_tokens=6, throughput_rounds=2, memory_batch_size=2,
              memory_seq_len=16, memory_steps=2)


# --- running and storing -----------------------------------------------------------------------------------------

def run_id(part: str, method: str, args) -> str:
    """The result's file name: trained runs carry their steps, batch and lr, so other settings sit beside."""
    if part in ("sst2", "alpaca") and method != "base":
        return f"{part}-{method}-{args.steps}x{args.batch_size}-lr{args.lr:g}"
    return part if part == "throughput" else f"{part}-{method}"


def run_one(part: str, method: str, args, measure) -> dict | None:
    """``measure()`` stored as the run's JSON unless the file exists or another worker holds the run."""
    path = args.out / f"{run_id(part, method, args)}.json"
    if path.exists():
        print(f"-- {path.stem}: done before", flush=True)
        return json.loads(path.read_text())
    with claimed(path.with_suffix(".lock")) as mine:
        if not mine:
            print(f"-- {path.stem}: another worker is running it", flush=True)
            return None
        if path.exists():  # finished by another worker between our check and our claim
            return json.loads(path.read_text())
        print(f"== {path.stem}", flush=True)
        started = time.time()
        result = measure()
        if not args.quick:
            require_same_library(args)  # a library edited during the run may have mixed old and new code
        result.update(part=part, method=method, wall_seconds=time.time() - started, **provenance(part, method, args))
        write_atomically(path, json.dumps(result, indent=2, sort_keys=True))
        return result


def provenance(part: str, method: str, args) -> dict:
    """Where a result came from: the command that made it, the one that reruns it alone, versions, threads."""
    import peft
    import torch
    import transformers
    from llm_models import SEED

    import adakron

    flags = [] if part in ("throughput", "memory") or method == "base" else [
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", f"{args.lr:g}"]
    rerun = ["python", "benchmarks/llm.py", "--parts", part, "--methods", method, *flags]
    rerun += ["--quick"] if args.quick else []
    rerun += [] if args.out == default_out(args.quick) else ["--out", str(args.out)]
    return {"command": shlex.join(["python", "benchmarks/llm.py", *args.argv]), "rerun": shlex.join(rerun),
            "model": "tiny random LLaMA (--quick)" if args.quick else "SmolLM2-135M-Instruct (embedded, Q4_1 dequant)",
            "threads": torch.get_num_threads(), "library_digest": args.library_digest, "seed": SEED,
            "sizes": dataclasses.asdict(args.sizes), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": {"adakron": adakron.__version__, "torch": torch.__version__, "peft": peft.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()}}


def write_markdown(folder: Path) -> Path:
    """The section as its own markdown file beside the results folder (benchmarks/results/llm.md)."""
    path = markdown_path(folder)
    write_atomically(path, "\n".join(section(folder)).rstrip() + "\n")
    return path


def write_atomically(path: Path, text: str) -> None:
    """Write beside ``path`` and rename: a kill leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- the parts ---------------------------------------------------------------------------------------------------

def run_sst2(args) -> None:
    folder = args.glue_dir / "SST-2"
    if not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
        print(f"sst2: no SST-2 data in {folder} (train.tsv, dev.tsv); pass --glue-dir. Skipped.", flush=True)
        return
    from llm_train import sst2_run

    for method in wanted("sst2", args):
        run_one("sst2", method, args, lambda m=method: sst2_run(m, folder, args))


def run_alpaca(args) -> None:
    if not args.alpaca_file.is_file():
        print(f"alpaca: {args.alpaca_file} not found; pass --alpaca-file. Skipped.", flush=True)
        return
    from llm_train import alpaca_run

    for method in wanted("alpaca", args):
        run_one("alpaca", method, args, lambda m=method: alpaca_run(m, args))


def run_throughput(args) -> None:
    from llm_speed import throughput

    s = args.sizes
    if wanted("throughput", args):
        run_one("throughput", "adakron", args, lambda: throughput(args.quick, s.throughput_rows, s.throughput_tokens,
                                                                  s.throughput_rounds, s.adapters))


def run_memory(args) -> None:
    """One fresh process per method, one after the other (so none competes with another for the CPU)."""
    from llm_speed import memory_result, start_memory

    s = args.sizes
    for method in wanted("memory", args):
        run_one("memory", method, args, lambda m=method: memory_result(start_memory(
            m, args.quick, s.memory_batch_size, s.memory_seq_len, s.memory_steps)))


def wanted(part: str, args) -> list[str]:
    return [m for m in METHODS[part] if args.methods is None or m in args.methods]


RUNNERS = {"sst2": run_sst2, "alpaca": run_alpaca, "throughput": run_throughput, "memory": run_memory}


# --- command line ------------------------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=lambda s: s.split(","), default=list(PARTS), help=",".join(PARTS))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None,
                        help="only these methods (base, adakron, lora, adapter, full); default: every part's")
    parser.add_argument("--quick", action="store_true", help="a tiny random LLaMA and a few rows: a smoke check")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {Sizes.steps})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"(default {Sizes.batch_size})")
    parser.add_argument("--lr", type=float, default=None, help="default: the library's default lr, read at run time")
    parser.add_argument("--glue-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", SHARED / "glue")))
    parser.add_argument("--alpaca-file", type=Path, default=SHARED / "instruct" / "alpaca_5000.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results/llm, or llm-quick with --quick)")
    parser.add_argument("--render", action="store_true", help="only rebuild the markdown from the result files")
    args = parser.parse_args(argv)
    known = {m for methods in METHODS.values() for m in methods}
    if set(args.parts) - set(PARTS) or set(args.methods or ()) - known:
        parser.error(f"parts are among {', '.join(PARTS)}; methods among {', '.join(sorted(known))}")
    for flag in ("steps", "batch_size", "lr"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    args.sizes = QUICK if args.quick else Sizes()
    args.out = args.out or default_out(args.quick)
    args.steps = args.steps or args.sizes.steps
    args.batch_size = args.batch_size or args.sizes.batch_size
    args.argv = argv
    return args


def default_out(quick: bool) -> Path:
    return RESULTS / ("llm-quick" if quick else "llm")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if not args.render:
        import transformers
        from llm_models import library_recipe

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a renamed transformers method
        args.lr = args.lr or library_recipe()["lr"]
        args.library_digest = library_digest()
        started = time.time()
        for part in args.parts:
            RUNNERS[part](args)
        print(f"llm benchmark pass done in {time.time() - started:.0f}s", flush=True)
    path = write_markdown(args.out)
    print(f"wrote {path}", flush=True)
    return 0


__all__ = ["main", "markdown_path", "section"]

if __name__ == "__main__":
    sys.exit(main())
