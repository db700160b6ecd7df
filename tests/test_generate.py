"""Generation with adapters: a mixed batch (left-padded, a different adapter per row, KV cache on) gives each row
the tokens it gets alone; greedy by default, seeded sampling, streaming (tiny tokenizer, tiny LLaMA)."""

import threading

import pytest
import torch
from tiny_lm import tiny_causal_lm, tiny_tokenizer

import adakron
from adakron.errors import UsageError
from adakron.training.generate import Sampling, generate, generate_ids, stream
from adakron.training.lm import prompt_ids

# Prompts of different lengths, so the batch is left-padded.
PROMPTS = ["hi", "what is the capital of france and of the sea", "the cat", "1 2 3"]
NAMES = ["a", "b", None, "a"]
SHORT = Sampling(max_new_tokens=10)


def two_adapter_model(tie: bool = True, head_modules=None):
    """The tiny LLaMA with adapters "a" and "b", initialised large enough to change every row's tokens."""
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, tie=tie)
    for name in ("a", "b"):
        adakron.add_adapter(model, adakron.AdaKronConfig(rank=8, init="reference", initializer_range=1.0, head_modules=head_modules),
                            name=name)
    return model, tokenizer


@pytest.fixture(scope="module")
def pair():
    return two_adapter_model()


def alone(model, tokenizer, prompt, name, sampling=SHORT):
    return generate_ids(model, tokenizer, [prompt], [name], sampling=sampling)[0]


def test_a_mixed_batch_gives_each_row_the_tokens_it_gets_alone_with_its_adapter(pair):
    model, tokenizer = pair
    mixed = generate_ids(model, tokenizer, PROMPTS, NAMES, sampling=SHORT)
    assert mixed == [alone(model, tokenizer, p, n) for p, n in zip(PROMPTS, NAMES)]
    # Not vacuous: each adapter (and the bare model) writes something else for the same prompt.
    assert len({tuple(alone(model, tokenizer, PROMPTS[1], n)) for n in ("a", "b", None)}) == 3
    assert all(len(row) == SHORT.max_new_tokens for row in mixed)


def test_cached_mixed_generation_equals_greedy_steps_without_cache_on_each_row(pair):
    model, tokenizer = pair
    mixed = generate_ids(model, tokenizer, PROMPTS, NAMES, sampling=SHORT)
    for prompt, name, row in zip(PROMPTS, NAMES, mixed):
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])
        with adakron.use_adapter(model, name) if name else adakron.disable_adapters(model), torch.no_grad():
            for _ in range(SHORT.max_new_tokens):
                next_token = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
                ids = torch.cat([ids, next_token.view(1, 1)], dim=1)
        assert ids[0, -SHORT.max_new_tokens:].tolist() == row


def test_an_untied_lm_head_copied_per_adapter_routes_per_row_too():
    model, tokenizer = two_adapter_model(tie=False)
    assert "lm_head" in model.adakron_state.configs["a"].head_modules
    mixed = generate_ids(model, tokenizer, PROMPTS, NAMES, sampling=SHORT)
    assert mixed == [alone(model, tokenizer, p, n) for p, n in zip(PROMPTS, NAMES)]


def test_an_untied_model_with_no_head_modules_trains_only_the_adapters():
    model, tokenizer = two_adapter_model(tie=False, head_modules=())
    assert adakron.trainable_parameters(model)[0] == adakron.adapter_parameters(model, "b")
    mixed = generate_ids(model, tokenizer, PROMPTS, NAMES, sampling=SHORT)
    assert mixed == [alone(model, tokenizer, p, n) for p, n in zip(PROMPTS, NAMES)]


def test_a_row_that_stops_early_ends_at_its_eos_while_the_others_go_on(pair):
    model, tokenizer = pair
    first = generate_ids(model, tokenizer, PROMPTS, NAMES, sampling=SHORT)
    stop = first[0][3]  # make the fourth token of row 0 the end of sequence
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop
    try:
        mixed = generate_ids(model, tokenizer, PROMPTS, NAMES, sampling=SHORT)
        expected = [alone(model, tokenizer, p, n) for p, n in zip(PROMPTS, NAMES)]
    finally:
        model.generation_config.eos_token_id = saved
    assert mixed == expected
    assert mixed[0] == first[0][: first[0].index(stop)] and stop not in mixed[0]
    assert max(len(row) for row in mixed) == SHORT.max_new_tokens


