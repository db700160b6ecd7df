"""The real embedded all-MiniLM-L6-v2: parameter count and a few training steps end to end."""

import json

import torch
from conftest import sentiment_rows, write_rows
from safetensors.torch import load_file

import adakron
from adakron import AdaKronConfig
from adakron.cli import main
from adakron.models import load_classifier


def test_minilm_r16_f4_has_57648_adapter_parameters():
    model = adakron.add_adapter(load_classifier(None, 2), AdaKronConfig(rank=16, kron_factor=4))
    assert adakron.adapter_parameters(model, "default") == 57_648
    trainable, total = adakron.trainable_parameters(model)
    assert trainable == 57_648 + (384 * 384 + 384) + (384 * 2 + 2)  # adapter, pooler, classifier


def test_minilm_r48_has_149856_adapter_parameters():
    model = adakron.add_adapter(load_classifier(None, 2), AdaKronConfig(rank=48, kron_factor=4))
    assert adakron.adapter_parameters(model, "default") == 149_856


def test_minilm_trains_a_few_steps_twice_to_the_same_small_checkpoint(tmp_path):
    train = write_rows(tmp_path / "train.csv", ["text", "label"], sentiment_rows(32, seed=0))
    dev = write_rows(tmp_path / "dev.csv", ["text", "label"], sentiment_rows(16, seed=1))
    for name in ("a", "b"):
        assert main(["train", "--train-file", train, "--validation-file", dev, "--text-columns", "text",
                     "--output-dir", str(tmp_path / name), "--epochs", "1", "--batch-size", "8",
                     "--max-length", "32"]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["trainable_params"] == 57_648 + 147_840 + 770
    assert 0 <= results["best"]["dev_accuracy"] <= 1
    weights = tmp_path / "a" / "adapter_model.safetensors"
    assert weights.stat().st_size < 1_000_000
    again = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(tensor, again[key]) for key, tensor in load_file(weights).items())
