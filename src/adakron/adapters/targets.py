"""Where adapters go: default target modules per model type, and name matching. The only file that
knows model families."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

WRAPPABLE = (nn.Linear, Conv1D)

# model_type -> (feed-forward output projection, attention output projection), as full-match regexes.
# The adapter sits on the projection's output, so the model's own dropout, residual add and
# LayerNorm follow it, as in the reference. Plain suffixes would be wrong: BERT's "output.dense"
# also ends "attention.output.dense", GPT-2's "c_proj" is in both attn and mlp.
_BERT_LIKE = (r".*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.attention\.output\.dense")
_DECODER = (r".*\.layers\.\d+\.mlp\.down_proj", r".*\.layers\.\d+\.self_attn\.o_proj")
DEFAULT_TARGETS: dict[str, tuple[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta": _BERT_LIKE,
    "deberta-v2": _BERT_LIKE,
    "distilbert": (r".*\.layer\.\d+\.ffn\.lin2", r".*\.layer\.\d+\.attention\.out_lin"),
    "gpt2": (r".*\.h\.\d+\.mlp\.c_proj", r".*\.h\.\d+\.attn\.c_proj"),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "bart": (r".*\.layers\.\d+\.fc2", r".*\.layers\.\d+\.self_attn\.out_proj"),
    "t5": (r".*\.DenseReluDense\.wo", r".*\.SelfAttention\.o"),
}

# Families whose classification and multiple-choice heads read the base model's pooler. Other models may
# build a pooler they never read (BigBird): training that would add dead parameters.
POOLED_HEAD_TYPES = frozenset({"bert", "albert", "megatron-bert", "ernie", "layoutlm", "mobilebert"})
POOLED_HEAD_CLASSES = ("ForSequenceClassification", "ForMultipleChoice")


def reads_pooler(model: nn.Module) -> bool:
    return (getattr(getattr(model, "config", None), "model_type", None) in POOLED_HEAD_TYPES
            and type(model).__name__.endswith(POOLED_HEAD_CLASSES))


def default_patterns(model_type: str, placement: str) -> list[str]:
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"No default adapter placement for model type {model_type!r}; pass target_modules (a regex or a "
            f"list of module names). `adakron targets <model>` lists the candidates. Known types: "
            f"{', '.join(sorted(DEFAULT_TARGETS))}."
        )
    ffn, attention = DEFAULT_TARGETS[model_type]
    return [ffn, attention] if placement == "houlsby" else [ffn]


def matches(name: str, target: str | Iterable[str]) -> bool:
    """A string is a regex that must match the whole name; a list holds exact names or dotted suffixes."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def candidate_names(model: nn.Module, limit: int = 20) -> list[str]:
    """Wrappable module names with layer numbers folded to '*', for error messages and `adakron targets`."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, WRAPPABLE):
            seen.setdefault(re.sub(r"\.\d+\.", ".*.", name))
    return list(seen)[:limit]


def output_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    raise TypeError(f"{type(module).__name__} cannot hold an AdaKron adapter (only nn.Linear and Conv1D).")
