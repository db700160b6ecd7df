"""Per-factor learning rates: the parameter groups that `adakron train` and users' own loops build."""

import pytest
import torch
from conftest import tiny_model

import adakron
from adakron.adapters.optim import parameter_groups


def _model(kron_factor=4):
    model = tiny_model("bert")
    # The reference init, large: every factor gets a gradient at step 0 (B = 0 would leave u and v without one),
    # and with 0.02 the gradients of the three-factor product are ~1e-9, below Adam's eps.
    adakron.add_adapter(model, adakron.AdaKronConfig(rank=8, kron_factor=kron_factor, init="reference",
                                                     initializer_range=0.5))
    return model


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_groups_give_each_factor_its_multiple_of_the_head_lr():
    model = _model()
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-3, weight_decay=0.1, down_lr_ratio=0.25,
                                                      up_lr_ratio=2.0)}
    assert {name: g["lr"] for name, g in groups.items()} == {
        "adakron_down": 0.25e-3, "adakron_down/no_decay": 0.25e-3, "adakron_up": 2e-3, "adakron_up/no_decay": 2e-3,
        "head": 1e-3, "head/no_decay": 1e-3}
    assert all(n.endswith(("adakron_down_outer.weight", "adakron_down_inner.weight"))
               for n in _names(model, groups["adakron_down"]))
    assert all(n.endswith("adakron_up.bias") for n in _names(model, groups["adakron_up/no_decay"]))
    assert _names(model, groups["head"]) == ["bert.pooler.heads.default.dense.weight",
                                             "classifier.heads.default.weight"]


def test_weight_decay_skips_biases_as_the_trainer_does():
    groups = {g["name"]: g for g in parameter_groups(_model(), lr=1e-3, weight_decay=0.1)}
    assert {name: g["weight_decay"] for name, g in groups.items()} == {
        "adakron_down": 0.1, "adakron_down/no_decay": 0.0, "adakron_down_outer": 0.1,
        "adakron_down_outer/no_decay": 0.0, "adakron_up": 0.1, "adakron_up/no_decay": 0.0,
        "head": 0.1, "head/no_decay": 0.0}


def test_groups_hold_every_trainable_parameter_once_and_nothing_frozen():
    model = _model()
    groups = parameter_groups(model, lr=1e-3)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}


def test_groups_work_with_adamw_and_a_step_moves_each_factor_by_its_own_rate():
    model = _model()
    optimizer = torch.optim.AdamW(parameter_groups(model, lr=1e-2, down_lr_ratio=0.1, up_lr_ratio=0.5))
    layer = next(m for m in model.modules() if isinstance(m, adakron.adapters.layer.AdaKronLayer))
    adapter = layer.adakron_adapters["default"]
    before = adapter.adakron_down_inner.weight.detach().clone(), adapter.adakron_up.weight.detach().clone()
    out = model(input_ids=torch.randint(3, 99, (2, 5))).logits
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    optimizer.step()
    # Adam's first step moves every parameter with a non-zero gradient by about its lr.
    down_step = (adapter.adakron_down_inner.weight - before[0]).abs().max().item()
    up_step = (adapter.adakron_up.weight - before[1]).abs().max().item()
    assert down_step == pytest.approx(1e-3, rel=0.05)
    assert up_step == pytest.approx(5e-3, rel=0.05)


def test_u_gets_a_group_of_its_own_at_its_own_rate_and_v_keeps_the_down_projections_rate():
    model = _model()
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-3, down_lr_ratio=0.5, up_lr_ratio=1.0,
                                                      outer_lr_ratio=0.125)}
    assert groups["adakron_down_outer"]["lr"] == groups["adakron_down_outer/no_decay"]["lr"] == 0.125e-3
    assert groups["adakron_down"]["lr"] == 0.5e-3
    assert all(n.endswith("adakron_down_outer.weight") for n in _names(model, groups["adakron_down_outer"]))
    assert all(n.endswith("adakron_down_outer.bias") for n in _names(model, groups["adakron_down_outer/no_decay"]))
    assert all(n.endswith("adakron_down_inner.weight") for n in _names(model, groups["adakron_down"]))


def test_u_at_vs_rate_shares_the_down_projections_group():
    names = [g["name"] for g in parameter_groups(_model(), lr=1e-3, down_lr_ratio=0.5, outer_lr_ratio=0.5)]
    assert "adakron_down_outer" not in names and "adakron_down" in names


def test_an_adamw_step_moves_u_by_its_own_rate_and_v_by_the_down_rate():
    model = _model()
    optimizer = torch.optim.AdamW(parameter_groups(model, lr=1e-2, down_lr_ratio=0.5, outer_lr_ratio=0.05))
    adapter = next(m for m in model.modules() if isinstance(m, adakron.adapters.layer.AdaKronLayer)) \
        .adakron_adapters["default"]
    with torch.no_grad():  # B = 0 (the default init) would give u and v no gradient on the first step
        adapter.adakron_up.weight.normal_()
    u, v = adapter.adakron_down_outer.weight, adapter.adakron_down_inner.weight
    before = u.detach().clone(), v.detach().clone()
    out = model(input_ids=torch.randint(3, 99, (2, 5))).logits
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    optimizer.step()
    assert (u - before[0]).abs().max().item() == pytest.approx(5e-4, rel=0.05)
    assert (v - before[1]).abs().max().item() == pytest.approx(5e-3, rel=0.05)


