"""Endpoint health: collect RunPod's /health into the endpoint_health table, and read it for people.

RunPod's job status alone cannot say why a job sits IN_QUEUE: no capacity, a cold start, or
workers that crash on start. The worker counters can, and `assess()` turns them into one label
and an estimated wait for a new job.
"""

from __future__ import annotations

import logging
import math
import statistics
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlmodel import Session, col, select

from jobs.errors import RunPodError
from jobs.runtime import Runtime
from jobs.settings import Endpoint
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.locks import try_acquire
from jobs.storage.models import EndpointHealthRow, JobRow, utcnow

log = logging.getLogger("rpq.health")


def collect_on_schedule(rt: Runtime) -> list[EndpointHealthRow] | None:
    """Beat's health round. A lease held for most of the interval (and not released) makes a second
    beat, or a backlog of rounds, skip instead of writing the same observation twice. None: skipped."""
    lease = timedelta(seconds=rt.settings.runpod_health_poll_seconds * 0.8)
    if not try_acquire(rt.engine, "health", owner=uuid.uuid4().hex, lease=lease):
        return None
    return collect(rt)


def collect(rt: Runtime, endpoints: list[Endpoint] | None = None) -> list[EndpointHealthRow]:
    """Ask RunPod for every configured endpoint's health and store one row each, failures included."""
    rows = []
    for endpoint in endpoints if endpoints is not None else list(rt.settings.endpoints.values()):
        rows.append(observe(rt, endpoint))
    with session_scope(rt.engine) as session:
        session.add_all(rows)
    return rows


def observe(rt: Runtime, endpoint: Endpoint) -> EndpointHealthRow:
    """One /health call as a row (not stored)."""
    row = EndpointHealthRow(endpoint_name=endpoint.name, endpoint_id=endpoint.id, observed_at=utcnow(), ok=False)
    try:
        health = rt.runpod.health(endpoint.id)
    except RunPodError as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        log.warning("health of %s failed: %s", endpoint.name, exc)
        return row
    row.ok = True
    j, w = health.jobs, health.workers
    row.jobs_completed, row.jobs_failed, row.jobs_retried = j.completed, j.failed, j.retried
    row.jobs_in_progress, row.jobs_in_queue = j.in_progress, j.in_queue
    row.workers_idle, row.workers_initializing, row.workers_ready = w.idle, w.initializing, w.ready
    row.workers_running, row.workers_throttled, row.workers_unhealthy = w.running, w.throttled, w.unhealthy
    return row


def latest(session: Session, endpoint_name: str) -> EndpointHealthRow | None:
    statement = (select(EndpointHealthRow).where(EndpointHealthRow.endpoint_name == endpoint_name)
                 .order_by(col(EndpointHealthRow.observed_at).desc(), col(EndpointHealthRow.id).desc()).limit(1))
    return session.exec(statement).first()


@dataclass(frozen=True)
class Assessment:
    state: str  # cold, warming, ready, busy, unhealthy, unreachable
    reason: str
    estimated_wait_seconds: float | None  # None: no recent jobs to estimate from


def assess(row: EndpointHealthRow, *, execution_ms: list[int], delay_ms: list[int]) -> Assessment:
    """Label an endpoint from one health row and estimate how long a new job would wait to start.

    `execution_ms` and `delay_ms` are recent jobs' executionTime and delayTime on this endpoint.

    Only `ready` and `running` workers can serve a job now. RunPod's `idle` workers are scaled down
    ("Scaled down, waiting for requests", not billed: docs serverless/workers/overview; runpodctl's
    health.go says the same), so a job they take starts with a cold start.
    """
    if not row.ok:
        return Assessment("unreachable", f"RunPod's /health failed: {row.error}", None)
    ready = row.workers_ready or 0
    running = row.workers_running or 0
    scaled_down = row.workers_idle or 0
    initializing = row.workers_initializing or 0
    unhealthy = row.workers_unhealthy or 0
    throttled = row.workers_throttled or 0
    queued = row.jobs_in_queue or 0
    warm = ready + running

    if unhealthy and not warm:
        state, reason = "unhealthy", (f"{unhealthy} worker(s) crashing on start: jobs will wait until the "
                                      "image or handler is fixed, not for capacity")
    elif initializing and not warm:
        state, reason = "warming", f"{initializing} worker(s) starting (cold start)"
    elif not warm:
        reason = "no workers running; a job starts with a cold start"
        if scaled_down:
            reason = f"{scaled_down} worker(s) scaled down (idle); a job starts with a cold start"
        if throttled:
            reason = f"{throttled} worker(s) throttled: RunPod has no capacity on their hosts"
        state = "cold"
    elif ready > queued:
        state, reason = "ready", f"{ready} ready worker(s)"
    else:
        state, reason = "busy", f"{running} worker(s) running, {queued} job(s) queued"

    per_job = statistics.median(execution_ms) / 1000 if execution_ms else None
    typical_delay = statistics.median(delay_ms) / 1000 if delay_ms else None
    wait: float | None
    if state == "ready":
        wait = 0.0  # a ready worker takes it now
    elif state in ("unhealthy", "unreachable") or per_job is None:
        wait = None  # no honest number: it depends on a fix, or we have no history
    elif warm:
        # Jobs ahead of it share the warm workers; assume no scale-up (the pessimistic case).
        waves = math.ceil((queued - ready + 1) / warm)
        wait = waves * per_job
    else:
        # Cold or warming: the delay recent jobs saw (cold starts included), plus the queue ahead.
        wait = (typical_delay or 0.0) + math.ceil(queued / max(initializing, 1)) * per_job
    return Assessment(state, reason, wait)


def recent_timings(session: Session, endpoint_id: str, *, limit: int = 50) -> tuple[list[int], list[int]]:
    """executionTime and delayTime of the endpoint's last completed jobs (last 24 hours)."""
    rows = session.exec(
        select(JobRow.execution_time_ms, JobRow.delay_time_ms)
        .where(JobRow.endpoint_id == endpoint_id, JobRow.status == JobStatus.COMPLETED,
               col(JobRow.finished_at) > utcnow() - timedelta(days=1))
        .order_by(col(JobRow.finished_at).desc()).limit(limit)
    ).all()
    return [e for e, _ in rows if e is not None], [d for _, d in rows if d is not None]


def purge_before(session: Session, cutoff: datetime, *, batch: int) -> int:
    ids = session.exec(select(EndpointHealthRow.id).where(EndpointHealthRow.observed_at < cutoff).limit(batch)).all()
    if ids:
        session.execute(delete(EndpointHealthRow).where(col(EndpointHealthRow.id).in_(ids)))
    return len(ids)
