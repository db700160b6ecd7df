"""Batched text generation for the OpenAI routes: requests for different adapters decoded together.

Requests that arrive within ``max_wait`` of the oldest waiting one (up to ``max_batch`` rows) run as ONE
``model.generate`` call on the worker thread, under the engine's model lock. Rows are left-padded and routed to
their own adapter (``route_rows``, which holds in the prefill and in every cached step), so a row gets the tokens
it would get alone; each row keeps its own settings inside the shared call (decoding.py).

This is static batching: a batch runs until its last row ends; requests that arrive meanwhile form the next one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from ..adapters.state import adapter_names
from ..adapters.switching import route_rows
from ..training.generate import Sampling, generation_config
from .decoding import Delta, Failed, Finished, Job, PickTokens, Row, Settings, Step
from .engine import Engine
from .schemas import GenerationStats, ServeError
from .worker import BatchWorker

# The request's side (Settings, Job, its events) lived here before decoding.py: still importable from here.
__all__ = ["Delta", "Finished", "GenerationEngine", "Job", "Settings"]

logger = logging.getLogger(__name__)


class GenerationEngine(BatchWorker[Job]):
    """The worker that batches generation requests (``submit``) over ``engine``'s model and adapters."""

    thread_name = "adakron-generate"
    task_name = "adakron-generation-batcher"
    crash_log = "The generation worker failed"

    def __init__(self, engine: Engine, max_wait: float, max_batch: int):
        super().__init__(engine, max_wait, max_batch)
        self.stats = GenerationStats()

    # -- on the event loop

    def submit(self, prompts: Sequence[list[int]], adapter: str | None, settings: Settings) -> Job:
        """Queue a request (its prompts already tokenized and checked); read its answer from ``job.events()``."""
        self._refuse_if_closed()
        job = Job(prompts, adapter, settings, asyncio.get_running_loop())
        with self.engine.stats_lock:
            self.stats.requests += 1
            self.stats.rows += len(job.rows)
            self.stats.prompt_tokens += sum(len(row.prompt) for row in job.rows)
        self._enqueue(job)
        return job

    def snapshot(self) -> GenerationStats:
        with self.engine.stats_lock:
            return self.stats.model_copy()

    def _abandoned(self, job: Job) -> bool:
        return job.cancelled

    def _dropped(self, jobs: list[Job]) -> None:
        with self.engine.stats_lock:
            self.stats.cancelled_rows += sum(len(job.rows) for job in jobs)

    def _halt(self, job: Job) -> None:
        job.cancel()  # its running rows end at their next token

    def _fail(self, job: Job, error: ServeError) -> None:
        # Put even if the job was answered: a request already answered has stopped reading its queue.
        job.queue.put_nowait(Failed(error))

    def _crashed(self, batch: Sequence[Job], error: Exception) -> None:
        # _work answers its own failures; this is a bug in it.
        for job in batch:
            self._fail(job, ServeError(500, "internal_error", "The generation worker failed; see the server log."))

    # -- the worker thread

    def _deliver(self, events: list[tuple[asyncio.Queue, object]]) -> None:
        if events:
            try:
                self._loop.call_soon_threadsafe(_put_all, events)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass

    def _work(self, jobs: Sequence[Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        with self.engine.lock:
            for start in range(0, len(rows), self.max_batch):
                self._run_rows([row for row in rows[start:start + self.max_batch] if not row.job.cancelled])

    def _run_rows(self, rows: list[Row]) -> None:
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
                self._fail_in_model(jobs[0])
                return
            logger.exception("A batch of %d requests failed; running them one by one", len(jobs))
        for job in jobs:
            open_rows = [row for row in rows if row.job is job and not row.done]
            if any(row.started for row in open_rows):
                self._fail_in_model(job)
                continue
            for row in open_rows:
                row.reset()
            self._run_rows(open_rows)

    def _fail_in_model(self, job: Job) -> None:
        job.failed = True
        job.cancel()  # its rows in later chunks are skipped
        with self.engine.stats_lock:
            self.stats.failed_requests += 1
        self._deliver([(job.queue, Failed(ServeError(500, "internal_error", "The model failed on this request; "
                                                                             "see the server log.")))])

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: it would change text already streamed when the next token arrives.
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _generate(self, rows: list[Row]) -> None:
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
        step = Step(rows, eos, self._decode, self._deliver)
        names = [row.job.adapter for row in rows]
        # With adapters loaded, None rows must be routed too: otherwise they would run the active adapter.
        try:
            with route_rows(model, names) if adapter_names(model) else nullcontext():
                model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                               logits_processor=LogitsProcessorList([PickTokens(rows, device)]),
                               stopping_criteria=StoppingCriteriaList([step]))
        finally:  # a failed call counts too: it ran
            self._count(rows, names, step.cancelled)
        # generate stops once every row is done; a row still open here ran out of tokens.
        self._deliver([(row.job.queue, step.finish(row, "length")) for row in rows if not row.done])

    def _count(self, rows: list[Row], names: list[str | None], cancelled: int) -> None:
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
