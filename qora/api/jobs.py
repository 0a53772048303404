"""Generation jobs and what runs them.

A `Job` is one request's generation as the HTTP side sees it: the prompt and options going in, the
Responses coming out on an asyncio queue (then END, or the exception that stopped it), and a cancel flag
the client side sets when it goes away. Whatever runs jobs is a `Scheduler`; today's is `Worker`: one
thread, one job at a time in arrival order, because one model has one engine and one KV cache. A batching
scheduler (N sequences decoded together) replaces it behind the same interface: the app only submits
jobs, reads their events and reports the counts.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from qora import limits
from qora.errors import QoraError
from qora.generate import GenerationOptions, stream_generate

log = logging.getLogger("qora.server")

END = object()  # a job's last event
POLL_S = 0.2  # how often a waiting non-streamed request checks that its client is still there


class ClientGone(Exception):
    """The client disconnected: in the middle of its request body, or while its non-streamed request waited."""


class QueueFull(Exception):
    """No room for another job; the client should retry later."""

    def __init__(self, waiting: int):
        super().__init__(f"{waiting} requests waiting")
        self.waiting = waiting


@dataclass
class Job:
    """One request's generation: the scheduler puts Responses (then END, or an exception) on `events`."""

    prompt: object
    options: GenerationOptions
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    checked: float = field(default_factory=time.monotonic)  # when the client was last seen connected
    submitted: float = field(default_factory=time.monotonic)

    def emit(self, item) -> None:
        """From the scheduler's thread: hand an event to the request's event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        self.cancelled.set()

    async def next_event(self, client_gone: Callable[[], Awaitable[bool]]):
        """The next event; every POLL_S (whether events flow or not) asks `client_gone()`, and if the client
        has left, cancels the job and raises ClientGone."""
        getter = asyncio.ensure_future(self.events.get())
        try:
            while True:
                wait = max(0.0, self.checked + POLL_S - time.monotonic())
                done, _ = await asyncio.wait({getter}, timeout=wait)
                if time.monotonic() >= self.checked + POLL_S:
                    self.checked = time.monotonic()
                    if await client_gone():
                        self.cancel()
                        raise ClientGone
                if done:
                    return getter.result()
        finally:
            if not getter.done():
                getter.cancel()


class Scheduler(Protocol):
    """What the app needs from whatever runs generation jobs."""

    counts: dict[str, int]  # requests "served", "cancelled", "failed" so far

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and wait until the engine is idle (the model is closed after)."""

    def cancel_all(self) -> None:
        """Cancel every job (the server is stopping) so that open streams end at their next token."""

    def submit(self, prompt, options: GenerationOptions) -> Job:
        """Queue a job, from the event loop; QueueFull when there is no room."""

    @property
    def queued(self) -> int: ...

    @property
    def busy(self) -> bool: ...


class Worker:
    """The one-at-a-time Scheduler: a thread of its own runs jobs in arrival order over one model."""

    def __init__(self, model, max_queued: int = limits.SERVER_MAX_QUEUED):
        self.model = model
        self.max_queued = max_queued
        self.jobs: queue.Queue = queue.Queue()
        self.counts = {"served": 0, "cancelled": 0, "failed": 0}
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._run, name="qora-engine", daemon=True)

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    @property
    def busy(self) -> bool:
        return self.running is not None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.running is not None:
            self.running.cancel()
        self.jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def cancel_all(self) -> None:
        running = self.running
        if running is not None:
            running.cancel()
        with self.jobs.mutex:
            queued = [job for job in self.jobs.queue if job is not None]
        for job in queued:
            job.cancel()

    def submit(self, prompt, options: GenerationOptions) -> Job:
        if self.jobs.qsize() >= self.max_queued:
            raise QueueFull(self.max_queued)
        job = Job(prompt, options, asyncio.get_running_loop())
        self.jobs.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.running = job
            try:
                self._serve(job)
            finally:
                self.running = None

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():  # the client left while queued
            self.counts["cancelled"] += 1
            job.emit(END)
            return
        gen = stream_generate(self.model, job.prompt, job.options)
        try:
            for r in gen:
                if job.cancelled.is_set():
                    break
                job.emit(r)
        except QoraError as e:
            self.counts["failed"] += 1
            job.emit(e)
        except Exception as e:  # a bug: answer 500 and keep serving
            log.exception("generation failed")
            self.counts["failed"] += 1
            job.emit(e)
        else:
            self.counts["cancelled" if job.cancelled.is_set() else "served"] += 1
        finally:
            gen.close()
            job.emit(END)
