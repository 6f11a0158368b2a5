"""Reads and writes of the job table. Every status change goes through `transition()`.

Functions take a session and never commit: the caller owns the transaction, so a status change
and its event row are written together or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, update
from sqlmodel import Session, col, select

from jobs import streams
from jobs.models import JobEvent, JobRow, utcnow
from jobs.states import AT_RUNPOD, JobStatus, sources_of


class Source:
    """Who made a change, as recorded in job_events.source."""

    API = "api"
    SUBMIT = "submit"
    POLL = "poll"
    WEBHOOK = "webhook"
    OPERATOR = "operator"
    RECONCILER = "reconciler"
    CANCEL = "cancel"  # a worker telling RunPod to stop a job already CANCELLED here


def transition(
    session: Session,
    job_id: str,
    *,
    to: JobStatus,
    source: str,
    detail: str | None = None,
    expected: Iterable[JobStatus] | None = None,
    values: Mapping[str, Any] | None = None,
) -> JobStatus | None:
    """Move a job to `to` if, and only if, its status is one of `expected`.

    `expected` defaults to every status the lifecycle allows into `to`. One UPDATE does the
    compare and the set, so a duplicate or late message is a no-op however the writers race.
    Returns the status the job left, or None when nothing changed.
    """
    allowed = sorted(sources_of(to) if expected is None else set(expected))
    now = utcnow()
    statement = (
        update(JobRow)
        .where(col(JobRow.id) == job_id, col(JobRow.status).in_(allowed))
        .values(previous_status=JobRow.status, status=to, updated_at=now, **dict(values or {}))
        .returning(col(JobRow.previous_status), col(JobRow.attempt), col(JobRow.stream), col(JobRow.output),
                   col(JobRow.error))
    )
    changed = session.execute(statement).one_or_none()
    if changed is None:
        return None
    previous, attempt, streaming, output, error = changed
    previous = JobStatus(previous)
    record_event(session, job_id, from_status=previous, to_status=to, source=source, detail=detail, at=now)
    streams.append(session, job_id, attempt, streams.for_transition(
        previous, to, streaming=streaming, output=output, error=error, detail=detail))
    return previous


def update_fields(
    session: Session, job_id: str, *, while_status: Iterable[JobStatus], values: Mapping[str, Any]
) -> bool:
    """Change non-status fields, but only while the job is still in one of `while_status`."""
    statement = (
        update(JobRow)
        .where(col(JobRow.id) == job_id, col(JobRow.status).in_(sorted(set(while_status))))
        .values(updated_at=utcnow(), **dict(values))
    )
    result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
    return result.rowcount == 1


def claim_poll(session: Session, job_id: str, *, seen: datetime | None, lease_until: datetime) -> bool:
    """Take the right to poll a job now: succeeds for exactly one of several racing polls.

    The claim is a compare-and-set on next_poll_at; the winner pushes it to `lease_until`, so a
    poll that dies mid-call is found overdue by the reconciler once the lease runs out.
    """
    due = col(JobRow.next_poll_at).is_(None) if seen is None else col(JobRow.next_poll_at) == seen
    statement = (
        update(JobRow)
        .where(col(JobRow.id) == job_id, col(JobRow.status).in_(sorted(AT_RUNPOD)), due)
        .values(next_poll_at=lease_until)
    )
    result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
    return result.rowcount == 1


def record_event(
    session: Session,
    job_id: str,
    *,
    from_status: JobStatus | None,
    to_status: JobStatus,
    source: str,
    detail: str | None = None,
    at: datetime | None = None,
) -> None:
    session.add(JobEvent(job_id=job_id, from_status=from_status, to_status=to_status, source=source,
                         detail=detail, at=at or utcnow()))


def get_row(session: Session, job_id: str) -> JobRow | None:
    return session.get(JobRow, job_id)


def find_by_idempotency_key(session: Session, endpoint_id: str, key: str) -> JobRow | None:
    statement = select(JobRow).where(JobRow.endpoint_id == endpoint_id, JobRow.idempotency_key == key)
    return session.exec(statement).first()


def events_of(session: Session, job_id: str) -> Sequence[JobEvent]:
    statement = select(JobEvent).where(JobEvent.job_id == job_id).order_by(col(JobEvent.id))
    return session.exec(statement).all()


def list_rows(
    session: Session,
    *,
    statuses: Iterable[JobStatus] | None = None,
    endpoint_ids: Iterable[str] | None = None,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Sequence[JobRow]:
    statement = select(JobRow)
    if statuses is not None:
        statement = statement.where(col(JobRow.status).in_(sorted(set(statuses))))
    if endpoint_ids is not None:
        statement = statement.where(col(JobRow.endpoint_id).in_(sorted(set(endpoint_ids))))
    if since is not None:
        statement = statement.where(col(JobRow.created_at) >= since)
    statement = statement.order_by(col(JobRow.created_at).desc(), col(JobRow.id)).offset(offset).limit(limit)
    return session.exec(statement).all()
