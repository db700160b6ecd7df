"""Causal-LM instruction data: reading the record shapes, chat templates, the completion-only loss mask,
truncation, the padding collator and the seeded held-out split (tiny tokenizer, tiny LLaMA, no network)."""

import json
import logging

import pytest
import torch
from tiny_lm import tiny_causal_lm, tiny_tokenizer

import adakron
from adakron.errors import UsageError
from adakron.training import lm
from adakron.training.lm import IGNORE_INDEX, Example

QA = Example(messages=({"role": "user", "content": "what is the capital of france"},
                       {"role": "assistant", "content": "paris is the capital"}), where="qa")


def learned_text(tokenizer, row) -> list[str]:
    """The learned spans of an encoded row, decoded (one string per run of learned tokens)."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return [tokenizer.decode(s) for s in spans + ([current] if current else [])]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# --- reading ---------------------------------------------------------------------------------------------------

def test_every_record_shape_becomes_a_conversation_or_a_text(tmp_path):
    records = [
        {"prompt": "what is the capital of france", "completion": "paris"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "bonjour"}]},
        {"instruction": "translate to french", "input": "good morning", "output": "bonjour", "id": 7},
        {"instruction": "write a poem about the sea", "output": "the sea"},
        {"text": "the cat sat on the mat"},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]},
    ]
    examples = lm.read_examples(write_jsonl(tmp_path / "train.jsonl", records))
    assert [e.where for e in examples] == [f"{tmp_path / 'train.jsonl'}:{i}" for i in range(1, 7)]
    assert examples[0].messages == ({"role": "user", "content": "what is the capital of france"},
                                    {"role": "assistant", "content": "paris"})
    assert [m["role"] for m in examples[1].messages] == ["system", "user", "assistant"]
    assert examples[2].messages[0] == {"role": "user", "content": "translate to french\n\ngood morning"}
    assert examples[3].messages[0] == {"role": "user", "content": "write a poem about the sea"}
    assert examples[4] == Example(text="the cat sat on the mat", where=examples[4].where)
    assert examples[5].messages == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})


def test_a_json_file_holding_a_list_reads_like_json_lines(tmp_path):
    records = [{"prompt": "a", "completion": "b"}, {"text": "c"}]
    (tmp_path / "train.json").write_text(json.dumps(records, indent=2))
    examples = lm.read_examples(tmp_path / "train.json")
    assert [e.where for e in examples] == [f"{tmp_path / 'train.json'} record {i}" for i in (1, 2)]
    assert examples[1].text == "c"


BAD_FILES = {
    "not valid JSON": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', ":2: not valid JSON"),
    "unknown shape": ('{"question": "a", "answer": "b"}\n', ":1: a record needs `prompt`+`completion`"),
    "half a pair": ('{"prompt": "a"}\n', ":1: `prompt` and `completion` go together; `completion` is missing"),
    "half alpaca": ('{"instruction": "a"}\n', ":1: `instruction` and `output` go together; `output` is missing"),
    "no reply": ('{"messages": [{"role": "user", "content": "a"}]}\n', ":1: the conversation has no assistant"),
    "content not text": ('{"messages": [{"role": "user", "content": 3}]}\n', "`messages[1].content` must be"),
    "reply first": ('{"messages": [{"role": "assistant", "content": "a"}]}\n', ":1: the conversation starts with an"),
    "message not an object": ('{"messages": ["hello"]}\n', "`messages` item 1 must be an object"),
    "empty messages": ('{"messages": []}\n', "`messages` must be a non-empty list"),
    "number completion": ('{"prompt": "a", "completion": 5}\n', "`completion` must be a string, found 5"),
    "empty text": ('{"text": ""}\n', ":1: `text` is empty"),
    "lone surrogate": ('{"text": "\\ud800"}\n', "not valid Unicode text"),
    "not an object": ('["a", "b"]\n', "record 1: expected a JSON object"),
    "bad JSON list": ('[{"text": "a"},\n {"text": }]\n', ":2: not valid JSON"),
    "one object over lines": ('{\n  "prompt": "a",\n  "completion": "b"\n}\n', "a single JSON object over several"),
    "no records": ("\n\n", "holds no records"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_or_record_is_one_usage_error_naming_file_and_line(tmp_path, case):
    content, expected = BAD_FILES[case]
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(UsageError) as error:
        lm.read_examples(path)
    message = str(error.value)
    assert expected in message and str(path) in message
    assert "\n" not in message


def test_a_missing_or_non_utf8_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        lm.read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UsageError, match="not UTF-8 text"):
        lm.read_examples(tmp_path / "latin.jsonl")


# --- templates and the loss mask --------------------------------------------------------------------------------

def test_the_loss_covers_the_reply_and_its_end_of_turn_only():
    tokenizer = tiny_tokenizer()
    row = lm.encode(tokenizer, QA, max_length=100)
    assert tokenizer.decode(row["input_ids"]) == ("<|im_start|>user\nwhat is the capital of france<|im_end|>\n"
                                                  "<|im_start|>assistant\nparis is the capital<|im_end|>\n")
    assert learned_text(tokenizer, row) == ["paris is the capital<|im_end|>\n"]
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_the_prompt_tokens_of_an_example_are_exactly_the_generation_prompt():
    tokenizer = tiny_tokenizer()
    row = lm.encode(tokenizer, QA, max_length=100)
    first_learned = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    assert row["input_ids"][:first_learned] == lm.prompt_ids(tokenizer, QA.messages[0]["content"])


def test_a_prompt_ending_in_a_space_keeps_its_own_tokens_and_the_reply_tokenizes_alone():
    # Byte-level BPE glues a space to the next word (" paris"); generation sees the prompt's own tokens, then
    # emits the reply's, so training must not merge the two.
    tokenizer = tiny_tokenizer()
    example = Example(messages=({"role": "user", "content": "the capital of france is "},
                                {"role": "assistant", "content": "paris"}))
    row = lm.encode(tokenizer, example, max_length=100, template="raw")
    prompt = lm.prompt_ids(tokenizer, "the capital of france is ", template="raw")
    assert row["input_ids"][: len(prompt)] == prompt and set(row["labels"][: len(prompt)]) == {IGNORE_INDEX}
    assert learned_text(tokenizer, row) == ["paris<|im_end|>"]


def test_train_on_prompt_learns_every_token():
    tokenizer = tiny_tokenizer()
    row = lm.encode(tokenizer, QA, max_length=100, train_on_prompt=True)
    assert row["labels"] == row["input_ids"]


def test_a_multi_turn_conversation_learns_each_assistant_reply_and_no_other_turn():
    tokenizer = tiny_tokenizer()
    chat = Example(messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                             {"role": "assistant", "content": "bonjour"}, {"role": "user", "content": "the cat"},
                             {"role": "assistant", "content": "sat on the mat"}))
    row = lm.encode(tokenizer, chat, max_length=200)
    assert learned_text(tokenizer, row) == ["bonjour<|im_end|>\n", "sat on the mat<|im_end|>\n"]


def test_a_template_that_rewrites_past_turns_learns_the_last_reply():
    # Like templates that drop earlier reasoning: past assistant turns render shorter than when they were last.
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}{{ '[...]' }}"
        "{% else %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    chat = Example(messages=({"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour"},
                             {"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}))
    row = lm.encode(tokenizer, chat, max_length=200)
    assert tokenizer.decode(row["input_ids"]).startswith("user: hello\n[...]user: the cat\n")
    assert learned_text(tokenizer, row) == ["sat\n"]
    assert row["input_ids"][: -len(tokenizer("sat\n")["input_ids"])] == lm.prompt_ids(tokenizer, chat.messages[:3])


def test_a_conversation_the_template_refuses_is_a_usage_error_naming_the_record():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must alternate') }}"
                               "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    bad = Example(messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"}), where="train.jsonl:4")
    with pytest.raises(UsageError, match=r"train.jsonl:4: the chat template cannot render .*roles must alternate"):
        lm.encode(tokenizer, bad, max_length=50)


def test_a_template_whose_generation_prompt_is_not_the_reply_header_is_a_usage_error():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'bot: ' }}{% endif %}")
    with pytest.raises(UsageError, match="qa: the chat template does not render the reply after its prompt"):
        lm.encode(tokenizer, QA, max_length=100)
    assert learned_text(tokenizer, lm.encode(tokenizer, QA, max_length=100, template="plain"))


def test_a_tokenizer_without_chat_template_gets_the_plain_template_ending_replies_with_eos():
    tokenizer = tiny_tokenizer(chat=False)
    row = lm.encode(tokenizer, QA, max_length=100)
    assert tokenizer.decode(row["input_ids"]) == ("### User:\nwhat is the capital of france\n\n"
                                                  "### Assistant:\nparis is the capital<|im_end|>\n\n")
    assert learned_text(tokenizer, row) == ["paris is the capital<|im_end|>\n\n"]
    assert tokenizer.decode(lm.prompt_ids(tokenizer, "hello")) == "### User:\nhello\n\n### Assistant:\n"


def test_the_raw_template_joins_prompt_and_completion_as_they_are():
    tokenizer = tiny_tokenizer()
    example = Example(messages=({"role": "user", "content": "the capital of france is"},
                                {"role": "assistant", "content": " paris"}))
    row = lm.encode(tokenizer, example, max_length=100, template="raw")
    assert tokenizer.decode(row["input_ids"]) == "the capital of france is paris<|im_end|>"
    assert learned_text(tokenizer, row)[0].endswith("paris<|im_end|>")
    with pytest.raises(UsageError, match="template 'chatml' is not one of auto, plain, raw"):
        lm.encode(tokenizer, example, max_length=100, template="chatml")


def test_a_text_record_is_learned_whole_and_ends_with_eos():
    tokenizer = tiny_tokenizer()
    row = lm.encode(tokenizer, Example(text="the cat sat on the mat"), max_length=100)
    assert tokenizer.decode(row["input_ids"]) == "the cat sat on the mat<|im_end|>"
    assert row["labels"] == row["input_ids"]


def test_truncation_keeps_max_length_tokens_and_skips_examples_with_no_reply_left(caplog):
    tokenizer = tiny_tokenizer()
    full = lm.encode(tokenizer, QA, max_length=1000)
    first_learned = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    cut = lm.encode(tokenizer, QA, max_length=first_learned + 2)
    assert cut["input_ids"] == full["input_ids"][: first_learned + 2]
    assert cut["labels"] == full["labels"][: first_learned + 2]
    assert lm.encode(tokenizer, QA, max_length=first_learned) is None
    short = Example(messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}))
    long = Example(messages=({"role": "user", "content": "the cat sat on the mat " * 20},
                             {"role": "assistant", "content": "yes"}), where="train.jsonl:2")
    with caplog.at_level(logging.WARNING):
        rows = lm.encode_examples(tokenizer, [short, long], max_length=first_learned)
    assert len(rows) == 1 and "1 of 2 examples have no reply within" in caplog.text and "train.jsonl:2" in caplog.text
    with pytest.raises(UsageError, match=r"no example has a reply within --max-length 3 tokens \(e.g. train.jsonl:2"):
        lm.encode_examples(tokenizer, [long], max_length=3)


def test_the_collator_pads_labels_with_minus_100_and_masks_the_padding():
    tokenizer = tiny_tokenizer()
    rows = lm.encode_examples(tokenizer, [QA, Example(text="hello")], max_length=100)
    batch = lm.collator(tokenizer)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, longest)
    n = len(rows[1]["input_ids"])
    assert batch["input_ids"][1, n:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][1, n:].eq(IGNORE_INDEX).all() and batch["attention_mask"][1, n:].eq(0).all()
    assert batch["labels"][1, :n].tolist() == rows[1]["labels"]
    assert lm.collator(tokenizer, pad_to_multiple_of=8)(rows)["input_ids"].shape[1] % 8 == 0


def test_a_tokenizer_without_pad_token_pads_with_its_eos_token():
    tokenizer = tiny_tokenizer(pad=False)
    batch = lm.collator(tokenizer)(lm.encode_examples(tokenizer, [QA, Example(text="hi")], max_length=100))
    assert tokenizer.pad_token == "<|im_end|>" and batch["input_ids"].shape[0] == 2


def test_an_adapter_learns_the_replies_in_a_few_steps_with_the_backbone_frozen():
    tokenizer = tiny_tokenizer()
    model = adakron.add_adapter(tiny_causal_lm(tokenizer), adakron.AdaKronConfig(rank=8, init="identity"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    hello = Example(messages=({"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour"}))
    examples = [QA, hello]
    batch = lm.collator(tokenizer)(lm.encode_examples(tokenizer, examples, max_length=64))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# --- held-out split ---------------------------------------------------------------------------------------------

def test_the_held_out_split_is_seeded_disjoint_and_keeps_file_order():
    items = list(range(50))
    train, held = lm.held_out_split(items, 0.2, seed=3)
    assert len(held) == 10 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)
    assert lm.held_out_split(items, 0.2, seed=3) == (train, held)
    assert lm.held_out_split(items, 0.2, seed=4)[1] != held
    assert len(lm.held_out_split(items, 7)[1]) == 7
    assert len(lm.held_out_split(items[:3], 0.01)[1]) == 1  # a fraction holds out at least one


@pytest.mark.parametrize("held_out", [0, 1.0, -2, 50, True, "0.1"])
def test_a_held_out_part_that_leaves_nothing_or_is_not_a_size_is_a_usage_error(held_out):
    with pytest.raises(UsageError):
        lm.held_out_split(list(range(50)), held_out)
