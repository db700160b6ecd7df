"""The adapter recipe: what `--recipe default|paper` and its four knobs give, and that the paper recipe is
the authors' code exactly (their init, one learning rate, the Trainer's own AdamW groups)."""

import json

import pytest
import torch
from conftest import tiny_model

import adakron
from adakron.adapters.config import AdaKronConfig
from adakron.adapters.kron import KronAdapter
from adakron.adapters.optim import DOWN_LR_RATIO, UP_LR_RATIO, parameter_groups
from adakron.training.recipes import ADAPTER_RECIPES, OWN_DATA_RECIPE, TrainArgs, adakron_config, with_recipe


def test_default_recipe_reads_its_values_from_the_config_and_optim_defaults():
    default = ADAPTER_RECIPES["default"]
    assert (default.init, default.outer_bias) == (AdaKronConfig().init, AdaKronConfig().outer_bias)
    assert (default.down_lr_ratio, default.up_lr_ratio) == (DOWN_LR_RATIO, UP_LR_RATIO)


def test_the_default_recipe_starts_from_the_base_model_with_an_open_outer_path_and_a_slow_outer_factor():
    """Set from the recipe study and the GLUE grid (RESULTS.md): B = 0, a1 = 1, u at lr/8, v at lr/2, B at lr;
    exact."""
    args = with_recipe(TrainArgs(), OWN_DATA_RECIPE)
    assert (args.init, args.outer_bias, args.down_lr_ratio, args.up_lr_ratio, args.outer_lr_ratio) == \
        ("identity", 1.0, 0.5, 1.0, 0.125)
    model = tiny_model("bert")
    adakron.add_adapter(model, adakron_config(args))
    adapter = next(m for m in model.modules() if isinstance(m, KronAdapter))
    f = adapter.outer
    assert torch.count_nonzero(adapter.adakron_up.weight) == 0 and torch.count_nonzero(adapter.adakron_up.bias) == 0
    assert torch.equal(adapter.adakron_down_outer.bias, torch.ones(f))
    assert torch.count_nonzero(adapter.adakron_down_inner.bias) == 0
    rates = {id(p): g["lr"] for g in parameter_groups(model, 2e-3, 0.1, args.down_lr_ratio, args.up_lr_ratio,
                                                      args.outer_lr_ratio) for p in g["params"]}
    u, v = adapter.adakron_down_outer, adapter.adakron_down_inner
    assert rates[id(u.weight)] == rates[id(u.bias)] == 2e-3 / 8
    assert rates[id(v.weight)] == rates[id(v.bias)] == 2e-3 / 2
    assert rates[id(adapter.adakron_up.weight)] == 2e-3
    head = dict(model.named_parameters())["classifier.heads.default.weight"]
    assert rates[id(head)] == 2e-3


def test_paper_recipe_is_the_authors_init_and_one_lr():
    paper = with_recipe(TrainArgs(recipe="paper"), OWN_DATA_RECIPE)
    assert (paper.init, paper.outer_bias, paper.down_lr_ratio, paper.up_lr_ratio) == ("reference", 0.0, 1.0, 1.0)
    config = adakron_config(paper)
    assert (config.init, config.outer_bias) == ("reference", 0.0)


def test_a_knob_given_on_its_own_overrides_the_recipe():
    args = with_recipe(TrainArgs(recipe="paper", init="identity", down_lr_ratio=0.125), OWN_DATA_RECIPE)
    assert (args.init, args.outer_bias, args.down_lr_ratio, args.up_lr_ratio) == ("identity", 0.0, 0.125, 1.0)


