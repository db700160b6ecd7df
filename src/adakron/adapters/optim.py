"""Optimizer parameter groups with a learning rate per adapter factor.

AdaKron's update is a product of three factors (u, v and the up-projection B). Under Adam every
parameter moves by about the learning rate per step whatever its gradient's size, so at the lr that suits
the task head the two down-projections (whose product is quadratic in h) move as fast as B and the product
becomes unstable. Giving the down-projections a fraction of the lr (LoRA+ gives B a multiple of A's for
the same reason) keeps ``lr`` meaning what it means for every other method: the task head's rate. The outer
factor u (``kron_factor`` wide) gets a rate of its own, lower still: it scales every one of v's products.

    groups = adakron.parameter_groups(model, lr=2e-3, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups)                     # or Trainer(..., optimizers=(optimizer, None))
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .kron import KronAdapter

# The defaults of `parameter_groups` and of `adakron train`, set from benchmarks/recipe.py and the GLUE grid
# (RESULTS.md). With one lr for all, CoLA and RTE stuck at the majority class at lr 4e-3. u, v at lr/8 learned there
# but slowly at lower lrs. u, v at lr/2 with B at lr learned at every lr on seed 42, but at lr 4e-3 (its choice on
# MRPC) CoLA stuck at the majority class on seeds 43 and 44: by step 300 the update was 33 times ||h|| in layer 3
# and one vector for every token in layers 4-6 (benchmarks/collapse_probe.py, seed 43). Halving both (u, v at
# lr/4, B at lr/2) learned on all three seeds, but more slowly (RTE at the majority class on seeds 43 and 44). Slowing
# u alone to lr/8 instead, v at lr/2 and B at lr, kept the update below ||h|| on both collapsing seeds, learned CoLA
# on all three (23.3 / 24.9 / 24.1) and RTE above the majority class on all three (59.2 / 55.6 / 55.2), and gave the
# best GLUE-5 average of any AdaKron r=16 recipe, 67.5 against 66.9 for lr/4 and lr/2 and LoRA's 67.3 (RESULTS.md).
DOWN_LR_RATIO = 0.5
UP_LR_RATIO = 1.0
# The up-projection sums r hidden units, each moved by about the lr per Adam step, so the update moves further per
# step the larger r is: above rank 32 both ratios scale by 32/r. That gives rank 48 u, v at lr/6 and B at lr/3, the
# rates it learned CoLA with on all three seeds at lr 4e-3 under the recipe before this one (u, v at lr/4, B at lr/2;
# with lr/2 and lr unscaled it stuck at the majority class). This recipe at rank 48 (u at lr/12, v at lr/3, B at
# 2lr/3) is not measured on the GLUE grid. Rank 16 is the one measured: every other rank up to 32 gets its ratios
# untested, and below 32 the ratios are never raised.
REFERENCE_RANK = 32
# The outer factor u's rate (FactorRates.outer = None would give u v's, the down-projections' rate).
OUTER_LR_RATIO = 0.125

# The capped recipe (`adakron train --recipe capped`; the recipe study's `id-bias1-capped`): the default's factor
# rates at lr 4e-3, where it learned CoLA and RTE on every seed, become caps in absolute terms, and each factor trains
# at min(lr, its cap). At lr 4e-3 it is the default; at lower lrs u and v move faster (at 5e-4, as fast as B and the
# head), where the default fitted RTE more slowly than LoRA (train loss 0.640 against 0.605, seeds 42-44).
DOWN_LR_MAX = 4e-3 * DOWN_LR_RATIO
OUTER_LR_MAX = 4e-3 * OUTER_LR_RATIO

DOWN, OUTER, UP, HEAD = "adakron_down", "adakron_down_outer", "adakron_up", "head"


def _positive_number(value) -> bool:
    """A real number above 0 and below infinity (not a bool, a string or NaN): what a rate or a ratio must be."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < float("inf")


@dataclass(frozen=True)
class FactorRates:
    """Learning rates of the adapter factors, as multiples of the task head's ``lr``: the down-projections (u and
    v), the up-projection (B), and u where it differs from v (``outer``; None: as ``down``)."""

    down: float = DOWN_LR_RATIO
    up: float = UP_LR_RATIO
    outer: float | None = OUTER_LR_RATIO

    def __post_init__(self) -> None:
        for name in ("down", "up", "outer"):
            value = getattr(self, name)
            if name == "outer" and value is None:
                continue
            if not _positive_number(value):
                raise ValueError(f"the {name}-projection lr ratio ({value!r}) must be a positive number, e.g. 1.0")


def rank_scale(rank: int) -> float:
    """What the default recipe's factor rates are multiplied by for an adapter of size ``rank``: min(1, 32 / rank)."""
    return min(1.0, REFERENCE_RANK / rank)


def default_rates(rank: int) -> FactorRates:
    """The default recipe's factor rates for an adapter of size ``rank``: times ``rank_scale(rank)``."""
    scale = rank_scale(rank)
    return FactorRates(DOWN_LR_RATIO * scale, UP_LR_RATIO * scale, OUTER_LR_RATIO * scale)


def _adapter_parameters(model: nn.Module) -> dict[int, tuple[str, int]]:
    """id of each adapter parameter -> (its factor, the size r of its adapter). Classified by the name inside the
    adapter module (adakron_down, adakron_down_outer / _inner, plain or MAdaKron's experts, adakron_up), so that an
    adapter or module named like a factor cannot steer the parameters around it into a factor's group. u
    (``adakron_down_outer``) is a factor of its own; v (``adakron_down_inner``) is one of the down-projections."""
    found = {}
    for module in model.modules():
        if not isinstance(module, KronAdapter):
            continue
        up = module.adakron_up
        for name, param in module.named_parameters():
            first = name.split(".")[0]
            kind = UP if first == UP else OUTER if first == OUTER else \
                DOWN if first == DOWN or first.startswith(DOWN + "_") else HEAD
            found[id(param)] = (kind, up.in_features)
    return found


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # As transformers.Trainer does: no weight decay on biases and normalisation weights (1-d tensors).
    return param.ndim < 2 or name.endswith(".bias")


