"""Tiny randomly initialised models of every supported family; no network, no tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)
TINY = {
    "bert": (transformers.BertConfig, _SIZES),
    "roberta": (transformers.RobertaConfig, {**_SIZES, "pad_token_id": 1}),
    "xlm-roberta": (transformers.XLMRobertaConfig, {**_SIZES, "pad_token_id": 1}),
    "electra": (transformers.ElectraConfig, {**_SIZES, "embedding_size": 16}),
    "deberta-v2": (transformers.DebertaV2Config, _SIZES),
    "distilbert": (transformers.DistilBertConfig, dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=99)),
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99, pad_token_id=0,
                                           bos_token_id=0, eos_token_id=0)),
    "llama": (transformers.LlamaConfig, {**_SIZES, "num_key_value_heads": 2, "pad_token_id": 0}),
    "mistral": (transformers.MistralConfig, {**_SIZES, "num_key_value_heads": 2, "pad_token_id": 0}),
    "qwen2": (transformers.Qwen2Config, {**_SIZES, "num_key_value_heads": 2, "pad_token_id": 0}),
    "bart": (transformers.BartConfig, dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                           decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                                           vocab_size=99, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
}
FAMILIES = sorted(TINY)


def tiny_model(family: str = "bert", num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    config_class, kwargs = TINY[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(config_class(**kwargs, num_labels=num_labels))
    return model.eval()


def tiny_batch(family: str = "bert", batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, length), generator=generator)
    if family == "bart":
        ids[:, -1] = 2  # BART classifies from the eos token
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny BERT classifier with a real tokenizer, saved like a hub model, for CLI runs (dropout off so
    runs are exactly comparable across process counts)."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.BertTokenizer(vocab=os.path.join(FIXTURES, "tiny_vocab.txt"))
    config = transformers.BertConfig(**{**_SIZES, "vocab_size": tokenizer.vocab_size}, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, max_position_embeddings=64,
                                     initializer_range=0.2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def write_rows(path, header: list[str], rows: list[list], sep: str = ",") -> str:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=sep, quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def sentiment_rows(n: int, seed: int = 0, labels=("negative", "positive")) -> list[list[str]]:
    """Short sentences whose label a model can learn: 'good'/'great' words mean the second label."""
    import random

    rng = random.Random(seed)
    filler = ["the", "a", "movie", "film", "plot", "actor", "story", "is", "was", "very", "really", "quite"]
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(["good", "great", "best", "nice"] if positive else ["bad", "awful", "worst", "terrible"])
        words = rng.sample(filler, 4) + [word]
        rng.shuffle(words)
        rows.append([" ".join(words), labels[int(positive)]])
    return rows


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, then torch's setting as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fails_in_one_line(capsys, argv: list[str], match: str, written=None) -> None:
    """`adakron ARGV` exits 2 with one line on stderr that contains ``match``, no traceback, and (if given)
    ``written`` does not exist afterwards."""
    from adakron.cli import main

    capsys.readouterr()  # only this command's output counts
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    if written is not None:
        assert not written.exists()


def wider_copy(model_dir: str, path) -> str:
    """The tiny model of ``model_dir`` with a wider hidden size (random weights, same tokenizer): a base model
    that an adapter trained on the original does not fit."""
    config = transformers.BertConfig.from_pretrained(model_dir)
    config.hidden_size, config.intermediate_size = 64, 37
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return str(path)