def test_paper_init_gives_normal_weights_zero_biases_and_a_non_zero_up_projection():
    torch.manual_seed(0)
    adapter = KronAdapter(384, adakron_config(with_recipe(TrainArgs(recipe="paper"), OWN_DATA_RECIPE)), 0.02)
    for linear in (adapter.adakron_down_outer, adapter.adakron_down_inner, adapter.adakron_up):
        assert torch.count_nonzero(linear.bias) == 0
        assert abs(linear.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(adapter.adakron_up.weight) == adapter.adakron_up.weight.numel()


def test_outer_bias_sets_only_the_outer_factors_bias():
    adapter = KronAdapter(24, AdaKronConfig(rank=16, kron_factor=4, outer_bias=1.0))
    assert adapter.merged_down()[1].tolist() == [1.0] * 4 + [0.0] * 4
    plain = KronAdapter(24, AdaKronConfig(rank=16, kron_factor=1, outer_bias=1.0))
    assert torch.count_nonzero(plain.adakron_down.bias) == 0  # no outer factor in the one-factor case


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", True, None])
def test_outer_bias_must_be_a_finite_number(bad):
    with pytest.raises(ValueError, match="outer_bias"):
        AdaKronConfig(outer_bias=bad)


def test_outer_bias_round_trips_and_configs_saved_before_it_existed_still_load():
    config = AdaKronConfig(outer_bias=0.5)
    assert AdaKronConfig.from_json(config.to_json()) == config
    old = json.loads(AdaKronConfig().to_json())
    del old["outer_bias"]
    assert AdaKronConfig.from_dict(old).outer_bias == 0.0


def test_paper_recipe_groups_are_what_the_trainer_builds_itself(tmp_path):
    """Per parameter, the same lr and weight decay as Trainer.create_optimizer: so `--recipe paper` trains
    exactly as the authors' code (and as this library did before it had parameter groups)."""
    from transformers import Trainer, TrainingArguments

    paper = ADAPTER_RECIPES["paper"]
    model = tiny_model("bert")
    adakron.add_adapter(model, AdaKronConfig(rank=8, init=paper.init, outer_bias=paper.outer_bias))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), learning_rate=2e-3,
                                                          weight_decay=0.1, report_to="none", use_cpu=True))
    theirs = {id(p): (g["lr"], g["weight_decay"]) for g in trainer.create_optimizer().param_groups for p in g["params"]}
    groups = parameter_groups(model, 2e-3, 0.1, paper.down_lr_ratio, paper.up_lr_ratio)
    ours = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert ours == theirs


def test_train_flags_reach_the_adapter_and_the_optimizer(monkeypatch):
    from adakron.cli import build_parser, train_args

    ns = build_parser().parse_args(["train", "--task", "rte", "--recipe", "paper", "--outer-bias", "1",
                                    "--down-lr-ratio", "0.125", "--up-lr-ratio", "2", "--outer-lr-ratio", "0.0625"])
    args = with_recipe(train_args(ns), OWN_DATA_RECIPE)
    assert (args.init, args.outer_bias, args.down_lr_ratio, args.up_lr_ratio, args.outer_lr_ratio) == \
        ("reference", 1.0, 0.125, 2.0, 0.0625)


def test_u_has_the_recipes_rate_follows_a_down_ratio_given_alone_and_takes_its_own_flag_first():
    def outer(**flags):
        return with_recipe(TrainArgs(**flags), OWN_DATA_RECIPE).outer_lr_ratio

    assert outer() == 0.125 and outer(recipe="paper") == 1.0
    assert outer(down_lr_ratio=0.25) == 0.25 == outer(recipe="paper", down_lr_ratio=0.25)
    assert outer(down_lr_ratio=0.25, outer_lr_ratio=0.03) == 0.03 == outer(outer_lr_ratio=0.03)
    model = tiny_model("bert")  # parameter_groups, for a user's own loop, reads the same way
    adakron.add_adapter(model, AdaKronConfig(rank=8))
    u = next(m for m in model.modules() if isinstance(m, KronAdapter)).adakron_down_outer.weight
    rate = lambda **ratios: next(g["lr"] for g in parameter_groups(model, 1.0, **ratios)  # noqa: E731
                                 for p in g["params"] if p is u)
    assert rate() == 0.125 and rate(down_lr_ratio=0.25) == 0.25 and rate(down_lr_ratio=0.25, outer_lr_ratio=0.03) == 0.03


def test_a_checkpoint_holds_u_and_v_as_the_one_down_matrix_every_checkpoint_before_had(tmp_path):
    """Saved files keep the layout of adakron 0.1.0 (u's rows first in `adakron_down.weight`), so a file written
    before u and v were held apart loads into them: here its down matrices are overwritten with new numbers."""
    from conftest import tiny_batch
    from safetensors.torch import load_file, save_file

    model = tiny_model("bert")
    adakron.add_adapter(model, AdaKronConfig(rank=8, init="reference", initializer_range=0.3), name="old")
    adakron.save_adapter(model, tmp_path / "old", name="old")
    path = tmp_path / "old" / "adapter_model.safetensors"
    tensors = load_file(path)
    fused = sorted(k for k in tensors if k.endswith("adakron_down.weight"))
    assert fused and not any("adakron_down_outer" in k or "adakron_down_inner" in k for k in tensors)
    generator = torch.Generator().manual_seed(7)
    for key in fused:
        tensors[key] = torch.randn(tensors[key].shape, generator=generator)
    save_file(tensors, path, metadata={"format": "pt", "adakron_format_version": "1"})
    config = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    config.pop("weights_sha256", None)  # edited by hand, as an older file would have no hash of these bytes
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))
    fresh = tiny_model("bert")
    adakron.load_adapter(fresh, tmp_path / "old")
    adapters = [m for m in fresh.modules() if isinstance(m, KronAdapter)]
    for key, adapter in zip(fused, adapters):
        f = adapter.outer
        assert torch.equal(adapter.adakron_down_outer.weight, tensors[key][:f])
        assert torch.equal(adapter.adakron_down_inner.weight, tensors[key][f:])
    fresh.eval()(**tiny_batch())  # and it runs


