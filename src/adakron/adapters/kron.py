"""The AdaKron adapter's math, and nothing else: h -> B·act(u ⊗ v) + b, with u, v linear in h."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .config import AdaKronConfig
from .experts import Experts


def kron_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``k[i*(r/f) + j] = u_i * v_j``: torch.kron(u, v) per token, the outer factor first. (..., f), (..., r/f)
    -> (..., r)."""
    return (u.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)


# Where the down-projection lives in an adapter file: AdaKron's u and v fused into one matrix, outer rows first, the
# layout of every adapter saved so far (and the one-factor adapter's own module).
FUSED_DOWN = "adakron_down"
OUTER, INNER = "adakron_down_outer", "adakron_down_inner"


class KronAdapter(nn.Module):
    """Returns the adapter's update ``B·act(kron(A_f·h + a_f, A_r·h + a_r)) + b``; the caller adds ``h``.

    The two down-projections are modules of their own, ``adakron_down_outer`` (u, width ``f``) and
    ``adakron_down_inner`` (v, width ``r/f``), so that an optimizer can give them different learning rates
    (``adakron.parameter_groups``); both read the same ``h``, so they still run as one matmul. The module's
    state dict holds them apart (the parameters themselves, as torch promises); adapter files hold them fused,
    as ``adakron_down.weight`` / ``.bias`` (outer rows first, ``saved_state_dict``), the layout of every file
    saved so far, and ``load_state_dict`` takes either layout.
    With ``kron_factor == 1`` there is no product: this is the plain bottleneck adapter, one ``adakron_down``.

    With ``num_experts > 1`` (MAdaKron) the outer projection (``experts="outer"``) or both (``"both"``) are
    ``Experts``, and state dicts hold them apart (to go on training); ``merge_experts()`` averages them into
    the plain AdaKron adapter.
    """

    def __init__(self, width: int, config: AdaKronConfig, initializer_range: float = 0.02):
        super().__init__()
        self.outer = 0 if config.is_plain_adapter else config.kron_factor
        self.has_experts = config.num_experts > 1
        inner_width = config.rank if config.is_plain_adapter else config.inner_width
        if self.has_experts:
            if self.outer:
                self.adakron_down_outer = Experts(width, self.outer, config.num_experts)
            self.adakron_down_inner = Experts(width, inner_width, config.num_experts) \
                if config.experts == "both" else nn.Linear(width, inner_width)
        elif self.outer:
            self.adakron_down_outer = nn.Linear(width, self.outer)
            self.adakron_down_inner = nn.Linear(width, inner_width)
        else:
            self.adakron_down = nn.Linear(width, config.down_width)
        self.adakron_up = nn.Linear(config.rank, width)
        self.act = ACT2FN[config.activation]
        self.reset_parameters(config.init, initializer_range, config.outer_bias)
        self.register_load_state_dict_pre_hook(_split_down)

    @property
    def split(self) -> bool:
        """u and v held as two plain projections (AdaKron without experts): saved fused."""
        return bool(self.outer) and not self.has_experts

    def _projections(self) -> list[nn.Module]:
        return [m for m in (getattr(self, n, None) for n in (FUSED_DOWN, OUTER, INNER, "adakron_up"))
                if m is not None]

    @torch.no_grad()
    def reset_parameters(self, init: str, initializer_range: float, outer_bias: float = 0.0) -> None:
        if self.split:
            # Drawn as one matrix and cut, so a seed gives the weights it gave when u and v were one module.
            inner = self.adakron_down_inner
            fused = inner.weight.new_empty(self.outer + inner.out_features, inner.in_features)
            fused.normal_(0.0, initializer_range)
            self.adakron_down_outer.weight.copy_(fused[: self.outer])
            self.adakron_down_inner.weight.copy_(fused[self.outer :])
            self.adakron_down_outer.bias.fill_(outer_bias)
            self.adakron_down_inner.bias.zero_()
            projections = [self.adakron_up]
        else:
            projections = self._projections()
        for projection in projections:
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

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.split:
            # One matmul for both factors; the concatenation copies (f + r/f) x d numbers, nothing next to it.
            weight, bias = self.merged_down()
            down = F.linear(h, weight, bias)  # (..., f + r/f)
            k = kron_features(down[..., : self.outer], down[..., self.outer :])
        elif self.has_experts:
            v = self.adakron_down_inner(h)  # (..., r/f), or (..., r) for the plain adapter
            k = kron_features(self.adakron_down_outer(h), v) if self.outer else v
        else:
            k = self.adakron_down(h)
        return self.adakron_up(self.act(k))

    def merged_down(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single down-projection (outer rows first): the experts averaged, u and v fused."""
        if not self.outer and not self.has_experts:
            return self.adakron_down.weight, self.adakron_down.bias
        parts = []
        for name in (OUTER, INNER) if self.outer else (INNER,):
            part = getattr(self, name)
            parts.append(part.average() if isinstance(part, Experts) else (part.weight, part.bias))
        return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts])

    @torch.no_grad()
    def merge_experts(self) -> None:
        """Replace the experts by their average, in place: a plain AdaKron adapter, same outputs in eval mode."""
        if not self.has_experts:
            return
        weight, bias = self.merged_down()
        if self.outer:
            rows = {OUTER: slice(0, self.outer), INNER: slice(self.outer, None)}
        else:
            rows = {FUSED_DOWN: slice(None)}
        for name in (OUTER, INNER):
            if hasattr(self, name):
                delattr(self, name)
        for name, part in rows.items():
            # skip_init: no throwaway init, so merging (also on load) never moves the caller's random state.
            linear = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight[part].shape[0],
                                              device=weight.device, dtype=weight.dtype)
            linear.weight.copy_(weight[part])
            linear.bias.copy_(bias[part])
            linear.requires_grad_(self.adakron_up.weight.requires_grad)
            setattr(self, name, linear)
        self.has_experts = False

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict the merged adapter would have in a file, without changing this one."""
        with torch.no_grad():
            weight, bias = self.merged_down()
        return {f"{FUSED_DOWN}.weight": weight, f"{FUSED_DOWN}.bias": bias,
                "adakron_up.weight": self.adakron_up.weight, "adakron_up.bias": self.adakron_up.bias}

    def saved_state_dict(self, merged: bool = False) -> dict[str, torch.Tensor]:
        """This adapter as an adapter file holds it: u and v fused (copies); MAdaKron's experts apart unless
        ``merged``."""
        return self.merged_state_dict() if merged or self.split else self.state_dict()


def _split_down(module: KronAdapter, state: dict, prefix: str, local_metadata, strict, missing, unexpected,
                error_msgs: list[str]) -> None:
    """Loads the fused layout of adapter files (and of checkpoints written before u and v were apart) into u and
    v; a wrong number of rows is a size mismatch, as it would be for any parameter, strict or not."""
    if not module.split:
        return
    rows = module.outer + module.adakron_down_inner.out_features
    for kind in ("weight", "bias"):
        fused = state.pop(f"{prefix}{FUSED_DOWN}.{kind}", None)
        if fused is None:
            continue
        if fused.shape[0] != rows:
            error_msgs.append(f"size mismatch for {prefix}{FUSED_DOWN}.{kind}: the checkpoint has {fused.shape[0]} "
                              f"rows, this adapter {rows} (f={module.outer} + r/f={rows - module.outer})")
            continue
        state[f"{prefix}{OUTER}.{kind}"] = fused[: module.outer]
        state[f"{prefix}{INNER}.{kind}"] = fused[module.outer :]


def default_initializer_range(model_config) -> float:
    value = getattr(model_config, "initializer_range", None)
    if isinstance(value, (int, float)) and value > 0 and math.isfinite(value):
        return float(value)
    return 0.02
