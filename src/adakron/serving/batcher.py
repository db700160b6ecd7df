"""Micro-batching: requests that arrive close together share one forward pass on the worker thread."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from .engine import Engine, Pending
from .schemas import ServeError

logger = logging.getLogger(__name__)


class MicroBatcher:
    """Collects requests for up to ``max_wait`` seconds (after the oldest arrived) or ``max_batch`` rows,
    then answers them all with one forward pass in the worker thread."""

    def __init__(self, engine: Engine, max_wait: float, max_batch: int):
        self.engine, self.max_wait, self.max_batch = engine, max_wait, max_batch
        self._pending: deque[Pending] = deque()
        self._running: list[Pending] = []  # the batch in the forward pass now
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    async def start(self) -> None:
        self._closing = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adakron-forward")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="adakron-batcher")

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for item in [*self._running, *self._pending]:
            if not item.future.done():
                item.future.set_exception(ServeError(503, "shutting_down", "The server is shutting down."))
        self._pending.clear()
        self._running = []
        if self._executor is not None:
            # wait=True: the worker thread has ended when stop() returns.
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
            self._executor = None

    async def call(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread (in turn with forward passes)."""
        if self._executor is None or self._closing:
            raise ServeError(503, "shutting_down", "The server is shutting down.")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, adapter: str, rows: list[tuple[str, str | None]], served=None) -> tuple[str, list[dict]]:
        """Queue ``rows`` for ``adapter``; ``served``: the loaded adapter they were validated against (Pending)."""
        if self._wakeup is None or self._closing:
            raise ServeError(503, "shutting_down", "The server is shutting down.")
        loop = asyncio.get_running_loop()
        item = Pending(adapter, rows, loop.create_future(), loop.time(), served)
        self._pending.append(item)
        self._wakeup.set()
        return await item.future

    def _pending_rows(self) -> int:
        return sum(len(i.rows) for i in self._pending)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Drop requests whose client went away before their turn.
            self._pending = deque(i for i in self._pending if not i.future.done())
            if not self._pending:
                continue
            deadline = self._pending[0].arrived + self.max_wait
            while self._pending_rows() < self.max_batch and loop.time() < deadline:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
                self._wakeup.clear()
            batch, rows = [], 0
            while self._pending and (not batch or rows + len(self._pending[0].rows) <= self.max_batch):
                item = self._pending.popleft()
                if not item.future.done():
                    batch.append(item)
                    rows += len(item.rows)
            if self._pending:
                self._wakeup.set()  # the rest goes next, without waiting again
            if not batch:
                continue
            self._running = batch
            try:
                results = await loop.run_in_executor(self._executor, self.engine.run, batch)
            except Exception as e:
                logger.exception("Forward pass failed")
                results = [ServeError(500, "internal_error", f"The forward pass failed: {type(e).__name__}: {e}")
                           ] * len(batch)
            self._running = []
            for item, result in zip(batch, results):
                if item.future.done():
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
