"""The AdaKron adapter's math, and nothing else: h -> B·act(u ⊗ v) + b, with u, v linear in h."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN

from .config import AdaKronConfig


class KronAdapter(nn.Module):
    """Returns the adapter's update ``B·act(kron(A_f·h + a_f, A_r·h + a_r)) + b``; the caller adds ``h``.

    Both down-projections read the same ``h``, so they live in one ``(f + r/f) x d`` matrix and run as
    one matmul; the first ``f`` outputs are the outer factor ``u``, the rest the inner factor ``v``.
    With ``kron_factor == 1`` there is no product: this is the plain bottleneck adapter.
    """

    def __init__(self, width: int, config: AdaKronConfig, initializer_range: float = 0.02):
        super().__init__()
        self.outer = 0 if config.is_plain_adapter else config.kron_factor
        self.adakron_down = nn.Linear(width, config.down_width)
        self.adakron_up = nn.Linear(config.rank, width)
        self.act = ACT2FN[config.activation]
        self.reset_parameters(config.init, initializer_range, config.outer_bias)

    @torch.no_grad()
    def reset_parameters(self, init: str, initializer_range: float, outer_bias: float = 0.0) -> None:
        for linear in (self.adakron_down, self.adakron_up):
            linear.weight.normal_(0.0, initializer_range)
            linear.bias.zero_()
        if init == "identity":
            self.adakron_up.weight.zero_()
        if self.outer:
            self.adakron_down.bias[: self.outer] = outer_bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        down = self.adakron_down(h)  # (..., f + r/f)
        if self.outer:
            u, v = down[..., : self.outer], down[..., self.outer :]  # (..., f), (..., r/f)
            # k[i*(r/f) + j] = u_i * v_j: torch.kron(u, v) per token, the outer factor first.
            down = (u.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)  # (..., r)
        return self.adakron_up(self.act(down))


def default_initializer_range(model_config) -> float:
    value = getattr(model_config, "initializer_range", None)
    if isinstance(value, (int, float)) and value > 0 and math.isfinite(value):
        return float(value)
    return 0.02
