"""The remedies that benchmarks apply from the outside (benchmarks/remedies.py: the collapse probe, the recipe
study's candidates) do what their names say, so that a run with one measures that remedy and nothing else."""

import copy
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
    module = KronAdapter(12, AdaKronConfig(rank=8, kron_factor=4, init="reference"))
    return module


def one_step(module: KronAdapter, outer_lr_ratio: float | None) -> None:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    if outer_lr_ratio is not None:
        remedies.scale_outer_steps(optimizer, module, outer_lr_ratio)
    torch.manual_seed(1)
    module(torch.randn(5, 12)).pow(2).sum().backward()
    optimizer.step()


def test_outer_lr_ratio_moves_only_the_outer_rows_and_by_exactly_that_multiple_of_their_step():
    start, plain, scaled = adapter(), adapter(), adapter()
    one_step(plain, None)
    one_step(scaled, 0.25)
    f = start.outer
    for name in ("weight", "bias"):
        old, full, part = (getattr(m.adakron_down, name).detach() for m in (start, plain, scaled))
        assert torch.allclose(part[:f] - old[:f], 0.25 * (full[:f] - old[:f]), atol=1e-7)
        assert (full[:f] != old[:f]).any()
        assert torch.equal(part[f:], full[f:])  # the inner factor v keeps its own rate
    assert torch.equal(scaled.adakron_up.weight, plain.adakron_up.weight)


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
