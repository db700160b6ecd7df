"""The remedies that benchmarks apply from the outside (benchmarks/remedies.py: the collapse probe, the recipe
study's candidates) do what their names say, so that a run with one measures that remedy and nothing else."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import collapse_probe
import glue
import remedies

from adakron import AdaKronConfig
from adakron.adapters.kron import KronAdapter


def adapter(seed: int = 0) -> KronAdapter:
    torch.manual_seed(seed)
    return KronAdapter(12, AdaKronConfig(rank=8, kron_factor=4, init="reference"))


def test_a_remedy_that_would_do_nothing_is_refused_not_run_under_its_name():
    with pytest.raises(ValueError, match="needs adapters"):
        remedies.cap_updates(torch.nn.Linear(3, 3), 1.0)


def test_update_cap_bounds_each_tokens_update_by_that_multiple_of_h_and_leaves_smaller_ones_alone():
    module = adapter()
    with torch.no_grad():
        module.adakron_up.bias.uniform_(50.0, 100.0)  # an update far larger than h for every token
    h = torch.randn(3, 5, 12)
    uncapped = module(h)
    capped_model = copy.deepcopy(module)
    remedies.cap_updates(capped_model, 0.5)
    capped = capped_model(h)
    assert torch.allclose(capped.norm(dim=-1), 0.5 * h.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(capped / capped.norm(dim=-1, keepdim=True),
                          uncapped / uncapped.norm(dim=-1, keepdim=True), atol=1e-6)  # same direction
    generous = copy.deepcopy(module)
    remedies.cap_updates(generous, 1e9)
    assert torch.equal(generous(h), uncapped)


@pytest.mark.parametrize("variant, tag", [
    ({}, ""),
    ({"outer_lr_ratio": 0.25}, "-outer0.25"),
    ({"down_lr_ratio": 1.0, "up_lr_ratio": 1.0, "update_cap": 1.0}, "-down1-up1-cap1"),
])
def test_a_probe_with_a_remedy_or_other_rates_is_stored_under_its_own_name(variant, tag):
    assert collapse_probe.variant_tag(**variant) == tag


def test_bad_remedy_values_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        collapse_probe.main(["--update-cap", "0"])
    assert exit_.value.code == 2
    assert "must be a finite number above 0" in capsys.readouterr().err


def test_a_grid_run_of_a_method_with_an_outer_rate_gives_u_that_rate_through_the_library():
    from types import SimpleNamespace

    import recipe
    from adakron.training.recipes import RECIPES, with_recipe

    args = SimpleNamespace(data_dir="d", quick=False, max_train_samples=None, max_eval_samples=None)
    candidate = glue.train_args("cola", recipe.CANDIDATES["id-bias1-u8-down2"], 42, 4e-3, args, Path("o"))
    resolved = with_recipe(candidate, RECIPES["cola"])
    assert (resolved.outer_lr_ratio, resolved.down_lr_ratio, resolved.up_lr_ratio) == (0.125, 0.5, 1.0)
    plain = with_recipe(glue.train_args("cola", glue.METHODS["adakron16-down2"], 42, 4e-3, args, Path("o")),
                        RECIPES["cola"])
    assert plain.outer_lr_ratio == plain.down_lr_ratio == 0.5  # u at v's rate


def test_the_probe_table_names_each_remedy_its_rates_and_steps_and_shows_the_dev_metric(tmp_path, monkeypatch):
    monkeypatch.setattr(collapse_probe, "FOLDER", tmp_path)
    header = {"task": "cola", "method_key": "adakron16-down2", "seed": 43, "lr": 4e-3, "steps": 540, "every": 100,
              "down_lr_ratio": 1.0, "up_lr_ratio": 1.0, "outer_lr_ratio": 0.125, "update_cap": None}
    lines = [header, {"step": 0, "ratio": [0.0, 0.5], "shared": [0.0, 0.9], "cls_spread": 0.59},
             {"step": 268, "eval": {"eval_dev_matthews_correlation": 0.123, "epoch": 1.0}}]
    (tmp_path / "probe.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    row = [line for line in collapse_probe.section() if line.startswith("| CoLA")]
    assert row == ["| CoLA `adakron16-down2-outer0.125`, v lr×1 s43 lr 0.004, 540 steps | 0.50 (L2, 0.90) / 0.59 "
                   "| 12.3 |"]
