"""Micro-batching: requests that arrive close together share one forward pass on the worker thread."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from .engine import Pending
from .schemas import ServeError
from .worker import BatchWorker, shutting_down


class MicroBatcher(BatchWorker[Pending]):
    """Collects requests for up to ``max_wait`` seconds (after the oldest arrived) or ``max_batch`` rows,
    then answers them all with one forward pass in the worker thread."""

    thread_name = "adakron-forward"
    task_name = "adakron-batcher"
    crash_log = "Forward pass failed"

    async def submit(self, adapter: str, rows: list[tuple[str, str | None]], served=None) -> tuple[str, list[dict]]:
        """Queue ``rows`` for ``adapter``; ``served``: the loaded adapter they were validated against (Pending)."""
        self._refuse_if_closed()
        loop = asyncio.get_running_loop()
        item = Pending(adapter, rows, loop.create_future(), loop.time(), served)
        self._enqueue(item)
        return await item.future

    def _abandoned(self, item: Pending) -> bool:
        return item.future.done()  # cancelled: the client went away

    def _fail(self, item: Pending, error: ServeError) -> None:
        if not item.future.done():
            item.future.set_exception(error)

    def _halt(self, item: Pending) -> None:
        # A forward pass cannot be stopped, and its result is thrown away: answer at once.
        self._fail(item, shutting_down())

    def _work(self, batch: Sequence[Pending]) -> list:
        return self.engine.run(batch)

    def _done(self, batch: Sequence[Pending], results: list) -> None:
        for item, result in zip(batch, results):
            if isinstance(result, Exception):
                self._fail(item, result)
            elif not item.future.done():
                item.future.set_result(result)

    def _crashed(self, batch: Sequence[Pending], error: Exception) -> None:
        for item in batch:
            self._fail(item, ServeError(500, "internal_error",
                                        f"The forward pass failed: {type(error).__name__}: {error}"))
