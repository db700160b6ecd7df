"""Decoding rows with their own settings inside one shared ``model.generate`` call, and the events a request gets.

* ``PickTokens`` (a logits processor) leaves the scores of greedy rows alone, so they decode exactly as
  ``training.generate.generate_ids`` does, and draws the token of a sampling row with that row's temperature,
  top-p and its own seeded generator, so a seed gives the same text whatever else shares the batch;
* ``Step`` (a stopping criterion, called after every token) ends each row at its end-of-sequence token, stop
  string or ``max_tokens``, and hands its new text to its request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .schemas import ServeError

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (dividing logits by them overflows)


@dataclass(frozen=True)
class Settings:
    """How the rows of one request are decoded (the HTTP layer has checked every value)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class Delta:
    """New text of row ``index`` (streaming requests only)."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    """Row ``index`` ended: its whole ``text``, the part of it not streamed yet, why, and its token count."""

    index: int
    text: str
    delta: str
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length" (max_tokens)
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: ServeError


class Job:
    """One HTTP request: its prompts (one row each), its adapter and settings, and the queue its events go to."""

    def __init__(self, prompts: Sequence[list[int]], adapter: str | None, settings: Settings,
                 loop: asyncio.AbstractEventLoop):
        self.adapter, self.settings = adapter, settings
        self.rows = [Row(self, i, list(ids)) for i, ids in enumerate(prompts)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrived = loop.time()
        self.cancelled = False  # set on the event loop, read by the worker thread between tokens
        self.failed = False

    def cancel(self) -> None:
        """Stop this request's rows at their next token (the client went away); no more events come."""
        self.cancelled = True

    async def events(self) -> AsyncIterator[Delta | Finished]:
        """The request's events until every row has finished; raises the ServeError of a failed request."""
        open_rows = len(self.rows)
        while open_rows:
            event = await self.queue.get()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                open_rows -= 1
            yield event


class Row:
    """One prompt's decoding state, touched only by the worker thread."""

    def __init__(self, job: Job, index: int, prompt: list[int]):
        self.job, self.index, self.prompt = job, index, prompt
        # Drawn once, so a row run again (after its batch failed) samples the same tokens.
        self.seed = job.settings.seed if job.settings.seed is not None else secrets.randbits(63)
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.sent = ""  # the text streamed so far
        self.done = False
        self.started = False  # some of its text has reached the client


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _streamable(text: str, holdback: int) -> int:
    """How much of ``text`` can be streamed: not a trailing incomplete character (decoded as U+FFFD until its
    last byte arrives), nor the last ``holdback`` characters, which may be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return min(end, len(text) - holdback)


def _draw(logits: torch.Tensor, settings: Settings, generator: torch.Generator) -> torch.Tensor:
    """One token id, (1,), drawn on the logits' device (no wait for the device)."""
    probs = torch.softmax(logits / settings.temperature, dim=-1)  # (V,)
    if settings.top_p < 1:
        ranked, order = probs.sort(descending=True)
        ranked[ranked.cumsum(-1) - ranked >= settings.top_p] = 0  # keep the fewest tokens reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, ranked)
    return torch.multinomial(probs, 1, generator=generator)


class PickTokens(LogitsProcessor):
    """Greedy rows keep their scores (generate's argmax picks their token); a sampling row's token is drawn here
    and left as its only finite score, so the same argmax picks it."""

    def __init__(self, rows: Sequence[Row], device: torch.device):
        self.sampled = [(i, row, torch.Generator(device=device).manual_seed(row.seed))
                        for i, row in enumerate(rows) if not row.job.settings.greedy]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        live = [(i, row, generator) for i, row, generator in self.sampled if not row.done]
        if live:
            tokens = torch.cat([_draw(scores[i], row.job.settings, generator) for i, row, generator in live])
            rows = torch.tensor([i for i, _, _ in live], device=scores.device)
            scores[rows] = -math.inf
            scores[rows, tokens] = 0.0
        return scores


class Step(StoppingCriteria):
    """After each new token: ends the rows that are done and sends every request its events."""

    def __init__(self, rows: Sequence[Row], eos: set[int], decode, deliver):
        self.rows, self.eos, self.decode, self.deliver = rows, eos, decode, deliver
        self.cancelled = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        events = []
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if row.done:
                continue
            if row.job.cancelled:
                row.done = True
                self.cancelled += not row.job.failed
                continue
            event = self._advance(row, token)
            if event is not None:
                row.started = True
                events.append((row.job.queue, event))
        self.deliver(events)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def _advance(self, row: Row, token: int) -> Delta | Finished | None:
        settings = row.job.settings
        row.tokens.append(token)
        ended = token in self.eos
        text = None
        if ended or settings.stream or settings.stop:
            text = self.decode(row.tokens[:-1] if ended else row.tokens)
            cut = _first_stop(text, settings.stop) if settings.stop else -1
            if cut >= 0:
                text, ended = text[:cut], True
        reason = "stop" if ended else "length" if len(row.tokens) >= settings.max_tokens else None
        if reason is not None:
            return self.finish(row, reason, text)
        if not settings.stream:
            return None
        holdback = max(map(len, settings.stop), default=1) - 1
        end = _streamable(text, holdback)
        if end <= len(row.sent) or not text.startswith(row.sent):
            return None
        piece, row.sent = text[len(row.sent):end], text[:end]
        return Delta(row.index, piece)

    def finish(self, row: Row, reason: str, text: str | None = None) -> Finished:
        row.done = True
        text = self.decode(row.tokens) if text is None else text
        # Streamed text is always a prefix of the final text (see _streamable), except if a tokenizer's decoding of
        # a prefix is not a prefix of its decoding of the whole; then the stream keeps what it has sent.
        delta = text[len(row.sent):] if text.startswith(row.sent) else ""
        return Finished(row.index, text, delta, reason, len(row.tokens))
