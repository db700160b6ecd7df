"""Training-step time, peak training memory, inference latency and one epoch's cost of AdaKron against
its baselines, on the embedded all-MiniLM-L6-v2 and on a randomly initialised BERT-base.

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

On a CPU shared with other jobs use --threads 1: with more threads than free cores, every parallel op
waits for a descheduled thread (milliseconds per op), which measures the scheduler, not the model.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from torch import nn

import adakron
from adakron import AdaKronConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_SST2 = HERE.parents[1] / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
METHODS = ("gate", "adakron", "adapter", "lora", "full")
RANK, KRON_FACTOR, LORA_R, LORA_ALPHA = 16, 4, 8, 16
LR = 1e-4
MIB = 1024 * 1024

# Goals from issue 4: (key, what is compared, upper bound on the measured ratio).
GOALS = [
    ("step_vs_gate", "adakron step time <= 1.03 x gate", 1.03),
    ("step_vs_lora", "adakron step time <= 0.90 x lora", 0.90),
    ("memory_vs_full", "adakron peak training memory increase <= 0.85 x full", 0.85),
    ("inference_vs_bare", "adakron inference latency <= 1.05 x bare backbone", 1.05),
]


# ----------------------------------------------------------------------------------------------- models

def backbone(name: str, seed: int = 0) -> nn.Module:
    """A fresh sequence-classification model with 2 labels; random weights are seeded, so equal across copies."""
    torch.manual_seed(seed)
    if name == "minilm":
        from adakron.models import load_classifier

        return load_classifier(None, 2)
    sizes = {
        "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=1000, max_position_embeddings=128),
    }
    if name not in sizes:
        raise SystemExit(f"unknown model {name!r}; choose from minilm, bert-base, tiny")
    config = transformers.BertConfig(num_labels=2, **sizes[name])
    return transformers.AutoModelForSequenceClassification.from_config(config)


class Gate(nn.Module):
    """The cheapest per-site trainable change: ``y = base_layer(x) * scale`` with a trainable d-vector."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        from adakron.adapters.targets import output_width

        weight = base_layer.weight
        self.scale = nn.Parameter(torch.ones(output_width(base_layer), device=weight.device, dtype=weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        return y * self.scale.to(y.dtype)


def add_gates(model: nn.Module) -> nn.Module:
    """Wrap exactly the modules AdaKron would wrap (its own site finder) in Gate; freeze all but gates and head."""
    from adakron.adapters.inject import find_sites, head_names

    config = AdaKronConfig(rank=RANK, kron_factor=KRON_FACTOR)
    heads = head_names(model, config)
    sites = find_sites(model, config, heads)
    for p in model.parameters():
        p.requires_grad_(False)
    for site in sites:
        parent, _, child = site.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, Gate(getattr(owner, child)))
    for head in heads:
        model.get_submodule(head).requires_grad_(True)
    return model


def with_method(model: nn.Module, method: str) -> nn.Module:
    if method == "gate":
        return add_gates(model)
    from adakron.training.trainer import TrainArgs, apply_method

    return apply_method(model, method, TrainArgs(rank=RANK, kron_factor=KRON_FACTOR, lora_r=LORA_R,
                                                 lora_alpha=LORA_ALPHA))


def vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def random_batch(model: nn.Module, batch_size: int, seq_len: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab_size(model) // 2)  # past BERT's special and unused ids
    ids = torch.randint(low, vocab_size(model), (batch_size, seq_len), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": torch.randint(0, 2, (batch_size,), generator=g).to(device),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Trainee:
    """One method's model and AdamW optimizer (trainable parameters only), kept alive across steps."""

    def __init__(self, model_name: str, method: str, args):
        self.method = method
        self.model = with_method(backbone(model_name, args.seed), method).to(args.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable, self.total = adakron.trainable_parameters(self.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=LR)
        self.device, self.bf16 = args.device, args.bf16

    def autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)

    def step(self, batch: dict) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def timed_step(self, batch: dict) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.step(batch)
        sync(self.device)
        return time.perf_counter() - start


def rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


# ------------------------------------------------------------------------------------------- step time

def step_times(model_name: str, args) -> dict:
    methods = args.methods
    log(f"[{model_name}] building {len(methods)} models: {', '.join(methods)}")
    trainees = {m: Trainee(model_name, m, args) for m in methods}
    batch = random_batch(trainees[methods[0]].model, args.batch_size, args.seq_len, args.device, args.seed)
    for r in range(args.warmup):
        for m in rotated(list(methods), r):
            trainees[m].step(batch)
    times: dict[str, list[float]] = {m: [] for m in methods}
    load_before = os.getloadavg()
    for r in range(args.steps):
        for m in rotated(list(methods), r):
            times[m].append(trainees[m].timed_step(batch))
        log(f"[{model_name}] round {r + 1}/{args.steps}: " + "  ".join(f"{m} {times[m][-1]:.3f}s" for m in methods))
    load_after = os.getloadavg()
    rows = {}
    for m in methods:
        q1, med, q3 = quartiles(times[m])
        rows[m] = {"median_s": med, "q1_s": q1, "q3_s": q3, "min_s": min(times[m]), "times_s": times[m],
                   "trainable_params": trainees[m].trainable, "total_params": trainees[m].total}
    for ref in ("gate", "full"):
        if ref in times:
            for m in methods:
                rows[m][f"x_{ref}"] = rows[m]["median_s"] / rows[ref]["median_s"]
                rows[m][f"paired_x_{ref}"] = statistics.median(a / b for a, b in zip(times[m], times[ref]))
    if "lora" in times:
        for m in methods:
            rows[m]["x_lora"] = rows[m]["median_s"] / rows["lora"]["median_s"]
    del trainees, batch
    gc.collect()
    return {"methods": rows, "order": "round-robin, one step per method per round, start rotating each round",
            "loadavg_before": load_before, "loadavg_after": load_after}


# ---------------------------------------------------------------------------------------------- memory

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(args) -> dict:
    """Runs in its own process: the peak memory of a few training steps of one method on one model."""
    model_name, method = args.models[0], args.methods[0]
    import peft  # noqa: F401  every method's process imports the same modules, so the baselines compare

    import adakron.training.trainer  # noqa: F401

    rss_start = _status_kib("VmRSS") * 1024
    trainee = Trainee(model_name, method, args)
    batch = random_batch(trainee.model, args.batch_size, args.seq_len, args.device, args.seed)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.memory_steps):
            trainee.step(batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        how = "torch.cuda.max_memory_allocated after reset_peak_memory_stats; before = memory_allocated"
    else:
        before = _status_kib("VmRSS") * 1024
        if _reset_peak_rss():
            how = "VmHWM after writing 5 to /proc/self/clear_refs; before = VmRSS"
        else:
            how = "ru_maxrss (peak RSS reset refused: includes the model-loading peak); before = VmRSS"
        for _ in range(args.memory_steps):
            trainee.step(batch)
        if how.startswith("VmHWM"):
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "model": model_name, "rss_at_start_bytes": rss_start, "before_bytes": before,
            "peak_bytes": peak, "increase_bytes": peak - before, "steps": args.memory_steps, "how": how,
            "trainable_params": trainee.trainable, **accounted_bytes(trainee, batch)}


def accounted_bytes(trainee: Trainee, batch: dict) -> dict:
    """Allocator-independent tally of one more step: the distinct storages autograd saves for backward
    (parameters excluded), the gradients, and the optimizer's state tensors."""
    params = {p.untyped_storage().data_ptr() for p in trainee.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    trainee.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainee.autocast():
        loss = trainee.model(**batch).loss
    loss.backward()
    trainee.optimizer.step()
    grads = sum(p.grad.nbytes for p in trainee.params if p.grad is not None)
    state = sum(v.nbytes for st in trainee.optimizer.state.values() for v in st.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return {"saved_activation_bytes": sum(saved.values()), "grad_bytes": grads, "optimizer_state_bytes": state,
            "accounted_bytes": sum(saved.values()) + grads + state}


def peak_memory(model_name: str, args) -> dict:
    rows = {}
    for method in args.methods:
        command = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", "--models", model_name,
                   "--methods", method, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--threads", str(args.threads), "--device", args.device, "--memory-steps", str(args.memory_steps),
                   "--seed", str(args.seed)]
        if args.bf16:
            command.append("--bf16")
        log(f"[{model_name}] memory: {method} in a subprocess")
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"memory subprocess for {method} failed:\n{done.stderr[-3000:]}")
        rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
    for ref in ("gate", "full"):
        if ref in rows:
            for m in rows:
                rows[m][f"increase_x_{ref}"] = rows[m]["increase_bytes"] / rows[ref]["increase_bytes"]
                rows[m][f"peak_x_{ref}"] = rows[m]["peak_bytes"] / rows[ref]["peak_bytes"]
                rows[m][f"accounted_x_{ref}"] = rows[m]["accounted_bytes"] / rows[ref]["accounted_bytes"]
    return {"methods": rows, "how": next(iter(rows.values()))["how"]}


# ------------------------------------------------------------------------------------------- inference

def inference(model_name: str, args) -> dict:
    """Bare backbone vs the AdaKron model, eval + no_grad, interleaved; at the main shape (the goal's) and at
    each --infer-extra shape (e.g. 1x16, a single short request, where fixed per-op costs weigh most)."""
    models = {"bare": backbone(model_name, args.seed),
              "adakron": with_method(backbone(model_name, args.seed), "adakron")}
    for m in models.values():
        m.to(args.device).eval()
    autocast = (torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16) if args.bf16
                else nullcontext())
    names = list(models)
    shapes = [(args.batch_size, args.seq_len, args.infer_reps)]
    shapes += [(*map(int, shape.split("x")), args.infer_reps * 10) for shape in args.infer_extra if shape]
    result = {"shapes": {}}
    for batch_size, seq_len, reps in shapes:
        batch = random_batch(models["bare"], batch_size, seq_len, args.device, args.seed)
        batch.pop("labels")
        times: dict[str, list[float]] = {k: [] for k in models}
        with torch.no_grad(), autocast:
            out = {k: models[k](**batch).logits for k in names}  # warm-up, and a check that both ran
            for _ in range(max(0, args.infer_warmup - 1)):
                for k in names:
                    models[k](**batch)
            for r in range(reps):
                for k in rotated(names, r):
                    sync(args.device)
                    start = time.perf_counter()
                    models[k](**batch)
                    sync(args.device)
                    times[k].append(time.perf_counter() - start)
        assert all(o.shape == out["bare"].shape for o in out.values())
        rows = {}
        for k in names:
            q1, med, q3 = quartiles(times[k])
            rows[k] = {"median_s": med, "q1_s": q1, "q3_s": q3, "times_s": times[k]}
        result["shapes"][f"{batch_size}x{seq_len}"] = {
            "variants": rows, "reps": reps,
            "adakron_x_bare": rows["adakron"]["median_s"] / rows["bare"]["median_s"],
            "paired_adakron_x_bare": statistics.median(a / b for a, b in zip(times["adakron"], times["bare"])),
        }
    main = result["shapes"][f"{args.batch_size}x{args.seq_len}"]
    result["adakron_x_bare"] = main["adakron_x_bare"]  # the goal's figure: the main shape
    del models
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------- goals

def goals(section: dict) -> list[dict]:
    steps = section.get("step", {}).get("methods", {})
    memory = section.get("memory", {}).get("methods", {})
    infer = section.get("inference", {})
    measured = {
        "step_vs_gate": steps.get("adakron", {}).get("x_gate"),
        "step_vs_lora": steps.get("adakron", {}).get("x_lora"),
        "memory_vs_full": memory.get("adakron", {}).get("increase_x_full"),
        "inference_vs_bare": infer.get("adakron_x_bare"),
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


# ------------------------------------------------------------------------------------------ epoch cost

def epoch_cost(args) -> dict:
    from transformers import DataCollatorWithPadding
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from adakron.models import load_tokenizer
    from adakron.training.data import read_file

    path = Path(args.sst2)
    if not path.is_file():
        log(f"--epoch-cost: {path} not found; skipped")
        return {"skipped": f"{path} not found"}
    examples = read_file(path, ["sentence"], "label")
    texts = [t[0] for t in examples.texts][: args.epoch_rows or None]
    labels = [int(v) for v in examples.labels][: len(texts)]
    tokenizer = load_tokenizer(None)
    start = time.perf_counter()
    encoded = tokenizer(texts, truncation=True, max_length=args.seq_len)
    tokenize_s = time.perf_counter() - start
    features = [{k: encoded[k][i] for k in encoded} | {"labels": labels[i]} for i in range(len(texts))]
    lengths = [len(ids) for ids in encoded["input_ids"]]
    bs = args.batch_size
    g = torch.Generator().manual_seed(args.seed)
    shuffled = torch.randperm(len(features), generator=g).tolist()
    grouped = list(LengthGroupedSampler(bs, lengths=lengths, generator=torch.Generator().manual_seed(args.seed)))
    static = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=args.seq_len)
    dynamic = DataCollatorWithPadding(tokenizer)
    strategies = {
        f"pad to {args.seq_len}": (shuffled, static, lambda batch: len(batch) * args.seq_len),
        "dynamic, random batches": (shuffled, dynamic, lambda batch: len(batch) * max(lengths[i] for i in batch)),
        "dynamic, length-grouped": (grouped, dynamic, lambda batch: len(batch) * max(lengths[i] for i in batch)),
    }
    real_tokens = sum(lengths)
    rows, samples = {}, {}
    rng = random.Random(args.seed)
    for name, (order, collator, slots) in strategies.items():
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        padded = sum(slots(b) for b in batches)
        picked = rng.sample(range(len(batches)), min(args.epoch_batches, len(batches)))
        samples[name] = [(batches[i], collator) for i in picked]
        sample_lengths = [max(lengths[j] for j in batches[i]) for i in picked]
        rows[name] = {"batches": len(batches), "real_tokens": real_tokens, "padded_slots": padded,
                      "real_per_slot": real_tokens / padded,
                      "pads_per_real_token": (padded - real_tokens) / real_tokens,
                      "sample_batches": len(picked), "sample_longest_row_median": statistics.median(sample_lengths)}
    result = {"data": str(path), "examples": len(features), "tokenize_s": tokenize_s,
              "length_median": statistics.median(lengths), "length_max": max(lengths),
              "extrapolated": True, "methods": {}}
    for method in args.epoch_methods:
        trainee = Trainee("minilm", method, args)
        warm = random_batch(trainee.model, bs, args.seq_len, args.device, args.seed)
        for _ in range(args.warmup):
            trainee.step(warm)
        times: dict[str, list[float]] = {k: [] for k in strategies}
        names = list(strategies)
        for r in range(max(len(s) for s in samples.values())):
            for k in rotated(names, r):
                if r >= len(samples[k]):
                    continue
                indices, collator = samples[k][r]
                sync(args.device)
                start = time.perf_counter()
                batch = {key: value.to(args.device) for key, value in collator([features[i] for i in indices]).items()}
                trainee.step(batch)
                sync(args.device)
                times[k].append(time.perf_counter() - start)
            log(f"[epoch-cost {method}] sample {r + 1}: " + "  ".join(
                f"{k} {times[k][-1]:.3f}s" for k in names if len(times[k]) > r))
        per = {}
        for k in names:
            mean = statistics.fmean(times[k])
            sem = statistics.stdev(times[k]) / len(times[k]) ** 0.5 if len(times[k]) > 1 else float("nan")
            per[k] = {"mean_s": mean, "sem_s": sem, "median_s": statistics.median(times[k]), "times_s": times[k],
                      "epoch_s_extrapolated": mean * rows[k]["batches"],
                      "epoch_s_sem": sem * rows[k]["batches"]}
        ref = per[names[0]]["epoch_s_extrapolated"]
        for k in names:
            per[k]["x_pad_to_max"] = per[k]["epoch_s_extrapolated"] / ref
        result["methods"][method] = per
        del trainee
        gc.collect()
    result["strategies"] = rows
    return result


# -------------------------------------------------------------------------------------------- profile

def profile(args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model_name = args.models[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    sort = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    totals, text = {}, []
    for method in args.profile:
        trainee = Trainee(model_name, method, args)
        batch = random_batch(trainee.model, args.batch_size, args.seq_len, args.device, args.seed)
        for _ in range(args.warmup):
            trainee.step(batch)
        with torch_profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                trainee.step(batch)
            sync(args.device)
        averages = prof.key_averages()
        text += [f"\n### torch.profiler: {model_name} / {method}, {args.profile_steps} steps, "
                 f"batch {args.batch_size} x {args.seq_len}, {torch.get_num_threads()} thread(s)\n", "```",
                 averages.table(sort_by=sort, row_limit=args.profile_rows), "```"]
        key = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        totals[method] = {e.key: (getattr(e, key), e.count) for e in averages}
        del trainee
        gc.collect()
    if len(args.profile) == 2:
        a, b = args.profile
        keys = set(totals[a]) | set(totals[b])
        diff = sorted(keys, key=lambda k: -abs(totals[a].get(k, (0, 0))[0] - totals[b].get(k, (0, 0))[0]))
        whole_a = sum(v for v, _ in totals[a].values()) / 1e6
        whole_b = sum(v for v, _ in totals[b].values()) / 1e6
        text += [f"\n### self time, {a} - {b} (ms over {args.profile_steps} steps; all ops: {a} {whole_a * 1e3:.0f} "
                 f"ms, {b} {whole_b * 1e3:.0f} ms)\n",
                 f"| op | {a} ms | {a} calls | {b} ms | {b} calls | difference ms |\n|---|---:|---:|---:|---:|---:|"]
        for k in diff[: args.profile_rows]:
            ta, ca = totals[a].get(k, (0, 0))
            tb, cb = totals[b].get(k, (0, 0))
            text.append(f"| {k} | {ta / 1e3:.1f} | {ca} | {tb / 1e3:.1f} | {cb} | {(ta - tb) / 1e3:+.1f} |")
    print("\n".join(text))
    device = "" if args.device == "cpu" else f"-{args.device.split(':')[0]}"
    out = RESULTS / f"profile-{model_name}{device}-{'-'.join(args.profile)}.md"
    out.write_text(f"# `python benchmarks/speed.py --models {model_name} --threads {args.threads} --profile "
                   f"{','.join(args.profile)}`\n" + "\n".join(text) + "\n")
    log(f"wrote {out}")


# ------------------------------------------------------------------------------------------ reporting

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


def markdown(results: dict) -> str:
    out = []
    for model_name, section in results.get("models", {}).items():
        m, s = section["machine"], section["settings"]
        out.append(f"## {model_name}: batch {s['batch_size']} x seq {s['seq_len']}, {m['device']}"
                   f"{' bf16 autocast' if m['bf16'] else ''}, {m['threads']} threads, {m['cpu_model']}, "
                   f"torch {m['torch']}, {m['date']}\n")
        if m.get("note"):
            out.append(f"Note: {m['note']}\n")
        # Files written before the pooler joined the head say nothing about it.
        head = s.get("head", "the classifier only, pooler frozen (measured before the pooler joined the head; "
                             "rerun to update)")
        out.append(f"Trained head: {head}.\n")
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
        memory = section.get("memory")
        if memory:
            out.append(f"Peak training memory, one subprocess per method, {s['memory_steps']} steps: "
                       f"{memory['how']}.\n")
            out.append("| method | loaded model MiB | peak MiB | increase MiB | increase x gate | increase x full | "
                       "peak x gate | peak x full |\n|---|---:|---:|---:|---:|---:|---:|---:|")
            for k, r in memory["methods"].items():
                out.append(f"| {k} | {r['before_bytes'] / MIB:.0f} | {r['peak_bytes'] / MIB:.0f} | "
                           f"{r['increase_bytes'] / MIB:.0f} | {r.get('increase_x_gate', float('nan')):.3f} | "
                           f"{r.get('increase_x_full', float('nan')):.3f} | "
                           f"{r.get('peak_x_gate', float('nan')):.3f} | "
                           f"{r.get('peak_x_full', float('nan')):.3f} |")
            out.append("\nAllocator-independent tally (one more step after the RSS measurement): distinct storages "
                       "autograd saves for backward (parameters excluded) + gradients + AdamW state.\n")
            out.append("| method | saved activations MiB | grads MiB | optimizer state MiB | accounted MiB | "
                       "x gate | x full |\n|---|---:|---:|---:|---:|---:|---:|")
            for k, r in memory["methods"].items():
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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=None, help="comma list of minilm, bert-base, tiny (default minilm,bert-base)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=10, help="measured training steps per method")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per method")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/loss")
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
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
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
        profile(args)
        return

    out_path = Path(args.out or RESULTS / "speed.json")
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    settings = {k: getattr(args, k) for k in ("batch_size", "seq_len", "steps", "warmup", "memory_steps",
                                              "infer_reps", "infer_extra", "methods", "seed")}
    settings.update(rank=RANK, kron_factor=KRON_FACTOR, lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.1,
                    optimizer=f"torch.optim.AdamW(lr={LR}) over trainable parameters",
                    head="pooler and classifier (every method but full: as adakron's head_names)")
    if args.epoch_cost:
        section = epoch_cost(args)
        section.update(machine=machine(args),
                       settings={**settings, "epoch_batches": args.epoch_batches, "epoch_methods": args.epoch_methods})
        results["epoch_cost"] = section
    else:
        results.setdefault("models", {})
        for model_name in args.models:
            section = {"machine": machine(args), "settings": settings}
            section["step"] = step_times(model_name, args)
            if not args.no_memory:
                section["memory"] = peak_memory(model_name, args)
            if not args.no_inference:
                log(f"[{model_name}] inference")
                section["inference"] = inference(model_name, args)
            section["goals"] = goals(section)
            section["machine"]["loadavg_at_end"] = os.getloadavg()
            results["models"][model_name] = section
            _write(out_path, results)  # after each model, so a later failure keeps what was measured
    _write(out_path, results)
    print(markdown(results))


def _write(out_path: Path, results: dict) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    out_path.with_suffix(".md").write_text(markdown(results) + "\n")


if __name__ == "__main__":
    main()
