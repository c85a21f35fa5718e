"""Dynamic batching: concurrent requests share one call of the compiled serving function.

A request's images wait at most ``timeout_ms`` for company (only while there is
load: a lone client pays no wait); a batch closes at ``max_batch_size`` images.
One batch per signature computes at a time (``concurrent_batches``; more only
helps when the device has idle capacity), so under load the next batch fills
while the current one computes: the batch size grows with the load, which is
what makes a busy server fast.

If a batch fails on its inputs (one request's image is undecodable by the
graph), each of its requests is retried alone, so only the bad request gets
the error (a 400). Any other failure (out of memory, an internal error) is the
server's: every request of the batch gets it as it is, and the app answers 500.
Only model calls that succeed are counted in the metrics.

With ``allowed_sizes`` (TF Serving's allowed_batch_sizes) a batch is padded
up to the next allowed size with copies of its first row, so the model only
ever sees a few batch shapes; the padding is cut from the outputs. Where the
time goes is reported per stage (``on_stage(stage, seconds)``): ``queue``
(submitted until its batch starts), ``handoff`` (until a worker thread runs
it) and ``model``; ``on_stage("padding", images)`` counts the rows added.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

import numpy as np


class InferenceError(Exception):
    """The model rejected a request's inputs (e.g. an image TensorFlow cannot decode): HTTP 400."""


class Unavailable(Exception):
    """The model version was unloaded while the request waited: HTTP 503, retrying finds the current one."""


def is_input_error(exc: BaseException) -> bool:
    """Did the model refuse the request's data (400), rather than fail on its own (500)?"""
    import tensorflow as tf

    return isinstance(exc, tf.errors.InvalidArgumentError)


def classify(exc: Exception) -> Exception:
    """What a caller whose model call raised ``exc`` gets: InferenceError for bad inputs, else ``exc``."""
    return InferenceError(short_error(exc)) if is_input_error(exc) else exc


def short_error(exc: BaseException) -> str:
    """TensorFlow's reason without its graph trace: 'Invalid JPEG data or crop window...'."""
    text = getattr(exc, "message", None) or str(exc)
    lines = [line.strip() for line in text.splitlines()]
    keep = [line for line in lines if line and not line.startswith(("Graph execution error", "Detected at node",
                                                                    "File ", "[[", "@", "tf2xla"))
            and "most recent call last" not in line and not line.startswith("[")]
    reason = (keep[-1] if keep else text.strip())[:300]
    return f"The model could not process the input: {reason}"


@dataclass
class Pending:
    inputs: dict  # input name -> array with the batch dimension first
    future: asyncio.Future
    queued: float = 0.0  # time.perf_counter() at submit

    @property
    def size(self) -> int:
        return len(next(iter(self.inputs.values())))


def padded_size(size: int, allowed: tuple) -> int:
    """The smallest allowed batch size that holds ``size`` images (``size`` itself when none is set or fits)."""
    at = bisect.bisect_left(allowed, size)
    return allowed[at] if at < len(allowed) else size


def run_and_split(fn: Callable, items: list[Pending], allowed: tuple = (), on_stage=None,
                  handed: float | None = None) -> list[dict]:
    """Concatenate, pad to an allowed size, call once, split the outputs back per request."""
    started = time.perf_counter()
    if on_stage and handed is not None:
        on_stage("handoff", started - handed)
    if len(items) == 1:
        inputs = items[0].inputs
    else:
        inputs = {k: np.concatenate([p.inputs[k] for p in items], axis=0) for k in items[0].inputs}
    size = sum(p.size for p in items)
    target = padded_size(size, allowed)
    if target > size:  # copies of the first row, as TF Serving pads
        inputs = {k: np.concatenate([v, np.repeat(v[:1], target - size, axis=0)], axis=0) for k, v in inputs.items()}
    called = time.perf_counter()
    outputs = {k: np.asarray(v) for k, v in fn(inputs).items()}
    if on_stage:
        on_stage("model", time.perf_counter() - called)
    if target > size:
        outputs = {k: v[:size] for k, v in outputs.items()}
    if len(items) == 1:
        return [outputs]
    parts, start = [], 0
    for item in items:
        parts.append({k: v[start:start + item.size] for k, v in outputs.items()})
        start += item.size
    return parts


