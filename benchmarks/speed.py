"""Training-step time, peak training memory, inference latency and one epoch's cost of AdaKron against
its baselines, on the embedded all-MiniLM-L6-v2 and on randomly initialised BERT-base and SmolLM2-sized
LLaMA models.

Methods (each on its own copy of the backbone, with its own AdamW optimizer):

* ``gate``    the least any per-layer method can cost: backbone frozen, the same feed-forward output
              Linear modules AdaKron wraps are wrapped in a module holding ``base_layer`` and a trainable
              d-vector ``scale`` (y = base(x) * scale); the task head trains too.
* ``adakron`` ``adakron.add_adapter`` with rank 16, kron_factor 4.
* ``adapter`` the same with kron_factor 1 (plain bottleneck adapter, rank 16).
* ``lora``    peft LoRA r=8, alpha=16, dropout 0.1 on query/value (peft's BERT defaults), as ``adakron train``.
* ``full``    everything trains.

What is measured, and how:

* Step time: forward + backward + AdamW step on one fixed batch of random token ids (full attention
  mask, random labels). Warm-up steps first, then the measured steps run round-robin over the methods
  (every round visits each method once, the starting method rotating each round), so a load change on
  a shared machine hits all methods alike. Reported: median seconds per step, quartiles, the ratio of
  medians to ``gate`` and ``full``, and the median over rounds of the within-round ratio.
* Peak training memory: one fresh subprocess per method. On CPU: the model, optimizer and batch are
  built, then the kernel's peak-RSS counter (VmHWM) is reset by writing 5 to /proc/self/clear_refs, a few
  training steps run, and VmHWM is read: ``increase`` = peak RSS during the steps - RSS before them
  (gradients, optimizer state, activations, allocator slack); the loaded-model RSS is reported beside it.
  If the reset is refused, ru_maxrss is used and the JSON says so (it then includes the load peak).
  On CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before.
* Inference: eval mode, no_grad, batch latency of the AdaKron model against the bare backbone (a separate
  copy with no wrappers), same inputs, interleaved; median seconds and their ratio. The goal uses the
  training shape; --infer-extra adds small shapes (default 1x16, one short request).
* Also: an allocator-independent tally per method (bytes of the storages autograd saves for backward,
  parameters excluded, + gradients + AdamW state), beside the RSS figures.
* ``--epoch-cost``: SST-2's train.tsv tokenized with the MiniLM tokenizer; one epoch at batch 32 with
  (a) padding to --seq-len, (b) dynamic padding (DataCollatorWithPadding) over random batches, (c) dynamic
  padding with transformers' LengthGroupedSampler. Every batch of each strategy's epoch is formed (so the
  real-token / padded-slot counts are exact), a random sample of those batches is timed (collation +
  training step, strategies interleaved), and the epoch time is EXTRAPOLATED as mean sample time x batches.
* ``--models llama-smollm2``: a randomly initialised LLaMA of SmolLM2-135M's shape (30 layers, hidden 576,
  intermediate 1536, 9 heads, 3 KV heads, vocab 49152, tied embeddings), trained with the causal-LM loss on
  the same random ids; LoRA gets peft's LLaMA targets (q_proj, v_proj). ``tiny-llama`` is its smoke-test size.
* ``--compile layers|model``: torch.compile every method's model (and both inference models), per transformer
  layer (identical layers share one compiled graph: compile time stays about one layer's) or as a whole; the
  warm-up steps compile, and the JSON records graphs, graph breaks and each method's build and warm-up seconds.
* ``--memory-in-process``: memory measured in the timing process as each method is built, other methods'
  memory subtracted: exact on CUDA (tensors are counted, not pages), approximate on CPU.
* ``--profile METHOD[,METHOD]``: torch.profiler over a few steps; prints the top ops by self time, and,
  for two methods, the ops whose self time differs most between them.

Results are merged into --out (JSON; sections are replaced per model / mode, so runs can be split) and
every table is printed and written next to it as markdown (speed.md).

    python benchmarks/speed.py --quick                              # smoke check, seconds
    python benchmarks/speed.py --models minilm --threads 1          # MiniLM, all methods (~6 min, 1 core)
    python benchmarks/speed.py --models bert-base --threads 1       # BERT-base size (~30 min on 1 core)
    python benchmarks/speed.py --epoch-cost --threads 1             # SST-2 epoch estimate (~2 min)
    python benchmarks/speed.py --models minilm --threads 1 --profile adakron,gate
    python benchmarks/speed.py --device cuda --bf16 --models minilm,bert-base
    python benchmarks/speed.py --device cuda --bf16 --models llama-smollm2 --compile layers --memory-in-process
    bash benchmarks/gpu_check.sh                                    # the prepared GPU check (gpu_check.py)

On a CPU shared with other jobs use --threads 1: with more threads than free cores, every parallel op
waits for a descheduled thread (milliseconds per op), which measures the scheduler, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import transformers
from speed_epoch import epoch_cost
from speed_measure import inference, step_times
from speed_memory import MeasuredBuild, memory_child, peak_memory
from speed_methods import (
    COMPILE_MODES,
    EXTRA_METHODS,
    KRON_FACTOR,
    LLAMA_SIZES,
    LORA_ALPHA,
    LORA_R,
    METHODS,
    MODELS,
    OPTIMIZER,
    RANK,
    log,
)
from speed_profile import profile
from speed_report import goals, machine, markdown

# The modules speed_*.py hold the parts: methods and models, step/inference timing, memory, epoch cost,
# profile, report. Other scripts import them from here (render.py: `from speed import markdown`).
__all__ = ["epoch_cost", "goals", "inference", "machine", "main", "markdown", "memory_child", "peak_memory",
           "profile", "step_times"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_SST2 = HERE.parents[1] / "shared" / "data" / "glue" / "SST-2" / "train.tsv"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)} (default minilm,bert-base)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=10, help="measured training steps per method")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per method")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/loss")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="torch.compile each transformer layer (layers: compiles once per method) or the whole model")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    p.add_argument("--memory-in-process", action="store_true",
                   help="measure memory in the timing process as each method is built (exact on CUDA, saves a "
                        "process, build and compile per method) instead of one subprocess per method")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke check in seconds")
    p.add_argument("--out", default=None, help="JSON to merge results into (default benchmarks/results/speed.json)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--no-inference", action="store_true", help="skip the inference latency comparison")
    p.add_argument("--memory-steps", type=int, default=3, help="training steps in each memory subprocess")
    p.add_argument("--infer-reps", type=int, default=20, help="measured inference batches per model")
    p.add_argument("--infer-warmup", type=int, default=3)
    p.add_argument("--infer-extra", default="1x16", help="more inference shapes BxS, comma list ('' = none); "
                   "10x --infer-reps each")
    p.add_argument("--epoch-cost", action="store_true", help="only the SST-2 epoch-cost estimate")
    p.add_argument("--mixed-batch", action="store_true",
                   help="only the mixed-adapter batch throughput (64 rows over 8 adapters vs one adapter); "
                        "runs benchmarks/mixed_batch.py, which writes results/mixed_batch.json")
    p.add_argument("--epoch-methods", default="adakron", help="methods timed in --epoch-cost")
    p.add_argument("--epoch-batches", type=int, default=30, help="batches sampled per padding strategy")
    p.add_argument("--epoch-rows", type=int, default=0, help="use only the first N SST-2 rows (0 = all)")
    p.add_argument("--sst2", default=str(DEFAULT_SST2), help="SST-2 train.tsv")
    p.add_argument("--profile", default=None, help="METHOD[,METHOD]: only profile these on the first model")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine shared')")
    p.add_argument("--_memory-child", dest="memory_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.quick:
        args.models = args.models or "tiny"
        args.batch_size, args.seq_len, args.steps, args.warmup = 4, 16, 3, 1
        args.memory_steps, args.infer_reps, args.infer_warmup = 2, 3, 1
        args.epoch_batches, args.epoch_rows = 3, args.epoch_rows or 2000
        args.out = args.out or str(RESULTS / "speed_quick.json")
    args.models = (args.models or "minilm,bert-base").split(",")
    args.methods = args.methods.split(",")
    args.epoch_methods = args.epoch_methods.split(",")
    args.infer_extra = args.infer_extra.split(",")
    for m in {*args.methods, *args.epoch_methods, *(args.profile.split(",") if args.profile else [])}:
        if m not in METHODS + EXTRA_METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.compile is None:
        args.compile_backend = None  # stored only with --compile
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return
    if args.mixed_batch:
        import mixed_batch

        mixed_batch.main([f"--threads={args.threads}"])
        return
    if args.profile:
        args.profile = args.profile.split(",")
        profile(args, RESULTS)
        return

    out_path = Path(args.out or RESULTS / "speed.json")
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    settings = {k: getattr(args, k) for k in ("batch_size", "seq_len", "steps", "warmup", "memory_steps",
                                              "infer_reps", "infer_extra", "methods", "seed")}
    settings.update(rank=RANK, kron_factor=KRON_FACTOR, lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.1,
                    optimizer=OPTIMIZER,
                    head="pooler and classifier (every method but full: as adakron's head_names)")
    if args.compile:
        settings["compile"] = f"torch.compile per {'layer' if args.compile == 'layers' else 'model'}, " \
                              f"{args.compile_backend}"
    if args.memory_in_process:
        settings["memory"] = "in-process"
    if args.epoch_cost:
        section = epoch_cost(args)
        section.update(machine=machine(args),
                       settings={**settings, "epoch_batches": args.epoch_batches, "epoch_methods": args.epoch_methods})
        results["epoch_cost"] = section
    else:
        results.setdefault("models", {})
        for model_name in args.models:
            section = {"machine": machine(args), "settings": model_settings(settings, model_name)}
            results["models"][model_name] = section  # written after each part, so a failure keeps what was measured
            if args.memory_in_process and not args.no_memory:
                build = MeasuredBuild(model_name, args)
                section["step"] = step_times(model_name, args, build)
                section["memory"] = build.section()
            else:
                section["step"] = step_times(model_name, args)
                _write(out_path, results)
                if not args.no_memory:
                    section["memory"] = peak_memory(model_name, args)
            _write(out_path, results)
            if not args.no_inference:
                log(f"[{model_name}] inference")
                section["inference"] = inference(model_name, args)
            section["goals"] = goals(section)
            section["machine"]["loadavg_at_end"] = os.getloadavg()
            _write(out_path, results)
    _write(out_path, results)
    print(markdown(results))


def model_settings(settings: dict, model_name: str) -> dict:
    """The settings as they hold for this model: a causal LM trains on the LM loss and has no task head."""
    if model_name not in LLAMA_SIZES:
        return settings
    return {**settings, "loss": "causal LM (labels = input ids)", "head": "none: the LM head is tied to the input "
            "embeddings, frozen but for full", "lora_targets": "peft's LLaMA default (q_proj, v_proj)"}


def _write(out_path: Path, results: dict) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    out_path.with_suffix(".md").write_text(markdown(results) + "\n")


if __name__ == "__main__":
    main()
