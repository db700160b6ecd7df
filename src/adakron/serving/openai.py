"""The OpenAI-compatible API of a causal LM: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``,
streaming or not, with the request's ``model`` naming the adapter (or the base model), as multi-LoRA servers do.

Requests are checked here, in full, before they reach the batch: a bad one gets an OpenAI-style error body
(``{"error": {"message", "type", "param", "code"}}``, 4xx) and never costs the others anything.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..training.lm import prompt_ids
from .engine import Engine
from .generation import Delta, Finished, GenerationEngine, Job, Settings
from .schemas import ServeError

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOPS = 4


# --- errors -----------------------------------------------------------------------------------------------------

class OpenAIError(Exception):
    """A refused request, answered with ``status`` and the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _respond(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}  # pydantic's names for the members of a union


def _path(loc: list) -> str:
    """``["messages", 0, "content"]`` as ``messages[0].content``, without pydantic's union-member tags."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part[:1].islower() and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """The first problem pydantic found, as OpenAI words it (400, the parameter named)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return OpenAIError(400, "The request body is not valid JSON.", code="invalid_json")
    error = errors[0]
    loc = list(error.get("loc", ()))
    loc = loc[1:] if loc[:1] == ["body"] else loc
    param = loc[0] if loc and isinstance(loc[0], str) else None
    path, kind = _path(loc), error.get("type", "")
    if not loc:
        return OpenAIError(400, "The request body must be a JSON object.", code="invalid_type")
    if kind == "missing":
        return OpenAIError(400, f"Missing required parameter: '{path}'.", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: '{path}'.", param, "unknown_parameter")
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    return OpenAIError(400, f"Invalid '{path}': {message}.", param, code)


def install_errors(app: FastAPI) -> None:
    """Every error of the app, whatever raised it, in the OpenAI shape."""

    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError) -> JSONResponse:
        return _respond(exc)

    @app.exception_handler(ServeError)
    async def _serve(request: Request, exc: ServeError) -> JSONResponse:
        return _respond(OpenAIError(exc.status, exc.message, code=exc.kind))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _respond(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        if exc.status_code == 404:
            message = (f"No such endpoint: {request.method} {request.url.path}; this server has /v1/models, "
                       "/v1/completions and /v1/chat/completions.")
        response = _respond(OpenAIError(exc.status_code, message))
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return _respond(OpenAIError(500, "The server failed on this request; see its log.", code="internal_error"))


# --- requests ---------------------------------------------------------------------------------------------------

_STRICT = ConfigDict(strict=True, extra="forbid")  # "16" is not a number, as for OpenAI


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = Field(False, description="Send a last chunk (empty choices) with the usage.")


class _GenerationRequest(BaseModel):
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


class CompletionRequest(_GenerationRequest):
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


class ChatRequest(_GenerationRequest):
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


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = Field(description="sha256 of the adapter's weights (null: the base model).")
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


# --- routes -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LMLimits:
    """What one request may ask of the model."""

    max_tokens: int  # --max-tokens
    max_prompts: int  # prompts per /v1/completions request (--max-rows)
    context: int | None  # prompt + max_tokens, in tokens (the model's position limit)
    vocab_size: int
    temperature: float = 1.0  # the defaults, from the model's generation config as vLLM takes them
    top_p: float = 1.0


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def router(engine: Engine, generator: GenerationEngine, limits: LMLimits, model_name: str) -> APIRouter:
    """The OpenAI routes over ``generator``: a request's ``model`` is ``model_name`` (the base model, no adapter)
    or the name of a loaded adapter."""
    api = APIRouter(tags=["openai"])
    started = int(time.time())
    tokenizer = engine.tokenizer
    root = str(getattr(engine.model.config, "_name_or_path", "") or "") or None

    def cards() -> list[dict[str, Any]]:
        base = {"id": model_name, "created": started, "root": root, "parent": None, "max_model_len": limits.context}
        return [base, *({"id": a.name, "created": started, "root": a.path, "parent": model_name,
                         "max_model_len": limits.context} for a in engine.adapters.values())]

    def adapter_of(model: str) -> str | None:
        if model == model_name:
            return None
        if model not in engine.adapters:
            served = ", ".join([model_name, *engine.adapters])
            raise OpenAIError(404, f"The model '{model}' does not exist; this server has: {served} "
                                   "(GET /v1/models).", "model", "model_not_found")
        return model

    def settings(body: _GenerationRequest, max_tokens: int | None, prompts: list[list[int]], param: str,
                 default: int | None, tokens_param: str = "max_tokens") -> Settings:
        """The request's decoding settings; ``max_tokens`` None: ``default``, shrunk to what the server and the
        context allow (None: all they allow). ``param`` is where the prompt came from, for the error."""
        longest = max(map(len, prompts))
        room = limits.context - longest if limits.context is not None else None
        if max_tokens is None:
            max_tokens = max(1, min(n for n in (default, limits.max_tokens, room) if n is not None))
        elif max_tokens > limits.max_tokens:
            raise OpenAIError(400, f"{tokens_param} is {max_tokens}, more than this server allows "
                                   f"({limits.max_tokens}, --max-tokens).", tokens_param, "invalid_value")
        if room is not None and max_tokens > room:
            raise OpenAIError(400, f"This model's context is {limits.context} tokens, but {longest + max_tokens} "
                                   f"were requested ({longest} in the {param}, {max_tokens} to generate); shorten "
                                   f"the {param} or lower {tokens_param}.", param, "context_length_exceeded")
        temperature = limits.temperature if body.temperature is None else body.temperature
        top_p = limits.top_p if body.top_p is None else body.top_p
        return Settings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=body.seed,
                        stop=tuple(body.stop or ()), stream=body.stream)

    def check_ids(prompts: list[list[int]]) -> list[list[int]]:
        for ids in prompts:
            if not ids:
                raise OpenAIError(400, "The prompt is empty: it gives no tokens.", "prompt", "invalid_value")
            bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
            if bad is not None:
                raise OpenAIError(400, f"Token id {bad} is outside the vocabulary (0..{limits.vocab_size - 1}).",
                                  "prompt", "invalid_value")
        return prompts

    def completion_prompts(prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if len(prompt) > limits.max_prompts:
            raise OpenAIError(400, f"{len(prompt)} prompts in one request; the limit is {limits.max_prompts} "
                                   "(--max-rows).", "prompt", "invalid_value")
        return check_ids([p if isinstance(p, list) else prompt_ids(tokenizer, p, "raw") for p in prompt])

    def chat_prompt(messages: list[ChatMessage]) -> list[list[int]]:
        from jinja2 import TemplateError

        try:
            ids = prompt_ids(tokenizer, [m.as_template_message() for m in messages], "auto")
        except TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/user/assistant/..."
            raise OpenAIError(400, f"The chat template cannot render these messages: {e}", "messages",
                              "invalid_value") from None
        return check_ids([ids])

    def fingerprint(adapter: str | None) -> str | None:
        served = engine.adapters.get(adapter) if adapter is not None else None
        return served.version if served is not None else None

    @api.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict[str, Any]:
        """The base model and every loaded adapter: each is a `model` a request can name."""
        return {"object": "list", "data": cards()}

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_errors(404))
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        adapter_of(model_id)
        return next(card for card in cards() if card["id"] == model_id)

    @api.post("/v1/completions", response_model=Completion, responses=_errors(400, 404, 413, 500, 503))
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Continue each prompt as it is (no chat template): one choice per prompt."""
        adapter = adapter_of(body.model)
        prompts = await asyncio.to_thread(completion_prompts, body.prompt)
        job = generator.submit(prompts, adapter, settings(body, body.max_tokens, prompts, "prompt",
                                                          COMPLETION_DEFAULT_TOKENS))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": fingerprint(adapter)}
        usage = sum(map(len, prompts))
        if body.stream:
            def chunks(event: Delta | Finished) -> list[dict[str, Any]]:
                done = isinstance(event, Finished)
                return [{"choices": [{"index": event.index, "text": event.delta if done else event.text,
                                      "logprobs": None, "finish_reason": event.finish_reason if done else None}]}]

            return await _stream(job, head, [], chunks, _wants_usage(body), usage)
        finished = await _collect(request, job)
        if finished is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        return {**head, "choices": [{"index": f.index, "text": f.text, "logprobs": None,
                                     "finish_reason": f.finish_reason} for f in finished],
                "usage": _usage(usage, sum(f.completion_tokens for f in finished))}

    @api.post("/v1/chat/completions", response_model=ChatCompletion, responses=_errors(400, 404, 413, 500, 503))
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        """Answer the conversation as the assistant (the chat template's generation prompt)."""
        adapter = adapter_of(body.model)
        prompts = await asyncio.to_thread(chat_prompt, body.messages)
        newer = body.max_completion_tokens is not None
        job = generator.submit(prompts, adapter, settings(
            body, body.max_completion_tokens if newer else body.max_tokens, prompts, "messages", None,
            "max_completion_tokens" if newer else "max_tokens"))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": fingerprint(adapter)}
        usage = len(prompts[0])
        if body.stream:
            def chunks(event: Delta | Finished) -> list[dict[str, Any]]:
                text = event.delta if isinstance(event, Finished) else event.text
                out = [{"choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                     "finish_reason": None}]}] if text else []
                if isinstance(event, Finished):
                    out.append({"choices": [{"index": 0, "delta": {}, "logprobs": None,
                                             "finish_reason": event.finish_reason}]})
                return out

            opening = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]}]
            return await _stream(job, {**head, "object": "chat.completion.chunk"}, opening, chunks,
                                 _wants_usage(body), usage)
        finished = await _collect(request, job)
        if finished is None:
            return Response(status_code=499)
        (answer,) = finished
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                                     "logprobs": None, "finish_reason": answer.finish_reason}],
                "usage": _usage(usage, answer.completion_tokens)}

    return api


