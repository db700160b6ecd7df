"""The OpenAI routes: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, streaming or not. A request
is checked in full before it reaches the batch, so a bad one never costs the others anything."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ...training.lm import prompt_ids
from ..decoding import Delta, Finished, Job, Settings
from ..engine import Engine
from ..generation import GenerationEngine
from ..schemas import ServeError
from .errors import OpenAIError, error_body
from .schemas import (
    COMPLETION_DEFAULT_TOKENS,
    ChatCompletion,
    ChatMessage,
    ChatRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
)


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

    def settings(body: GenerationRequest, max_tokens: int | None, prompts: list[list[int]], param: str,
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


def _wants_usage(body: GenerationRequest) -> bool:
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
