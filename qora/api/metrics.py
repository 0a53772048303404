"""What `/metrics` reports (Prometheus text format 0.0.4) and the request log under --verbose.

The app counts what it sees of each request (`Stats.finished`: outcome, tokens in and out, time to
first token, duration; `Stats.tokens`: answer tokens as they stream, for the recent decode rate);
the scheduler reports its own state through the small `SchedulerStats` interface (queue depth,
sequences being decoded, slots), read at scrape time. The one-at-a-time Worker has one slot; a
batching scheduler reports its N.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Protocol

log = logging.getLogger("qora.server")

# time to first token and request duration, seconds
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 10.0  # the decode rate gauge covers the tokens of the last 10 s


class SchedulerStats(Protocol):
    """What a scheduler tells /metrics: `queued` (jobs waiting), and optionally `active` (sequences
    being generated; default: 1 while `busy`) and `slots` (how many may be at once; default 1)."""

    @property
    def queued(self) -> int: ...

    @property
    def busy(self) -> bool: ...


def scheduler_gauges(scheduler) -> tuple[int, int, int]:
    """(queued, active, slots) of any scheduler."""
    queued = int(scheduler.queued)
    active = getattr(scheduler, "active", None)
    active = int(scheduler.busy) if active is None else int(active)
    return queued, active, int(getattr(scheduler, "slots", 1))


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.total}"]


class Stats:
    """The server's counters since it started (thread-safe: the event loop and tests read them)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status) -> count
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.generation_seconds = 0.0
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.duration = _Histogram(DURATION_BUCKETS)
        self.recent: deque[tuple[float, int]] = deque()  # (time, answer tokens) for the rate gauge

    def tokens(self, n: int = 1) -> None:
        """`n` tokens were generated just now."""
        now = time.monotonic()
        with self.lock:
            self.recent.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def rate(self) -> float:
        """Tokens per second generated over the last RATE_WINDOW_S, all requests together."""
        now = time.monotonic()
        with self.lock:
            self._trim(now)
            return sum(n for _, n in self.recent) / RATE_WINDOW_S

    def finished(
        self,
        endpoint: str,
        status: int | str,
        usage=None,
        ttft: float | None = None,
        duration: float | None = None,
        **fields,
    ) -> None:
        """One request answered (or failed); `usage` is its last Response when it generated anything.
        Logs one JSON line (debug: shown under --verbose)."""
        with self.lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if usage is not None:
                self.prompt_tokens += usage.prompt_tokens
                self.completion_tokens += usage.generation_tokens
                self.cached_tokens += usage.cached_tokens
                self.generation_seconds += usage.generation_time
            if ttft is not None:
                self.ttft.observe(ttft)
            if duration is not None:
                self.duration.observe(duration)
        record = {"event": "request", "endpoint": endpoint, "status": status, **fields}
        if usage is not None:
            record.update(
                prompt_tokens=usage.prompt_tokens,
                cached_tokens=usage.cached_tokens,
                completion_tokens=usage.generation_tokens,
                finish=usage.finish_reason,
                decode_tps=round(usage.generation_tps, 2),
            )
        if ttft is not None:
            record["ttft_ms"] = round(ttft * 1e3, 1)
        if duration is not None:
            record["duration_ms"] = round(duration * 1e3, 1)
        log.debug("%s", json.dumps(record, ensure_ascii=True))

    def render(self, scheduler, model_id: str) -> str:
        """The Prometheus text exposition of everything."""
        queued, active, slots = scheduler_gauges(scheduler)
        rate = self.rate()
        with self.lock:
            out: list[str] = []

            def metric(name, kind, help_text, samples):
                out.append(f"# HELP {name} {help_text}")
                out.append(f"# TYPE {name} {kind}")
                out.extend(samples)

            label = f'model="{_escape(model_id)}"'
            metric("qora_info", "gauge", "The model served.", [f"qora_info{{{label}}} 1"])
            metric(
                "qora_requests_total",
                "counter",
                "Requests answered, by endpoint and HTTP status.",
                [
                    f'qora_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())
                ],
            )
            metric(
                "qora_prompt_tokens_total",
                "counter",
                "Prompt tokens of finished requests.",
                [f"qora_prompt_tokens_total {self.prompt_tokens}"],
            )
            metric(
                "qora_prompt_cached_tokens_total",
                "counter",
                "Prompt tokens reused from the KV cache.",
                [f"qora_prompt_cached_tokens_total {self.cached_tokens}"],
            )
            metric(
                "qora_completion_tokens_total",
                "counter",
                "Generated tokens of finished requests.",
                [f"qora_completion_tokens_total {self.completion_tokens}"],
            )
            metric(
                "qora_generation_seconds_total",
                "counter",
                "Seconds spent generating, summed over requests.",
                [f"qora_generation_seconds_total {self.generation_seconds:.6f}"],
            )
            metric("qora_queue_depth", "gauge", "Requests waiting for a slot.", [f"qora_queue_depth {queued}"])
            metric("qora_active_slots", "gauge", "Sequences being generated now.", [f"qora_active_slots {active}"])
            metric("qora_slots", "gauge", "Sequences the scheduler generates at once at most.", [f"qora_slots {slots}"])
            metric(
                "qora_decode_tokens_per_second",
                "gauge",
                f"Tokens generated per second over the last {RATE_WINDOW_S:g} s, all requests together.",
                [f"qora_decode_tokens_per_second {rate:.3f}"],
            )
            metric(
                "qora_time_to_first_token_seconds",
                "histogram",
                "From request received to first token.",
                self.ttft.lines("qora_time_to_first_token_seconds"),
            )
            metric(
                "qora_request_duration_seconds",
                "histogram",
                "From request received to last byte queued.",
                self.duration.lines("qora_request_duration_seconds"),
            )
            metric(
                "qora_start_time_seconds",
                "gauge",
                "When the server started (Unix time).",
                [f"qora_start_time_seconds {self.started:.3f}"],
            )
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
