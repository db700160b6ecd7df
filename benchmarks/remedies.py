"""Remedies for AdaKron's collapse that the library does not have, applied to a benchmark run from the outside so
that they can be measured before anyone builds them (benchmarks/collapse_probe.py, and grid candidates in
benchmarks/recipe.py through ``glue.Method.outer_lr_ratio``)."""

from __future__ import annotations


def scale_outer_steps(optimizer, model, ratio: float) -> None:
    """Makes each adapter's outer-factor rows (u: the first f rows of the fused down-projection, weight and bias) move
    ``ratio`` times as far per optimizer step as the rest of that parameter (v). AdamW's step, decoupled weight decay
    included, is proportional to the lr, so this is u at ``ratio`` times v's lr; a gradient hook could not do it,
    since Adam's step does not depend on the gradient's scale."""
    import torch

    from adakron.adapters.kron import KronAdapter

    rows = [(p, module.outer) for module in model.modules() if isinstance(module, KronAdapter) and module.outer
            and not module.has_experts for p in (module.adakron_down.weight, module.adakron_down.bias)]
    before: list = []
    optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper

    def save(*_):
        before[:] = [p[:f].detach().clone() for p, f in rows]

    def scale(*_):
        with torch.no_grad():
            for (p, f), old in zip(rows, before):
                p[:f] = old + ratio * (p[:f] - old)

    optimizer.register_step_pre_hook(save)
    optimizer.register_step_post_hook(scale)


def cap_updates(model, cap: float) -> None:
    """Rescales each adapter's update, per token, to at most ``cap`` times the norm of the h it is added to."""
    from adakron.adapters.kron import KronAdapter

    def hook(module, inputs, output):
        limit = cap * inputs[0].norm(dim=-1, keepdim=True)
        return output * (limit / output.norm(dim=-1, keepdim=True).maximum(limit).clamp_min(1e-30))

    for module in model.modules():
        if isinstance(module, KronAdapter):
            module.register_forward_hook(hook)  # registered first, so later hooks (a probe's) see the capped update


def down_lr_ratio(method) -> float:
    """The rate of a benchmark method's down-projections over --lr: its own, or its recipe's."""
    if method.down_lr_ratio is not None:
        return method.down_lr_ratio
    from adakron.training.recipes import adapter_recipe

    return adapter_recipe(method.recipe, method=method.method, rank=method.rank).down_lr_ratio


def outer_step_ratio(method, outer_lr_ratio: float | None) -> float | None:
    """u's rate over --lr (``outer_lr_ratio``) as a multiple of the fused matrix's step, which is v's rate."""
    return None if outer_lr_ratio is None else outer_lr_ratio / down_lr_ratio(method)


def callback(outer_step_ratio: float | None = None, update_cap: float | None = None):
    """A TrainerCallback that applies the remedies when training begins (None: that remedy is off)."""
    from transformers import TrainerCallback

    class Remedies(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if outer_step_ratio is not None:
                scale_outer_steps(optimizer, model, outer_step_ratio)
            if update_cap is not None:
                cap_updates(model, update_cap)

    return Remedies()
