"""Batched text generation for the OpenAI routes: requests for different adapters decoded together.

Requests that arrive within ``max_wait`` of the oldest waiting one (up to ``max_batch`` rows) run as ONE
``model.generate`` call on the worker thread, under the engine's model lock. Rows are left-padded and routed to
their own adapter (``route_rows``, which holds in the prefill and in every cached step), so a row gets the tokens
it would get alone. Each row keeps its own settings inside the shared call:

* ``_PickTokens`` (a logits processor) leaves the scores of greedy rows alone, so they decode exactly as
  ``training.generate.generate_ids`` does, and draws the token of a sampling row with that row's temperature,
  top-p and its own seeded generator, so a seed gives the same text whatever else shares the batch;
* ``_Step`` (a stopping criterion, called after every token) ends each row at its end-of-sequence token, stop
  string or ``max_tokens``, and hands its new text to its request's asyncio queue.

This is static batching: a batch runs until its last row ends; requests that arrive meanwhile form the next one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..adapters.state import adapter_names
from ..adapters.switching import route_rows
from ..training.generate import Sampling, generation_config
from .engine import Engine
from .schemas import GenerationStats, ServeError

logger = logging.getLogger(__name__)

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
        self.rows = [_Row(self, i, list(ids)) for i, ids in enumerate(prompts)]
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


class _Row:
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


class _PickTokens(LogitsProcessor):
    """Greedy rows keep their scores (generate's argmax picks their token); a sampling row's token is drawn here
    and left as its only finite score, so the same argmax picks it."""

    def __init__(self, rows: Sequence[_Row], device: torch.device):
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


class _Step(StoppingCriteria):
    """After each new token: ends the rows that are done and sends every request its events."""

    def __init__(self, rows: Sequence[_Row], eos: set[int], decode, deliver):
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

    def _advance(self, row: _Row, token: int) -> Delta | Finished | None:
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

    def finish(self, row: _Row, reason: str, text: str | None = None) -> Finished:
        row.done = True
        text = self.decode(row.tokens) if text is None else text
        # Streamed text is always a prefix of the final text (see _streamable), except if a tokenizer's decoding of
        # a prefix is not a prefix of its decoding of the whole; then the stream keeps what it has sent.
        delta = text[len(row.sent):] if text.startswith(row.sent) else ""
        return Finished(row.index, text, delta, reason, len(row.tokens))


class GenerationEngine:
    """The worker that batches generation requests (``submit``) over ``engine``'s model and adapters."""

    def __init__(self, engine: Engine, max_wait: float, max_batch: int):
        self.engine, self.max_wait, self.max_batch = engine, max_wait, max_batch
        self.stats = GenerationStats()
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    # -- lifecycle (on the event loop)

    async def start(self) -> None:
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adakron-generate")
        self._task = self._loop.create_task(self._batches(), name="adakron-generation-batcher")

    async def stop(self) -> None:
        """Stop the worker: running rows end at their next token, and every unanswered request gets a 503."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        jobs = [*self._running, *self._pending]
        for job in jobs:
            job.cancel()
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
            self._executor = None
        for job in jobs:  # a request already answered has stopped reading its queue
            job.queue.put_nowait(Failed(ServeError(503, "shutting_down", "The server is shutting down.")))
        self._pending.clear()
        self._running = []

    def submit(self, prompts: Sequence[list[int]], adapter: str | None, settings: Settings) -> Job:
        """Queue a request (its prompts already tokenized and checked); read its answer from ``job.events()``."""
        if self._wakeup is None or self._closing:
            raise ServeError(503, "shutting_down", "The server is shutting down.")
        job = Job(prompts, adapter, settings, asyncio.get_running_loop())
        with self.engine.stats_lock:
            self.stats.requests += 1
            self.stats.rows += len(job.rows)
            self.stats.prompt_tokens += sum(len(row.prompt) for row in job.rows)
        self._pending.append(job)
        self._wakeup.set()
        return job

    def snapshot(self) -> GenerationStats:
        with self.engine.stats_lock:
            return self.stats.model_copy()

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._drop_cancelled()
            if not self._pending:
                continue
            deadline = self._pending[0].arrived + self.max_wait
            while sum(len(j.rows) for j in self._pending) < self.max_batch and loop.time() < deadline:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
                self._wakeup.clear()
            self._drop_cancelled()
            batch, rows = [], 0
            while self._pending and (not batch or rows + len(self._pending[0].rows) <= self.max_batch):
                job = self._pending.popleft()
                batch.append(job)
                rows += len(job.rows)
            if self._pending:
                self._wakeup.set()  # the rest goes next, without waiting again
            if not batch:
                continue
            self._running = batch
            try:
                await loop.run_in_executor(self._executor, self._run, batch)
            except Exception:  # _run answers its own failures; this is a bug in it
                logger.exception("The generation worker failed")
                for job in batch:
                    job.queue.put_nowait(Failed(ServeError(500, "internal_error", "The generation worker failed; "
                                                                                 "see the server log.")))
            self._running = []

    def _drop_cancelled(self) -> None:
        kept = deque(job for job in self._pending if not job.cancelled)
        if len(kept) != len(self._pending):
            with self.engine.stats_lock:
                self.stats.cancelled_rows += sum(len(j.rows) for j in self._pending if j.cancelled)
            self._pending = kept

    # -- the worker thread

    def _deliver(self, events: list[tuple[asyncio.Queue, object]]) -> None:
        if events:
            try:
                self._loop.call_soon_threadsafe(_put_all, events)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass

    def _run(self, jobs: Sequence[Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        with self.engine.lock:
            for start in range(0, len(rows), self.max_batch):
                self._run_rows([row for row in rows[start:start + self.max_batch] if not row.job.cancelled])

    def _run_rows(self, rows: list[_Row]) -> None:
        """Decode ``rows`` together; if that fails, run each request again on its own, so that only the request
        that breaks the batch fails (one that has already streamed text cannot be replayed: it fails too)."""
        if not rows:
            return
        try:
            self._generate(rows)
            return
        except Exception:
            jobs = list(dict.fromkeys(row.job for row in rows))
            if len(jobs) == 1:
                logger.exception("A generation request failed inside the model")
                self._fail(jobs[0])
                return
            logger.exception("A batch of %d requests failed; running them one by one", len(jobs))
        for job in jobs:
            open_rows = [row for row in rows if row.job is job and not row.done]
            if any(row.started for row in open_rows):
                self._fail(job)
                continue
            for row in open_rows:
                row.reset()
            self._run_rows(open_rows)

    def _fail(self, job: Job) -> None:
        job.failed = True
        job.cancel()  # its rows in later chunks are skipped
        with self.engine.stats_lock:
            self.stats.failed_requests += 1
        self._deliver([(job.queue, Failed(ServeError(500, "internal_error", "The model failed on this request; "
                                                                             "see the server log.")))])

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: it would change text already streamed when the next token arrives.
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _generate(self, rows: list[_Row]) -> None:
        """One ``model.generate`` call for ``rows`` (left-padded, each through its own adapter)."""
        model, tokenizer = self.engine.model, self.engine.tokenizer
        device = next(model.parameters()).device
        width = max(len(row.prompt) for row in rows)
        pads = [width - len(row.prompt) for row in rows]
        input_ids = torch.tensor([[tokenizer.pad_token_id] * pad + row.prompt for pad, row in zip(pads, rows)],
                                 device=device)
        attention_mask = torch.tensor([[0] * pad + [1] * len(row.prompt) for pad, row in zip(pads, rows)],
                                      device=device)
        config = generation_config(model, tokenizer,
                                   Sampling(max_new_tokens=max(row.job.settings.max_tokens for row in rows)))
        eos = config.eos_token_id
        eos = set(eos) if isinstance(eos, (list, tuple)) else set() if eos is None else {eos}
        step = _Step(rows, eos, self._decode, self._deliver)
        names = [row.job.adapter for row in rows]
        # With adapters loaded, None rows must be routed too: otherwise they would run the active adapter.
        try:
            with route_rows(model, names) if adapter_names(model) else nullcontext():
                model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                               logits_processor=LogitsProcessorList([_PickTokens(rows, device)]),
                               stopping_criteria=StoppingCriteriaList([step]))
        finally:  # a failed call counts too: it ran
            self._count(rows, names, step.cancelled)
        # generate stops once every row is done; a row still open here ran out of tokens.
        self._deliver([(row.job.queue, step.finish(row, "length")) for row in rows if not row.done])

    def _count(self, rows: list[_Row], names: list[str | None], cancelled: int) -> None:
        with self.engine.stats_lock:
            s, distinct = self.stats, len(set(names))
            s.batches += 1
            s.mixed_batches += distinct > 1
            s.max_rows_per_batch = max(s.max_rows_per_batch, len(rows))
            s.max_adapters_per_batch = max(s.max_adapters_per_batch, distinct)
            s.completion_tokens += sum(len(row.tokens) for row in rows)
            s.cancelled_rows += cancelled


def _put_all(events: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in events:
        queue.put_nowait(event)
