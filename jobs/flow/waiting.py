"""Why a PENDING job has not gone to RunPod yet, read from the table when the job is read.

A held job's reason is never stored: 10,000 jobs held behind an endpoint's max_in_flight would need
10,000 rows (or events) rewritten each time a slot frees. The table already holds every fact the
dispatcher decides by: the job's place in the dispatcher's order, the endpoint's jobs in flight, its
cap, and a deferred /run's next try. Reading them costs one count over `ix_jobs_dispatch` for a job
(the jobs ahead of it), one for the endpoint's jobs in flight when it has a cap, and, for a page of
jobs, one ranking per endpoint instead of a count per row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from jobs.flow.dispatch import DISPATCH_ORDER, IN_FLIGHT, ahead_of, due_pending, in_flight
from jobs.flow.spend_guard import spend_hold
from jobs.settings import Settings
from jobs.states import JobStatus
from jobs.storage.models import JobRow


class WaitReason(StrEnum):
    """What a PENDING job waits for."""

    #: The endpoint's cap on jobs at RunPod is full, counting the jobs ahead of this one: it goes when
    #: jobs in flight end.
    MAX_IN_FLIGHT = "max_in_flight"
    #: Other jobs of its endpoint go first (higher priority, or older); they go out at rpq's /run pace.
    QUEUED = "queued"
    #: Nothing is ahead of it and nothing holds it: the dispatcher sends it when it next runs.
    NEXT = "next"
    #: Its /run was put off (RunPod unavailable, or rpq's /run budget spent) until `next_try_at`.
    DEFERRED = "deferred"
    #: The spend guard holds new jobs: the account spends too fast, or its balance is too low
    #: (jobs.flow.spend_guard). It goes, in its usual order, once the limit clears.
    SPEND = "spend"


@dataclass(frozen=True)
class Waiting:
    """Why a PENDING job waits: a sentence for people and the facts behind it."""

    reason: WaitReason
    message: str
    #: PENDING jobs of the endpoint that go before this one (None for a deferred job: it has no place
    #: in line until its next try).
    jobs_ahead: int | None = None
    #: The endpoint's jobs at RunPod, or that RunPod may have (only when it has a max_in_flight).
    in_flight: int | None = None
    max_in_flight: int | None = None
    next_try_at: datetime | None = None

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason.value, "message": self.message, "jobs_ahead": self.jobs_ahead,
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "next_try_at": self.next_try_at.isoformat() if self.next_try_at else None}


def waiting_of(session: Session, row: JobRow, settings: Settings, now: datetime) -> Waiting | None:
    """Why this job waits; None unless it is PENDING."""
    if row.status is not JobStatus.PENDING:
        return None
    hold = spend_hold(session, settings, now, row.endpoint_id)
    if hold is not None and not row.spend_released:
        return Waiting(WaitReason.SPEND, hold.message)
    if _deferred(row, now):
        return _explain(row, settings, now, ahead=None, flying=None)
    ahead = session.exec(select(func.count()).select_from(JobRow).where(
        JobRow.endpoint_id == row.endpoint_id, due_pending(now),
        ahead_of(row.priority, row.created_at, row.id))).one()
    cap = settings.max_in_flight_for(row.endpoint_id)
    flying = in_flight(session, row.endpoint_id) if cap is not None else None
    return _explain(row, settings, now, ahead=ahead, flying=flying)


def waiting_of_rows(session: Session, rows: Iterable[JobRow], settings: Settings,
                    now: datetime) -> dict[str, Waiting]:
    """`waiting_of` for a page of jobs, keyed by job id (PENDING jobs only): the jobs ahead of each are
    ranked once per endpoint, and each capped endpoint's jobs in flight are counted once."""
    pending = [row for row in rows if row.status is JobStatus.PENDING]
    holds = {endpoint_id: spend_hold(session, settings, now, endpoint_id)
             for endpoint_id in {row.endpoint_id for row in pending if not row.spend_released}}
    held = {row.id: Waiting(WaitReason.SPEND, hold.message) for row in pending
            if (hold := holds.get(row.endpoint_id)) is not None and not row.spend_released}
    pending = [row for row in pending if row.id not in held]
    due = [row for row in pending if not _deferred(row, now)]
    endpoint_ids = sorted({row.endpoint_id for row in due})
    places: dict[str, int] = {}
    if due:
        place = func.row_number().over(partition_by=col(JobRow.endpoint_id), order_by=DISPATCH_ORDER) - 1
        ranked = select(JobRow.id, place.label("ahead")) \
            .where(col(JobRow.endpoint_id).in_(endpoint_ids), due_pending(now)).subquery()
        places = dict(session.exec(select(ranked.c.id, ranked.c.ahead)
                                   .where(ranked.c.id.in_([row.id for row in due]))).all())
    capped = [endpoint_id for endpoint_id in endpoint_ids if settings.max_in_flight_for(endpoint_id) is not None]
    flying: dict[str, int] = dict.fromkeys(capped, 0)
    if capped:
        counted = select(JobRow.endpoint_id, func.count()).where(
            col(JobRow.endpoint_id).in_(capped), col(JobRow.status).in_(sorted(IN_FLIGHT)))
        flying |= dict(session.exec(counted.group_by(col(JobRow.endpoint_id))).all())
    # A due job missing from the ranking was sent (or put off) between the two reads: it was first in line.
    return held | {row.id: _explain(row, settings, now,
                                    ahead=None if _deferred(row, now) else places.get(row.id, 0),
                                    flying=flying.get(row.endpoint_id))
                   for row in pending}


