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

    adapters = [m for m in model.modules() if isinstance(m, KronAdapter)]
    if not adapters or any(not m.outer or m.has_experts for m in adapters):
        # A run named for this remedy must have had it: LoRA, the plain adapter (no u) and MAdaKron (u apart) have not.
        raise ValueError("an outer-factor rate needs AdaKron adapters with a fused down-projection (kron_factor > 1, "
                         "no experts)")
    rows = [(p, m.outer) for m in adapters for p in (m.adakron_down.weight, m.adakron_down.bias)]
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


def outer_step_ratio(method, outer_lr_ratio: float | None) -> float | None:
    """u's rate over --lr (``outer_lr_ratio``) as a multiple of the fused matrix's step, which is v's rate."""
    return None if outer_lr_ratio is None else outer_lr_ratio / factor_rates(method)[0]


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