def test_an_adapter_saved_before_the_recipe_knobs_and_experts_existed_loads_unchanged(tmp_path):
    from conftest import tiny_batch

    model = tiny_model("bert")
    adakron.add_adapter(model, AdaKronConfig(rank=8, init="reference", initializer_range=0.3), name="old")
    expected = model.eval()(**tiny_batch()).logits
    adakron.save_adapter(model, tmp_path / "old", name="old")
    config = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    for key in ("outer_bias", "num_experts", "experts"):  # what a checkpoint of adakron 0.1.0 lacks
        del config[key]
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))
    fresh = tiny_model("bert")
    adakron.load_adapter(fresh, tmp_path / "old")
    torch.testing.assert_close(fresh.eval()(**tiny_batch()).logits, expected, rtol=0, atol=0)


def test_a_causal_lm_keeps_the_recipe_it_shipped_with_base_model_start_no_outer_bias_one_lr():
    """The recipe study ran on encoders only: a causal LM's default is B = 0 with the authors' other knobs."""
    from adakron.training.recipes import CAUSAL_LM_RECIPE

    args = with_recipe(TrainArgs(), CAUSAL_LM_RECIPE, causal_lm=True)
    assert (args.init, args.outer_bias, args.down_lr_ratio, args.up_lr_ratio) == ("identity", 0.0, 1.0, 1.0)
    paper = with_recipe(TrainArgs(recipe="paper"), CAUSAL_LM_RECIPE, causal_lm=True)
    assert (paper.init, paper.outer_bias) == ("reference", 0.0)


def test_the_plain_adapter_keeps_the_authors_recipe_it_was_measured_with():
    """The study was of AdaKron's three-factor product; `--method adapter` keeps one lr and the reference init."""
    args = with_recipe(TrainArgs(method="adapter"), OWN_DATA_RECIPE)
    assert (args.init, args.outer_bias, args.down_lr_ratio, args.up_lr_ratio) == ("reference", 0.0, 1.0, 1.0)
    assert adakron_config(TrainArgs(method="adapter")).init == "reference"
    assert with_recipe(TrainArgs(method="adapter", init="identity"), OWN_DATA_RECIPE).init == "identity"


def test_a_run_without_lr_takes_its_methods_lr_and_the_flag_or_the_task_recipe_overrides_it():
    from adakron.training.recipes import CAUSAL_LM_RECIPE, FULL_LR, METHOD_LR, PAPER_LR

    for method, lr in METHOD_LR.items():
        assert with_recipe(TrainArgs(method=method), OWN_DATA_RECIPE).lr == lr
    assert with_recipe(TrainArgs(recipe="paper"), OWN_DATA_RECIPE).lr == PAPER_LR
    assert with_recipe(TrainArgs(method="full"), OWN_DATA_RECIPE).lr == FULL_LR
    assert with_recipe(TrainArgs(lr=3e-4), OWN_DATA_RECIPE).lr == 3e-4
    assert with_recipe(TrainArgs(), CAUSAL_LM_RECIPE, causal_lm=True).lr == CAUSAL_LM_RECIPE.lr == 5e-4


def test_cola_trains_every_peft_method_at_2e_3_where_adakrons_4e_3_stuck_at_the_majority_class():
    from adakron.training.recipes import METHOD_LR, RECIPES

    assert METHOD_LR["adakron"] == 4e-3
    for method in METHOD_LR:
        assert with_recipe(TrainArgs(task="cola", method=method), RECIPES["cola"]).lr == 2e-3


@pytest.mark.parametrize("rank, down, up, outer", [(4, 0.5, 1.0, 0.125), (16, 0.5, 1.0, 0.125), (32, 0.5, 1.0, 0.125),
                                                   (48, 0.5 / 1.5, 1.0 / 1.5, 0.125 / 1.5), (64, 0.25, 0.5, 0.0625)])
