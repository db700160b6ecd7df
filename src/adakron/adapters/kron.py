"""The AdaKron adapter's math, and nothing else: h -> B·act(u ⊗ v) + b, with u, v linear in h."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN

from .config import AdaKronConfig
from .experts import Experts


def kron_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``k[i*(r/f) + j] = u_i * v_j``: torch.kron(u, v) per token, the outer factor first. (..., f), (..., r/f)
    -> (..., r)."""
    return (u.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)


class KronAdapter(nn.Module):
    """Returns the adapter's update ``B·act(kron(A_f·h + a_f, A_r·h + a_r)) + b``; the caller adds ``h``.

    Both down-projections read the same ``h``, so they live in one ``(f + r/f) x d`` matrix and run as
    one matmul; the first ``f`` outputs are the outer factor ``u``, the rest the inner factor ``v``.
    With ``kron_factor == 1`` there is no product: this is the plain bottleneck adapter.

    With ``num_experts > 1`` (MAdaKron) the down-projections are held apart, ``adakron_down_outer`` (u) and
    ``adakron_down_inner`` (v), the outer one (``experts="outer"``) or both (``"both"``) as ``Experts``;
    ``merge_experts()`` averages them back into the single ``adakron_down`` of a plain AdaKron adapter.
    """

    def __init__(self, width: int, config: AdaKronConfig, initializer_range: float = 0.02):
        super().__init__()
        self.outer = 0 if config.is_plain_adapter else config.kron_factor
        self.has_experts = config.num_experts > 1
        if self.has_experts:
            inner_width = config.rank if config.is_plain_adapter else config.inner_width
            if self.outer:
                self.adakron_down_outer = Experts(width, self.outer, config.num_experts)
            self.adakron_down_inner = Experts(width, inner_width, config.num_experts) \
                if config.experts == "both" else nn.Linear(width, inner_width)
        else:
            self.adakron_down = nn.Linear(width, config.down_width)
        self.adakron_up = nn.Linear(config.rank, width)
        self.act = ACT2FN[config.activation]
        self.reset_parameters(config.init, initializer_range, config.outer_bias)

    def _projections(self) -> list[nn.Module]:
        return [m for m in (getattr(self, n, None) for n in ("adakron_down", "adakron_down_outer",
                                                           "adakron_down_inner", "adakron_up")) if m is not None]

    @torch.no_grad()
    def reset_parameters(self, init: str, initializer_range: float, outer_bias: float = 0.0) -> None:
        for projection in self._projections():
            if isinstance(projection, Experts):
                projection.reset_parameters(initializer_range)
            else:
                projection.weight.normal_(0.0, initializer_range)
                projection.bias.zero_()
        if init == "identity":
            self.adakron_up.weight.zero_()
        if self.outer and self.has_experts:
            for bias in self.adakron_down_outer.biases:
                bias.fill_(outer_bias)
        elif self.outer:
            self.adakron_down.bias[: self.outer] = outer_bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.has_experts:
            v = self.adakron_down_inner(h)  # (..., r/f), or (..., r) for the plain adapter
            k = kron_features(self.adakron_down_outer(h), v) if self.outer else v
        else:
            down = self.adakron_down(h)  # (..., f + r/f)
            k = kron_features(down[..., : self.outer], down[..., self.outer :]) if self.outer else down
        return self.adakron_up(self.act(k))

    @torch.no_grad()
    def merged_down(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single down-projection of the merged adapter, outer rows first."""
        if not self.has_experts:
            return self.adakron_down.weight, self.adakron_down.bias
        parts = [self.adakron_down_outer.average()] if self.outer else []
        inner = self.adakron_down_inner
        parts.append(inner.average() if isinstance(inner, Experts) else (inner.weight, inner.bias))
        return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts])

    @torch.no_grad()
    def merge_experts(self) -> None:
        """Replace the experts by their average, in place: a plain AdaKron adapter, same outputs in eval mode."""
        if not self.has_experts:
            return
        weight, bias = self.merged_down()
        # skip_init: no throwaway init, so merging (also on load) never moves the caller's random state.
        down = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], device=weight.device,
                                        dtype=weight.dtype)
        down.weight.copy_(weight)
        down.bias.copy_(bias)
        down.requires_grad_(self.adakron_up.weight.requires_grad)
        for name in ("adakron_down_outer", "adakron_down_inner"):
            if hasattr(self, name):
                delattr(self, name)
        self.adakron_down = down
        self.has_experts = False

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict the merged adapter would have, without changing this one."""
        weight, bias = self.merged_down()
        return {"adakron_down.weight": weight, "adakron_down.bias": bias,
                "adakron_up.weight": self.adakron_up.weight, "adakron_up.bias": self.adakron_up.bias}


def default_initializer_range(model_config) -> float:
    value = getattr(model_config, "initializer_range", None)
    if isinstance(value, (int, float)) and value > 0 and math.isfinite(value):
        return float(value)
    return 0.02
