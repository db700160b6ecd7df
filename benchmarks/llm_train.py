"""The decoder-LLM benchmark's data, training loop and scores (llm.py runs them): SST-2 as prompt/completion
pairs scored by each label word's likelihood, Alpaca with a seeded held-out split scored by completion NLL, and
greedy generations for side-by-side reading.

The loop is our own, short and explicit: the same seeded batches, in the same order, for every method; AdamW
with a linear schedule after a warm-up; the loss on the completion tokens only (training/lm.py's encoding and
collator).
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from llm_models import (
    SEED,
    library_recipe,
    load,
    method_record,
    optimizer_and_schedule,
    parameters,
    recipe_record,
    train_step,
    with_method,
)

from adakron.training import lm

PROMPT = ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
          "Review: {sentence}")
SPLIT_SEED = 0  # the SST-2 dev subset and the Alpaca held-out split: fixed, whatever else changes
GROUP = 16  # length grouping: batches are cut from runs of GROUP batches' worth of rows sorted by length


# --- data --------------------------------------------------------------------------------------------------------

def sst2_example(sentence: str, label: str) -> lm.Example:
    """A review as a chat turn asking for its sentiment, answered by the label word alone."""
    return lm.Example(messages=({"role": "user", "content": PROMPT.format(sentence=sentence.strip())},
                                {"role": "assistant", "content": label}))


def read_sst2(path: Path) -> list[tuple[str, int]]:
    """(sentence, label id) rows of a GLUE SST-2 TSV, read by the library's unquoted-TSV reader."""
    from adakron.training.tasks import get_task, read_split

    examples = read_split(get_task("sst2"), path)
    return [(texts[0], label) for texts, label in zip(examples.texts, examples.labels)]


def sst2_labels() -> tuple[str, ...]:
    from adakron.training.tasks import get_task

    return get_task("sst2").labels  # ("negative", "positive"), by label id


def seeded_order(n: int, seed: int) -> Iterator[int]:
    """Indices 0..n-1 in seeded random orders, one permutation after another (an epoch each), forever."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def encode_rows(tokenizer, examples: Sequence[lm.Example], count: int, max_length: int, seed: int) -> list[dict]:
    """``count`` encoded examples drawn in a seeded order (repeating once all are used); examples whose prompt
    leaves no reply within ``max_length`` are passed over."""
    rows, order, tried = [], seeded_order(len(examples), seed), 0
    while len(rows) < count:
        row = lm.encode(tokenizer, examples[next(order)], max_length)
        tried += 1
        if row is not None:
            rows.append(row)
        elif tried > 10 * count:
            raise SystemExit(f"hardly any example has a reply within {max_length} tokens")
    return rows


def training_batches(tokenizer, rows: list[dict], batch_size: int, seed: int) -> list[dict]:
    """Padded batches of ``rows`` (already in their seeded order), grouped by length as `adakron train` groups
    them: each run of GROUP batches is sorted by length, cut, and its batches shuffled, so padding stays short
    while every method still sees the same batches in the same order."""
    collate, rng, batches = lm.collator(tokenizer), random.Random(seed), []
    span = GROUP * batch_size
    for start in range(0, len(rows), span):
        run = sorted(rows[start:start + span], key=lambda r: len(r["input_ids"]), reverse=True)
        cut = [run[i:i + batch_size] for i in range(0, len(run), batch_size)]
        rng.shuffle(cut)
        batches += [collate(chunk) for chunk in cut]
    return batches


def held_out_alpaca(path: Path, held_out: int, seed: int, limit: int | None = None):
    """(train, held-out) Alpaca examples: ``held_out`` of them drawn with ``seed`` (lm.held_out_split), the
    same every run; ``limit`` keeps only the file's first records (--quick)."""
    examples = lm.read_examples(path)
    return lm.held_out_split(examples[:limit] if limit else examples, held_out, seed)


def sample_prompts(held_out: Sequence[lm.Example], count: int) -> list[lm.Example]:
    """The first ``count`` held-out examples with a short prompt and reference, so generations fit on a page."""
    short = [e for e in held_out if len(e.messages[0]["content"]) <= 200 and len(e.messages[-1]["content"]) <= 400]
    return (short or list(held_out))[:count]


# --- training ----------------------------------------------------------------------------------------------------

def train(model, batches: list[dict], recipe: dict, lr: float, log_every: int = 10) -> dict:
    """Train on ``batches`` (one step each); returns the loss per step and the seconds the steps took."""
    optimizer, schedule = optimizer_and_schedule(model, recipe, lr, len(batches))
    model.train()
    losses, started = [], time.perf_counter()
    for step, batch in enumerate(batches, 1):
        losses.append(train_step(model, optimizer, schedule, batch))
        if step % log_every == 0 or step == len(batches):
            spent = time.perf_counter() - started
            window = statistics.mean(losses[-log_every:])
            print(f"   step {step}/{len(batches)}  loss {window:.3f}  {spent / step:.2f} s/step  "
                  f"eta {spent / step * (len(batches) - step):.0f}s", flush=True)
    model.eval()
    return {"losses": losses, "train_seconds": time.perf_counter() - started}


# --- scores ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def completion_nll(model, tokenizer, rows: list[dict], batch_size: int) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each row's completion tokens (its labels other than -100), given the rest:
    rows are batched by length for speed, results come back in the rows' order."""
    collate, out = lm.collator(tokenizer), [None] * len(rows)
    print(f"   scoring {len(rows)} rows", flush=True)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([rows[i] for i in chunk])
        labels = batch["labels"][:, 1:]  # position t predicts token t + 1
        # The LM head (a fifth of SmolLM2's forward) runs only where some row has a completion token next.
        keep = (labels != lm.IGNORE_INDEX).any(0).nonzero().squeeze(1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                       logits_to_keep=keep).logits
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels[:, keep], ignore_index=lm.IGNORE_INDEX,
                              reduction="none")
        counts = (labels != lm.IGNORE_INDEX).sum(1)
        for i, total, count in zip(chunk, nll.sum(1).tolist(), counts.tolist()):
            out[i] = (total, count)
    return out


