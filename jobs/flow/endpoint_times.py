"""What an endpoint's recent finished jobs say about the next one: loaded from the job table, kept a while.

`jobs.flow.pollplan` places polls from these figures. A poll must not pay a query each time, so each
process keeps what it loaded per endpoint for `ttl` seconds (30): a new job's figures count within
half a minute, and an endpoint with many jobs in flight costs one small query per process per 30 s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col

from jobs.flow.pollplan import DEFAULT_TUNING, NO_HISTORY, EndpointTimes
from jobs.states import JobStatus
from jobs.storage.db import READ_ONLY
from jobs.storage.models import JobRow

log = logging.getLogger("rpq.endpoint_times")

#: How many of an endpoint's newest completed jobs are learned from.
RECENT_JOBS = 200
#: How long a process keeps what it loaded for an endpoint, in seconds.
CACHE_SECONDS = 30.0
#: ... and while the endpoint has too few finished jobs to plan from: a new endpoint's first ends are
#: what its plan starts from, and every second without one costs polls of jobs that cannot be over.
LEARNING_CACHE_SECONDS = 5.0


def load(engine: Engine, endpoint_id: str, *, limit: int = RECENT_JOBS) -> EndpointTimes:
    """The executionTime and delayTime of the endpoint's newest `limit` completed jobs.

    Only COMPLETED jobs: a failed or cancelled one says nothing about how long a job takes. Served by
    the index on (endpoint_id, status, finished_at), so it reads `limit` index entries whatever the
    table's size."""
    statement = (
        select(col(JobRow.execution_time_ms), col(JobRow.delay_time_ms))
        .where(col(JobRow.endpoint_id) == endpoint_id, col(JobRow.status) == JobStatus.COMPLETED,
               col(JobRow.execution_time_ms).is_not(None))
        .order_by(col(JobRow.finished_at).desc())
        .limit(limit)
    )
    with engine.execution_options(**{READ_ONLY: True}).connect() as connection:
        rows = connection.execute(statement).all()
    return EndpointTimes.from_ms(rows)


class EndpointTimesCache:
    """Per-process memory of `load`, one entry per (engine, endpoint), each kept `ttl` seconds.

    Thread-safe (a threads worker polls many jobs at once). Two threads that miss together may both
    load; that costs a query, never a wrong answer. A failed load is not kept: the poll falls back to
    the doubling schedule, and the next one tries again."""

    def __init__(self, *, ttl: float = CACHE_SECONDS, learning_ttl: float = LEARNING_CACHE_SECONDS,
                 limit: int = RECENT_JOBS, clock: Callable[[], float] = time.monotonic,
                 loader: Callable[[Engine, str], EndpointTimes] | None = None) -> None:
        self.ttl = ttl
        self.learning_ttl = learning_ttl
        self.limit = limit
        self._clock = clock
        self._load = loader or (lambda engine, endpoint_id: load(engine, endpoint_id, limit=self.limit))
        self._kept: dict[tuple[int, str], tuple[float, EndpointTimes]] = {}
        self._lock = threading.Lock()

    def get(self, engine: Engine, endpoint_id: str) -> EndpointTimes:
        key = (id(engine), endpoint_id)
        now = self._clock()
        with self._lock:
            kept = self._kept.get(key)
        if kept is not None and now - kept[0] < self._ttl_of(kept[1]):
            return kept[1]
        try:
            times = self._load(engine, endpoint_id)
        except SQLAlchemyError as exc:
            log.warning("could not load recent job times of endpoint %s (%s); polling on the doubling schedule",
                        endpoint_id, type(exc).__name__)
            return NO_HISTORY
        with self._lock:
            self._kept[key] = (now, times)
        return times

    def _ttl_of(self, times: EndpointTimes) -> float:
        return self.ttl if times.samples >= DEFAULT_TUNING.min_samples else min(self.ttl, self.learning_ttl)

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