def outer_ratio(outer_lr_ratio: float | None, down_lr_ratio: float | None, default: float) -> float:
    """u's ratio: its own where given; else a down ratio given alone, which has always meant u and v; else the
    recipe's ``default``. The one place this rule lives (``parameter_groups`` and ``adakron train`` read it, and
    ``adakron train`` reads u's rate cap by it too)."""
    if outer_lr_ratio is not None:
        return outer_lr_ratio
    return default if down_lr_ratio is None else down_lr_ratio


def parameter_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                     down_lr_ratio: float | None = None, up_lr_ratio: float | None = None,
                     outer_lr_ratio: float | None = None, down_lr_max: float | None = None,
                     outer_lr_max: float | None = None) -> list[dict]:
    """The model's trainable parameters, grouped for ``torch.optim.AdamW`` (or any optimizer taking groups).

    Args:
        model: a model with adapters (only parameters with ``requires_grad`` are included).
        lr: the learning rate of the task head and of anything else that trains (LoRA, full fine-tuning).
        weight_decay: applied to weight matrices, not to biases or normalisation weights (as Trainer does).
        down_lr_ratio: the adapters' down-projections (v, and u unless ``outer_lr_ratio`` says otherwise) train at
            ``lr * down_lr_ratio``; None: the default recipe's for each adapter's rank (``default_rates``: 0.5 up to
            rank 32, 0.5 * 32 / r above).
        up_lr_ratio: the adapters' up-projections (B) train at ``lr * up_lr_ratio``; None: as above (1.0 up to
            rank 32, 32 / r above). A ratio given is used as it is, at every rank.
        outer_lr_ratio: AdaKron's outer factor u (the ``kron_factor``-wide one) trains at ``lr * outer_lr_ratio``;
            None: ``down_lr_ratio`` where that is given (the down-projections' ratio has always meant u and v),
            else the default recipe's (``default_rates``: 0.125 up to rank 32, 0.125 * 32 / r above).
        down_lr_max: a cap on v's rate (and u's unless ``outer_lr_max`` is given), in absolute terms: v trains at
            ``min(lr * down_lr_ratio, down_lr_max)``. The factors' stable step size does not grow with the head's
            lr, so a cap keeps them there at a high lr while a low lr trains them at the head's pace
            (``adakron train --recipe capped``). None: no cap. A cap is used as given, at every rank (``adakron
            train --recipe capped`` scales its caps above rank 32 as it scales its ratios).
        outer_lr_max: the same cap for u alone; None: ``down_lr_max``.

    Every group carries ``name`` ("adakron_down", "adakron_down_outer" where u's rate differs from v's,
    "adakron_up" or "head", with "/no_decay" for the parameters without weight decay, and "@r48" where adapters
    of several ranks get different rates), ``lr`` and ``weight_decay``; empty groups are left out.
    """
    FactorRates(DOWN_LR_RATIO if down_lr_ratio is None else down_lr_ratio,
                UP_LR_RATIO if up_lr_ratio is None else up_lr_ratio, outer_lr_ratio)  # checks what was given
    if not lr > 0:
        raise ValueError(f"lr ({lr!r}) must be positive, e.g. 1e-3")
    for name, cap in (("down_lr_max", down_lr_max), ("outer_lr_max", outer_lr_max)):
        if cap is not None and not _positive_number(cap):
            raise ValueError(f"{name} ({cap!r}) must be a positive learning rate, e.g. 2e-3, or None for no cap")
    caps = {DOWN: down_lr_max, OUTER: down_lr_max if outer_lr_max is None else outer_lr_max}
    adapter = _adapter_parameters(model)

    def ratio(kind: str, rank: int | None) -> float:
        if kind == HEAD:
            return 1.0
        rates = default_rates(rank)
        down = rates.down if down_lr_ratio is None else down_lr_ratio
        if kind == OUTER:
            return outer_ratio(outer_lr_ratio, down_lr_ratio, rates.outer)
        if kind == DOWN:
            return down
        return rates.up if up_lr_ratio is None else up_lr_ratio

    def rate(kind: str, rank: int | None) -> float:
        uncapped = lr * ratio(kind, rank)
        return uncapped if caps.get(kind) is None else min(uncapped, caps[kind])

    groups: dict[tuple[str, bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (kind, rank), bare = adapter.get(id(param), (HEAD, None)), _no_decay(name, param)
        lr_ = rate(kind, rank)
        if kind == OUTER and lr_ == rate(DOWN, rank):
            kind = DOWN  # u at v's rate: one group for both down-projections
        group = groups.setdefault((kind, bare, lr_), {
            "name": kind + ("/no_decay" if bare else ""), "params": [], "lr": lr_,
            "weight_decay": 0.0 if bare else weight_decay, "rank": rank})
        group["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters: add an adapter (adakron.add_adapter) first")
    # One rate per kind is the usual case; adapters of several ranks at different rates get their rank in the name.
    for kind, bare in {(k, b) for k, b, _ in groups}:
        same = [g for (k, b, _), g in groups.items() if (k, b) == (kind, bare)]
        for group in same if len(same) > 1 else ():
            group["name"] += f"@r{group['rank']}"
    order = [DOWN, OUTER, UP, HEAD]
    keys = sorted(groups, key=lambda k: (order.index(k[0]), k[1], -k[2]))
    return [{k: v for k, v in groups[key].items() if k != "rank"} for key in keys]
