import re

import pytest
import torch
from conftest import TINY, tiny_batch, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import adakron
from adakron import AdaKronConfig
from adakron.adapters.layer import AdaKronLayer, TaskHeads

FFN_SITE = {
    "bert": r"bert\.encoder\.layer\.\d\.output\.dense",
    "roberta": r"roberta\.encoder\.layer\.\d\.output\.dense",
    "xlm-roberta": r"roberta\.encoder\.layer\.\d\.output\.dense",
    "electra": r"electra\.encoder\.layer\.\d\.output\.dense",
    "deberta-v2": r"deberta\.encoder\.layer\.\d\.output\.dense",
    "distilbert": r"distilbert\.transformer\.layer\.\d\.ffn\.lin2",
    "gpt2": r"transformer\.h\.\d\.mlp\.c_proj",
    "llama": r"model\.layers\.\d\.mlp\.down_proj",
    "mistral": r"model\.layers\.\d\.mlp\.down_proj",
    "qwen2": r"model\.layers\.\d\.mlp\.down_proj",
    "bart": r"model\.(en|de)coder\.layers\.\d\.fc2",
}


def _sites(model):
    return [name for name, m in model.named_modules() if isinstance(m, AdaKronLayer)]


def _layers(family):
    return 4 if family == "bart" else 2  # BART: 2 encoder + 2 decoder layers


def test_default_placement_is_one_adapter_per_layer_on_the_feed_forward_output(family):
    model = adakron.add_adapter(tiny_model(family))
    sites = _sites(model)
    assert len(sites) == _layers(family)
    assert all(re.fullmatch(FFN_SITE[family], s) for s in sites), sites


def test_houlsby_placement_adds_the_attention_output_projection(family):
    model = adakron.add_adapter(tiny_model(family), AdaKronConfig(placement="houlsby"))
    assert len(_sites(model)) == 2 * _layers(family)


def test_bert_adapter_sits_before_dropout_residual_and_layernorm():
    model = adakron.add_adapter(tiny_model("bert"))
    output = model.bert.encoder.layer[0].output  # BertOutput: LayerNorm(dropout(dense(x)) + input)
    assert isinstance(output.dense, AdaKronLayer)
    x, residual = torch.randn(2, 3, 37), torch.randn(2, 3, 32)
    h = output.dense.base_layer(x)
    expected = output.LayerNorm(h + output.dense.adakron_adapters["default"](h) + residual)
    torch.testing.assert_close(output(x, residual), expected)


def test_gpt2_conv1d_is_wrapped():
    model = adakron.add_adapter(tiny_model("gpt2"))
    assert isinstance(model.transformer.h[0].mlp.c_proj.base_layer, Conv1D)
    assert not isinstance(model.transformer.h[0].attn.c_proj, AdaKronLayer)


def test_adapter_is_identity_at_init_with_identity_init(family):
    model, batch = tiny_model(family), tiny_batch(family)
    base = model(**batch).logits
    adakron.add_adapter(model, AdaKronConfig(init="identity"))
    assert torch.equal(model(**batch).logits, base)


def test_reference_init_changes_the_output_at_step_zero():
    model, batch = tiny_model("bert"), tiny_batch("bert")
    base = model(**batch).logits
    adakron.add_adapter(model, AdaKronConfig(init="reference", initializer_range=0.5))
    assert not torch.allclose(model(**batch).logits, base)


def test_only_adapters_and_the_task_head_train(family):
    model = adakron.add_adapter(tiny_model(family))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all("adakron_" in n or ".heads.default." in n for n in trainable), trainable


