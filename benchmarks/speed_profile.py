"""``speed.py --profile``: torch.profiler over a few steps of one or two methods, to see where a difference in
step time comes from (the top ops by self time, and the ops whose self time differs most between two methods)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from speed_methods import Trainee, log, random_batch, sync


def profile(args, out_dir: Path) -> None:
    """Prints the tables and writes them to out_dir/profile-MODEL[-DEVICE]-METHODS.md."""
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
    out = out_dir / f"profile-{model_name}{device}-{'-'.join(args.profile)}.md"
    out.write_text(f"# `python benchmarks/speed.py --models {model_name} --threads {args.threads} --profile "
                   f"{','.join(args.profile)}`\n" + "\n".join(text) + "\n")
    log(f"wrote {out}")

