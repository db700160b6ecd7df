"""Generation throughput and peak training memory for the decoder-LLM benchmark (llm.py).

Throughput: one batch of prompts, greedy, every row made to generate exactly the same number of tokens (the
end-of-sequence token is held back until then, so random adapters cannot end rows early and change the work),
on the bare model (a copy with no adapter wrappers), on one adapter (``use_adapter``: no routing), on one
adapter through the per-row routing, and with a different adapter on every row (``generate_ids(...,
adapter_names=[...])``). The settings run interleaved, the order rotating each round, and medians are kept.

Memory: a few training steps in a fresh process per method (``python benchmarks/llm_speed.py memory-child``), so
one method's allocations and allocator slack never count towards another's: the peak RSS during the steps
(VmHWM after resetting it through /proc/self/clear_refs) minus the RSS just before them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from speed_memory import reset_peak_rss, status_kib

HERE = Path(__file__).resolve().parent
PROMPTS = ("Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "List five uses of a paperclip and say why each works.", "Describe the water cycle to a child.",
           "What should I pack for a week of hiking in the mountains?", "Write a poem about autumn rain.",
           "Give me three tips for learning to cook, with an example for each.", "Why is the sky blue?")
SETTINGS = ("bare", "one", "one_routed", "mixed")


# --- throughput --------------------------------------------------------------------------------------------------

def timed_generation(model, tokenizer, prompts, names, new_tokens: int) -> float:
    """Seconds for one batch to generate exactly ``new_tokens`` tokens per row (greedy)."""
    from adakron.training.generate import Sampling, generate_ids

    model.generation_config.min_new_tokens = new_tokens  # holds the end-of-sequence token back until then
    started = time.perf_counter()
    rows = generate_ids(model, tokenizer, prompts, names, sampling=Sampling(max_new_tokens=new_tokens))
    seconds = time.perf_counter() - started
    if any(len(row) != new_tokens for row in rows):
        raise RuntimeError(f"rows generated {sorted({len(r) for r in rows})} tokens, not {new_tokens}")
    return seconds


def setting_runner(setting: str, bare, model, tokenizer, prompts, names):
    """A function of ``new_tokens`` that times one batch of ``setting``."""
    import adakron

    def run(new_tokens: int) -> float:
        if setting == "bare":
            return timed_generation(bare, tokenizer, prompts, None, new_tokens)
        if setting == "one":
            with adakron.use_adapter(model, names[0]):
                return timed_generation(model, tokenizer, prompts, None, new_tokens)
        mixed = [names[i % len(names)] for i in range(len(prompts))]
        chosen = [names[0]] * len(prompts) if setting == "one_routed" else mixed
        return timed_generation(model, tokenizer, prompts, chosen, new_tokens)

    return run


def with_adapters(model, count: int):
    """``count`` AdaKron adapters (the benchmark's r=16 config), each with its own seeded random weights."""
    from llm_models import adapter_config

    import adakron

    names = [f"task{i}" for i in range(count)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        adakron.add_adapter(model, adapter_config("adakron"), name=name)
    return names


def throughput(quick: bool, rows: int, new_tokens: int, rounds: int, adapters: int) -> dict:
    """Tokens/s, batch latency, first-token latency and per-token decode time of each setting (medians)."""
    from llm_models import load

    model, tokenizer = load(quick)
    bare = copy.deepcopy(model)
    names = with_adapters(model, adapters)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(rows)]
    runners = {s: setting_runner(s, bare, model, tokenizer, prompts, names) for s in SETTINGS}
    for run in runners.values():  # warm-up: first calls pay for one-off allocations
        run(new_tokens)
    first, full = {s: [] for s in SETTINGS}, {s: [] for s in SETTINGS}
    with torch.no_grad():
        for r in range(rounds):
            for setting in SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)]:
                first[setting].append(runners[setting](1))
                full[setting].append(runners[setting](new_tokens))
            print(f"   round {r + 1}/{rounds}: " + ", ".join(f"{s} {full[s][-1]:.2f}s" for s in SETTINGS),
                  flush=True)
    return {"settings": {s: setting_summary(first[s], full[s], rows, new_tokens) for s in SETTINGS},
            "rows": rows, "new_tokens": new_tokens, "rounds": rounds, "adapters": adapters,
            "ratios": ratios({s: statistics.median(full[s]) for s in SETTINGS}), "prompts": prompts}


