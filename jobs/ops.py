"""Operator actions that go beyond one job: warming an endpoint up, purging RunPod's queue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select

from jobs import api
from jobs.runpod import health
from jobs.runtime import Runtime
from jobs.states import TERMINAL
from jobs.storage.db import session_scope
from jobs.storage.models import JobRow, utcnow

WARMUP_MARK = "rpq_warmup"
DEFAULT_WARMUP_INPUT: dict[str, Any] = {"warmup": True}


@dataclass(frozen=True)
class Warmup:
    action: str  # "none" or "submitted"
    reason: str
    job_id: str | None = None
    workers_ready: int | None = None  # warm workers (ready and running) /health showed; None when it failed


def warmup(rt: Runtime, endpoint: str, *, input: Any = None) -> Warmup:
    """Send one warm-up job unless the endpoint has warm or starting workers, or a warm-up is in flight.

    Warm means `ready` or `running`: RunPod's `idle` workers are scaled down, so an endpoint with only
    those is cold and gets its warm-up job. Idempotent: however often it is called, at most one warm-up
    job is in flight per endpoint.
    """
    target = rt.settings.resolve_endpoint(endpoint)
    row = health.observe(rt, target)
    warm = (row.workers_ready or 0) + (row.workers_running or 0) if row.ok else None
    if row.ok:
        if warm:
            return Warmup("none", f"{warm} worker(s) already warm", workers_ready=warm)
        if row.workers_initializing:
            return Warmup("none", f"{row.workers_initializing} worker(s) already starting", workers_ready=warm)
    with session_scope(rt.engine) as session:
        for live in session.exec(select(JobRow).where(
                JobRow.endpoint_id == target.id, col(JobRow.status).not_in(sorted(TERMINAL)))).all():
            if (live.meta or {}).get(WARMUP_MARK):
                return Warmup("none", "a warm-up job is already in flight", live.id, warm)
    # A key per ten-minute window: two operators warming up at the same moment share one job.
    window = utcnow().strftime("%Y%m%d%H%M")[:-1]
    job = api.submit(endpoint, DEFAULT_WARMUP_INPUT if input is None else input,
                     metadata={WARMUP_MARK: True}, idempotency_key=f"{WARMUP_MARK}-{window}", runtime=rt)
    cold = "no workers" if row.ok else f"health unknown ({row.error})"
    return Warmup("submitted", f"{cold}: sent one warm-up job", job.id, warm)


def purge_queue(rt: Runtime, endpoint: str) -> int:
    """RunPod's purge-queue: removes the endpoint's queued jobs (running ones go on). Polls then see them
    end, as RunPod reports them."""
    return rt.runpod.purge_queue(rt.settings.resolve_endpoint(endpoint).id)