class DynamicBatcher:
    """Groups submissions for one function; ``submit`` returns that request's outputs."""

    def __init__(self, fn: Callable, executor: Executor, max_batch_size: int = 32, timeout_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None, arriving: Callable[[], int] | None = None,
                 concurrent_batches: int = 1, allowed_sizes=(), on_stage: Callable[[str, float], None] | None = None):
        self.fn = fn
        self.allowed = tuple(sorted(allowed_sizes))
        self.on_stage = on_stage
        self.executor = executor
        self.arriving = arriving or (lambda: 0)
        self.concurrent_batches = max(1, int(concurrent_batches))
        self.slots: asyncio.Semaphore | None = None
        self.last_size = 0
        self.max_batch_size = max(1, int(max_batch_size))
        self.timeout = max(0.0, float(timeout_ms)) / 1000.0
        self.on_batch = on_batch or (lambda size: None)
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.carry: Pending | None = None
        self.running: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
        self.pending = 0  # submitted requests not yet answered
        self.closed = False
        self.lock = threading.Lock()  # close() comes from the registry's thread

    async def submit(self, inputs: dict) -> dict:
        loop = asyncio.get_running_loop()
        with self.lock:
            if self.closed:
                raise Unavailable("The model version was unloaded; retry the request.")
            if self.task is None or self.loop is not loop or self.task.done():
                self.loop = loop
                self.queue = asyncio.Queue()
                self.slots = asyncio.Semaphore(self.concurrent_batches)
                self.task = loop.create_task(self._collect())
        future = loop.create_future()
        self.pending += 1
        try:
            await self.queue.put(Pending(inputs, future, time.perf_counter()))
            return await future
        finally:
            self.pending -= 1

    @property
    def idle(self) -> bool:
        """No request submitted and unanswered: closing now loses nothing (event-loop thread only)."""
        return self.pending == 0

    def close(self) -> None:
        """Cancel the collector (called from any thread when a version is unloaded); later submits fail."""
        with self.lock:
            self.closed = True
            if self.task is not None and self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.task.cancel)

    async def _next_batch(self) -> list[Pending]:
        first = self.carry or await self.queue.get()
        self.carry = None
        batch, size = [first], first.size
        # Wait for company only when there is load: the last batch had some, or a request is being
        # parsed right now. A lone client then pays no timeout, a busy server fills its batches.
        patient = self.last_size > 1 or self.arriving() > 0
        deadline = self.loop.time() + self.timeout
        while size < self.max_batch_size:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - self.loop.time()
                if remaining <= 0 or not (patient or self.arriving() > 0):
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if size + item.size > self.max_batch_size:
                self.carry = item
                break
            batch.append(item)
            size += item.size
        self.last_size = size
        return batch

    async def _collect(self) -> None:
        try:
            while True:
                await self.slots.acquire()  # while every slot computes, requests pile up into a bigger batch
                try:
                    batch = await self._next_batch()
                except BaseException:
                    self.slots.release()
                    raise
                batch = [p for p in batch if not p.future.cancelled()]
                if not batch:
                    self.slots.release()
                    continue
                task = self.loop.create_task(self._run_and_release(batch))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
        except asyncio.CancelledError:  # the version was unloaded: nobody may wait forever
            waiting = [self.carry] if self.carry else []
            while not self.queue.empty():
                waiting.append(self.queue.get_nowait())
            for item in waiting:
                _resolve(item.future, exc=Unavailable("The model version was unloaded; retry the request."))
            raise

    async def _run_and_release(self, batch: list[Pending]) -> None:
        try:
            await self._run(batch)
        except Exception as exc:  # never leave a caller waiting: a fault of the server, a 500
            for item in batch:
                _resolve(item.future, exc=exc)
        finally:
            self.slots.release()

    async def _run(self, batch: list[Pending]) -> None:
        handed = time.perf_counter()
        if self.on_stage:
            for item in batch:
                self.on_stage("queue", handed - item.queued)
        try:
            parts = await self.loop.run_in_executor(self.executor, run_and_split, self.fn, batch, self.allowed,
                                                    self.on_stage, handed)
        except Exception as exc:
            if len(batch) > 1 and is_input_error(exc):
                for item in batch:  # find the request that broke the batch; the others still succeed
                    await self._run([item])
                return
            for item in batch:
                _resolve(item.future, exc=classify(exc))
            return
        size = sum(p.size for p in batch)
        self.on_batch(size)
        if self.on_stage and padded_size(size, self.allowed) > size:
            self.on_stage("padding", padded_size(size, self.allowed) - size)
        for item, part in zip(batch, parts):
            _resolve(item.future, result=part)


class DirectRunner:
    """Batching off (or every batcher busy): each request calls the function on its own (the benchmark's baseline)."""

    idle = True  # no task or queue of its own: closing it never loses a request

    def __init__(self, fn: Callable, executor: Executor, on_batch: Callable[[int], None] | None = None,
                 allowed_sizes=(), on_stage: Callable[[str, float], None] | None = None):
        self.fn = fn
        self.executor = executor
        self.on_batch = on_batch or (lambda size: None)
        self.allowed = tuple(sorted(allowed_sizes))
        self.on_stage = on_stage

    async def submit(self, inputs: dict) -> dict:
        item = Pending(inputs, None)
        loop = asyncio.get_running_loop()
        try:
            outputs = (await loop.run_in_executor(self.executor, run_and_split, self.fn, [item], self.allowed,
                                                  self.on_stage, time.perf_counter()))[0]
        except Exception as exc:
            error = classify(exc)
            if error is exc:
                raise
            raise error from None
        self.on_batch(item.size)
        if self.on_stage and padded_size(item.size, self.allowed) > item.size:
            self.on_stage("padding", padded_size(item.size, self.allowed) - item.size)
        return outputs

    def close(self) -> None:
        pass


def _resolve(future: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
