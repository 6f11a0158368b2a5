"""What workers count for the metrics: submits, polls, RunPod errors, job latency, retention runs held up.

Workers run in many processes, so their counters live in one Redis hash (HINCRBY is atomic); the
exporter (`jobs.observability.metrics`) reads it at each scrape. Losing the hash (a FLUSHALL) only resets the
counters, which Prometheus handles like a restart. Recording never fails a job: a Redis error is
logged (once a minute at most) and ignored.

A process counts in memory and flushes its increments in one pipeline every FLUSH_SECONDS
(`BufferedRecorder`): a Redis round trip per event cost more CPU than the event itself. A process
killed with SIGKILL loses at most its last FLUSH_SECONDS of counts; an orderly exit flushes.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import Counter
from datetime import datetime
from typing import Protocol

import redis

from jobs.errors import RunPodError
from jobs.storage.models import utcnow

log = logging.getLogger("rpq.metrics")

COUNTERS_KEY = "rpq:metrics"
LATENCY_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
SEP = "|"  # endpoint names and operations cannot contain it (see settings.ENDPOINT_NAME_RE)
FLUSH_SECONDS = 2.0


class Recorder(Protocol):
    def submitted(self, endpoint: str, outcome: str) -> None: ...
    def polled(self, endpoint: str) -> None: ...
    def runpod_error(self, operation: str, error: RunPodError) -> None: ...
    def finished(self, endpoint: str, status: str, created_at: datetime) -> None: ...
    def output_missing(self, endpoint: str) -> None: ...
    def files_missing(self, endpoint: str) -> None: ...
    def cost(self, endpoint: str, usd: float) -> None: ...
    def stream_gap(self, endpoint: str) -> None: ...
    def retention_blocked(self, reason: str) -> None: ...


class NullRecorder:
    def submitted(self, endpoint: str, outcome: str) -> None:
        pass

    def polled(self, endpoint: str) -> None:
        pass

    def runpod_error(self, operation: str, error: RunPodError) -> None:
        pass

    def finished(self, endpoint: str, status: str, created_at: datetime) -> None:
        pass

    def output_missing(self, endpoint: str) -> None:
        pass

    def files_missing(self, endpoint: str) -> None:
        pass

    def cost(self, endpoint: str, usd: float) -> None:
        pass

    def stream_gap(self, endpoint: str) -> None:
        pass

    def retention_blocked(self, reason: str) -> None:
        pass


def error_kind(error: RunPodError) -> str:
    """RunPodRateLimited -> rate_limited, RunOutcomeUnknown -> outcome_unknown, ..."""
    name = type(error).__name__.removeprefix("RunPod")
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_") or "error"


class RedisRecorder:
    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._last_warning = 0.0

    def _add(self, increments: dict[str, float]) -> None:
        try:
            pipe = self._redis.pipeline(transaction=False)
            for field, amount in increments.items():
                if isinstance(amount, int):
                    pipe.hincrby(COUNTERS_KEY, field, amount)
                else:
                    pipe.hincrbyfloat(COUNTERS_KEY, field, amount)
            pipe.execute()
        except redis.RedisError as exc:
            if time.monotonic() - self._last_warning > 60:  # say it once a minute, not per job
                self._last_warning = time.monotonic()
                log.warning("metrics not recorded (Redis: %s)", exc)

    def submitted(self, endpoint: str, outcome: str) -> None:
        self._add({SEP.join(("submits", endpoint, outcome)): 1})

    def polled(self, endpoint: str) -> None:
        self._add({SEP.join(("polls", endpoint)): 1})

    def runpod_error(self, operation: str, error: RunPodError) -> None:
        self._add({SEP.join(("runpod_errors", operation, error_kind(error))): 1})

    def output_missing(self, endpoint: str) -> None:
        self._add({SEP.join(("output_missing", endpoint)): 1})

    def files_missing(self, endpoint: str) -> None:
        self._add({SEP.join(("files_missing", endpoint)): 1})

    def cost(self, endpoint: str, usd: float) -> None:
        self._add({SEP.join(("cost_usd", endpoint)): float(usd)})

    def stream_gap(self, endpoint: str) -> None:
        self._add({SEP.join(("stream_gaps", endpoint)): 1})

    def retention_blocked(self, reason: str) -> None:
        self._add({SEP.join(("retention_blocked", reason)): 1})

    def finished(self, endpoint: str, status: str, created_at: datetime) -> None:
        seconds = max((utcnow() - created_at).total_seconds(), 0.0)
        increments: dict[str, float] = {
            SEP.join(("latency_count", endpoint, status)): 1,
            SEP.join(("latency_sum", endpoint, status)): seconds,
        }
        for bound in LATENCY_BUCKETS:
            if seconds <= bound:
                increments[SEP.join(("latency_bucket", endpoint, status, str(bound)))] = 1
        self._add(increments)


class BufferedRecorder(RedisRecorder):
    """A RedisRecorder that adds up increments in memory and writes them every FLUSH_SECONDS from a
    background thread (started on first use in each process, so a forked pool child gets its own)."""

    def __init__(self, url: str, *, flush_seconds: float = FLUSH_SECONDS) -> None:
        super().__init__(url)
        self._flush_seconds = flush_seconds
        self._pending: Counter[str] = Counter()
        self._pending_lock = threading.Lock()
        self._flusher_pid: int | None = None
        self._wake = threading.Event()

    def _add(self, increments: dict[str, float]) -> None:
        with self._pending_lock:
            if self._flusher_pid != os.getpid():
                self._start_flusher()
            self._pending.update(increments)

    def _start_flusher(self) -> None:
        # Counts a parent made before forking belong to the parent; the child starts from zero.
        self._pending = Counter()
        self._flusher_pid = os.getpid()
        threading.Thread(target=self._flush_forever, name="rpq-metrics-flush", daemon=True).start()
        atexit.register(self.flush)

    def _flush_forever(self) -> None:
        while True:
            self._wake.wait(self._flush_seconds)
            self.flush()

    def flush(self) -> None:
        """Write what has been counted since the last flush (also at exit)."""
        with self._pending_lock:
            pending, self._pending = self._pending, Counter()
        if pending:
            RedisRecorder._add(self, dict(pending))
