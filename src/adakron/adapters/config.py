"""AdaKronConfig: what one adapter is, validated on construction, stored as adapter_config.json."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PLACEMENTS = ("ffn", "houlsby")
INITS = ("reference", "identity")
EXPERT_SITES = ("outer", "both")
PROBLEM_TYPES = ("single_label_classification", "regression")


def _activation_names() -> list[str]:
    from transformers.activations import ACT2FN

    return sorted(ACT2FN)


@dataclass(frozen=True)
class AdaKronConfig:
    """One AdaKron adapter and its task head.

    ``rank`` is the width after the Kronecker product; it is split into a factor of width ``kron_factor``
    (the outer index) and one of width ``rank // kron_factor``. ``kron_factor=1`` is the plain bottleneck
    adapter (Houlsby/Pfeiffer): a single down-projection of width ``rank``.
    """

    rank: int = field(default=16, metadata={"help": "Adapter width r after the Kronecker product."})
    kron_factor: int = field(
        default=4, metadata={"help": "Width f of the outer factor; the inner factor has r/f. 1 = plain adapter."}
    )
    activation: str = field(default="gelu", metadata={"help": "Non-linearity after the product (ACT2FN key)."})
    placement: str = field(
        default="ffn",
        metadata={"help": "'ffn': one adapter per layer on the feed-forward output (paper); "
                  "'houlsby': also on the attention output projection."},
    )
    target_modules: str | tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Regex (full match) or list of module names/suffixes; None = defaults for the model."},
    )
    # The defaults of init, outer_bias (and optim's lr ratios) are the recipe benchmarks/recipe.py chose: the
    # authors' init stuck at the majority class on CoLA and RTE at the lr where LoRA does best (RESULTS.md).
    init: str = field(
        default="identity",
        metadata={"help": "'identity': up-projection zeroed, so the model starts as the base model (exactly in "
                  "fp32; up to rounding on bf16/fp16, where the head copies compute in fp32); 'reference': "
                  "N(0, initializer_range) weights, zero biases (as the paper's code)."},
    )
    outer_bias: float = field(
        default=1.0,
        metadata={"help": "Initial value of the outer factor's bias a1 (u = A1·h + a1). 0 is the paper's code; a "
                  "non-zero value opens a path linear in h at step 0 (u ~ a1, so k ~ a1·v), instead of a "
                  "product of two small factors that starts on a plateau. Ignored by the plain adapter."},
    )
    num_experts: int = field(
        default=1,
        metadata={"help": "MAdaKron: copies of the down-projection(s), one drawn at random per training step and "
                  "averaged for inference (merge_experts); 1 = AdaKron. The authors use 4."},
    )
    experts: str = field(
        default="outer",
        metadata={"help": "With num_experts > 1: 'outer' puts experts on the f-wide factor only (Partial "
                  "MAdaKron), 'both' on both down-projections (Full). The up-projection is always shared."},
    )
    initializer_range: float | None = field(
        default=None, metadata={"help": "Std of the 'reference' init; None = the model config's initializer_range."}
    )
    head_modules: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Modules trained with the adapter (the task head), by path; None = every module "
                  "outside the base model that owns parameters, plus the base model's pooler (BERT, ALBERT)."},
    )
    num_labels: int | None = field(default=None, metadata={"help": "Outputs of this adapter's head; None = model's."})
    label_names: tuple[str, ...] | None = field(default=None, metadata={"help": "Class names, by class index."})
    problem_type: str | None = field(
        default=None, metadata={"help": "'single_label_classification' or 'regression'; None = from num_labels."}
    )

    def __post_init__(self) -> None:
        # Lists arrive from JSON and from users; tuples keep the frozen config hashable and comparable.
        for name in ("target_modules", "head_modules", "label_names"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        targets = self.target_modules
        if targets is not None and not (isinstance(targets, str) or _strings(targets)):
            raise ValueError(f"`target_modules` ({self.target_modules!r}) must be a regex string or a list of module "
                             "names, e.g. '.*\\.output\\.dense' or ['output.dense'].")
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"`target_modules` ({targets!r}) is not a valid regular expression ({e}).") from None
        for name in ("head_modules", "label_names"):
            value = getattr(self, name)
            if value is not None and not _strings(value):
                raise ValueError(f"`{name}` ({value!r}) must be a list of strings or null.")
        for name in ("activation", "placement", "init", "experts"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"`{name}` ({getattr(self, name)!r}) must be a string.")
        if self.initializer_range is not None and (isinstance(self.initializer_range, bool) or not isinstance(
                self.initializer_range, (int, float))):
            raise ValueError(f"`initializer_range` ({self.initializer_range!r}) must be a number or null, e.g. 0.02.")
        for name in ("rank", "kron_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` ({value!r}) must be a positive integer, e.g. rank=16, kron_factor=4.")
        if self.rank % self.kron_factor:
            raise ValueError(
                f"`rank` ({self.rank}) must be divisible by `kron_factor` ({self.kron_factor}); "
                f"try rank={self.kron_factor * max(1, round(self.rank / self.kron_factor))}."
            )
        if self.activation not in _activation_names():
            raise ValueError(
                f"`activation` ({self.activation!r}) is not a known activation; use one of: "
                f"{', '.join(_activation_names())}."
            )
        if self.placement not in PLACEMENTS:
            raise ValueError(f"`placement` ({self.placement!r}) must be one of {PLACEMENTS}.")
        if self.init not in INITS:
            raise ValueError(f"`init` ({self.init!r}) must be one of {INITS}.")
        if isinstance(self.outer_bias, bool) or not isinstance(self.outer_bias, (int, float)) \
                or not math.isfinite(self.outer_bias):
            raise ValueError(f"`outer_bias` ({self.outer_bias!r}) must be a finite number, e.g. 0.0 or 1.0.")
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 1:
            raise ValueError(f"`num_experts` ({self.num_experts!r}) must be a positive integer (1 = AdaKron, 4 = the "
                             "authors' MAdaKron).")
        if self.experts not in EXPERT_SITES:
            raise ValueError(f"`experts` ({self.experts!r}) must be one of {EXPERT_SITES}.")
        if self.num_experts > 1 and self.is_plain_adapter and self.experts == "outer":
            raise ValueError("the plain adapter (kron_factor=1) has no outer factor to give experts; use "
                             "experts='both' (experts on its down-projection).")
        if self.initializer_range is not None and not self.initializer_range > 0:
            raise ValueError(f"`initializer_range` ({self.initializer_range!r}) must be > 0, e.g. 0.02.")
        if self.num_labels is not None and (not isinstance(self.num_labels, int) or self.num_labels <= 0):
            raise ValueError(f"`num_labels` ({self.num_labels!r}) must be a positive integer (1 for regression).")
        if self.label_names is not None and self.num_labels is not None and len(self.label_names) != self.num_labels:
            raise ValueError(
                f"`label_names` has {len(self.label_names)} names but `num_labels` is {self.num_labels}; "
                "give one name per class."
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"`problem_type` ({self.problem_type!r}) must be one of {PROBLEM_TYPES}.")

    @property
    def inner_width(self) -> int:
        return self.rank // self.kron_factor

    @property
    def is_plain_adapter(self) -> bool:
        return self.kron_factor == 1

    @property
    def down_width(self) -> int:
        """Outputs of the fused down-projection: f + r/f (or r for the plain adapter)."""
        return self.rank if self.is_plain_adapter else self.kron_factor + self.inner_width

    def adapter_parameters(self, width: int) -> int:
        """Parameters of one adapter on a sub-layer of output width ``width`` (closed form), experts included."""
        outer = 0 if self.is_plain_adapter else self.kron_factor
        inner = self.down_width - outer
        outer_copies = self.num_experts
        inner_copies = self.num_experts if self.experts == "both" else 1
        return (outer_copies * outer + inner_copies * inner) * (width + 1) + self.rank * width + width

    def replace(self, **changes: Any) -> AdaKronConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaKronConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown AdaKronConfig keys: %s", ", ".join(unknown))
        # A config written before a field existed was made with that field's value of then, not today's default.
        return cls(**{**LEGACY_VALUES, **{k: v for k, v in data.items() if k in known}})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdaKronConfig:
        return cls.from_dict(json.loads(text))


# Fields added after configs were first saved, with the value every earlier adapter was made with.
LEGACY_VALUES = {"outer_bias": 0.0}

# Keys that adapter_config.json carries beside the config fields (written by checkpoint.save_adapter).
METADATA_KEYS = frozenset(
    {"format_version", "adakron_version", "base_model_name_or_path", "model_type", "architecture",
     "adapter_name", "weights_sha256"}
)


def _strings(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, str) for v in value)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
