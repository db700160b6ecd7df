"""Training-step time and inference latency, measured so that a shared machine's load changes hit every method
alike: the methods' models stay alive side by side and each round visits each of them once, the starting
method rotating each round. Reported as medians, quartiles and ratios of medians, and the median of the
within-round ratios (paired), which a slow drift of the load cancels out of."""

from __future__ import annotations

import gc
import os
import statistics
import time
from contextlib import nullcontext

import torch
from speed_methods import Trainee, backbone, compile_model, log, random_batch, sync, with_method


def rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def step_times(model_name: str, args, build=None) -> dict:
    """``build(method)`` makes each method's Trainee (default: plain Trainee); speed_memory.MeasuredBuild measures
    memory on the way."""
    methods = args.methods
    log(f"[{model_name}] building {len(methods)} models: {', '.join(methods)}")
    build = build or (lambda method: Trainee(model_name, method, args))
    counters = {"build_s": {}, "warmup_s": {}}
    if getattr(args, "compile", None):
        _reset_compile_counters()
    trainees = {}
    for m in methods:
        start = time.perf_counter()
        trainees[m] = build(m)
        counters["build_s"][m] = time.perf_counter() - start
    batch = random_batch(trainees[methods[0]].model, args.batch_size, args.seq_len, args.device, args.seed)
    for r in range(args.warmup):
        for m in rotated(list(methods), r):
            start = time.perf_counter()
            trainees[m].step(batch)
            counters["warmup_s"][m] = counters["warmup_s"].get(m, 0.0) + time.perf_counter() - start
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
    result = {"methods": rows, "order": "round-robin, one step per method per round, start rotating each round",
              "loadavg_before": load_before, "loadavg_after": load_after}
    if getattr(args, "compile", None):
        result["compile"] = _compile_report(counters)
    return result


def _reset_compile_counters() -> None:
    import torch._dynamo.utils

    torch._dynamo.utils.counters.clear()


def _compile_report(counters: dict) -> dict:
    """What torch.compile did: graphs compiled, graph breaks (each one a return to eager mid-layer), and the
    seconds each method's build and warm-up took (the first warm-up step compiles)."""
    import torch._dynamo.utils

    stats = torch._dynamo.utils.counters
    breaks = dict(stats["graph_break"])
    return {"unique_graphs": stats["stats"].get("unique_graphs", 0),
            "calls_captured": stats["stats"].get("calls_captured", 0),
            "graph_breaks": sum(breaks.values()), "graph_break_reasons": list(breaks)[:10], **counters}


def inference(model_name: str, args) -> dict:
    """Bare backbone vs the AdaKron model (and a merged MAdaKron one when --methods names madakron), eval +
    no_grad, interleaved; at the main shape (the goals') and at each --infer-extra shape (e.g. 1x16, a single
    short request, where fixed per-op costs weigh most)."""
    models = {"bare": backbone(model_name, args.seed),
              "adakron": with_method(backbone(model_name, args.seed), "adakron")}
    if "madakron" in args.methods:
        # What MAdaKron serves: its experts merged into one AdaKron adapter, which should cost AdaKron's time.
        import adakron

        models["madakron merged"] = with_method(backbone(model_name, args.seed), "madakron")
        adakron.merge_experts(models["madakron merged"])
    for m in models.values():
        compile_model(m.to(args.device).eval(), getattr(args, "compile", None),
                      getattr(args, "compile_backend", "inductor"))
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
        if "madakron merged" in rows:
            result["shapes"][f"{batch_size}x{seq_len}"].update(
                madakron_x_adakron=rows["madakron merged"]["median_s"] / rows["adakron"]["median_s"],
                paired_madakron_x_adakron=statistics.median(
                    a / b for a, b in zip(times["madakron merged"], times["adakron"])))
    main = result["shapes"][f"{args.batch_size}x{args.seq_len}"]
    result["adakron_x_bare"] = main["adakron_x_bare"]  # the goals' figures: the main shape
    if "madakron_x_adakron" in main:
        result["madakron_x_adakron"] = main["madakron_x_adakron"]
    del models
    gc.collect()
    return result


