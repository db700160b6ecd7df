"""What adakron keeps on a model, and which adapter is active: the base that injection, switching and
checkpoints all build on (so none of them imports another to get at it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import AdaKronConfig
from .layer import AdaKronLayer, TaskHeads

STATE_ATTR = "adakron_state"


@dataclass
class AdapterState:
    """What adakron keeps on a model: each adapter's resolved config, and how the bare model was."""

    configs: dict[str, AdaKronConfig] = field(default_factory=dict)
    sites: dict[str, list[str]] = field(default_factory=dict)
    active: str | None = None
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    base_labels: dict[str, Any] = field(default_factory=dict)


def state_of(model: nn.Module) -> AdapterState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("This model has no AdaKron adapters; call adakron.add_adapter(model, config) first.")
    return state


def adapter_names(model: nn.Module) -> list[str]:
    state = getattr(model, STATE_ATTR, None)
    return list(state.configs) if state else []


def adakron_layers(model: nn.Module) -> list[AdaKronLayer]:
    return [m for m in model.modules() if isinstance(m, AdaKronLayer)]


def task_heads(model: nn.Module) -> list[TaskHeads]:
    return [m for m in model.modules() if isinstance(m, TaskHeads)]


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the adapter (and head) every forward uses; None runs the bare model."""
    state = state_of(model)
    if name is not None and name not in state.configs:
        raise ValueError(f"No adapter named {name!r}; adapters: {adapter_names(model)}.")
    for module in (*adakron_layers(model), *task_heads(model)):
        module.active_adapter = name
    state.active = name
    _apply_labels(model, _labels_for(model, name))


def active_adapter(model: nn.Module) -> str | None:
    return state_of(model).active


def _labels_for(model: nn.Module, name: str | None) -> dict[str, Any]:
    state = state_of(model)
    if name is None:
        return state.base_labels
    config = state.configs[name]
    return {
        "num_labels": config.num_labels,
        "id2label": dict(enumerate(config.label_names)),
        "label2id": {label: i for i, label in enumerate(config.label_names)},
        "problem_type": config.problem_type,
    }


def _apply_labels(model: nn.Module, labels: dict[str, Any]) -> None:
    # The model's forward picks its loss from these, so they must follow the head in use.
    model.config.id2label = dict(labels["id2label"])
    model.config.label2id = dict(labels["label2id"])
    model.config.problem_type = labels["problem_type"]
    if hasattr(model, "num_labels"):
        model.num_labels = labels["num_labels"]
