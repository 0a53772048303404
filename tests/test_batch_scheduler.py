"""The batching scheduler in process (qora/api/batch.py, no HTTP): a prefix held by a sequence still
running is copied into a new sequence's slot, and jobs cancelled at random moments leave the others'
answers equal to their greedy answers alone."""

from __future__ import annotations

import asyncio
import random

import pytest

import qora
from qora.api.batch import BatchScheduler
from qora.api.jobs import END
from qora.generate import GenerationOptions

SYSTEM = "You are a helpful assistant who answers with care and detail. " * 6


@pytest.fixture(scope="module")
def model(demo_model):
    with qora.load(demo_model, threads=1, max_seq_len=512) as m:
        yield m


def _opts(n: int, **kw) -> GenerationOptions:
    return GenerationOptions(greedy=True, max_tokens=n, sentence_stop=False, **kw)


async def _collect(job, cancel_after: int | None = None):
    """(answer text, last Response) of a job; with cancel_after, the job is cancelled after that many events."""
    text, last, seen = [], None, 0
    while True:
        ev = await job.events.get()
        if ev is END:
            return "".join(text), last
        if isinstance(ev, BaseException):
            raise ev
        seen += 1
        if ev.channel == "answer":
            text.append(ev.text)
        last = ev
        if cancel_after is not None and seen == cancel_after:
            job.cancel()


def test_a_running_sequences_prefix_is_copied_to_a_new_slot(model):
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me about rivers."}]
    second = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a fruit."}]
    want = model.generate(second, greedy=True, max_tokens=6, sentence_stop=False)
    sched = BatchScheduler(model, 2)

    async def run():
        sched.start()
        try:
            a = sched.submit(first, _opts(40, ignore_eos=True))
            while not sched.active:  # the first is running (and holds the system prompt in its slot)
                await asyncio.sleep(0.01)
            b = sched.submit(second, _opts(6))
            return await asyncio.gather(_collect(a), _collect(b))
        finally:
            await asyncio.to_thread(sched.stop)

    (_, last_a), (text_b, last_b) = asyncio.run(run())
    assert last_a.generation_tokens == 40
    assert last_b.cached_tokens > 60  # the shared system prompt, copied from the running slot
    assert text_b == want
    assert sched.counts == {"served": 2, "cancelled": 0, "failed": 0}


def test_random_cancellations_leave_the_other_answers_exact(model):
    questions = [f"Say something about the number {i}." for i in range(8)]
    want = {q: model.generate(q, greedy=True, max_tokens=10, sentence_stop=False) for q in questions}
    rng = random.Random(5)
    sched = BatchScheduler(model, 3, max_queued=64)

    async def run():
        sched.start()
        try:
            jobs = []
            for round_ in range(2):
                for q in questions:
                    cancel = rng.choice([None, None, 1, 4, 8]) if round_ == 0 else None
                    jobs.append((q, cancel, sched.submit(q, _opts(10))))
            results = await asyncio.gather(*(_collect(j, c) for _, c, j in jobs))
            return [(q, c, r) for (q, c, _), r in zip(jobs, results, strict=True)]
        finally:
            await asyncio.to_thread(sched.stop)

    out = asyncio.run(run())
    for q, cancel, (text, last) in out:
        if cancel is None:
            assert text == want[q] and last.finish_reason is not None
    n_cancel = sum(c is not None for _, c, _ in out)
    assert sched.counts["served"] + sched.counts["cancelled"] == len(out)
    assert sched.counts["failed"] == 0 and sched.counts["cancelled"] <= n_cancel
    assert not sched.active and sched.queued == 0
