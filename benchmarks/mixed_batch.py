"""Throughput of one mixed-adapter batch against the same batch on one adapter.

A batch of 64 rows x 128 tokens runs through the embedded all-MiniLM-L6-v2 with 8 AdaKron adapters:

* ``single``        -- every row on adapter 0, the plain forward (``use_adapter``), no routing at all;
* ``single_routed`` -- every row on adapter 0 through ``adakron.predict`` (routing with one group);
* ``mixed``         -- the rows spread over the 8 adapters (8 each, shuffled) through ``adakron.predict``.

The three are timed interleaved (the order rotates every round), and the median of the rounds is kept.
The goal is mixed throughput >= 0.85x single. Prints a table; writes benchmarks/results/mixed_batch.json.

    python benchmarks/mixed_batch.py                 # defaults: 64 rows, 128 tokens, 8 adapters, 12 rounds
    python benchmarks/mixed_batch.py --threads 2 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import adakron
from adakron import AdaKronConfig
from adakron.models import DEFAULT_MODEL, load_classifier

RESULTS = Path(__file__).resolve().parent / "results"
HEAD_WIDTHS = (2, 3, 1, 2, 2, 3, 1, 2)  # heads of different widths, as GLUE tasks have (MNLI 3, STS-B 1)


def build(args) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[str]]:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = load_classifier(args.model, num_labels=2).eval()
    names = [f"task{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        adakron.add_adapter(model, AdaKronConfig(rank=args.rank, kron_factor=args.kron_factor,
                                                 num_labels=HEAD_WIDTHS[i % len(HEAD_WIDTHS)]), name=name)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (args.batch, args.seq_len), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP] of the BERT vocabulary
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return model, batch, names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"Backbone (default: the embedded {DEFAULT_MODEL}).")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--kron-factor", type=int, default=4)
    p.add_argument("--rounds", type=int, default=12, help="Interleaved timed rounds (median kept); >= 10.")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the dev box has 2 shared cores).")
    p.add_argument("--out", default=str(RESULTS / "mixed_batch.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, batch, names = build(args)
    rows = [names[i % len(names)] for i in range(args.batch)]
    random.Random(0).shuffle(rows)
    first = names[0]

    @torch.no_grad()
    def single():
        with adakron.use_adapter(model, first):
            return model(**batch).logits

    runs = {
        "single": single,
        "single_routed": lambda: adakron.predict(model, batch, [first] * args.batch),
        "mixed": lambda: adakron.predict(model, batch, rows),
    }
    # The mixed rows must equal each row on its own adapter (a benchmark of wrong answers is worthless).
    check = adakron.predict(model, batch, rows)
    for name in names[:2]:
        with torch.no_grad(), adakron.use_adapter(model, name):
            own = model(**batch).logits
        for i, row_name in enumerate(rows):
            if row_name == name:
                torch.testing.assert_close(check[i], own[i], atol=1e-4, rtol=1e-4)

    times: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.warmup + args.rounds):
        for key in order[r % len(order):] + order[: r % len(order)]:
            start = time.perf_counter()
            runs[key]()
            elapsed = time.perf_counter() - start
            if r >= args.warmup:
                times[key].append(elapsed)
        if r >= args.warmup:
            done = ", ".join(f"{k} {times[k][-1]:.3f}s" for k in order)
            print(f"round {r - args.warmup + 1}/{args.rounds}: {done}", file=sys.stderr, flush=True)

    summary = {}
    for key, values in times.items():
        median = statistics.median(values)
        summary[key] = {"median_s": median, "min_s": min(values), "max_s": max(values),
                        "rows_per_s": args.batch / median, "runs": len(values)}
    ratio = summary["mixed"]["rows_per_s"] / summary["single"]["rows_per_s"]
    ratio_routed = summary["mixed"]["rows_per_s"] / summary["single_routed"]["rows_per_s"]
    result = {
        "benchmark": "mixed_batch",
        "command": "python benchmarks/" + Path(__file__).name + (" " + " ".join(argv if argv is not None
                                                                               else sys.argv[1:])).rstrip(),
        "model": args.model or DEFAULT_MODEL,
        "batch": args.batch, "seq_len": args.seq_len, "adapters": args.adapters,
        "adapter_config": {"rank": args.rank, "kron_factor": args.kron_factor},
        "head_widths": [HEAD_WIDTHS[i % len(HEAD_WIDTHS)] for i in range(args.adapters)],
        "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
        "results": summary,
        "mixed_over_single": ratio, "mixed_over_single_routed": ratio_routed, "goal": 0.85,
        "machine": {"cpu": _cpu(), "cores": _cores(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
    }
    print(f"\n{args.batch} rows x {args.seq_len} tokens, {args.adapters} adapters, {args.threads} thread(s), "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'run':<15}{'median s':>10}{'min s':>9}{'max s':>9}{'rows/s':>9}")
    for key, s in summary.items():
        print(f"{key:<15}{s['median_s']:>10.3f}{s['min_s']:>9.3f}{s['max_s']:>9.3f}{s['rows_per_s']:>9.1f}")
    print(f"mixed / single throughput: {ratio:.3f}x (goal >= 0.85x); mixed / single_routed: {ratio_routed:.3f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cores() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