def test_trainable_parameters_match_the_closed_form(family):
    model = tiny_model(family, num_labels=3)
    head = sum(p.numel() for name in adakron.adapters.inject.head_names(model, AdaKronConfig())
               for p in model.get_submodule(name).parameters())
    total_before = sum(p.numel() for p in model.parameters())
    adakron.add_adapter(model, AdaKronConfig(rank=16, kron_factor=4))
    d, r, f, layers = 32, 16, 4, _layers(family)
    closed_form = layers * (d * (r // f + f) + r // f + f + r * d + d)
    trainable, total = adakron.trainable_parameters(model)
    assert adakron.adapter_parameters(model, "default") == closed_form
    assert trainable == closed_form + head
    assert total == total_before + closed_form + head


def test_target_modules_regex_and_list_work_for_any_model():
    model = adakron.add_adapter(tiny_model("bert"), AdaKronConfig(target_modules=r".*\.intermediate\.dense"))
    assert _sites(model) == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    model = adakron.add_adapter(tiny_model("bert"), AdaKronConfig(target_modules=["layer.1.attention.self.query"]))
    assert _sites(model) == ["bert.encoder.layer.1.attention.self.query"]


def test_pattern_that_matches_nothing_lists_candidates_and_leaves_the_model_unchanged():
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"matched no Linear/Conv1D module\. Candidates: .*bert\.encoder\.layer\.\*\."
                                         r"output\.dense"):
        adakron.add_adapter(model, AdaKronConfig(target_modules=r".*nope"))
    assert not any(isinstance(m, (AdaKronLayer, TaskHeads)) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_model_type_without_targets_says_what_to_pass():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = type("Config", (), {"model_type": "mystery"})()
    with pytest.raises(ValueError, match="pass target_modules"):
        adakron.add_adapter(model)


def test_pattern_matching_only_non_linear_modules_is_rejected():
    with pytest.raises(ValueError, match="matched no Linear/Conv1D"):
        adakron.add_adapter(tiny_model("bert"), AdaKronConfig(target_modules=r".*LayerNorm"))


def test_unload_restores_the_original_modules_and_outputs(family):
    model, batch = tiny_model(family), tiny_batch(family)
    keys, base = set(model.state_dict()), model(**batch).logits
    adakron.add_adapter(model, AdaKronConfig(init="reference", initializer_range=0.5))
    adakron.add_adapter(model, AdaKronConfig(), name="second")
    adakron.unload(model)
    assert set(model.state_dict()) == keys
    assert torch.equal(model(**batch).logits, base)
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "adakron_state")


def test_duplicate_and_invalid_names_are_rejected():
    model = adakron.add_adapter(tiny_model("bert"), name="rte")
    with pytest.raises(ValueError, match="already exists"):
        adakron.add_adapter(model, name="rte")
    with pytest.raises(ValueError, match="must be letters"):
        adakron.add_adapter(model, name="a.b")


def test_a_config_given_as_a_dict_is_refused_with_the_way_to_build_one():
    model = tiny_model("bert")
    with pytest.raises(TypeError, match=r"AdaKronConfig\.from_dict"):
        adakron.add_adapter(model, {"rank": 16})
    assert not hasattr(model, "adakron_state")


def test_remove_adapter_drops_its_weights_and_head():
    model = adakron.add_adapter(tiny_model("bert"), name="a")
    adakron.add_adapter(model, name="b")
    adakron.remove_adapter(model, "b")
    assert adakron.adapter_names(model) == ["a"]
    assert not any(".b." in n for n, _ in model.named_parameters())
    assert adakron.active_adapter(model) == "a"


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_trains_one_step(family):
    model = adakron.add_adapter(tiny_model(family)).train()
    batch = tiny_batch(family)
    loss = model(**batch, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "adakron_up" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_unload_restores_the_label_settings_after_a_head_of_another_width():
    model = tiny_model("bert")
    before = (model.config.id2label, model.config.problem_type, model.num_labels)
    adakron.add_adapter(model, AdaKronConfig(num_labels=1), name="stsb")
    assert model.num_labels == 1
    adakron.unload(model)
    assert (model.config.id2label, model.config.problem_type, model.num_labels) == before
    assert model(**tiny_batch()).logits.shape == (3, 2)


def test_removing_the_last_adapter_gives_back_the_original_model():
    model, batch = tiny_model("bert"), tiny_batch()
    keys, base = set(model.state_dict()), model(**batch).logits
    adakron.add_adapter(model, name="only")
    adakron.remove_adapter(model, "only")
    assert set(model.state_dict()) == keys and torch.equal(model(**batch).logits, base)
    assert all(p.requires_grad for p in model.parameters())
    assert adakron.adapter_names(model) == []


def test_removing_an_adapter_unwraps_sites_no_other_adapter_uses():
    model = adakron.add_adapter(tiny_model("bert"), name="ffn")
    keys = set(model.state_dict())
    adakron.add_adapter(model, AdaKronConfig(placement="houlsby"), name="both")
    adakron.remove_adapter(model, "both")
    assert set(model.state_dict()) == keys


def test_bert_pooler_trains_with_the_head_as_a_per_adapter_copy():
    model = adakron.add_adapter(tiny_model("bert"), AdaKronConfig(), name="a")
    pooler = model.bert.pooler
    assert isinstance(pooler, TaskHeads) and set(pooler.heads) == {"a"}
    assert all(p.requires_grad for p in pooler.heads["a"].parameters())
    assert not any(p.requires_grad for p in pooler.original_module.parameters())


def test_explicit_head_modules_without_the_pooler_leave_it_frozen_and_unwrapped():
    model = adakron.add_adapter(tiny_model("bert"), AdaKronConfig(head_modules=("classifier",)))
    assert not isinstance(model.bert.pooler, TaskHeads)
    assert not any(p.requires_grad for p in model.bert.pooler.parameters())


@pytest.mark.parametrize("method", ["adakron", "adapter", "lora"])
def test_every_peft_method_trains_the_pooler_unless_asked_to_leave_it_frozen(method):
    from adakron.training.trainer import TrainArgs, apply_method

    def pooler_trains(train_pooler):
        model = apply_method(tiny_model("bert"), method, TrainArgs(lora_r=4), train_pooler)
        return any(p.requires_grad for n, p in model.named_parameters() if ".pooler." in n)

    assert pooler_trains(True) and not pooler_trains(False)


def test_head_modules_naming_no_module_lists_the_choices():
    with pytest.raises(ValueError, match=r"not modules of this model.*bert\.pooler"):
        adakron.add_adapter(tiny_model("bert"), AdaKronConfig(head_modules=("bert.nowhere",)))


def test_a_pooler_the_head_never_reads_stays_frozen():
    from transformers import BigBirdConfig, BigBirdForSequenceClassification

    config = BigBirdConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=100, attention_type="original_full")
    model = BigBirdForSequenceClassification(config)
    assert model.bert.pooler is not None  # built, but the classification head reads the first token itself
    adakron.add_adapter(model, AdaKronConfig(target_modules=r"bert\.encoder\.layer\.\d\.output\.dense"))
    assert adakron.adapters.inject.head_names(model, AdaKronConfig()) == ["classifier"]
    assert not any(p.requires_grad for p in model.bert.pooler.parameters())


def test_the_pooler_is_never_taken_for_the_label_projection_even_when_their_widths_match():
    # hidden 32 and a base model built with num_labels=32: the pooler's dense is also 32 wide.
    model = tiny_model("bert", num_labels=32)
    adakron.add_adapter(model, AdaKronConfig(num_labels=2))
    logits = model(**tiny_batch()).logits
    assert logits.shape == (3, 2)
    heads = {n: m for n, m in model.named_modules()}
    assert heads["bert.pooler.heads.default.dense"].out_features == 32
    assert heads["classifier.heads.default"].out_features == 2


@pytest.mark.parametrize("family", ["roberta", "distilbert", "deberta-v2", "bart", "electra"])
def test_the_label_projection_is_the_last_linear_of_the_head(family):
    model = tiny_model(family, num_labels=2)
    adakron.add_adapter(model, AdaKronConfig(num_labels=5))
    assert model(**tiny_batch(family)).logits.shape[-1] == 5
