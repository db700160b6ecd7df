"""A tiny causal LM and a tokenizer made on the spot (byte-level BPE, a ChatML chat template like SmolLM2's), for
the causal-LM tests: no network, milliseconds to build."""

from __future__ import annotations

import functools

import torch
import transformers
from conftest import TINY
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the cat sat on the mat", "what is the capital of france", "paris is the capital of france",
    "translate to french: good morning", "bonjour", "write a poem about the sea", "user assistant system",
    "hello world, how are you today?", "1 2 3 4 5 6 7 8 9 10",
]


@functools.cache
def _bpe() -> str:
    """The trained BPE model as JSON (trained once per session; copies are made from it)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return bpe.to_str()


def tiny_tokenizer(chat: bool = True, pad: bool = True) -> transformers.PreTrainedTokenizerFast:
    """A fresh tokenizer (tests may change it): ChatML template if ``chat``, a pad token if ``pad``; its
    end-of-sequence token is ``<|im_end|>``, as in SmolLM2."""
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe()),
                                                     eos_token="<|im_end|>", pad_token="<|pad|>" if pad else None)
    tokenizer.chat_template = CHATML if chat else None
    return tokenizer


def tiny_causal_lm(tokenizer, seed: int = 0, tie: bool = True) -> transformers.LlamaForCausalLM:
    """A randomly initialised 2-layer LLaMA with the conftest sizes, its vocabulary fitted to ``tokenizer``;
    ``tie``: the LM head shares the embeddings, as in SmolLM2."""
    _, sizes = TINY["llama"]
    config = transformers.LlamaConfig(**{**sizes, "vocab_size": len(tokenizer), "tie_word_embeddings": tie,
                                         "pad_token_id": tokenizer.convert_tokens_to_ids("<|pad|>"),
                                         "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None,
                                         "max_position_embeddings": 128, "initializer_range": 0.3})
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def save_tiny_lm(folder, seed: int = 0):
    """The tiny LLaMA and its tokenizer saved as a model folder, for the command-line tests; returns the folder."""
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
