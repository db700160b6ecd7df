"""Remedies for AdaKron's collapse that the library does not have, applied to a benchmark run from the outside so
that they can be measured before anyone builds them (benchmarks/collapse_probe.py). u's own rate, measured here
first, is the library's now (``adakron.parameter_groups(outer_lr_ratio=...)``)."""

from __future__ import annotations


def cap_updates(model, cap: float) -> None:
    """Rescales each adapter's update, per token, to at most ``cap`` times the norm of the h it is added to."""
    from adakron.adapters.kron import KronAdapter

    def hook(module, inputs, output):
        # As measured: the gradient also flows through ||h||, into the layers below.
        limit = cap * inputs[0].norm(dim=-1, keepdim=True)
        return output * (limit / output.norm(dim=-1, keepdim=True).maximum(limit).clamp_min(1e-30))

    adapters = [m for m in model.modules() if isinstance(m, KronAdapter)]
    if not adapters:
        raise ValueError("an update cap needs adapters (--method adakron or adapter)")
    for module in adapters:
        module.register_forward_hook(hook)  # registered first, so later hooks (a probe's) see the capped update


def factor_rates(method) -> tuple[float, float]:
    """(down, up): the rates of a benchmark method's down- and up-projections over --lr, its own or its recipe's."""
    from adakron.training.recipes import adapter_recipe

    recipe = adapter_recipe(method.recipe, method=method.method, rank=method.rank)
    return (recipe.down_lr_ratio if method.down_lr_ratio is None else method.down_lr_ratio,
            recipe.up_lr_ratio if method.up_lr_ratio is None else method.up_lr_ratio)


def callback(update_cap: float | None = None):
    """A TrainerCallback that applies the remedy when training begins (None: it is off)."""
    from transformers import TrainerCallback

    class Remedies(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if update_cap is not None:
                cap_updates(model, update_cap)

    return Remedies()
