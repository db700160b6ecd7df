"""`adakron train` on a causal LM: instruction data in, loss on the completion only, dev loss and perplexity per
epoch, the best epoch by dev loss, and an adapter that generates (tiny random LLaMA, no network)."""

import json
import math

import pytest
from tiny_lm import save_tiny_lm

from adakron.cli import main

ALPACA = [{"instruction": f"Say the word number {i}.", "input": "", "output": ["alpha", "beta", "gamma"][i % 3]}
          for i in range(40)]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-llama"))


def _train(lm_dir, tmp_path, *extra):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(ALPACA))
    out = tmp_path / "run"
    argv = ["train", "--model", str(lm_dir), "--train-file", str(data), "--output-dir", str(out), "--epochs", "2",
            "--batch-size", "8", "--lr", "5e-3", "--max-length", "48", "--no-plot", *extra]
    return main(argv), out


@pytest.mark.parametrize("method", ["adakron", "lora"])
def test_a_causal_lm_trains_on_alpaca_data_without_labels_or_a_dev_file(lm_dir, tmp_path, method):
    code, out = _train(lm_dir, tmp_path, "--method", method)
    assert code == 0
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1.0, 2.0]
    for e in epochs:
        assert e["dev"]["dev_perplexity"] == pytest.approx(math.exp(e["dev"]["dev_nll"]), rel=1e-6)
    results = json.loads((out / "results.json").read_text())
    assert results["main_metric"] == "dev_nll"
    assert results["best"]["dev_nll"] == min(e["dev"]["dev_nll"] for e in epochs)  # lower is better
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    task = json.loads((out / "task.json").read_text())
    assert task["objective"] == "causal-lm" and task["text_columns"] is None


def test_an_adakron_causal_lm_adapter_has_no_task_head_and_counts_in_closed_form(lm_dir, tmp_path):
    from adakron import AdaKronConfig

    code, out = _train(lm_dir, tmp_path, "--rank", "8", "--max-steps", "2")
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["head_modules"] == []
    width, layers = 32, 2
    assert results["trainable_params"] == layers * AdaKronConfig(rank=8).adapter_parameters(width)
    assert results["last"]["epoch"] <= 1.0 and json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])[
        "step"] == 2


def test_generate_streams_what_the_library_generates_with_the_trained_adapter(lm_dir, tmp_path, capsys):
    import adakron
    from adakron.models import load_causal_lm
    from adakron.training.generate import generate

    code, out = _train(lm_dir, tmp_path, "--max-steps", "3")
    assert code == 0
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "6", "Say the word number 1."]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load_causal_lm(str(lm_dir))
    name = adakron.load_adapter(model, out)
    assert printed == generate(model, tokenizer, ["Say the word number 1."], adapter_names=[name],
                               max_new_tokens=6)[0] + "\n"
    assert main(["generate", "--model", str(lm_dir), "--max-new-tokens", "4", "hello"]) == 0  # the base model


def test_generate_refuses_bad_sampling_flags_in_one_line(lm_dir, capsys):
    assert main(["generate", "--model", str(lm_dir), "--temperature", "-1", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--temperature" in err and err.count("\n") == 1


@pytest.mark.parametrize("recipe,init", [("default", "identity"), ("paper", "reference")])
def test_a_causal_lm_adapter_starts_from_the_base_model_unless_the_paper_recipe_is_asked_for(lm_dir, tmp_path,
                                                                                            recipe, init):
    code, out = _train(lm_dir, tmp_path, "--max-steps", "1", "--recipe", recipe)
    assert code == 0
    assert json.loads((out / "adapter_config.json").read_text())["init"] == init


def test_the_dev_loss_is_the_models_own_token_mean_loss_on_the_completions(lm_dir):
    import torch

    from adakron.models import load_causal_lm
    from adakron.training.causal import compute_metrics, nll_sums
    from adakron.training.lm import collator, encode_examples, parse_record

    model, tokenizer = load_causal_lm(str(lm_dir))
    rows = encode_examples(tokenizer, [parse_record(r, f"record {i}") for i, r in enumerate(ALPACA[:5])], 48)
    batch = collator(tokenizer)(rows)
    with torch.no_grad():
        out = model(**batch)
    sums = nll_sums(out.logits, batch["labels"])
    assert sums.shape == (5, 2)
    metrics = compute_metrics(type("P", (), {"predictions": sums.numpy()})())
    assert metrics["nll"] == pytest.approx(out.loss.item(), rel=1e-5)  # the same token mean as transformers'
