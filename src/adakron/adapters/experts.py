"""MAdaKron's experts (the authors' mixture-of-experts AdaKron, after AdaMix): several copies of a down-projection,
one drawn at random per training forward pass, averaged into one projection for inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """``num_experts`` linear maps ``in_features -> out_features``.

    In training mode each forward pass draws one expert uniformly at random (torch's global generator, so a
    seeded run draws the same sequence) and the whole batch uses it; ``last_expert`` says which. Each expert is a
    Parameter of its own, so the ones not drawn get no gradient and the optimizer leaves them alone that step
    (as AdaMix's separate modules; a stacked tensor would get zero gradients, and AdamW would still move it by
    its momentum and weight decay). In eval mode the output is that of the average expert (weights and biases
    averaged), exactly what ``average()`` gives the merged adapter: evaluating an unmerged adapter is evaluating
    the merged one.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(out_features, in_features))
                                        for _ in range(num_experts))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(out_features)) for _ in range(num_experts))
        self.last_expert: int | None = None

    @property
    def num_experts(self) -> int:
        return len(self.weights)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.last_expert = int(torch.randint(self.num_experts, ()))
            return F.linear(h, self.weights[self.last_expert], self.biases[self.last_expert])
        return F.linear(h, *self.average())

    def average(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged projection's (weight, bias): the uniform average of the experts'."""
        return torch.stack(list(self.weights)).mean(0), torch.stack(list(self.biases)).mean(0)

    @torch.no_grad()
    def reset_parameters(self, std: float, bias: float = 0.0) -> None:
        for weight, b in zip(self.weights, self.biases):  # every expert drawn independently
            weight.normal_(0.0, std)
            b.fill_(bias)


def merge_experts(model: nn.Module, name: str | None = None) -> None:
    """Turn MAdaKron adapter ``name`` (default: the active one) into a plain AdaKron adapter, in place: each
    layer's experts are averaged into one down-projection, with exactly AdaKron's cost and checkpoint layout.
    Outputs in eval mode do not change; an adapter without experts is left as it is."""
    from .state import adakron_layers, adapter_names, state_of

    state = state_of(model)
    name = name or state.active
    if name not in state.configs:
        raise ValueError(f"No adapter named {name!r}; adapters: {adapter_names(model)}.")
    for layer in adakron_layers(model):
        if name in layer.adakron_adapters:
            layer.adakron_adapters[name].merge_experts()
    state.configs[name] = merged_config(state.configs[name])


def merged_config(config):
    """The config of the merged adapter: one expert, the rest as it was."""
    from dataclasses import fields

    default = next(f.default for f in fields(config) if f.name == "experts")
    return config.replace(num_experts=1, experts=default)
