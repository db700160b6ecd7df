import json

import pytest
import torch
from conftest import TINY, tiny_batch, tiny_model

import adakron
from adakron import AdaKronConfig, AdapterLoadError
from adakron.adapters.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def _trained(family="bert", num_labels=2, seed=5, **config):
    model = adakron.add_adapter(tiny_model(family, num_labels=num_labels), AdaKronConfig(**config), name="task")
    torch.manual_seed(seed)
    with torch.no_grad():  # stand in for training: move every trainable weight
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("family", sorted(TINY))
def test_checkpoint_round_trip_is_exact(family, tmp_path):
    model, batch = _trained(family), tiny_batch(family)
    adakron.save_adapter(model, tmp_path)
    fresh = tiny_model(family)
    assert adakron.load_adapter(fresh, tmp_path) == "task"
    assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_checkpoint_holds_only_adapter_and_head_weights_in_safetensors(tmp_path):
    model = _trained()
    adakron.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    expected = {f"bert.encoder.layer.{i}.output.dense.{m}.{p}" for i in range(2)
                for m in ("adakron_down", "adakron_up") for p in ("weight", "bias")}
    head = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert keys == expected | head
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["format_version"] == 1 and saved["model_type"] == "bert" and saved["rank"] == 16
    assert saved["head_modules"] == ["bert.pooler", "classifier"]


def test_loaded_adapter_is_frozen_unless_asked(tmp_path):
    adakron.save_adapter(_trained(), tmp_path)
    fresh = tiny_model("bert")
    adakron.load_adapter(fresh, tmp_path)
    assert adakron.trainable_parameters(fresh)[0] == 0
    other = tiny_model("bert")
    adakron.load_adapter(other, tmp_path, is_trainable=True)
    assert adakron.trainable_parameters(other)[0] > 0


def test_crash_mid_save_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    model = _trained()
    adakron.save_adapter(model, tmp_path)
    good = (tmp_path / WEIGHTS_NAME).read_bytes()

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("adakron.adapters.checkpoint.os.replace", crash)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        adakron.save_adapter(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left


def _assert_rejected(model, directory, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=match):
        adakron.load_adapter(model, directory)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_loading_onto_a_wider_backbone_is_refused(tmp_path):
    adakron.save_adapter(_trained(), tmp_path)
    config_class, kwargs = TINY["bert"]
    wider = __import__("transformers").AutoModelForSequenceClassification.from_config(
        config_class(**{**kwargs, "hidden_size": 64}))
    _assert_rejected(wider, tmp_path, "shape mismatches")


def test_loading_onto_a_deeper_backbone_is_refused(tmp_path):
    adakron.save_adapter(_trained(), tmp_path)
    config_class, kwargs = TINY["bert"]
    deeper = __import__("transformers").AutoModelForSequenceClassification.from_config(
        config_class(**{**kwargs, "num_hidden_layers": 3}))
    _assert_rejected(deeper, tmp_path, "4 missing keys")


def test_loading_onto_another_model_type_is_refused(tmp_path):
    adakron.save_adapter(_trained(), tmp_path)
    _assert_rejected(tiny_model("roberta"), tmp_path, "trained on a 'bert' model; this model is 'roberta'")


def test_truncated_weights_are_refused(tmp_path):
    adakron.save_adapter(_trained(), tmp_path)
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-10])
    _assert_rejected(tiny_model("bert"), tmp_path, "corrupted or truncated")


def test_corrupted_weights_are_refused(tmp_path):
    adakron.save_adapter(_trained(), tmp_path)
    path = tmp_path / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    _assert_rejected(tiny_model("bert"), tmp_path, "corrupted or truncated")


def test_unreadable_safetensors_without_a_recorded_hash_is_refused(tmp_path):
    adakron.save_adapter(_trained(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["weights_sha256"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x00" * 5)
    _assert_rejected(tiny_model("bert"), tmp_path, "not a readable safetensors file")


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_missing_file_is_refused(tmp_path, missing):
    adakron.save_adapter(_trained(), tmp_path)
    (tmp_path / missing).unlink()
    _assert_rejected(tiny_model("bert"), tmp_path, f"{missing} does not exist")


def test_config_from_a_newer_format_version_is_refused(tmp_path):
    adakron.save_adapter(_trained(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["format_version"] = 99
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    _assert_rejected(tiny_model("bert"), tmp_path, "format_version 99.*Upgrade adakron")


def test_failed_load_beside_other_adapters_leaves_them_in_place(tmp_path):
    adakron.save_adapter(_trained(), tmp_path)
    model = adakron.add_adapter(tiny_model("bert"), name="keep")
    adakron.save_adapter(_trained(), tmp_path / "ok")
    (tmp_path / "ok" / WEIGHTS_NAME).write_bytes((tmp_path / "ok" / WEIGHTS_NAME).read_bytes()[:-1])
    _assert_rejected(model, tmp_path / "ok", "corrupted")
    assert adakron.adapter_names(model) == ["keep"] and adakron.active_adapter(model) == "keep"


def test_head_with_other_number_of_labels_round_trips(tmp_path):
    batch = tiny_batch()
    model = adakron.add_adapter(tiny_model("bert"), AdaKronConfig(num_labels=1), name="stsb")
    adakron.save_adapter(model, tmp_path)
    fresh = tiny_model("bert")
    adakron.load_adapter(fresh, tmp_path)
    assert fresh(**batch).logits.shape == (3, 1)
    assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_shape_mismatch_beside_other_adapters_leaves_the_model_exactly_as_it_was(tmp_path):
    adakron.save_adapter(_trained(placement="houlsby"), tmp_path)
    import transformers

    config_class, kwargs = TINY["bert"]
    wider = transformers.AutoModelForSequenceClassification.from_config(config_class(**{**kwargs, "hidden_size": 64}))
    adakron.add_adapter(wider, name="keep")
    _assert_rejected(wider, tmp_path, "shape mismatches")
    assert adakron.adapter_names(wider) == ["keep"]


def test_loading_does_not_move_the_callers_random_state(tmp_path):
    adakron.save_adapter(_trained(), tmp_path)
    fresh = tiny_model("bert")
    torch.manual_seed(123)
    adakron.load_adapter(fresh, tmp_path)
    after_load = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_load)


def test_a_peft_directory_is_named_as_such(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    _assert_rejected(tiny_model("bert"), tmp_path, "holds a PEFT \\(LORA\\) adapter")
