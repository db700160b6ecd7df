"""Instruction data for causal-LM training: records from JSON(L) files, rendered with the model's chat template,
tokenized with the loss on the completion only, padded into batches, and a seeded held-out split.

Every record becomes a conversation (a list of ``{role, content}`` messages) or a plain ``text``. Training and
generation render conversations with the same template (``render``/``prompt_ids``), so an adapter sees at
inference exactly the prompt layout it was trained on.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import UsageError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips
RECORD_SHAPES = "`prompt`+`completion`, `messages`, `instruction`+`output` (Alpaca) or `text`"

# For tokenizers without a chat template (base models). The end-of-sequence token closes every reply, so the
# model learns to stop; the reply header is the generation prompt. (Literal text sits in {{ }} expressions:
# transformers renders with trim_blocks, which eats a newline written right after a {% %} tag.)
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant:\\n' + message['content'] + (eos_token or '') + '\\n\\n' }}"
    "{% else %}{{ '### ' + (message['role'] | capitalize) + ':\\n' + message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
# Prompt and completion joined as they are (text continuation, e.g. "The capital of France is" -> " Paris").
RAW_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{% endfor %}"
)
# auto: the tokenizer's chat template where it has one, else plain.
TEMPLATES = ("auto", "plain", "raw")


@dataclass(frozen=True)
class Example:
    """One training record: a conversation whose assistant replies are learned, or a text learned whole."""

    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None
    where: str = ""  # "train.jsonl:3", for messages about this example


# --- reading ---------------------------------------------------------------------------------------------------

def read_examples(path: str | Path) -> list[Example]:
    """The records of a JSON-lines file (one object per line) or a JSON file holding a list of objects."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (undecodable byte 0x{e.object[e.start]:02x}); save it as "
                         "UTF-8") from None
    examples = [parse_record(record, where) for where, record in _records(path, text)]
    if not examples:
        raise UsageError(f"{path} holds no records")
    return examples


