"""MAdaKron: experts on the down-projections, one drawn per training forward, averaged (merged) for inference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_batch, tiny_model

import adakron
from adakron import AdaKronConfig
from adakron.adapters.experts import Experts
from adakron.adapters.kron import KronAdapter, kron_features
from adakron.adapters.state import adakron_layers


def _adapter(experts="outer", num_experts=4, kron_factor=4, width=24, seed=0):
    torch.manual_seed(seed)
    config = AdaKronConfig(rank=16, kron_factor=kron_factor, num_experts=num_experts, experts=experts,
                           init="reference")  # B != 0, so that every factor gets a gradient
    adapter = KronAdapter(width, config, initializer_range=0.5)
    with torch.no_grad():  # non-zero biases, different per expert, so that they are checked too
        for p in adapter.parameters():
            if p.ndim == 1:
                p.normal_()
    return adapter


def test_one_expert_is_todays_adakron_bit_for_bit():
    torch.manual_seed(3)
    plain = KronAdapter(24, AdaKronConfig(rank=16, init="reference"), initializer_range=0.02)
    torch.manual_seed(3)
    one = KronAdapter(24, AdaKronConfig(rank=16, num_experts=1, experts="both", init="reference"),
                      initializer_range=0.02)
    assert plain.state_dict().keys() == one.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), one.state_dict().values()))
    h = torch.randn(2, 5, 24)
    assert torch.equal(plain(h), one(h))


@pytest.mark.parametrize("experts", ["outer", "both"])
def test_a_training_forward_uses_exactly_the_one_expert_it_drew(experts):
    adapter = _adapter(experts).train()
    h = torch.randn(3, 5, 24)
    out = adapter(h)
    outer = adapter.adakron_down_outer
    i = outer.last_expert
    u = F.linear(h, outer.weights[i], outer.biases[i])
    inner = adapter.adakron_down_inner
    if experts == "both":
        j = inner.last_expert
        v = F.linear(h, inner.weights[j], inner.biases[j])
    else:
        assert isinstance(inner, torch.nn.Linear)
        v = inner(h)
    expected = adapter.adakron_up(F.gelu(kron_features(u, v)))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    # Only the drawn expert gets a gradient; the others none at all, so the optimizer skips them this step.
    assert [e for e in range(4) if outer.weights[e].grad is not None] == [i]
    assert outer.weights[i].grad.abs().sum() > 0


def test_each_projection_of_each_layer_draws_on_its_own():
    model = tiny_model("bert")
    adakron.add_adapter(model, AdaKronConfig(rank=8, num_experts=4, experts="both"))
    model.train()
    projections = [m for m in model.modules() if isinstance(m, Experts)]
    assert len(projections) == 2 * 2  # two layers, two down-projections each
    draws = []
    torch.manual_seed(0)
    for _ in range(20):
        model(**tiny_batch())
        draws.append(tuple(p.last_expert for p in projections))
    assert len(set(draws)) > 10  # joint draws vary: not one shared choice
    assert all({d[k] for d in draws} == {0, 1, 2, 3} for k in range(4))  # every expert gets drawn


@pytest.mark.parametrize("experts", ["outer", "both"])
def test_the_merged_adapter_is_the_average_expert(experts):
    adapter = _adapter(experts).eval()
    h = torch.randn(3, 5, 24)
    outer = adapter.adakron_down_outer
    mean = lambda ps: sum(ps) / len(ps)  # noqa: E731
    u = F.linear(h, mean(list(outer.weights)), mean(list(outer.biases)))
    inner = adapter.adakron_down_inner
    v = F.linear(h, mean(list(inner.weights)), mean(list(inner.biases))) if experts == "both" else inner(h)
    by_hand = adapter.adakron_up(F.gelu(kron_features(u, v)))
    unmerged = adapter(h)
    adapter.merge_experts()
    assert sorted(adapter.saved_state_dict()) == ["adakron_down.bias", "adakron_down.weight", "adakron_up.bias",
                                                  "adakron_up.weight"]
    assert adapter.merged_down()[0].shape == (4 + 4, 24)
    assert adapter.adakron_down_outer.weight.shape == (4, 24)  # u a plain projection again, as AdaKron's
    torch.testing.assert_close(adapter(h), by_hand)
    torch.testing.assert_close(unmerged, by_hand)


def _model_with(config, name="m"):
    model = tiny_model("bert")
    adakron.add_adapter(model, config, name=name)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in adakron_layers(model):
            for p in layer.adakron_adapters[name].parameters():
                p.normal_(0.0, 0.3)
    return model.eval()


def test_merge_experts_makes_a_plain_adakron_adapter_with_the_same_outputs():
    model = _model_with(AdaKronConfig(rank=8, num_experts=4))
    batch = tiny_batch()
    before = model(**batch).logits
    state = torch.random.get_rng_state()
    adakron.merge_experts(model, "m")
    assert torch.equal(torch.random.get_rng_state(), state)  # merging draws no random numbers
    torch.testing.assert_close(model(**batch).logits, before)
    plain = tiny_model("bert")
    adakron.add_adapter(plain, AdaKronConfig(rank=8), name="m")
    assert adakron.adapter_parameters(model, "m") == adakron.adapter_parameters(plain, "m")
    assert model.adakron_state.configs["m"].num_experts == 1


def test_save_load_round_trips_the_experts_and_the_merged_form(tmp_path):
    model = _model_with(AdaKronConfig(rank=8, num_experts=3, experts="both"))
    batch = tiny_batch()
    expected = model(**batch).logits
    adakron.save_adapter(model, tmp_path / "experts", name="m")
    adakron.save_adapter(model, tmp_path / "merged", name="m", merge_experts=True)
    assert model.adakron_state.configs["m"].num_experts == 3  # saving merged leaves the model as it was

    again = tiny_model("bert")
    adakron.load_adapter(again, tmp_path / "experts")
    assert again.adakron_state.configs["m"].num_experts == 3
    torch.testing.assert_close(again.eval()(**batch).logits, expected)

    merged = tiny_model("bert")
    adakron.load_adapter(merged, tmp_path / "merged")
    config = merged.adakron_state.configs["m"]
    assert (config.num_experts, config.experts) == (1, "outer")
    torch.testing.assert_close(merged.eval()(**batch).logits, expected, atol=1e-6, rtol=1e-5)

    on_load = tiny_model("bert")
    adakron.load_adapter(on_load, tmp_path / "experts", merge_experts=True)
    assert on_load.adakron_state.configs["m"].num_experts == 1
    torch.testing.assert_close(on_load.eval()(**batch).logits, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kron_factor,experts", [(4, "outer"), (4, "both"), (1, "both")])
def test_parameter_counts_match_the_closed_form(kron_factor, experts):
    config = AdaKronConfig(rank=8, kron_factor=kron_factor, num_experts=4, experts=experts)
    model = tiny_model("bert")
    adakron.add_adapter(model, config)
    f, d, r = kron_factor, 32, 8
    down = (4 * f + (4 if experts == "both" else 1) * (r // f)) * (d + 1) if f > 1 else 4 * r * (d + 1)
    assert config.adapter_parameters(d) == down + r * d + d
    assert adakron.adapter_parameters(model, "default") == 2 * config.adapter_parameters(d)


def test_experts_train_at_the_down_projections_rate():
    model = _model_with(AdaKronConfig(rank=8, num_experts=4))
    groups = {g["name"]: g for g in adakron.parameter_groups(model, lr=1e-3, down_lr_ratio=0.5)}
    ids = {id(p) for p in groups["adakron_down"]["params"]}
    experts = [p for m in model.modules() if isinstance(m, Experts) for p in m.weights]
    assert experts and all(id(p) in ids for p in experts) and groups["adakron_down"]["lr"] == 0.5e-3


def test_expert_settings_are_validated_and_round_trip_through_json():
    config = AdaKronConfig(num_experts=4, experts="both")
    assert AdaKronConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="num_experts"):
        AdaKronConfig(num_experts=0)
    with pytest.raises(ValueError, match="experts"):
        AdaKronConfig(num_experts=2, experts="inner")
    with pytest.raises(ValueError, match="no outer factor"):
        AdaKronConfig(kron_factor=1, num_experts=2, experts="outer")


def test_consistency_loss_is_zero_for_equal_predictions_and_pulls_both_passes_together():
    from adakron.training.consistency import consistency_loss

    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    assert consistency_loss(a, a.detach().clone()).item() == pytest.approx(0.0, abs=1e-7)
    loss = consistency_loss(a, b)
    p, q = F.softmax(a, -1), F.softmax(b, -1)
    kl = lambda x, y: (x * (x.log() - y.log())).sum(-1).mean()  # noqa: E731
    assert loss.item() == pytest.approx(0.5 * (kl(q, p) + kl(p, q)).item(), rel=1e-5)
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    one, two = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.5], [2.0]])
    assert consistency_loss(one, two).item() == pytest.approx(0.125)  # regression: the squared difference


def test_train_with_experts_saves_the_merged_adapter_and_keeps_the_experts(tiny_model_dir, tmp_path, capsys):
    import json

    from conftest import sentiment_rows, write_rows

    from adakron.cli import main
    from adakron.adapters.checkpoint import read_adapter

    train = write_rows(tmp_path / "train.csv", ["text", "label"], sentiment_rows(32, seed=0))
    dev = write_rows(tmp_path / "dev.csv", ["text", "label"], sentiment_rows(16, seed=1))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--train-file", train, "--validation-file", dev,
                 "--text-columns", "text", "--output-dir", str(out), "--epochs", "2", "--batch-size", "8",
                 "--max-length", "16", "--num-experts", "3", "--experts", "both", "--consistency-weight", "1",
                 "--no-plot"]) == 0
    served, _, tensors = read_adapter(out)
    assert served.num_experts == 1 and not any("experts" in k or "outer" in k for k in tensors)
    kept, _, _ = read_adapter(out / "experts")
    assert (kept.num_experts, kept.experts) == (3, "both")
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    # Evaluation during training used the merged adapter: the saved one scores the same on the same file.
    assert main(["eval", "--adapter", str(out), "--validation-file", dev]) == 0
    assert json.loads(capsys.readouterr().out)["dev"]["accuracy"] == results["best"]["dev_accuracy"]
    # An unmerged adapter handed to predict is merged on load: the same answers as the merged one.
    for source, name in ((out, "a.jsonl"), (out / "experts", "b.jsonl")):
        assert main(["predict", "--adapter", str(source), "--model", tiny_model_dir, "--input", dev,
                     "--text-columns", "text", "--output", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