def test_above_rank_32_the_default_recipe_scales_the_factor_rates_by_32_over_r(rank, down, up, outer):
    """Under the previous default r=48 learned CoLA at lr 4e-3 on three seeds with its rates times 32/48 (u, v at
    lr/6, B at lr/3); with lr/2 and lr unscaled it stuck. All three factors scale alike."""
    args = with_recipe(TrainArgs(rank=rank), OWN_DATA_RECIPE)
    assert (args.down_lr_ratio, args.up_lr_ratio, args.outer_lr_ratio) == pytest.approx((down, up, outer), rel=1e-12)
    model = tiny_model("bert")
    adakron.add_adapter(model, adakron_config(args))
    adapter = next(m for m in model.modules() if isinstance(m, KronAdapter))
    # What `adakron train` builds (the ratios it recorded) and what a user's own loop gets by default agree.
    for groups in (parameter_groups(model, 4e-3, 0.1, args.down_lr_ratio, args.up_lr_ratio, args.outer_lr_ratio),
                   parameter_groups(model, 4e-3, 0.1)):
        rates = {id(p): g["lr"] for g in groups for p in g["params"]}
        assert rates[id(adapter.adakron_down_inner.weight)] == pytest.approx(4e-3 * down, rel=1e-12)
        assert rates[id(adapter.adakron_down_outer.weight)] == pytest.approx(4e-3 * outer, rel=1e-12)
        assert rates[id(adapter.adakron_up.weight)] == pytest.approx(4e-3 * up, rel=1e-12)
        assert rates[id(dict(model.named_parameters())["classifier.heads.default.weight"])] == 4e-3


@pytest.mark.parametrize("flags", [dict(recipe="paper"), dict(method="adapter"), dict(down_lr_ratio=0.5,
                                                                                   up_lr_ratio=1.0)])
def test_the_rank_rule_leaves_the_paper_recipe_the_plain_adapter_and_given_ratios_alone(flags):
    args = with_recipe(TrainArgs(rank=48, **flags), OWN_DATA_RECIPE)
    assert (args.down_lr_ratio, args.up_lr_ratio) == ((0.5, 1.0) if "down_lr_ratio" in flags else (1.0, 1.0))


def test_the_capped_recipe_is_the_defaults_init_with_its_rates_at_lr_4e_3_as_caps():
    """The recipe study's `id-bias1-capped`: exact values, and at lr 4e-3 the same groups as the default."""
    args = with_recipe(TrainArgs(recipe="capped", lr=1e-3), OWN_DATA_RECIPE)
    assert (args.init, args.outer_bias, args.down_lr_ratio, args.up_lr_ratio, args.outer_lr_ratio, args.down_lr_max,
            args.outer_lr_max) == ("identity", 1.0, 1.0, 1.0, 1.0, 2e-3, 5e-4)
    model = tiny_model("bert")
    adakron.add_adapter(model, adakron_config(args))

    def rates(run):
        return [(g["name"], g["lr"]) for g in parameter_groups(model, run.lr, 0.1, run.down_lr_ratio,
                                                                  run.up_lr_ratio, run.outer_lr_ratio,
                                                                  run.down_lr_max, run.outer_lr_max)]

    top = [with_recipe(TrainArgs(recipe=name, lr=4e-3), OWN_DATA_RECIPE) for name in ("capped", "default")]
    assert rates(top[0]) == rates(top[1])
    assert dict(rates(args)) == {"adakron_down": 1e-3, "adakron_down/no_decay": 1e-3, "adakron_down_outer": 5e-4,
                                 "adakron_down_outer/no_decay": 5e-4, "adakron_up": 1e-3, "adakron_up/no_decay": 1e-3,
                                 "head": 1e-3, "head/no_decay": 1e-3}


def test_caps_follow_the_rules_of_the_ratios_a_down_cap_alone_caps_u_too_and_rank_48_scales_them():
    def caps(**flags):
        args = with_recipe(TrainArgs(**flags), OWN_DATA_RECIPE)
        return args.down_lr_max, args.outer_lr_max

    assert caps() == (None, None) == caps(recipe="paper")
    assert caps(down_lr_max=1e-3) == (1e-3, 1e-3) == caps(recipe="capped", down_lr_max=1e-3)
    assert caps(recipe="capped", outer_lr_max=1e-4) == (2e-3, 1e-4)
    assert caps(recipe="capped", rank=48) == pytest.approx((2e-3 / 1.5, 5e-4 / 1.5), rel=1e-12)
    with pytest.raises(adakron.errors.UsageError, match="--down-lr-max must be a finite positive number"):
        caps(down_lr_max=0.0)