def test_madakrons_outer_experts_are_u_and_get_us_rate():
    model = tiny_model("bert")
    adakron.add_adapter(model, adakron.AdaKronConfig(rank=8, num_experts=3))
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-3, down_lr_ratio=0.5, outer_lr_ratio=0.125)}
    assert groups["adakron_down_outer"]["lr"] == 0.125e-3
    assert all(".adakron_down_outer.weights." in n for n in _names(model, groups["adakron_down_outer"]))


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "1", True])
def test_a_ratio_that_is_not_a_positive_number_is_refused(bad):
    with pytest.raises(ValueError, match="lr ratio"):
        parameter_groups(_model(), lr=1e-3, down_lr_ratio=bad)
    with pytest.raises(ValueError, match="outer-projection lr ratio"):
        parameter_groups(_model(), lr=1e-3, outer_lr_ratio=bad)


def test_a_model_without_trainable_parameters_is_refused_with_what_to_do():
    model = tiny_model("bert").requires_grad_(False)
    with pytest.raises(ValueError, match="add_adapter"):
        parameter_groups(model, lr=1e-3)


def test_adapters_of_two_ranks_get_each_its_own_default_rates_in_groups_named_by_rank():
    model = tiny_model("bert")
    adakron.add_adapter(model, adakron.AdaKronConfig(rank=16), name="small")
    adakron.add_adapter(model, adakron.AdaKronConfig(rank=64), name="large")
    for n, p in model.named_parameters():  # both train, as when a user trains two at once
        if ".adakron_adapters." in n:
            p.requires_grad_(True)
    groups = {g["name"]: g["lr"] for g in parameter_groups(model, lr=1e-3)}
    assert groups["adakron_down@r16"] == 0.5e-3 and groups["adakron_down@r64"] == 0.25e-3  # 64: times 32/64
    assert groups["adakron_down_outer@r16"] == 0.125e-3 and groups["adakron_down_outer@r64"] == 0.0625e-3
    assert groups["adakron_up/no_decay@r16"] == 1e-3 and groups["adakron_up/no_decay@r64"] == 0.5e-3
    assert groups["head"] == 1e-3


@pytest.mark.parametrize("name", ["adakron_down_v2", "adakron_up"])
def test_an_adapter_named_like_a_factor_leaves_each_parameter_in_its_own_group(name):
    model = tiny_model("bert")
    adakron.add_adapter(model, adakron.AdaKronConfig(rank=8), name=name)
    groups = parameter_groups(model, lr=1e-3, down_lr_ratio=0.25, up_lr_ratio=2.0)
    rate = {n: g["lr"] for g in groups for p in g["params"] for n, q in model.named_parameters() if q is p}
    for n, lr in rate.items():
        inside = n.split(f".adakron_adapters.{name}.")[-1] if ".adakron_adapters." in n else None
        expected = 0.25e-3 if inside and inside.startswith("adakron_down") else \
            2e-3 if inside and inside.startswith("adakron_up") else 1e-3
        assert lr == expected, n
    assert sorted({g["lr"] for g in groups}) == [0.25e-3, 1e-3, 2e-3]


def test_a_cap_holds_a_factors_rate_at_it_while_a_lower_lr_trains_the_factor_at_its_ratio():
    model = _model()
    adapter = next(m for m in model.modules() if isinstance(m, adakron.adapters.kron.KronAdapter))
    u, v, b = adapter.adakron_down_outer.weight, adapter.adakron_down_inner.weight, adapter.adakron_up.weight

    def rates(lr, **knobs):
        found = {id(p): g["lr"] for g in parameter_groups(model, lr, **knobs) for p in g["params"]}
        return found[id(u)], found[id(v)], found[id(b)]

    capped = dict(down_lr_ratio=1.0, up_lr_ratio=1.0, outer_lr_ratio=1.0, down_lr_max=2e-3, outer_lr_max=5e-4)
    assert rates(4e-3, **capped) == (5e-4, 2e-3, 4e-3) == rates(4e-3)  # the default's rates at its lr
    assert rates(1e-3, **capped) == (5e-4, 1e-3, 1e-3)
    assert rates(5e-4, **capped) == (5e-4, 5e-4, 5e-4)
    # u's cap is v's unless it has its own, as u's ratio is v's unless it has its own.
    assert rates(4e-3, down_lr_ratio=1.0, outer_lr_ratio=1.0, down_lr_max=1e-3) == (1e-3, 1e-3, 4e-3)


@pytest.mark.parametrize("bad", [0, -1e-3, float("inf"), float("nan"), "1e-3", True])
def test_a_cap_that_is_not_a_positive_learning_rate_is_refused(bad):
    for knob in ("down_lr_max", "outer_lr_max"):
        with pytest.raises(ValueError, match=f"{knob} .* must be a positive learning rate"):
            parameter_groups(_model(), lr=1e-3, **{knob: bad})