def held_by_cap(session: Session, settings: Settings, now: datetime) -> dict[str, int]:
    """Per configured endpoint with a max_in_flight: its PENDING jobs that wait for the cap alone (what
    `waiting_of` calls MAX_IN_FLIGHT). The due jobs past the free slots; jobs waiting out a deferred
    /run are not held by the cap."""
    ids = {endpoint.id: name for name, endpoint in settings.endpoints.items() if name in settings.max_in_flight}
    if not ids:
        return {}
    counts: dict[tuple[str, JobStatus], int] = defaultdict(int)
    for endpoint_id, status, count in session.exec(
        select(JobRow.endpoint_id, JobRow.status, func.count())
        .where(col(JobRow.endpoint_id).in_(sorted(ids)), col(JobRow.status).in_(sorted(IN_FLIGHT)) | due_pending(now))
        .group_by(col(JobRow.endpoint_id), col(JobRow.status))
    ):
        counts[(endpoint_id, JobStatus(status))] = count
    held = {}
    for endpoint_id, name in ids.items():
        cap = settings.max_in_flight[name]
        flying = sum(counts[(endpoint_id, status)] for status in IN_FLIGHT)
        held[name] = max(counts[(endpoint_id, JobStatus.PENDING)] - max(cap - flying, 0), 0)
    return held


def _deferred(row: JobRow, now: datetime) -> bool:
    return row.next_poll_at is not None and row.next_poll_at > now


def _explain(row: JobRow, settings: Settings, now: datetime, *, ahead: int | None,
             flying: int | None) -> Waiting:
    endpoint = row.endpoint_name
    if ahead is None:
        assert row.next_poll_at is not None
        seconds = max((row.next_poll_at - now).total_seconds(), 0.0)
        return Waiting(WaitReason.DEFERRED, "its /run was put off: RunPod was unavailable or rpq's /run budget "
                       f"was spent (its history says which); next try in {seconds:.0f} s",
                       next_try_at=row.next_poll_at)
    cap = settings.max_in_flight_for(row.endpoint_id)
    if cap is not None and flying is not None and flying + ahead >= cap:
        place = "this job is next" if ahead == 0 else f"{_jobs(ahead)} ahead of this one"
        return Waiting(WaitReason.MAX_IN_FLIGHT, f"endpoint {endpoint} has {flying} of {cap} jobs in flight "
                       f"(max_in_flight); {place}", jobs_ahead=ahead, in_flight=flying, max_in_flight=cap)
    if ahead > 0:
        pace = settings.runpod_limits.of("run")
        return Waiting(WaitReason.QUEUED, f"queued behind {_jobs(ahead)} of endpoint {endpoint} (by priority, "
                       f"then age); they go out at up to {pace} /run per 10 s", jobs_ahead=ahead,
                       in_flight=flying, max_in_flight=cap)
    return Waiting(WaitReason.NEXT, f"next in line for endpoint {endpoint}: sent to RunPod when the dispatcher "
                   "next runs", jobs_ahead=0, in_flight=flying, max_in_flight=cap)


def _jobs(count: int) -> str:
    return "1 job" if count == 1 else f"{count:,} jobs"
