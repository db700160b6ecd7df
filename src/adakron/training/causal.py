"""The causal-LM objective of `adakron train`: instruction data in, loss on the completion tokens only, dev loss
(token-mean negative log-likelihood) and perplexity per epoch, the best epoch by dev loss.

A decoder model (`--model smollm2`, or any causal LM) with a data file that has no label column trains this way:
`adakron train --model smollm2 --train-file alpaca.json`. Without --validation-file a fixed, seeded part of the
training file is held out for the dev loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from .lm import Example, collator, encode_examples, ensure_pad_token, held_out_split, read_examples

METRIC = "nll"  # lower is better: the token-mean negative log-likelihood of the dev completions
HELD_OUT = 0.05  # of the training file, when no --validation-file is given...
MAX_HELD_OUT = 200  # ...but no more than this many examples (dev loss is computed every epoch)
HELD_OUT_SEED = 0  # the same split whatever --seed, so runs with different seeds compare on the same dev set


@dataclass
class CausalData:
    train: list[Example]
    dev: list[Example]

    def __len__(self) -> int:
        return len(self.train)


def read_data(train_file: str, validation_file: str | None, max_train: int | None, max_eval: int | None
              ) -> CausalData:
    train = read_examples(train_file)
    if validation_file:
        dev = read_examples(validation_file)
    else:
        count = max(1, min(MAX_HELD_OUT, round(HELD_OUT * len(train))))
        if len(train) < 2:
            raise UsageError(f"{train_file} holds {len(train)} example(s): pass --validation-file, or give at least "
                             "2 examples so that one can be held out for the dev loss")
        train, dev = held_out_split(train, count, seed=HELD_OUT_SEED)
    return CausalData(train[:max_train] if max_train else train, dev[:max_eval] if max_eval else dev)


def datasets(data: CausalData, tokenizer, max_length: int, template: str = "auto", train_on_prompt: bool = False):
    """Token ids with labels (-100 on prompt tokens unless ``train_on_prompt``), and the padding collator."""
    ensure_pad_token(tokenizer)
    train = encode_examples(tokenizer, data.train, max_length, template, train_on_prompt)
    dev = encode_examples(tokenizer, data.dev, max_length, template, train_on_prompt)
    return train, {"dev": dev}, collator(tokenizer)


def nll_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row (B, 2): the summed next-token NLL over its labelled positions, and their count. Per row, so that
    gathering across processes (which trims padded duplicate rows) stays exact; the full logits (batch x length x
    vocabulary) are never gathered across the dev set."""
    targets = labels[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                                reduction="none")  # (B, T-1), 0 where ignored
    return torch.stack([per_token.sum(1), (targets != -100).sum(1).to(per_token.dtype)], dim=1)


def compute_metrics(eval_pred) -> dict[str, float]:
    sums = np.asarray(eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple)
                      else eval_pred.predictions).reshape(-1, 2).sum(0)
    nll = float(sums[0] / max(sums[1], 1.0))
    return {METRIC: nll, "perplexity": math.exp(min(nll, 700.0))}


def prepare_model(model, method: str, args, adakron_config):
    """``model`` ready to train with ``method``; the LM head is not copied per adapter (tied to the embeddings in
    SmolLM2 and most small LMs; for an untied one it would add vocabulary x hidden trainable parameters)."""
    if method in ("adakron", "adapter"):
        from ..adapters.inject import add_adapter

        return add_adapter(model, adakron_config(args, method).replace(head_modules=()))
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        return get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_r,
                                                lora_alpha=args.lora_alpha, lora_dropout=0.05))
    return model
