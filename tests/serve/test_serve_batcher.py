"""Dynamic batching on a real model: what runs together, what waits, what is refused.

The model is a real :class:`ServedModel` on a bundle trained here; a subclass records
the frame of every batch it computes and can hold a batch (a ``threading.Event``) so a
test decides when the forward pass may finish. Each test runs its own event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from serve_support import iris

from kiln.errors import DeadlineExceeded, QueueFull
from kiln.serve.batcher import Batcher, Closed
from kiln.serve.model import Output, ServedModel
from support import async_wait_for


class Recording(ServedModel):
    """A served model that records each batch's frame and can be held mid-batch."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, backend="torch")
        self.batches: list[pd.DataFrame] = []
        self.entered = threading.Event()  # a batch reached the forward pass
        self.release = threading.Event()
        self.release.set()  # not holding unless a test says so
        self.fail_next = False

    def predict_frame(self, frame: pd.DataFrame) -> Output:
        self.batches.append(frame.copy())
        self.entered.set()
        assert self.release.wait(10), "the test never released the batch"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the forward pass broke")
        return super().predict_frame(frame)

    def hold(self) -> None:
        self.entered.clear()
        self.release.clear()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "no batch started"

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


@pytest.fixture(scope="module")
def model(iris_bundle: Path) -> Recording:
    return Recording(iris_bundle)


@pytest.fixture(scope="module")
def reference(iris_bundle: Path) -> Any:
    import kiln

    return kiln.load(iris_bundle)


@pytest.fixture(autouse=True)
def _fresh(model: Recording) -> None:
    model.batches.clear()
    model.release.set()
    model.fail_next = False


def frame(start: int, n: int) -> pd.DataFrame:
    """Rows ``start .. start+n`` of iris's features, in the model's column order."""
    return iris().drop(columns="target").iloc[start : start + n].reset_index(drop=True)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def assert_matches(output: Output, rows: pd.DataFrame, reference: Any) -> None:
    """Exactly the request's own rows' predictions, as the bundle itself predicts them."""
    expected = reference.predict(rows)
    assert len(output.predictions) == len(rows)
    assert output.predictions == expected.predictions
    assert output.probabilities is not None
    np.testing.assert_allclose(output.probabilities, expected.probabilities, atol=1e-5)


def computed_rows(model: Recording) -> pd.DataFrame:
    return pd.concat(model.batches, ignore_index=True)


def test_requests_arriving_together_share_a_batch_and_get_their_own_rows(
    model: Recording, reference: Any
) -> None:
    sizes = [1, 3, 2, 5, 1]
    starts = [0, 40, 70, 100, 140]  # rows of all three classes

    async def main() -> None:
        batcher = Batcher(model, max_batch_size=64, max_delay_ms=50)
        outputs = await asyncio.gather(
            *(batcher.predict(frame(s, n), timeout=10) for s, n in zip(starts, sizes, strict=True))
        )
        await batcher.close()
        for output, s, n in zip(outputs, starts, sizes, strict=True):
            assert_matches(output, frame(s, n), reference)

    run(main)
    assert model.sizes == [sum(sizes)]


def test_requests_queued_behind_a_busy_model_run_as_one_batch(
    model: Recording, reference: Any
) -> None:
    async def main() -> None:
        batcher = Batcher(model, max_batch_size=64, max_delay_ms=0)
        model.hold()
        first = asyncio.ensure_future(batcher.predict(frame(0, 1), timeout=10))
        await model.wait_entered()  # the first batch is computing, alone
        later = [asyncio.ensure_future(batcher.predict(frame(s, 2), timeout=10)) for s in (50, 3)]
        await async_wait_for(lambda: batcher.depth == 2, timeout=10, what="2 requests queued")
        model.release.set()
        assert_matches(await first, frame(0, 1), reference)
        for task, s in zip(later, (50, 3), strict=True):
            assert_matches(await task, frame(s, 2), reference)
        await batcher.close()

    run(main)
    assert model.sizes == [1, 4]


def test_a_batch_closes_at_max_batch_size_without_waiting_for_the_delay(model: Recording) -> None:
    async def main() -> None:
        batcher = Batcher(model, max_batch_size=4, max_delay_ms=1000)
        started = time.monotonic()
        await asyncio.gather(*(batcher.predict(frame(i, 1), timeout=10) for i in range(4)))
        assert time.monotonic() - started < 0.9  # full: it did not wait for the delay
        # six more single rows: a full batch of 4, then the 2 left over
        await asyncio.gather(*(batcher.predict(frame(i, 1), timeout=10) for i in range(6)))
        await batcher.close()

    run(main)
    assert model.sizes == [4, 4, 2]