def test_greedy_is_the_default_whatever_sampling_the_checkpoint_ships(pair):
    model, tokenizer = pair
    expected = generate(model, tokenizer, PROMPTS[:2], ["a", "b"], max_new_tokens=6)
    saved = model.generation_config
    model.generation_config = saved.__class__(**{**saved.to_dict(), "do_sample": True, "temperature": 5.0,
                                                 "top_k": 3})
    try:
        runs = [generate(model, tokenizer, PROMPTS[:2], ["a", "b"], max_new_tokens=6) for _ in range(2)]
    finally:
        model.generation_config = saved
    assert runs == [expected, expected]


def test_sampling_with_a_seed_repeats_and_leaves_the_callers_random_state_alone(pair):
    model, tokenizer = pair
    state = torch.random.get_rng_state()
    sample = Sampling(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    first = generate_ids(model, tokenizer, PROMPTS, NAMES, sampling=sample)
    assert generate_ids(model, tokenizer, PROMPTS, NAMES, sampling=sample) == first
    assert torch.equal(torch.random.get_rng_state(), state)
    other = Sampling(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=8)
    assert generate_ids(model, tokenizer, PROMPTS, NAMES, sampling=other) != first
    assert first != generate_ids(model, tokenizer, PROMPTS, NAMES, sampling=SHORT)


@pytest.mark.parametrize("flags, message", [
    ({"max_new_tokens": 0}, "--max-new-tokens must be a whole number >= 1"),
    ({"temperature": -1.0}, "--temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, "--temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"--top-p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
])
def test_bad_sampling_flags_are_usage_errors_naming_the_flag(flags, message):
    with pytest.raises(UsageError, match=message):
        Sampling(**flags)


def test_prompts_and_adapter_names_must_line_up(pair):
    model, tokenizer = pair
    with pytest.raises(ValueError, match="adapter_names has 1 entries for 2 prompts"):
        generate(model, tokenizer, ["hi", "the cat"], ["a"])
    with pytest.raises(ValueError, match="Unknown adapters"):
        generate(model, tokenizer, ["hi"], ["nope"])
    with pytest.raises(TypeError, match="put a single prompt in a list"):
        generate(model, tokenizer, "hi")
    assert generate(model, tokenizer, []) == []


def test_a_conversation_prompt_is_the_same_as_its_user_message(pair):
    model, tokenizer = pair
    as_text = generate(model, tokenizer, ["the cat"], ["a"], max_new_tokens=5)
    assert generate(model, tokenizer, [[{"role": "user", "content": "the cat"}]], ["a"], max_new_tokens=5) == as_text


def test_without_adapter_names_the_active_adapter_generates(pair):
    model, tokenizer = pair
    with adakron.use_adapter(model, "b"):
        assert generate_ids(model, tokenizer, PROMPTS[:2], sampling=SHORT) == [
            alone(model, tokenizer, p, "b") for p in PROMPTS[:2]]


def test_generation_puts_a_training_model_back_in_training_mode(pair):
    model, tokenizer = pair
    model.train()
    try:
        generate(model, tokenizer, ["hi"], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_a_stream_yields_the_text_generate_returns(pair):
    model, tokenizer = pair
    pieces = list(stream(model, tokenizer, PROMPTS[1], "b", max_new_tokens=10))
    assert "".join(pieces) == generate(model, tokenizer, [PROMPTS[1]], ["b"], max_new_tokens=10)[0]


def test_closing_a_stream_early_stops_its_generation_thread(pair):
    model, tokenizer = pair
    pieces = stream(model, tokenizer, "hi", "a", max_new_tokens=100_000)
    next(pieces)
    pieces.close()
    assert not any(t.name == "adakron-generate" and t.is_alive() for t in threading.enumerate())


def test_an_error_while_streaming_reaches_the_reader(pair):
    model, tokenizer = pair
    with pytest.raises(ValueError, match="Unknown adapters"):
        list(stream(model, tokenizer, "hi", "nope", max_new_tokens=3))