def _wants_usage(body: _GenerationRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _collect(request: Request, job: Job) -> list[Finished] | None:
    """Every row's result, in order; None if the client went away first (its rows are then stopped)."""
    finished: dict[int, Finished] = {}

    async def gather() -> None:
        async for event in job.events():
            if isinstance(event, Finished):
                finished[event.index] = event

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            job.cancel()
            work.cancel()
    if work.cancelled():
        return None
    work.result()  # the request's ServeError, if it failed
    return [finished[i] for i in sorted(finished)]


async def _stream(job: Job, head: dict[str, Any], opening: list[dict[str, Any]],
                  chunks: Callable[[Delta | Finished], list[dict[str, Any]]], include_usage: bool,
                  prompt_tokens: int) -> StreamingResponse:
    """Server-sent events, as OpenAI sends them. The first event is awaited before the response starts, so a
    request that fails at once still gets its HTTP status; a later failure arrives as an error event."""
    events = job.events()
    try:
        first = await anext(events)
    except BaseException:
        job.cancel()
        raise

    async def body() -> AsyncIterator[str]:
        completion_tokens, event = 0, first
        try:
            for chunk in opening:
                yield _sse({**head, **chunk})
            while True:
                if isinstance(event, Finished):
                    completion_tokens += event.completion_tokens
                for chunk in chunks(event):
                    yield _sse({**head, **chunk})
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    break
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        except ServeError as e:
            yield _sse(error_body(e.status, e.message, code=e.kind))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (or all is sent): stop its rows

    return StreamingResponse(body(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
