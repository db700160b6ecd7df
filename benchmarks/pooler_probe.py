"""Frozen or trained pooler: how fast AdaKron, the plain adapter and LoRA start to learn STS-B.

BERT's sequence classifier reads the pooler (dense + tanh over the first token), which sits inside the
backbone. all-MiniLM-L6-v2 was trained with mean pooling, so its pooler was never trained (zero bias,
weights of std 0.009): frozen, it feeds the classifier a small random projection of the first token. This
probe trains each method for a few hundred steps with the pooler frozen (peft's default for LoRA) and with
the pooler trained as part of the head (adakron's default since the GLUE grid's first pass), and evaluates
STS-B dev Pearson along the way. Each variant writes its own JSON under benchmarks/results/pooler_probe/
and is skipped when present.

    python benchmarks/pooler_probe.py                 # 6 variants x 300 steps: about an hour on one busy core
    python benchmarks/pooler_probe.py --steps 100 --methods adakron
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from glue import DEFAULT_DATA, RESULTS

OUT = RESULTS / "pooler_probe"
LRS = {"adakron": 1e-3, "adapter": 2e-3, "lora": 1e-3}  # the grid's first-pass MRPC choices
DEV_ROWS, BATCH, MAX_LENGTH, SEED = 600, 32, 128, 42


def build(method: str, train_pooler: bool):
    from adakron.models import load_classifier
    from adakron.training.trainer import TrainArgs, apply_method

    return apply_method(load_classifier(None, 1, problem_type="regression"), method, TrainArgs(), train_pooler)


def dev_pearson(model, dev, collate) -> float:
    from scipy.stats import pearsonr

    model.eval()
    predictions, gold = [], []
    with torch.no_grad():
        for start in range(0, len(dev), 64):
            batch = collate([dev[i] for i in range(start, min(start + 64, len(dev)))])
            gold += batch.pop("labels").tolist()
            predictions += model(**batch).logits.squeeze(-1).tolist()
    model.train()
    return float(pearsonr(predictions, gold)[0])


def probe(method: str, train_pooler: bool, steps: int, data_dir: Path) -> dict:
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup, set_seed

    from adakron.adapters.inject import trainable_parameters
    from adakron.models import load_tokenizer
    from adakron.training.data import tokenize
    from adakron.training.tasks import get_task, load_glue

    set_seed(SEED)
    tokenizer = load_tokenizer(None)
    collate = DataCollatorWithPadding(tokenizer)
    train_rows, devs = load_glue(get_task("stsb"), str(data_dir))
    train = tokenize(train_rows, tokenizer, MAX_LENGTH)
    dev = tokenize(next(iter(devs.values())).head(DEV_ROWS), tokenizer, MAX_LENGTH)
    model = build(method, train_pooler)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LRS[method], weight_decay=0.1)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SEED)).tolist()
    model.train()
    losses, curve, started = [], [], time.time()
    for step in range(steps):
        start = step * BATCH % len(train)
        loss = model(**collate([train[i] for i in order[start:start + BATCH]])).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % (steps // 3) == 0:
            curve.append({"step": step + 1, "train_loss": float(np.mean(losses[-(steps // 3):])),
                          "dev_pearson": dev_pearson(model, dev, collate)})
    return {"method": method, "train_pooler": train_pooler, "lr": LRS[method], "steps": steps, "batch": BATCH,
            "seed": SEED, "dev_rows": DEV_ROWS, "trainable_params": trainable_parameters(model)[0],
            "threads": torch.get_num_threads(), "seconds": round(time.time() - started, 1), "curve": curve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="adakron,adapter,lora")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(LRS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(LRS)}")
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the dev set is evaluated at each third)")
    if not (args.data_dir / "STS-B" / "train.tsv").exists():
        print(f"STS-B not found under {args.data_dir}; pass --data-dir. Nothing to run.")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for method in methods:
        for train_pooler in (False, True):
            path = OUT / f"stsb-{method}-{'trained' if train_pooler else 'frozen'}-pooler-{args.steps}steps.json"
            if path.exists():
                continue
            result = probe(method, train_pooler, args.steps, args.data_dir)
            path.write_text(json.dumps(result, indent=2))
            print(path.name, [round(c["dev_pearson"], 3) for c in result["curve"]], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
