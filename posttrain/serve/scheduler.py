"""One model, one worker: requests wait in a bounded FIFO and one thread generates them, batch by batch.

The event loop never runs model code: the worker hands each batch to a single dedicated thread
and awaits it, so the server keeps answering (errors, /v1/models, queueing) while a batch runs.

A batch is formed from the oldest waiting sequence and the sequences after it (in arrival
order) that use the same model or adapter, up to ``max_batch``; it runs until its last
sequence ends. Requests arriving meanwhile wait for the next batch: they are queued, never
dropped, unless ``max_queue`` requests are already waiting (then ``submit`` raises
``QueueFull`` and the server answers 429).

A request whose client has gone is cancelled: its waiting sequences are taken out of the
queue, and its running ones leave the batch at the next decoding step.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import NamedTuple

from posttrain.serve.engine import Backend, Sequence

log = logging.getLogger("posttrain.serve")


class QueueFull(Exception):
    pass


class Event(NamedTuple):
    """New text of choice ``index``; ``finish_reason`` on its last event; ``error`` when generation failed."""

    index: int
    text: str
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Stats:
    queued: int = 0  # requests with a sequence still waiting
    running: int = 0  # sequences in the batch being generated
    completed: int = 0  # requests whose every choice ended
    cancelled: int = 0  # requests given up because their client left
    failed: int = 0  # requests whose generation raised
    batches: int = 0
    largest_batch: int = 0


class Job:
    """The sequences of one request and the events they produce, in order."""

    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.waiting = len(seqs)  # sequences not yet handed to the worker
        self.unfinished = len(seqs)
        self.cancelled = False
        self.counted = False  # in completed, cancelled or failed

    @property
    def done(self) -> bool:
        return self.unfinished == 0 or self.counted


class Scheduler:
    def __init__(self, backend: Backend, *, max_batch: int = 8, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1; got {max_batch}, {max_queue}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stats = Stats()
        self._waiting: deque[tuple[Job, Sequence]] = deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._running: list[tuple[Job, Sequence]] = []

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-generate")
        self._task = asyncio.create_task(self._run(), name="posttrain-scheduler")

    async def stop(self) -> None:
        """Cancel everything waiting or running; the generation thread ends at its next step."""
        for job, _ in [*self._waiting, *self._running]:
            self.cancel(job)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def snapshot(self) -> dict:
        return asdict(self.stats)

    def submit(self, seqs: list[Sequence]) -> Job:
        """Queue one request's sequences; raises ``QueueFull`` when ``max_queue`` requests already wait."""
        if self._task is None:
            raise RuntimeError("the scheduler has not been started")
        if self.stats.queued >= self.max_queue:
            raise QueueFull(f"{self.stats.queued} requests are already waiting (--max-queue {self.max_queue})")
        job = Job(seqs)
        for seq in seqs:
            seq.on_text = self._listener(job, seq)
            self._waiting.append((job, seq))
        self.stats.queued += 1
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client has gone: stop working for ``job`` (nothing happens when it has already ended)."""
        if job.cancelled or job.done:
            return
        job.cancelled = True
        for seq in job.seqs:
            seq.cancelled = True
        if job.waiting:
            self._waiting = deque(item for item in self._waiting if item[0] is not job)
            self._left_queue(job, job.waiting)
        if not any(j is job for j, _ in self._running):
            self._count(job, "cancelled")
        # A running job is counted by the worker once the thread has dropped it.

    def _listener(self, job: Job, seq: Sequence):
        """Called in the generation thread: hand the event over to the event loop."""
        def on_text(text: str, finish_reason: str | None) -> None:
            try:
                self._loop.call_soon_threadsafe(self._deliver, job, Event(seq.index, text, finish_reason))
            except RuntimeError:  # the loop has closed: the server is shutting down
                seq.cancelled = True
        return on_text

    def _deliver(self, job: Job, event: Event) -> None:
        job.events.put_nowait(event)
        if event.finish_reason is not None or event.error is not None:
            job.unfinished -= 1
            if job.unfinished == 0:
                self._count(job, "failed" if event.error is not None else "completed")

    def _count(self, job: Job, outcome: str) -> None:
        if not job.counted:
            job.counted = True
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def _left_queue(self, job: Job, count: int = 1) -> None:
        job.waiting -= count
        if job.waiting == 0:
            self.stats.queued -= 1

    def _next_batch(self) -> list[tuple[Job, Sequence]]:
        batch: list[tuple[Job, Sequence]] = []
        skipped: list[tuple[Job, Sequence]] = []
        while self._waiting and len(batch) < self.max_batch:
            job, seq = self._waiting.popleft()
            if batch and seq.adapter != batch[0][1].adapter:
                skipped.append((job, seq))
                continue
            batch.append((job, seq))
            self._left_queue(job)
        self._waiting.extendleft(reversed(skipped))
        return batch

    async def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._running = batch
            self.stats.running = len(batch)
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            try:
                await self._loop.run_in_executor(self._executor, self.backend.generate, [s for _, s in batch])
            except Exception as exc:  # noqa: BLE001 - one failed batch must not end the server
                log.exception("generation failed")
                reason = f"generation failed: {type(exc).__name__}: {exc}"
                for job, seq in batch:
                    if seq.finish_reason is None and not seq.cancelled:
                        self._deliver(job, Event(seq.index, "", None, reason))
            finally:
                self._running = []
                self.stats.running = 0
            for job, seq in batch:
                if job.cancelled and seq.finish_reason is None:
                    self._count(job, "cancelled")