def _records(path: Path, text: str) -> list[tuple[str, Any]]:
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise UsageError(f"{path}: JSON nested too deeply to read") from None
        return [(f"{path} record {i}", record) for i, record in enumerate(records, 1)]
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            if n == lines[0][0] and _is_one_object(text):
                raise UsageError(f"{path}: holds a single JSON object over several lines; give a list of records "
                                 "([{...}, ...]) or JSON lines (one object per line)") from None
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg}); give one JSON object per line") from None
        except RecursionError:
            raise UsageError(f"{path}:{n}: JSON nested too deeply to read") from None
    return records


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def parse_record(record: Any, where: str) -> Example:
    """A record in one of the shapes ``RECORD_SHAPES`` names (other keys are ignored)."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object with {RECORD_SHAPES}, found {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
    elif "prompt" in record or "completion" in record:
        _require(record, ("prompt", "completion"), where)
        prompt, completion = record["prompt"], record["completion"]
        # TRL's conversational form: both sides may already be lists of messages.
        messages = (_messages(prompt, where, "prompt") if isinstance(prompt, list)
                    else [{"role": "user", "content": _text(prompt, where, "prompt")}])
        messages += (_messages(completion, where, "completion") if isinstance(completion, list)
                     else [{"role": "assistant", "content": _text(completion, where, "completion")}])
    elif "instruction" in record or "output" in record:
        _require(record, ("instruction", "output"), where)
        instruction = _text(record["instruction"], where, "instruction")
        extra = _text(record.get("input") or "", where, "input")
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                    {"role": "assistant", "content": _text(record["output"], where, "output")}]
    elif "text" in record:
        text = _text(record["text"], where, "text")
        if not text:
            raise UsageError(f"{where}: `text` is empty")
        return Example(text=text, where=where)
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise UsageError(f"{where}: a record needs {RECORD_SHAPES}; this one has {keys}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UsageError(f"{where}: the conversation has no assistant message to learn")
    if messages[0]["role"] == "assistant":
        raise UsageError(f"{where}: the conversation starts with an assistant message; nothing prompts it")
    return Example(messages=tuple(messages), where=where)


def _require(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise UsageError(f"{where}: `{'` and `'.join(keys)}` go together; `{missing[0]}` is missing")


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{where}: `{key}` must be a string, found {json.dumps(value)[:60]}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where}: `{key}` is not valid Unicode text (a lone surrogate such as \\ud800)") from None
    return value


def _messages(value: Any, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: `{key}` must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise UsageError(f"{where}: `{key}` item {i} must be an object with string `role` and `content`")
        messages.append({"role": message["role"], "content": _text(message["content"], where, f"{key}[{i}].content")})
    return messages


# --- rendering and tokenizing ----------------------------------------------------------------------------------

def chat_template(tokenizer, template: str = "auto") -> str | None:
    """The Jinja template conversations are rendered with: None means the tokenizer's own."""
    if template not in TEMPLATES:
        raise UsageError(f"template {template!r} is not one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return None if getattr(tokenizer, "chat_template", None) else PLAIN_TEMPLATE
    return PLAIN_TEMPLATE if template == "plain" else RAW_TEMPLATE


def render(tokenizer, messages: Sequence[dict[str, str]], template: str = "auto",
           add_generation_prompt: bool = False) -> str:
    """A conversation as the text the model reads."""
    return tokenizer.apply_chat_template(list(messages), chat_template=chat_template(tokenizer, template),
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def _adds_special_tokens(tokenizer, template: str) -> bool:
    # A tokenizer's own chat template writes its special tokens (BOS, ...) itself, so apply_chat_template
    # tokenizes without adding them; our plain templates rely on the tokenizer to add them, as for any text.
    return chat_template(tokenizer, template) is not None


def prompt_ids(tokenizer, prompt: str | Sequence[dict[str, str]], template: str = "auto") -> list[int]:
    """Token ids of a prompt ready for the reply: a user message (or a whole conversation) rendered with the
    generation prompt, tokenized exactly as training tokenizes the prompt part of an example."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = render(tokenizer, messages, template, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=_adds_special_tokens(tokenizer, template))["input_ids"]


def pieces(tokenizer, example: Example, template: str = "auto") -> list[tuple[str, bool]]:
    """The example's text cut into (piece, learned) parts: prompts and template headers not learned, each
    assistant reply (with the end-of-turn tokens the template puts after it) learned."""
    if example.text is not None:
        return [(example.text + (tokenizer.eos_token or ""), True)]
    from jinja2 import TemplateError

    chat_template(tokenizer, template)  # a bad template name fails here, not as a problem of this example
    messages = list(example.messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    try:
        cut = _cut(tokenizer, messages, turns, template)
        # Templates that rewrite earlier turns (e.g. drop past reasoning) render no common prefix: learn the
        # last reply then, after the whole conversation before it as its prompt.
        cut = cut if cut is not None else _cut(tokenizer, messages, turns[-1:], template)
    except TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/user/assistant/..."
        raise UsageError(f"{example.where}: the chat template cannot render this conversation ({e})") from None
    if cut is None:
        raise UsageError(f"{example.where}: the chat template does not render the reply after its prompt; use "
                         "the plain template instead")
    return cut


def _cut(tokenizer, messages, turns: list[int], template: str) -> list[tuple[str, bool]] | None:
    """Pieces for the replies at ``turns``; None if the template does not render each one after its prompt."""
    parts, done = [], ""
    for i in turns:
        prompt = render(tokenizer, messages[:i], template, add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], template)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            return None
        parts += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, learned) for text, learned in parts if text]


def encode(tokenizer, example: Example, max_length: int, template: str = "auto",
           train_on_prompt: bool = False) -> dict[str, list[int]] | None:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt tokens unless ``train_on_prompt``),
    cut to ``max_length`` tokens; None when nothing learnable is left within ``max_length``."""
    parts = pieces(tokenizer, example, template)
    text = "".join(piece for piece, _ in parts)
    specials = _adds_special_tokens(tokenizer, template) or example.text is not None
    # The tokens up to the end of each piece are those of the text up to there, tokenized alone: so the prompt
    # part is exactly what generation feeds the model (prompt_ids), and a reply tokenizes as in the whole text.
    # Where the text after a boundary would merge into the token before it (a prompt ending in a space, then a
    # word), generation cannot re-tokenize its prompt either: the piece is tokenized on its own instead.
    ids, labels, end = [], [], 0
    for piece, learned in parts:
        end += len(piece)
        upto = tokenizer(text[:end], add_special_tokens=specials)["input_ids"]
        new = upto[len(ids):] if upto[:len(ids)] == ids else tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += new
        labels += new if learned or train_on_prompt else [IGNORE_INDEX] * len(new)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_examples(tokenizer, examples: Sequence[Example], max_length: int, template: str = "auto",
                    train_on_prompt: bool = False) -> list[dict[str, list[int]]]:
    """``encode`` for every example. Examples whose prompt fills ``max_length`` leave no reply to learn: they
    are skipped with a warning (a batch of only those would have no loss), and if all are, that is an error."""
    encoded, skipped = [], []
    for example in examples:
        row = encode(tokenizer, example, max_length, template, train_on_prompt)
        if row is None:
            skipped.append(example)
        else:
            encoded.append(row)
    if skipped and not encoded:
        raise UsageError(f"no example has a reply within --max-length {max_length} tokens (e.g. "
                         f"{skipped[0].where}); raise --max-length")
    if skipped:
        logger.warning("%d of %d examples have no reply within %d tokens and are skipped (first: %s)",
                       len(skipped), len(examples), max_length, skipped[0].where)
    return encoded


def ensure_pad_token(tokenizer):
    """The tokenizer, given a pad token if it has none (the end-of-sequence token, as is usual for decoders):
    batches need one, and the attention mask and -100 labels keep padding out of attention and loss."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError("this tokenizer has neither a pad nor an end-of-sequence token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Pads ``input_ids``/``attention_mask`` with the tokenizer (on its padding side) and ``labels`` with -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(ensure_pad_token(tokenizer), padding=True, pad_to_multiple_of=pad_to_multiple_of,
                                  label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


# --- held-out split --------------------------------------------------------------------------------------------

T = TypeVar("T")


def held_out_split(items: Sequence[T], held_out: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, held-out): ``held_out`` is a fraction in (0, 1) (a float) or a count of items (an int), drawn with
    ``seed``; both parts keep the file's order, and the same items and seed always give the same split."""
    n = len(items)
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or held_out <= 0 or (
            isinstance(held_out, float) and held_out >= 1):
        raise UsageError(f"the held-out part must be a fraction in (0, 1) or a count >= 1, got {held_out!r}")
    count = max(1, round(held_out * n)) if isinstance(held_out, float) else held_out
    if count >= n:
        raise UsageError(f"holding out {count} of {n} examples leaves none to train on")
    chosen = set(random.Random(seed).sample(range(n), count))
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]
