"""Dynamic batching for `tunesmith serve`: requests that arrive close together share one forward pass.

One worker thread owns the model, so at most one forward pass runs at a time (two on a 2-core CPU
would only fight over the cores). Requests put their inputs on a queue with an asyncio future; the
worker takes the first waiting request, keeps collecting for `window_ms` or until `max_batch`
inputs are in hand, runs them as one batch and hands each request its own slice of the outputs.
A request larger than `max_batch` is run in `max_batch` pieces and answered once, whole. This is
the scheme of TorchServe's and Triton's dynamic batchers (a maximum batch and a maximum queue delay).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Job:
    inputs: Sequence[Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    outputs: list[Any] = field(default_factory=list)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"batches": self.batches, "items": self.items, "largest_batch": self.largest,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else 0.0}


class DynamicBatcher:
    """`await batcher.submit(inputs)` returns `run_batch`'s outputs for those inputs, in order."""

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32, window_ms: float = 5.0):
        if max_batch < 1 or window_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and window_ms >= 0 (got {max_batch}, {window_ms})")
        self.run_batch, self.max_batch, self.window = run_batch, max_batch, window_ms / 1000
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="tunesmith-batcher", daemon=True)
        self._thread.start()

    async def submit(self, inputs: Sequence[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        job = _Job(list(inputs), loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus those that arrive within the window, up to max_batch inputs."""
        jobs, n = [first], len(first.inputs)
        deadline = time.perf_counter() + self.window
        while n < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            if n + len(job.inputs) > self.max_batch:  # it starts the next batch instead
                self._run(jobs)
                jobs, n, deadline = [], 0, time.perf_counter() + self.window
            jobs.append(job)
            n += len(job.inputs)
        return jobs, False

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._collect(first)
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if not j.future.cancelled()]  # a client that went away costs nothing
        flat = [x for j in live for x in j.inputs]
        try:
            outputs: list[Any] = []
            for i in range(0, len(flat), self.max_batch):
                chunk = flat[i : i + self.max_batch]
                outputs += list(self.run_batch(chunk))
                self.stats.batches += 1
                self.stats.items += len(chunk)
                self.stats.largest = max(self.stats.largest, len(chunk))
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
            for j in live:
                j.loop.call_soon_threadsafe(_set, j.future, None, e)
            return
        at = 0
        for j in live:
            j.loop.call_soon_threadsafe(_set, j.future, outputs[at : at + len(j.inputs)], None)
            at += len(j.inputs)


def _set(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled while the batch ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
