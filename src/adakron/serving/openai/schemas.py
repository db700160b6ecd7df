"""The request and response bodies of the OpenAI routes (pydantic). Requests are strict and refuse what this
server does not support; the handlers return plain dicts, which FastAPI checks against the response models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOPS = 4

# --- requests ---------------------------------------------------------------------------------------------------

_STRICT = ConfigDict(strict=True, extra="forbid")  # "16" is not a number, as for OpenAI


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = Field(False, description="Send a last chunk (empty choices) with the usage.")


class GenerationRequest(BaseModel):
    model_config = _STRICT

    model: str = Field(min_length=1, max_length=512,
                       description="An adapter's name, or the base model's name for no adapter (GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (at most the server's "
                                                          "--max-tokens, and the prompt + these within the context).")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False,
                                      description="0: greedy. Default: the model's generation config, else 1.")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass.")
    n: int = Field(1, description="Choices per prompt; only 1 is supported.")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="Seed for sampling: the same seed, the same "
                                                                     "text, whatever else shares the batch.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} strings that end the text (not "
                                                           "included in it).")
    stream: bool = Field(False, description="Send the text as server-sent events, ending with data: [DONE].")
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, description="Only 0 is supported.")
    frequency_penalty: float = Field(0.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty is supported.")
    user: str | None = Field(None, max_length=256, description="Ignored.")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported; this server returns one choice per prompt (n=1)")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, stop: Any) -> Any:
        if stop is None or isinstance(stop, str):
            stop = [] if stop is None else [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOPS:
            raise ValueError(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them")
        return stop

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported; leave it at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("logit_bias is not supported; leave it out")
        return value


def _token_lists(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        for ids in value)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts (one choice each), token ids, or a list of token-id lists; fed to the "
                    "model as it is (no chat template).")
    echo: bool = Field(False, description="Only false is supported.")
    logprobs: int | None = Field(None, description="Only null is supported.")
    best_of: int | None = Field(None, description="Only 1 is supported.")
    suffix: str | None = Field(None, description="Only null is supported.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, prompt: Any) -> Any:
        texts = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str) for p in prompt)
        if not (isinstance(prompt, str) or texts or _token_lists([prompt]) or _token_lists(prompt)):
            raise ValueError("prompt must be a string, a non-empty list of strings, a list of token ids or a list "
                             "of lists of token ids")
        return prompt

    @field_validator("echo", "logprobs", "best_of", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        neutral = {"echo": (False,), "logprobs": (None, 0), "best_of": (None, 1), "suffix": (None, "")}
        if value not in neutral[info.field_name]:
            raise ValueError(f"{info.field_name} is not supported; leave it out")
        return value


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Other message fields may come back as null (a client echoing a reply it got); any other value is refused.
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="developer is read as system (chat templates rarely know it).")
    content: str | list[TextPart] = Field(description="A text, or a list of text parts (joined by newlines).")
    name: str | None = Field(None, description="Ignored.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported, not {kind!r}")
        return content

    @model_validator(mode="after")
    def _no_other_fields(self) -> ChatMessage:
        used = next((key for key, value in (self.model_extra or {}).items() if value is not None), None)
        if used is not None:
            raise ValueError(f"message field {used!r} is not supported (tools, audio and the like)")
        return self

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, rendered with the tokenizer's "
                                                                  "chat template (the plain one if it has none).")
    max_completion_tokens: int | None = Field(None, ge=1, description="max_tokens by its newer name; wins if both.")
    logprobs: bool = Field(False, description="Only false is supported.")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("logprobs are not supported; leave it out")
        return value


# --- responses (the OpenAPI docs; handlers return plain dicts) --------------------------------------------------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adakron"
    root: str | None = Field(description="The base model's path, or the adapter's directory.")
    parent: str | None = Field(description="For an adapter: the base model it runs on.")
    max_model_len: int | None = Field(description="Context length in tokens: prompt + max_tokens.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Tokens generated, an end-of-sequence token included.")
    total_tokens: int


class _Answer(BaseModel):
    """The body of a completion and of a chat completion; each narrows ``object`` and ``choices`` (a field
    redeclared in a subclass keeps its place, so the JSON keys keep their order)."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str | None = Field(description="sha256 of the adapter's weights (null: the base model).")
    choices: list
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(_Answer):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(_Answer):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
