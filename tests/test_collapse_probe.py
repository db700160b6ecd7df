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


def test_outer_lr_ratio_is_u_trained_at_that_multiple_of_the_lr_step_after_step_under_a_schedule():
    """The reference holds u and v apart, in two AdamW groups: u at ratio x lr, v at lr, same gradients, weight
    decay and lr schedule."""
    module = adapter()
    f, ratio, lr = module.outer, 0.25, 1e-2
    weight, bias = module.adakron_down.weight, module.adakron_down.bias
    u = [torch.nn.Parameter(weight[:f].detach().clone()), torch.nn.Parameter(bias[:f].detach().clone())]
    v = [torch.nn.Parameter(weight[f:].detach().clone()), torch.nn.Parameter(bias[f:].detach().clone())]
    reference = torch.optim.AdamW([{"params": u, "lr": ratio * lr}, {"params": v, "lr": lr}], weight_decay=0.1)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=0.1)
    remedies.scale_outer_steps(optimizer, module, ratio)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (reference, optimizer)]
    torch.manual_seed(1)
    for _ in range(5):
        h, target = torch.randn(5, 12), torch.randn(5, weight.shape[0])
        for opt in (reference, optimizer):
            opt.zero_grad()
        torch.nn.functional.linear(h, weight, bias).sub(target).pow(2).sum().backward()
        torch.nn.functional.linear(h, torch.cat([u[0], v[0]]), torch.cat([u[1], v[1]])).sub(target).pow(2).sum() \
            .backward()
        for opt, schedule in zip((reference, optimizer), schedules):
            opt.step()
            schedule.step()
    assert torch.allclose(weight[:f], u[0], atol=1e-6) and torch.allclose(bias[:f], u[1], atol=1e-6)
    assert torch.allclose(weight[f:], v[0], atol=1e-6) and torch.allclose(bias[f:], v[1], atol=1e-6)
    assert not torch.allclose(weight[:f], adapter().adakron_down.weight[:f], atol=1e-4)  # it did train


def test_a_remedy_that_would_do_nothing_is_refused_not_run_under_its_name():
    plain = KronAdapter(12, AdaKronConfig(rank=8, kron_factor=1))
    with pytest.raises(ValueError, match="fused down-projection"):
        remedies.scale_outer_steps(torch.optim.AdamW(plain.parameters()), plain, 0.5)
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


def test_outer_lr_ratio_is_a_multiple_of_the_lr_applied_relative_to_the_down_projections_own_rate():
    assert remedies.outer_step_ratio(glue.METHODS["adakron16-down2"], 0.125) == 0.25  # v at lr/2: u's step x 1/4
    assert remedies.outer_step_ratio(glue.METHODS["adakron16"], 0.125) == 0.125  # the authors' one lr
    assert remedies.outer_step_ratio(glue.METHODS["adakron16-down2"], None) is None


def test_a_grid_run_of_a_method_with_an_outer_rate_trains_with_the_remedy_and_records_it(tmp_path, monkeypatch):
    import adakron.training.trainer as trainer
    from types import SimpleNamespace

    seen = []
    monkeypatch.setattr(trainer, "fit", lambda args, callbacks=None: seen.append(callbacks) or {"epochs": []})
    monkeypatch.setattr(glue, "require_same_library", lambda args: None)
    args = SimpleNamespace(data_dir=tmp_path, quick=True, max_train_samples=None, max_eval_samples=None,
                           library_digest="x")
    import recipe

    result = glue._train("cola", recipe.CANDIDATES["id-bias1-u8-down2"], 42, 4e-3, args, tmp_path / "run.json")
    assert result["outer_lr_ratio"] == 0.125
    assert [type(c).__name__ for c in seen[0]] == ["Remedies"]
    glue._train("cola", glue.METHODS["adakron16-down2"], 42, 4e-3, args, tmp_path / "plain.json")
    assert seen[1] == [] and "outer_lr_ratio" not in json.loads((tmp_path / "plain.json").read_text())


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
