"""Dynamic batching: requests queue per model version and run together.

A batch closes at ``max_batch_size`` rows or ``max_delay_ms`` after its first request,
whichever comes first; requests are never split (one larger than the batch size runs
alone). The forward pass runs on a thread of its own, off the event loop. The queue
is bounded (:class:`~kiln.errors.QueueFull`, a 503), and a request whose deadline passes
before its batch starts is dropped uncomputed (:class:`~kiln.errors.DeadlineExceeded`, a
504): both are kiln errors, so every edge maps them like any other.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kiln.errors import DeadlineExceeded, QueueFull
from kiln.serve.model import Output, ServedModel


class Closed(Exception):  # noqa: N818 - the caller picks another route
    """The batcher stopped taking requests (its version was swapped out)."""


@dataclass
class BatchStats:
    """What one batch cost, for metrics: rows, seconds waiting, seconds computing."""

    rows: int
    waits: list[float]
    model_seconds: float


@dataclass
class _Item:
    frame: pd.DataFrame
    deadline: float
    enqueued: float
    future: asyncio.Future[tuple[Output, int, int]] = field(repr=False)


class Batcher:
    """One model version's queue and its batching loop."""

    def __init__(
        self,
        model: ServedModel,
        *,
        max_batch_size: int = 32,
        max_delay_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._items: deque[_Item] = deque()
        self._rows = 0  # rows of the requests in ``_items``
        self._loop_ref = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None  # the batching loop sleeps on it
        self._closed = False
        self._inflight = 0  # requests taken into a batch that has not answered yet
        # one thread: batches of one version never compete for the cores
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-forward")
        self._task = self._loop_ref.create_task(self._loop())

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._items)

    async def predict(self, frame: pd.DataFrame, timeout: float) -> Output:
        """This request's rows of its batch's output."""
        if self._closed:
            raise Closed()
        if len(self._items) >= self.max_queue:
            raise QueueFull()
        loop = self._loop_ref
        now = time.monotonic()
        future: asyncio.Future[tuple[Output, int, int]] = loop.create_future()
        # a caller that timed out never reads its future's exception: mark it read
        future.add_done_callback(_retrieve)
        self._items.append(_Item(frame, now + timeout, now, future))
        self._rows += len(frame)
        self._notify()
        # one timer, not ``wait_for`` (a task per request): past the deadline the future
        # fails, and a batch that takes it later skips it
        timer = loop.call_later(timeout, _expire, future)
        try:
            output, start, stop = await future
        finally:
            timer.cancel()
        return Output(
            predictions=output.predictions[start:stop],
            probabilities=output.probabilities[start:stop] if output.probabilities else None,
            labels=output.labels,
        )

    def _notify(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _sleep(self, timeout: float | None) -> None:
        """Until a request arrives (or ``close``), or ``timeout`` seconds pass."""
        waiter = self._waiter = self._loop_ref.create_future()
        timer = None if timeout is None else self._loop_ref.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _loop(self) -> None:
        loop = self._loop_ref
        while True:
            while not self._items:
                if self._closed:
                    return
                await self._sleep(None)
            first = self._items[0]
            close_at = first.enqueued + self.max_delay
            # wait for more rows until the batch is full or the delay is over
            while self._rows < self.max_batch_size:
                left = close_at - time.monotonic()
                if left <= 0:
                    break
                await self._sleep(left)
            batch = self._take()
            if not batch:
                continue
            frame = batch[0].frame if len(batch) == 1 else _concat([b.frame for b in batch])
            started = time.monotonic()
            self._inflight += len(batch)
            try:
                output = await loop.run_in_executor(self._executor, self.model.predict_frame, frame)
            except Exception as exc:  # the model failed: every request of the batch hears it
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self._inflight -= len(batch)
            offset = 0
            for item in batch:
                n = len(item.frame)
                if not item.future.done():
                    item.future.set_result((output, offset, offset + n))
                offset += n
            if self.on_batch is not None:
                self.on_batch(
                    BatchStats(
                        rows=len(frame),
                        waits=[started - b.enqueued for b in batch],
                        model_seconds=time.monotonic() - started,
                    )
                )

    def _take(self) -> list[_Item]:
        """Whole requests up to the batch size (at least one); expired ones are dropped."""
        batch: list[_Item] = []
        rows = 0
        now = time.monotonic()
        while self._items:
            item = self._items[0]
            n = len(item.frame)
            if item.future.done() or item.deadline <= now:  # its caller gave up: skip it
                self._items.popleft()
                self._rows -= n
                if not item.future.done():
                    item.future.set_exception(DeadlineExceeded())
                continue
            if batch and rows + n > self.max_batch_size:
                break
            self._items.popleft()
            self._rows -= n
            batch.append(item)
            rows += n
        return batch

    async def close(self) -> None:
        """Stop taking requests; those already queued are answered first."""
        self._closed = True
        self._notify()
        await self._task
        self._executor.shutdown(wait=True)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The batch's rows as one frame.

    Frames that share one columns object and hold float64 only (what
    ``ServedModel.check_rows`` makes of JSON numbers) are stacked as arrays, in a
    tenth of the time ``pd.concat`` takes.
    """
    columns = frames[0].columns
    if all(f.columns is columns for f in frames):
        arrays = [f.to_numpy() for f in frames]
        if all(a.dtype == np.float64 for a in arrays):
            return pd.DataFrame(np.concatenate(arrays), columns=columns, copy=False)
    return pd.concat(frames)


def _retrieve(future: asyncio.Future[tuple[Output, int, int]]) -> None:
    if not future.cancelled():
        future.exception()


def _expire(future: asyncio.Future[tuple[Output, int, int]]) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded())


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
