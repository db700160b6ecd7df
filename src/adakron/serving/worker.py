"""The worker skeleton of the classifier batcher and the generation engine: a queue of requests, collected into
batches that run one at a time on a single worker thread while the event loop keeps serving."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from .engine import Engine
from .schemas import ServeError

Item = TypeVar("Item")  # a queued request: has ``rows`` (a sized list) and ``arrived`` (its event-loop time)


def shutting_down() -> ServeError:
    return ServeError(503, "shutting_down", "The server is shutting down.")


class BatchWorker(Generic[Item]):
    """Collects queued items for up to ``max_wait`` seconds (after the oldest arrived) or ``max_batch`` rows, then
    runs them as one batch over ``engine`` on the worker thread. Subclasses say when an item is abandoned, how it is
    answered with an error, what runs on the thread (``_work``) and what becomes of its result (``_done``)."""

    thread_name = "adakron-worker"
    task_name = "adakron-worker"
    crash_log = "The worker failed"

    def __init__(self, engine: Engine, max_wait: float, max_batch: int):
        self.engine, self.max_wait, self.max_batch = engine, max_wait, max_batch
        # The subclass's module logger: the log names the worker that failed.
        self.log = logging.getLogger(type(self).__module__)
        self._pending: deque[Item] = deque()
        self._running: list[Item] = []  # the batch on the worker thread now
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    # -- what subclasses supply

    def _abandoned(self, item: Item) -> bool:
        """Whether nobody waits for ``item`` any more (it is dropped before its turn)."""
        raise NotImplementedError

    def _dropped(self, items: list[Item]) -> None:
        """``items`` were abandoned while queued."""

    def _fail(self, item: Item, error: ServeError) -> None:
        """Answer ``item`` with ``error``."""
        raise NotImplementedError

    def _halt(self, item: Item) -> None:
        """On shutdown, before the worker thread is waited for: stop ``item``'s work where that is possible."""

    def _work(self, batch: Sequence[Item]) -> Any:
        """Runs ``batch`` on the worker thread; its return value goes to ``_done``."""
        raise NotImplementedError

    def _done(self, batch: Sequence[Item], result: Any) -> None:
        """On the event loop, after ``_work`` returned ``result``."""

    def _crashed(self, batch: Sequence[Item], error: Exception) -> None:
        """``_work`` raised ``error`` (a bug: ``crash_log`` and the traceback are logged): answer the batch."""
        raise NotImplementedError

    # -- lifecycle (on the event loop)

    async def start(self) -> None:
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        self._task = self._loop.create_task(self._batches(), name=self.task_name)

    async def stop(self) -> None:
        """Stop the worker; every request not answered yet gets a 503."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        items = [*self._running, *self._pending]
        for item in items:
            self._halt(item)
        if self._executor is not None:
            # wait=True: the worker thread has ended when stop() returns.
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
            self._executor = None
        for item in items:
            self._fail(item, shutting_down())
        self._pending.clear()
        self._running = []

    def _refuse_if_closed(self) -> None:
        if self._executor is None or self._closing:
            raise shutting_down()

    async def call(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread (in turn with the batches)."""
        self._refuse_if_closed()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _enqueue(self, item: Item) -> None:
        self._pending.append(item)
        self._wakeup.set()

    # -- collecting batches

    def _pending_rows(self) -> int:
        return sum(len(item.rows) for item in self._pending)

    def _drop_abandoned(self) -> None:
        kept, gone = deque(), []
        for item in self._pending:
            (gone if self._abandoned(item) else kept).append(item)
        if gone:
            self._dropped(gone)
        self._pending = kept

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._drop_abandoned()  # the clients that went away before their turn
            if not self._pending:
                continue
            deadline = self._pending[0].arrived + self.max_wait
            while self._pending_rows() < self.max_batch and loop.time() < deadline:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
                self._wakeup.clear()
            self._drop_abandoned()  # and those that went away while it waited
            batch, rows = [], 0
            while self._pending and (not batch or rows + len(self._pending[0].rows) <= self.max_batch):
                item = self._pending.popleft()
                batch.append(item)
                rows += len(item.rows)
            if self._pending:
                self._wakeup.set()  # the rest goes next, without waiting again
            if not batch:
                continue
            self._running = batch
            try:
                result = await loop.run_in_executor(self._executor, self._work, batch)
            except Exception as e:
                self.log.exception(self.crash_log)
                self._crashed(batch, e)
            else:
                self._done(batch, result)
            self._running = []