def setting_summary(first: list[float], full: list[float], rows: int, new_tokens: int) -> dict:
    batch, first_token = statistics.median(full), statistics.median(first)
    return {"tokens_per_second": rows * new_tokens / batch, "batch_latency_s": batch,
            "first_token_latency_s": first_token,
            "decode_ms_per_token": 1000 * (batch - first_token) / max(1, new_tokens - 1),
            "batch_seconds": full, "first_token_seconds": first}


def ratios(seconds: dict[str, float]) -> dict[str, float]:
    """Throughput ratios (the inverse of the time ratios); the goal is mixed >= 0.85 x one adapter."""
    return {"mixed_vs_one": seconds["one"] / seconds["mixed"], "mixed_vs_one_routed": seconds["one_routed"] /
            seconds["mixed"], "one_vs_bare": seconds["bare"] / seconds["one"]}


# --- memory ------------------------------------------------------------------------------------------------------

def start_memory(method: str, quick: bool, batch_size: int, seq_len: int, steps: int) -> subprocess.Popen:
    """The fresh process that measures one method's peak training memory."""
    command = [sys.executable, str(HERE / "llm_speed.py"), "memory-child", method, "--batch-size", str(batch_size),
               "--seq-len", str(seq_len), "--steps", str(steps)] + (["--quick"] if quick else [])
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def memory_result(child: subprocess.Popen) -> dict:
    """What a memory process measured (its JSON line is the last of its stdout)."""
    out, err = child.communicate()
    if child.returncode:
        raise RuntimeError(f"the memory process {child.args[3:]} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def random_batch(vocab_size: int, batch_size: int, seq_len: int) -> dict:
    """Token ids drawn with a fixed seed, learned whole (labels = inputs): every method sees the same batch."""
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@torch.no_grad()
def resident(model) -> None:
    """Reads every weight once. transformers maps a saved model's weights from its files and reads them on first
    use: without this, the first step would page SmolLM2's 0.5 GB of weights in and count them as training
    memory (measured: about 500 MiB more for every method)."""
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.sum()


def memory_child(method: str, quick: bool, batch_size: int, seq_len: int, steps: int) -> dict:
    """Runs in its own process: builds the model with ``method``, then measures ``steps`` training steps."""
    from llm_models import (
        library_recipe,
        load,
        method_record,
        optimizer_and_schedule,
        parameters,
        train_step,
        with_method,
    )

    model, _ = load(quick)
    model = with_method(model, method, seed=0)
    recipe = library_recipe()
    optimizer, schedule = optimizer_and_schedule(model, recipe, recipe["lr"], steps)
    batch = random_batch(model.config.vocab_size, batch_size, seq_len)
    model.train()
    resident(model)
    gc.collect()
    before = status_kib("VmRSS") * 1024
    exact = reset_peak_rss()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        train_step(model, optimizer, schedule, batch)
        seconds.append(time.perf_counter() - started)
    peak = status_kib("VmHWM") * 1024 if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    how = ("VmHWM after writing 5 to /proc/self/clear_refs" if exact else
           "ru_maxrss (the peak could not be reset: it includes loading the model)") + "; before = VmRSS"
    return {"method": method, "before_bytes": before, "peak_bytes": peak, "increase_bytes": peak - before,
            "how": how, "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "step_seconds": seconds,
            **parameters(model), **method_record(method)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the memory child of benchmarks/llm.py (not for direct use)")
    parser.add_argument("what", choices=["memory-child"])
    parser.add_argument("method")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a renamed transformers method
    torch.manual_seed(0)
    print(json.dumps(memory_child(args.method, args.quick, args.batch_size, args.seq_len, args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
