"""The scheduler: one worker, a bounded FIFO, batches of one adapter, cancellation (with a fake backend)."""

import asyncio
import time

import pytest

from posttrain.serve.engine import Sampling, Sequence
from posttrain.serve.scheduler import QueueFull, Scheduler


class FakeBackend:
    """Emits one "x" per step (each taking step_s) until max_tokens; drops cancelled sequences."""

    def __init__(self, step_s: float = 0.0):
        self.step_s = step_s
        self.batches: list[list[tuple[str | None, int]]] = []

    def generate(self, seqs):
        self.batches.append([(s.adapter, s.index) for s in seqs])
        live = [s for s in seqs if not s.cancelled]
        while live:
            time.sleep(self.step_s)
            for seq in list(live):
                if seq.cancelled:
                    live.remove(seq)
                    continue
                seq.completion_tokens += 1
                done = seq.completion_tokens >= seq.sampling.max_tokens
                seq.emit("x", "length" if done else None)
                if done:
                    live.remove(seq)


def _seqs(n=1, adapter=None, max_tokens=2):
    return [Sequence([1], Sampling(max_tokens, temperature=0), adapter, i) for i in range(n)]


async def _collect(job):
    texts = {}
    for _ in job.seqs:
        while True:
            event = await job.events.get()
            texts[event.index] = texts.get(event.index, "") + event.text
            if event.finish_reason:
                break
    return texts


def _with_scheduler(backend, body, **kw):
    async def main():
        scheduler = Scheduler(backend, **kw)
        await scheduler.start()
        try:
            return await body(scheduler)
        finally:
            await scheduler.stop()
    return asyncio.run(asyncio.wait_for(main(), 30))


def test_requests_are_batched_by_adapter_in_arrival_order():
    backend = FakeBackend(step_s=0.01)

    async def body(scheduler):
        jobs = [scheduler.submit(_seqs(adapter=a)) for a in (None, "a", None, "a", None)]
        results = await asyncio.gather(*(_collect(j) for j in jobs))
        return results, scheduler.snapshot()

    results, stats = _with_scheduler(backend, body, max_batch=8)
    assert results == [{0: "xx"}] * 5
    # All five wait when the worker wakes: the oldest request's adapter forms the first batch.
    assert [[a for a, _ in b] for b in backend.batches] == [[None, None, None], ["a", "a"]]
    assert stats["completed"] == 5 and stats["queued"] == 0 and stats["largest_batch"] == 3


def test_n_choices_can_span_batches():
    backend = FakeBackend()

    async def body(scheduler):
        return await _collect(scheduler.submit(_seqs(n=5)))

    assert _with_scheduler(backend, body, max_batch=2) == {i: "xx" for i in range(5)}
    assert [len(b) for b in backend.batches] == [2, 2, 1]


def test_full_queue_refuses_and_nothing_queued_is_dropped():
    backend = FakeBackend(step_s=0.02)

    async def body(scheduler):
        running = scheduler.submit(_seqs(max_tokens=10))
        await asyncio.sleep(0.05)  # the worker has taken it
        waiting = [scheduler.submit(_seqs()), scheduler.submit(_seqs())]
        with pytest.raises(QueueFull):
            scheduler.submit(_seqs())
        return await asyncio.gather(*(_collect(j) for j in [running, *waiting]))

    assert _with_scheduler(backend, body, max_queue=2) == [{0: "x" * 10}, {0: "xx"}, {0: "xx"}]


def test_cancelling_a_running_request_stops_its_generation_and_frees_the_worker():
    backend = FakeBackend(step_s=0.01)

    async def body(scheduler):
        long = scheduler.submit(_seqs(max_tokens=10_000))
        await long.events.get()
        scheduler.cancel(long)
        start = time.monotonic()
        after = await _collect(scheduler.submit(_seqs()))
        return after, time.monotonic() - start, long, scheduler.snapshot()

    after, seconds, long, stats = _with_scheduler(backend, body)
    assert after == {0: "xx"} and seconds < 5
    assert long.seqs[0].finish_reason is None and long.seqs[0].completion_tokens < 1000
    assert stats["cancelled"] == 1 and stats["completed"] == 1


def test_cancelling_a_waiting_request_takes_it_out_of_the_queue():
    backend = FakeBackend(step_s=0.01)

    async def body(scheduler):
        first = scheduler.submit(_seqs(max_tokens=5))
        await asyncio.sleep(0.02)
        second = scheduler.submit(_seqs())
        assert scheduler.snapshot()["queued"] == 1
        scheduler.cancel(second)
        assert scheduler.snapshot()["queued"] == 0
        await _collect(first)
        await asyncio.sleep(0.05)
        return scheduler.snapshot()

    stats = _with_scheduler(backend, body)
    assert stats["cancelled"] == 1 and stats["completed"] == 1 and len(backend.batches) == 1


def test_a_failing_batch_fails_its_requests_not_the_server():
    class Broken(FakeBackend):
        def generate(self, seqs):
            if seqs[0].adapter == "bad":
                raise RuntimeError("boom")
            super().generate(seqs)

    async def body(scheduler):
        bad = scheduler.submit(_seqs(adapter="bad"))
        event = await bad.events.get()
        good = await _collect(scheduler.submit(_seqs()))
        return event, good, scheduler.snapshot()

    event, good, stats = _with_scheduler(Broken(), body)
    assert "boom" in event.error and good == {0: "xx"}
    assert stats["failed"] == 1 and stats["completed"] == 1
