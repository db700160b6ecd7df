"""Optimizer parameter groups with a learning rate per adapter factor.

AdaKron's update is a product of three factors (u, v and the up-projection B). Under Adam every
parameter moves by about the learning rate per step whatever its gradient's size, so at the lr that suits
the task head the two down-projections (whose product is quadratic in h) move as fast as B and the product
becomes unstable. Giving the down-projections a fraction of the lr (LoRA+ gives B a multiple of A's for
the same reason) keeps ``lr`` meaning what it means for every other method: the task head's rate.

    groups = adakron.parameter_groups(model, lr=2e-3, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups)                     # or Trainer(..., optimizers=(optimizer, None))
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# The defaults of `parameter_groups` and of `adakron train`, set from benchmarks/recipe.py (RESULTS.md): with one
# lr for all, CoLA and RTE stick at the majority class at lr 4e-3; lr/8 learns there but slowly at lower lrs;
# lr/2 learns at every lr screened, with a higher worst case across the lr grid than lr/8 on each task.
DOWN_LR_RATIO = 0.5
UP_LR_RATIO = 1.0

DOWN, UP, HEAD = "adakron_down", "adakron_up", "head"


@dataclass(frozen=True)
class FactorRates:
    """Learning rates of the two adapter factors, as multiples of the task head's ``lr``."""

    down: float = DOWN_LR_RATIO
    up: float = UP_LR_RATIO

    def __post_init__(self) -> None:
        for name in ("down", "up"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or value == float("inf"):
                raise ValueError(f"the {name}-projection lr ratio ({value!r}) must be a positive number, e.g. 1.0")


def _kind(name: str) -> str:
    # adakron_down, or MAdaKron's adakron_down_outer / adakron_down_inner (its experts).
    parts = name.split(".")
    if any(p == DOWN or p.startswith(DOWN + "_") for p in parts):
        return DOWN
    if UP in parts:
        return UP
    return HEAD


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # As transformers.Trainer does: no weight decay on biases and normalisation weights (1-d tensors).
    return param.ndim < 2 or name.endswith(".bias")


def parameter_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                     down_lr_ratio: float = DOWN_LR_RATIO, up_lr_ratio: float = UP_LR_RATIO) -> list[dict]:
    """The model's trainable parameters, grouped for ``torch.optim.AdamW`` (or any optimizer taking groups).

    Args:
        model: a model with adapters (only parameters with ``requires_grad`` are included).
        lr: the learning rate of the task head and of anything else that trains (LoRA, full fine-tuning).
        weight_decay: applied to weight matrices, not to biases or normalisation weights (as Trainer does).
        down_lr_ratio: the adapters' down-projections (u and v) train at ``lr * down_lr_ratio``.
        up_lr_ratio: the adapters' up-projections (B) train at ``lr * up_lr_ratio``.

    Every group carries ``name`` ("adakron_down", "adakron_up" or "head", with "/no_decay" for the
    parameters without weight decay), ``lr`` and ``weight_decay``; empty groups are left out.
    """
    rates = FactorRates(down_lr_ratio, up_lr_ratio)
    if not lr > 0:
        raise ValueError(f"lr ({lr!r}) must be positive, e.g. 1e-3")
    ratio = {DOWN: rates.down, UP: rates.up, HEAD: 1.0}
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind, bare = _kind(name), _no_decay(name, param)
        group = groups.setdefault((kind, bare), {
            "name": kind + ("/no_decay" if bare else ""), "params": [], "lr": lr * ratio[kind],
            "weight_decay": 0.0 if bare else weight_decay})
        group["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters: add an adapter (adakron.add_adapter) first")
    order = [DOWN, UP, HEAD]
    return [groups[k] for k in sorted(groups, key=lambda k: (order.index(k[0]), k[1]))]