def test_requests_are_never_split_and_a_large_one_runs_alone(
    model: Recording, reference: Any
) -> None:
    async def main() -> None:
        batcher = Batcher(model, max_batch_size=4, max_delay_ms=20)
        a, b, big = await asyncio.gather(
            batcher.predict(frame(0, 3), timeout=10),
            batcher.predict(frame(60, 3), timeout=10),
            batcher.predict(frame(90, 10), timeout=10),
        )
        await batcher.close()
        assert_matches(a, frame(0, 3), reference)
        assert_matches(b, frame(60, 3), reference)
        assert_matches(big, frame(90, 10), reference)

    run(main)
    assert model.sizes == [3, 3, 10]


def test_the_first_request_waits_about_max_delay_for_company(model: Recording) -> None:
    async def main() -> None:
        batcher = Batcher(model, max_batch_size=1000, max_delay_ms=100)
        started = time.monotonic()
        await batcher.predict(frame(0, 1), timeout=10)
        waited = time.monotonic() - started
        await batcher.close()
        assert 0.08 <= waited < 2.0, waited  # held for the delay, and not much longer

    run(main)
    assert model.sizes == [1]


def test_a_full_queue_refuses_at_once(model: Recording, reference: Any) -> None:
    async def main() -> None:
        batcher = Batcher(model, max_batch_size=1, max_delay_ms=0, max_queue=2)
        model.hold()
        first = asyncio.ensure_future(batcher.predict(frame(0, 1), timeout=10))
        await model.wait_entered()
        queued = [asyncio.ensure_future(batcher.predict(frame(i, 1), timeout=10)) for i in (1, 2)]
        await asyncio.sleep(0)
        assert batcher.depth == 2
        with pytest.raises(QueueFull) as full:
            await batcher.predict(frame(3, 1), timeout=10)
        assert (full.value.http_status, full.value.code, full.value.retry_after) == (
            503,
            "overloaded",
            1,
        )
        model.release.set()
        assert_matches(await first, frame(0, 1), reference)
        for task, i in zip(queued, (1, 2), strict=True):
            assert_matches(await task, frame(i, 1), reference)
        # room again
        assert_matches(await batcher.predict(frame(3, 1), timeout=10), frame(3, 1), reference)
        await batcher.close()

    run(main)
    assert model.sizes == [1, 1, 1, 1]


def test_a_request_past_its_deadline_is_refused_and_never_computed(
    model: Recording, reference: Any
) -> None:
    late_rows = frame(120, 2)

    async def main() -> None:
        batcher = Batcher(model, max_batch_size=64, max_delay_ms=0)
        model.hold()
        first = asyncio.ensure_future(batcher.predict(frame(0, 1), timeout=10))
        await model.wait_entered()  # the model is busy…
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as late:  # …past this request's deadline
            await batcher.predict(late_rows, timeout=0.05)
        assert (late.value.http_status, late.value.code) == (504, "timeout")
        assert time.monotonic() - started < 5
        model.release.set()
        assert_matches(await first, frame(0, 1), reference)
        # the batcher goes on serving, without the expired request
        assert_matches(await batcher.predict(frame(60, 2), timeout=10), frame(60, 2), reference)
        await batcher.close()

    run(main)
    assert model.sizes == [1, 2]
    computed = computed_rows(model)
    merged = computed.merge(late_rows, how="inner")
    assert merged.empty, "the expired request's rows were computed"


def test_close_answers_what_is_queued_then_refuses(model: Recording, reference: Any) -> None:
    async def main() -> None:
        batcher = Batcher(model, max_batch_size=2, max_delay_ms=0)
        model.hold()
        first = asyncio.ensure_future(batcher.predict(frame(0, 1), timeout=10))
        await model.wait_entered()
        queued = [
            asyncio.ensure_future(batcher.predict(frame(s, 2), timeout=10)) for s in (50, 100)
        ]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(Closed):
            await batcher.predict(frame(10, 1), timeout=10)
        assert not closing.done()  # it waits for the queue to drain
        model.release.set()
        await closing
        assert_matches(await first, frame(0, 1), reference)
        for task, s in zip(queued, (50, 100), strict=True):
            assert_matches(await task, frame(s, 2), reference)
        with pytest.raises(Closed):
            await batcher.predict(frame(10, 1), timeout=10)

    run(main)
    assert model.sizes == [1, 2, 2]


def test_a_failed_batch_fails_its_requests_and_the_next_batch_still_runs(
    model: Recording, reference: Any
) -> None:
    async def main() -> None:
        batcher = Batcher(model, max_batch_size=64, max_delay_ms=20)
        model.fail_next = True
        results = await asyncio.gather(
            batcher.predict(frame(0, 1), timeout=10),
            batcher.predict(frame(1, 2), timeout=10),
            return_exceptions=True,
        )
        assert all(isinstance(r, RuntimeError) for r in results), results
        assert_matches(await batcher.predict(frame(5, 3), timeout=10), frame(5, 3), reference)
        await batcher.close()

    run(main)
    assert model.sizes == [3, 3]
