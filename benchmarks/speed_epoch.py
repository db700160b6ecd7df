"""The SST-2 epoch-cost estimate (``speed.py --epoch-cost``): what each padding strategy costs an epoch, from
exact per-epoch token counts and a timed random sample of each strategy's own batches."""

from __future__ import annotations

import gc
import random
import statistics
import time
from pathlib import Path

import torch
from speed_measure import rotated
from speed_methods import Trainee, log, random_batch, sync


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


