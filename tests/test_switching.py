import pytest
import torch
from conftest import tiny_batch, tiny_model

import adakron
from adakron import AdaKronConfig

HEADS = {"rte": 2, "stsb": 1, "mnli": 3}


def _multi(tmp_path, family="bert"):
    """A backbone with three adapters whose heads differ in width, each also saved on its own."""
    model = tiny_model(family)
    for seed, (name, labels) in enumerate(HEADS.items()):
        torch.manual_seed(seed)
        adakron.add_adapter(model, AdaKronConfig(num_labels=labels, init="reference", initializer_range=0.3), name=name)
        adakron.save_adapter(model, tmp_path / name, name=name)
    return model


def _alone(family, directory):
    model = tiny_model(family)
    adakron.load_adapter(model, directory)
    return model


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_use_adapter_gives_the_logits_of_a_model_holding_only_that_adapter(tmp_path, family):
    model, batch = _multi(tmp_path, family), tiny_batch(family)
    for name, labels in HEADS.items():
        with adakron.use_adapter(model, name):
            logits = model(**batch).logits
        assert logits.shape == (3, labels)
        assert torch.equal(logits, _alone(family, tmp_path / name)(**batch).logits)


def test_use_adapter_restores_the_previous_choice():
    model = adakron.add_adapter(tiny_model("bert"), name="a")
    adakron.add_adapter(model, name="b")
    assert adakron.active_adapter(model) == "b"
    with adakron.use_adapter(model, "a"):
        assert adakron.active_adapter(model) == "a"
    assert adakron.active_adapter(model) == "b"


def test_use_adapter_switches_the_loss_to_the_heads_problem_type(tmp_path):
    model = _multi(tmp_path)
    with adakron.use_adapter(model, "stsb"):
        assert model.config.problem_type == "regression" and model.num_labels == 1
        labels = torch.tensor([0.5, 1.0, 2.0])
        out = model(**tiny_batch(), labels=labels)
        torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), labels))


def test_disable_adapters_gives_exactly_the_base_models_hidden_states_and_logits(tmp_path, family):
    base, batch = tiny_model(family), tiny_batch(family)
    expected = base(**batch, output_hidden_states=True)
    model = _multi(tmp_path, family)
    with adakron.disable_adapters(model):
        got = model(**batch, output_hidden_states=True)
    assert torch.equal(got.logits, expected.logits)
    states = "decoder_hidden_states" if family == "bart" else "hidden_states"
    for a, b in zip(getattr(got, states), getattr(expected, states), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(model(**batch).logits[:, :1], expected.logits[:, :1])


def test_unknown_adapter_name_is_rejected():
    model = adakron.add_adapter(tiny_model("bert"), name="a")
    with pytest.raises(ValueError, match=r"No adapter named 'zzz'; adapters: \['a'\]"):
        with adakron.use_adapter(model, "zzz"):
            pass


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
def test_mixed_batch_rows_equal_running_each_adapter_separately(tmp_path, family):
    model = _multi(tmp_path, family)
    batch = tiny_batch(family, batch=6)
    names = ["stsb", "rte", None, "mnli", "rte", "stsb"]
    rows = adakron.predict(model, batch, names)
    base = tiny_model(family)
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        reference = (_alone(family, tmp_path / name) if name else base)(**row).logits[0]
        assert rows[i].shape == reference.shape
        torch.testing.assert_close(rows[i], reference, atol=1e-5, rtol=0)


def test_mixed_batch_needs_one_name_per_row():
    model = adakron.add_adapter(tiny_model("bert"), name="a")
    with pytest.raises(ValueError, match="one per row"):
        adakron.predict(model, tiny_batch(batch=3), ["a"])


def test_a_new_adapter_takes_the_bare_models_labels_not_the_active_adapters():
    model = adakron.add_adapter(tiny_model("bert"), AdaKronConfig(num_labels=1), name="stsb")
    adakron.add_adapter(model, name="rte")
    assert adakron.adapters.inject.state_of(model).configs["rte"].num_labels == 2
    with adakron.use_adapter(model, "rte"):
        assert model(**tiny_batch()).logits.shape == (3, 2)


def test_predict_runs_in_eval_mode_and_restores_the_mode():
    model = adakron.add_adapter(tiny_model("bert"), name="a").train()
    batch = tiny_batch()
    first = adakron.predict(model, batch, ["a"] * 3)
    second = adakron.predict(model, batch, ["a"] * 3)
    assert all(torch.equal(x, y) for x, y in zip(first, second))  # no dropout
    assert model.training


def test_each_adapter_uses_its_own_pooler():
    model = adakron.add_adapter(tiny_model("bert"), AdaKronConfig(), name="a")
    adakron.add_adapter(model, AdaKronConfig(), name="b")
    with torch.no_grad():
        model.bert.pooler.heads["b"].dense.bias.add_(1.0)
    batch = tiny_batch("bert")
    with adakron.use_adapter(model, "a"):
        pooled_a = model.bert(**batch).pooler_output
    with adakron.use_adapter(model, "b"):
        pooled_b = model.bert(**batch).pooler_output
    with adakron.disable_adapters(model):
        pooled_bare = model.bert(**batch).pooler_output
    assert not torch.allclose(pooled_a, pooled_b)
    assert torch.equal(pooled_bare, tiny_model("bert").bert(**batch).pooler_output)
