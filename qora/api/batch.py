"""The batching Scheduler: up to N requests generated together, one engine step for all of them.

One thread owns the engine. Each loop turn is one step: every decoding sequence contributes its next
token, and sequences that joined contribute a chunk of their prompt (at most `prefill_chunk` prompt
tokens per step in all, so a long prompt never stalls the others for long); `engine.forward_batch`
runs them all in one pass (the weights are read once per step, not once per sequence). Each sequence
is a `qora.generate.Generation` (its own sampler, constraint, stop strings, think budget, loop
detection) fed the logits of its last row; its Responses go to its job at once.

Between steps: cancelled jobs (the client left) leave and free their slot; waiting jobs take free
slots in arrival order; a bounded queue refuses the rest (QueueFull, answered 429).

Prefix cache: every slot remembers the tokens its cache holds, and a finished sequence's slot keeps
them. A new sequence takes the free slot sharing the longest prefix with its prompt (least recently
used among equals), or has the longest prefix held by any slot copied into its slot
(`engine.copy_slot`); only the rest of its prompt is prefilled, and `cached_tokens` says how much
was reused. The cache is bounded by the slots' memory (N contexts), and entries are replaced least
recently used first.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from qora import limits
from qora.api.jobs import END, Job, QueueFull
from qora.errors import ContextOverflowError, QoraError
from qora.generate import Generation, GenerationOptions

log = logging.getLogger("qora.server")

PREFILL_CHUNK = 64  # prompt tokens per step, over all joining sequences


@dataclass
class _Seq:
    """A job in a slot: its Generation, where it is, and what it feeds next."""

    job: Job
    gen: Generation
    slot: int
    cached: int
    pos: int  # positions of the slot's cache written for this sequence so far
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    next_token: int | None = None
    started: float = field(default_factory=time.perf_counter)


DEFAULT_MAX_PARALLEL = 16  # sequences at once when --parallel is not given (and memory allows)
KV_RAM_FRACTION = 0.5  # of the memory available after loading, what the slots' KV caches may take
MIN_SLOT_CONTEXT = 256


def plan_slots(model, parallel: int | None = None, context: int | None = None, available: int | None = None):
    """(parallel, context per sequence) for `qora serve`: the KV caches of all slots (parallel x context
    positions) must fit KV_RAM_FRACTION of available memory, or on a GPU the device memory the model
    left (`engine.slot_memory()`). Without --parallel, as many as fit (at most DEFAULT_MAX_PARALLEL);
    with it and no --context, each slot's context shrinks to fit."""
    cfg, engine = model.config, model.engine
    from qora.engine.base import KV_ELEMENT_BYTES

    width = KV_ELEMENT_BYTES.get(getattr(engine, "kv_dtype", "f16"), 4.0)
    per_token = 2 * cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"] * width  # keys and values
    device_free = getattr(engine, "slot_memory", lambda: None)() if available is None else None
    memory = "memory is available"
    if device_free is not None:  # the GPU's slots also take their logits and tables: a margin for them
        available, budget, memory = device_free, 0.95 * device_free, "device memory is left after the model"
    else:
        if available is None:
            import psutil

            available = psutil.virtual_memory().available
        budget = KV_RAM_FRACTION * available
    ctx = min(int(context), engine.max_seq_len) if context else engine.max_seq_len
    if parallel is None:
        return max(1, min(DEFAULT_MAX_PARALLEL, int(budget // (ctx * per_token)))), ctx
    if not 1 <= parallel <= limits.MAX_BATCH_SLOTS:
        raise QoraError(f"--parallel must be in 1..{limits.MAX_BATCH_SLOTS}, got {parallel}")
    if parallel * ctx * per_token > budget:
        fit = int(budget // (parallel * per_token))
        if context or fit < MIN_SLOT_CONTEXT:
            raise QoraError(
                f"{parallel} sequences of {ctx} tokens need {parallel * ctx * per_token / 2**30:.1f} GiB of KV cache "
                f"but {available / 2**30:.1f} GiB of {memory}: lower --parallel or --context"
            )
        ctx = fit
    return parallel, ctx


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n], np.int64), np.asarray(b[:n], np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


class BatchScheduler:
    """The Scheduler (qora.api.jobs) that decodes up to `parallel` sequences together."""

    def __init__(self, model, parallel: int, context: int | None = None, max_queued: int = limits.SERVER_MAX_QUEUED):
        self.model = model
        self.engine = model.engine
        self.slots = self.engine.open_slots(parallel, context)
        self.context = min(int(context), self.engine.max_seq_len) if context else self.engine.max_seq_len
        if self.slots < parallel:
            log.warning("the %s engine runs %d sequence(s) at a time, not %d", self.engine.device, self.slots, parallel)
        self.max_queued = max_queued
        self.counts = {"served": 0, "cancelled": 0, "failed": 0}
        self.prefill_chunk = PREFILL_CHUNK
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._active: dict[int, _Seq] = {}
        self._held: list[list[int]] = [[] for _ in range(self.slots)]  # tokens each slot's cache holds
        self._used = [0.0] * self.slots  # when each slot was last given out (LRU)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qora-batch", daemon=True)
        if hasattr(model, "cache_tokens"):  # one-slot engines share their own cache with slot 0: forget it
            model.cache_tokens.clear()

    # ── the Scheduler protocol ──

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._active)

    @property
    def active(self) -> int:
        """Sequences being generated now (of `slots`), for /metrics (qora.api.metrics.SchedulerStats)."""
        return len(self._active)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.cancel_all()
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def cancel_all(self) -> None:
        with self._cv:
            jobs = [*self._waiting, *(s.job for s in list(self._active.values()))]
            self._cv.notify_all()
        for job in jobs:
            job.cancel()

    def submit(self, prompt, options: GenerationOptions) -> Job:
        job = Job(prompt, options, asyncio.get_running_loop())
        with self._cv:
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(len(self._waiting))
            self._waiting.append(job)
            self._cv.notify()
        return job

    # ── the engine thread ──

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stopping and not self._active:
                    break
            self._drop_cancelled()
            self._admit()
            if self._active:
                self._step()
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in waiting:
            self.counts["cancelled"] += 1
            job.emit(END)

    def _drop_cancelled(self) -> None:
        for seq in list(self._active.values()):
            if seq.job.cancelled.is_set():
                self._leave(seq, "cancelled")
        with self._cv:
            gone = [j for j in self._waiting if j.cancelled.is_set()]
            for job in gone:
                self._waiting.remove(job)
        for job in gone:
            self.counts["cancelled"] += 1
            job.emit(END)

    def _leave(self, seq: _Seq, outcome: str) -> None:
        """The sequence is done (or its client gone): its slot is free at once, its cache kept for reuse."""
        del self._active[seq.slot]
        self.counts[outcome] += 1
        seq.job.emit(END)

    def _admit(self) -> None:
        while len(self._active) < self.slots:
            with self._cv:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if job.cancelled.is_set():
                self.counts["cancelled"] += 1
                job.emit(END)
                continue
            try:
                self._start(job)
            except QoraError as e:
                self.counts["failed"] += 1
                job.emit(e)
                job.emit(END)
            except Exception as e:  # a bug: answer 500 and keep serving
                log.exception("could not start a generation")
                self.counts["failed"] += 1
                job.emit(e)
                job.emit(END)

    def _start(self, job: Job) -> None:
        gen = Generation(self.model, job.prompt, job.options)
        ids = [int(t) for t in gen.ids]
        if len(ids) + 1 > self.context:
            raise ContextOverflowError(
                f"the prompt is {len(ids)} tokens but a request's context holds {self.context}: "
                f"shorten it to at most {self.context - 1} tokens"
            )
        slot, cached = self._place(ids)
        self._used[slot] = time.monotonic()
        del self._held[slot][cached:]
        self._active[slot] = _Seq(job, gen, slot, cached, cached, pending=ids[cached:])

    def _place(self, ids: list[int]) -> tuple[int, int]:
        """A free slot for a prompt and how many of its leading tokens that slot's cache will hold:
        the free slot with the longest shared prefix, or the longest prefix of any slot copied over.
        At most len(ids) - 1 are reused: the last prompt token is run again for its logits."""
        limit = len(ids) - 1
        free = [s for s in range(self.slots) if s not in self._active]
        shared = {s: min(_common_prefix(self._held[s], ids), limit) for s in range(self.slots)}
        slot = max(free, key=lambda s: (shared[s], -self._used[s]))
        best = max(range(self.slots), key=lambda s: shared[s])
        if shared[best] > shared[slot]:
            # the longest cached prefix is in another slot: copy it (a free slot with nothing worth keeping)
            slot = min(free, key=lambda s: (shared[s], self._used[s]))
            self.engine.copy_slot(best, slot, shared[best])
            self._held[slot] = self._held[best][: shared[best]]
            return slot, shared[best]
        return slot, shared[slot]

    def _entries(self) -> list[tuple[_Seq, list[int]]]:
        """This step's rows: every decoder's next token, then prompt chunks within the prefill budget."""
        rows, budget = [], self.prefill_chunk
        for seq in self._active.values():
            if not seq.pending:
                rows.append((seq, [seq.next_token]))
        for seq in sorted(self._active.values(), key=lambda s: s.job.submitted):
            if seq.pending and budget > 0:
                chunk = seq.pending[:budget]
                budget -= len(chunk)
                rows.append((seq, chunk))
        return rows

    def _step(self) -> None:
        rows = self._entries()
        try:
            logits = self.engine.forward_batch([(seq.slot, toks, seq.pos) for seq, toks in rows])
        except Exception as e:
            if not isinstance(e, QoraError):
                log.exception("batched step failed")
            for seq, _ in rows:
                self._held[seq.slot] = self._held[seq.slot][: seq.pos]
                seq.job.emit(e)
                self._leave(seq, "failed")
            return
        for (seq, toks), out in zip(rows, logits, strict=True):
            self._held[seq.slot][seq.pos :] = toks
            seq.pos += len(toks)
            if seq.pending:
                del seq.pending[: len(toks)]
                if seq.pending:
                    continue  # more of the prompt next step
                seq.gen.prefilled(seq.cached, time.perf_counter() - seq.started)
            self._advance(seq, out)

    def _advance(self, seq: _Seq, logits) -> None:
        """Feed the sequence its logits; send its Responses; it leaves when its answer is over."""
        try:
            responses, token = seq.gen.feed(logits)
            if token is not None and seq.pos + 1 > self.context:
                responses.append(seq.gen.close("length"))  # the context is full: the token cannot be fed
                token = None
        except QoraError as e:
            seq.job.emit(e)
            self._leave(seq, "failed")
            return
        except Exception as e:
            log.exception("generation failed")
            seq.job.emit(e)
            self._leave(seq, "failed")
            return
        for r in responses:
            seq.job.emit(r)
        if token is None:
            self._leave(seq, "cancelled" if seq.job.cancelled.is_set() else "served")
        else:
            seq.next_token = token
