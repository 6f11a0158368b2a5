"""The queue panel of an endpoint: how it is doing, from what rpq has stored, for the CLI and the HTTP API alike.

Built from beat's last `/health` observation, the endpoints collector's last `/workers` snapshot (exact worker
states and max workers) and rpq's own job table, so reading it makes no RunPod call: a page that refreshes it
every few seconds for every user costs RunPod nothing. `live=True` asks `/health` now instead (operators only;
it spends the shared request budget).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, func, select

from jobs.flow.spend_guard import spend_hold
from jobs.flow.waiting import held_by_cap
from jobs.runpod import collect, health
from jobs.runtime import Runtime
from jobs.settings import Endpoint
from jobs.states import TERMINAL, JobStatus
from jobs.storage.db import session_scope
from jobs.storage.models import JobRow, utcnow

#: /health's worker states, in the order the panel shows them.
WORKER_STATES = ("ready", "running", "idle", "initializing", "throttled", "unhealthy")
#: /health's job counts.
JOB_COUNTS = ("in_queue", "in_progress", "completed", "failed")


def endpoint_panel(rt: Runtime, endpoint: Endpoint, *, live: bool = False) -> dict[str, Any]:
    """One endpoint's panel, JSON-ready (the HTTP API's EndpointPanel)."""
    row = health.observe(rt, endpoint) if live else None
    now = utcnow()
    with session_scope(rt.engine, read_only=True) as session:
        row = row or health.latest(session, endpoint.name)
        execution_ms, delay_ms = health.recent_timings(session, endpoint.id)
        panel: dict[str, Any] = {"endpoint": endpoint.name, "endpoint_id": endpoint.id,
                                 "queue": _queue(session, rt, endpoint, now), **_snapshot(session, endpoint.name)}
    if row is None:
        return {**panel, "state": "unknown", "observed_at": None, "age_seconds": None, "estimated_wait_seconds": None,
                "reason": "no observation yet (beat collects them every "
                          f"{rt.settings.runpod_health_poll_seconds}s)", "error": None, "workers": None, "jobs": None}
    verdict = health.assess(row, execution_ms=execution_ms, delay_ms=delay_ms)
    return {
        **panel, "state": verdict.state, "reason": verdict.reason,
        "estimated_wait_seconds": verdict.estimated_wait_seconds, "error": row.error,
        "observed_at": row.observed_at.isoformat(), "age_seconds": _age(row.observed_at, now),
        "workers": None if not row.ok else {s: getattr(row, f"workers_{s}") for s in WORKER_STATES},
        "jobs": None if not row.ok else {s: getattr(row, f"jobs_{s}") for s in JOB_COUNTS},
    }


def _snapshot(session: Session, name: str) -> dict[str, Any]:
    """What the endpoints collector last saw: max and min workers, and the exact worker states (RunPod's
    /workers, which /health only approximates). None each when nothing was collected yet."""
    snapshot = collect.latest_endpoint(session, name, ok=True)
    if snapshot is None:
        return {"max_workers": None, "min_workers": None, "worker_states": None, "worker_states_observed_at": None}
    return {"max_workers": snapshot.workers_max, "min_workers": snapshot.workers_min,
            "worker_states": {s: getattr(snapshot, f"workers_{s}") for s in collect.WORKER_STATES},
            "worker_states_observed_at": snapshot.observed_at.isoformat()}


def _queue(session: Session, rt: Runtime, endpoint: Endpoint, now: datetime) -> dict[str, int]:
    """rpq's own count of the endpoint's unfinished jobs by status, and how many PENDING ones its cap and the
    spend guard hold."""
    counts = dict.fromkeys(("PENDING", "SUBMITTING", "SUBMIT_UNKNOWN", "IN_QUEUE", "IN_PROGRESS"), 0)
    for status, count in session.exec(select(JobRow.status, func.count()).where(
            JobRow.endpoint_id == endpoint.id, col(JobRow.status).not_in(sorted(TERMINAL)))
            .group_by(col(JobRow.status))).all():
        counts[str(status)] = int(count)
    held_by_spend = 0
    if spend_hold(session, rt.settings, now, endpoint.id) is not None:
        held_by_spend = int(session.exec(select(func.count()).select_from(JobRow).where(
            JobRow.endpoint_id == endpoint.id, JobRow.status == JobStatus.PENDING,
            col(JobRow.spend_released).is_(False))).one())
    return {**counts, "held_by_cap": held_by_cap(session, rt.settings, now).get(endpoint.name, 0),
            "held_by_spend": held_by_spend}


def _age(moment: datetime, now: datetime) -> float:
    return round(max(0.0, (now - moment).total_seconds()), 1)
