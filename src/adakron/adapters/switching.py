"""Several adapters on one backbone: pick one, switch all off, or route each row of a batch to its own."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .state import active_adapter, adakron_layers, adapter_names, set_active_adapter, state_of, task_heads


@contextmanager
def use_adapter(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run the block with adapter ``name`` and its head active; the previous choice comes back after."""
    previous = active_adapter(model)
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        set_active_adapter(model, previous)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block exactly as the base model (original head included)."""
    previous = active_adapter(model)
    set_active_adapter(model, None)
    modules = (*adakron_layers(model), *task_heads(model))
    for module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for module in modules:
            module.disabled = False
        set_active_adapter(model, previous)


@contextmanager
def route_rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row ``i`` of every batch runs through adapter ``names[i]`` and its head
    (None: the bare model). Head outputs of different widths are zero-padded to the widest."""
    known = set(adapter_names(model))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"Unknown adapters {unknown}; adapters: {sorted(known)}.")
    device = next(model.parameters()).device
    groups = [
        (name, torch.tensor([i for i, n in enumerate(names) if n == name], device=device))
        for name in dict.fromkeys(names)
    ]
    modules = (*adakron_layers(model), *task_heads(model))
    for module in modules:
        module.row_groups = groups
    try:
        yield model
    finally:
        for module in modules:
            module.row_groups = None


@torch.no_grad()
def predict(model: nn.Module, batch: dict[str, torch.Tensor], adapter_names: Sequence[str | None]) -> list[
        torch.Tensor]:
    """One forward pass in which each row uses its own adapter and head; returns each row's logits
    (width = that adapter's ``num_labels``; None rows get the bare model's)."""
    if len(adapter_names) != len(next(iter(batch.values()))):
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of "
                         f"{len(next(iter(batch.values())))} rows; give one per row.")
    state = state_of(model)
    was_training = model.training
    model.eval()  # inference: no dropout
    try:
        with route_rows(model, adapter_names):
            logits = model(**batch).logits
    finally:
        model.train(was_training)
    widths = [state.configs[n].num_labels if n is not None else state.base_labels["num_labels"]
              for n in adapter_names]
    return [row[:width] for row, width in zip(logits, widths)]
