"""Dynamic batching per task, on asyncio: requests of one task that arrive close together run as one batch.

Each task has its own queue (tasks differ in resolution and head, so their images cannot share a
tensor). A task's collector takes the first waiting request, waits at most `timeout_s` for more, up
to `max_batch`, then hands the batch to one of `num_workers` threads. While every worker is busy the
queue keeps filling, so the batch grows with the load: one request alone waits `timeout_s` at most,
64 at once run in a few large batches. `max_batch=1` is plain one-request-at-a-time serving.

A key names what a queue's batches compute: the server's keys are (kind, task), so a task's
predictions and its embeddings queue apart (one computes probabilities, the other pooled features).
Only prepared inputs are submitted (decoding and the eval transform run before, in the request's
own handler), so a bad upload never reaches a batch; if a batch still fails, its requests run one by
one, and only the one that fails gets the error.

`close()` drains: from its call on, `submit` refuses (`BatcherClosedError`), while every request
already submitted, queued or in a running batch, is answered before the workers stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

Key = TypeVar("Key")
log = logging.getLogger(__name__)


class BatcherClosedError(RuntimeError):
    """A request submitted after `close()` began: the server is shutting down."""


class TaskBatcher(Generic[Key]):
    """`await batcher.submit(key, image)` -> that image's row of `run(key, images)`."""

    def __init__(
        self,
        run: Callable[[Key, torch.Tensor], torch.Tensor],
        max_batch: int = 32,
        timeout_s: float = 0.005,
        num_workers: int = 1,
        on_batch: Callable[[Key, list[float]], None] | None = None,
    ) -> None:
        if max_batch < 1 or num_workers < 1 or timeout_s < 0:
            raise ValueError(
                f"batching: max_batch {max_batch} and workers {num_workers} must be >= 1, "
                f"the timeout {timeout_s} s >= 0"
            )
        self.run = run
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self.on_batch = on_batch  # (key, seconds each request waited in the queue) as a batch starts
        self.batch_sizes: Counter[int] = Counter()  # size -> how many batches ran at that size
        self._queues: dict[Key, asyncio.Queue] = {}
        self._collectors: list[asyncio.Task] = []
        self._running: set[asyncio.Task] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._pending: set[asyncio.Future] = set()  # submitted and not yet answered
        self._closing = False

    @property
    def num_pending(self) -> int:
        """Images submitted and not yet answered: queued, or in a running batch."""
        return len(self._pending)

    async def submit(self, key: Key, item: torch.Tensor) -> torch.Tensor:
        if self._closing:
            raise BatcherClosedError("shutting down: no new requests are taken")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="vitkit-batch")
            self._slots = asyncio.Semaphore(self.num_workers)
        if key not in self._queues:
            self._queues[key] = asyncio.Queue()
            self._collectors.append(asyncio.create_task(self._collect(key)))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        await self._queues[key].put((item, future, loop.time()))
        return await future

    async def _collect(self, key: Key) -> None:
        queue = self._queues[key]
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.timeout_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            await self._slots.acquire()
            # Whatever arrived while the workers were busy joins this batch.
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            waiting = [entry for entry in batch if not entry[1].cancelled()]
            if not waiting:
                self._slots.release()
                continue
            if self.on_batch is not None:
                started = loop.time()
                self.on_batch(key, [started - queued for _, _, queued in waiting])
            batch = [(item, future) for item, future, _ in waiting]
            running = asyncio.create_task(self._run_batch(key, batch))
            self._running.add(running)
            running.add_done_callback(self._running.discard)

    async def _run_batch(self, key: Key, batch: list[tuple[torch.Tensor, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.batch_sizes[len(batch)] += 1
            try:
                images = torch.stack([item for item, _ in batch])
                outputs = await loop.run_in_executor(self._executor, self.run, key, images)
                results: list[torch.Tensor | BaseException] = list(outputs)
            except Exception as error:
                if len(batch) == 1:
                    results = [error]
                else:
                    log.warning(
                        "a batch of %d for %r failed (%s); running its requests one by one",
                        len(batch),
                        key,
                        error,
                    )
                    results = [await self._run_one(key, item) for item, _ in batch]
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._slots.release()

    async def _run_one(self, key: Key, item: torch.Tensor) -> torch.Tensor | BaseException:
        try:
            return (
                await asyncio.get_running_loop().run_in_executor(self._executor, self.run, key, item[None])
            )[0]
        except Exception as error:
            return error

    async def close(self, timeout_s: float | None = None) -> None:
        """Refuse new requests, answer every submitted one (waiting at most `timeout_s`; the rest are
        cancelled), then stop the collectors and the worker threads."""
        self._closing = True
        if self._pending:
            _, unanswered = await asyncio.wait(set(self._pending), timeout=timeout_s)
            if unanswered:
                log.warning(
                    "shutdown: %d requests unanswered after %s s, cancelled", len(unanswered), timeout_s
                )
            for future in unanswered:
                future.cancel()
        for collector in self._collectors:
            collector.cancel()
        await asyncio.gather(*self._collectors, *self._running, return_exceptions=True)
        self._collectors.clear()
        self._queues.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