def sst2_accuracy(model, tokenizer, dev: list[tuple[str, int]], max_length: int, batch_size: int) -> dict:
    """Dev accuracy with the answer restricted to the labels: each review is scored with each label word as
    the reply (the summed log-probability of the reply's tokens, the end-of-turn tokens included, as training
    encodes it), and the likelier label is the prediction."""
    labels = sst2_labels()
    rows = [lm.encode(tokenizer, sst2_example(sentence, word), max_length) for sentence, _ in dev for word in labels]
    if any(row is None for row in rows):
        raise SystemExit(f"an SST-2 dev prompt is longer than {max_length} tokens")
    nll = [total for total, _ in completion_nll(model, tokenizer, rows, batch_size)]
    scores = [nll[i * len(labels):(i + 1) * len(labels)] for i in range(len(dev))]
    predicted = [min(range(len(labels)), key=s.__getitem__) for s in scores]
    correct = sum(p == gold for p, (_, gold) in zip(predicted, dev))
    return {"dev_accuracy": correct / len(dev), "dev_rows": len(dev),
            "predicted_share": {w: predicted.count(i) / len(dev) for i, w in enumerate(labels)},
            "mean_margin_nats": statistics.mean(abs(s[0] - s[1]) for s in scores)}


def held_out_loss(model, tokenizer, examples: Sequence[lm.Example], max_length: int, batch_size: int) -> dict:
    """Token-mean NLL of the held-out completions (cut to ``max_length`` tokens, as in training)."""
    rows = [r for r in (lm.encode(tokenizer, e, max_length) for e in examples) if r is not None]
    scored = completion_nll(model, tokenizer, rows, batch_size)
    tokens = sum(count for _, count in scored)
    return {"held_out_loss": sum(total for total, _ in scored) / tokens, "held_out_tokens": tokens,
            "held_out_examples": len(rows)}


def generations(model, tokenizer, examples: Sequence[lm.Example], max_new_tokens: int) -> list[dict]:
    """Greedy replies to the examples' prompts (rendered as in training), with each prompt and reference."""
    from adakron.training.generate import generate

    prompts = [list(e.messages[:-1]) for e in examples]
    replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return [{"prompt": e.messages[0]["content"], "reference": e.messages[-1]["content"], "reply": reply}
            for e, reply in zip(examples, replies)]


# --- the runs llm.py stores ----------------------------------------------------------------------------------------

def sst2_run(method: str, folder: Path, args) -> dict:
    """Train ``method`` on seeded SST-2 rows (nothing for ``base``), then score the seeded dev subset."""
    sizes = args.sizes
    model, tokenizer = load(args.quick)
    model = with_method(model, method, SEED)
    result = {**parameters(model), **method_record(method)}
    if method != "base":
        rows = [sst2_example(s, sst2_labels()[y]) for s, y in read_sst2(folder / "train.tsv")]
        result.update(trained(model, tokenizer, rows, sizes.sst2_max_length, args))
    dev = read_sst2(folder / "dev.tsv")
    subset = dev_subset(len(dev), sizes.dev_rows)
    started = time.perf_counter()
    result.update(sst2_accuracy(model, tokenizer, [dev[i] for i in subset], sizes.sst2_max_length,
                                sizes.eval_batch_size))
    result.update(eval_seconds=time.perf_counter() - started, dev_subset_seed=SPLIT_SEED,
                  prompt=PROMPT, labels=list(sst2_labels()))
    return result


def dev_subset(n: int, count: int) -> list[int]:
    """A fixed seeded choice of ``count`` dev rows (all of them if there are fewer), in file order."""
    return sorted(random.Random(SPLIT_SEED).sample(range(n), min(count, n)))


def trained(model, tokenizer, examples, max_length: int, args) -> dict:
    """Train on ``steps x batch`` seeded rows of ``examples``; the recipe and the loss curve, for the result."""
    recipe = library_recipe()
    rows = encode_rows(tokenizer, examples, args.steps * args.batch_size, max_length, SEED)
    batches = training_batches(tokenizer, rows, args.batch_size, SEED)
    log = train(model, batches, recipe, args.lr, log_every=max(1, min(10, args.steps // 5)))
    return {"recipe": recipe_record(recipe, args.lr, args.steps, args.batch_size), "max_length": max_length,
            "length_grouped": True, **log}


def alpaca_run(method: str, args) -> dict:
    """Train ``method`` on the training part (nothing for ``base``), then the held-out loss and generations."""
    sizes = args.sizes
    to_train, held_out = held_out_alpaca(args.alpaca_file, sizes.held_out, SPLIT_SEED, sizes.alpaca_limit)
    model, tokenizer = load(args.quick)
    model = with_method(model, method, SEED)
    result = {**parameters(model), **method_record(method), "held_out_seed": SPLIT_SEED,
              "data": args.alpaca_file.name, "data_sha256": hashlib.sha256(args.alpaca_file.read_bytes()).hexdigest()}
    if method != "base":
        result.update(trained(model, tokenizer, to_train, sizes.alpaca_max_length, args))
    started = time.perf_counter()
    result.update(held_out_loss(model, tokenizer, held_out, sizes.alpaca_max_length, sizes.eval_batch_size))
    result["eval_seconds"] = time.perf_counter() - started
    result["samples"] = generations(model, tokenizer, sample_prompts(held_out, sizes.samples), sizes.sample_tokens)
    return result
