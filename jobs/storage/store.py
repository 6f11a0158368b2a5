"""Reads and writes of the job table. Every status change goes through `transition()` (or
`transition_all()`, the same compare-and-set for many jobs at once).

Functions take a session and never commit: the caller owns the transaction, so a status change
and its event row are written together or not at all. `insert_job` alone takes the engine: a new
job and its first event are a transaction of their own, written the cheapest way each database has.

A write made on behalf of a RunPod job (a poll's findings, a submit's answer) carries a `Fence`:
the attempt and RunPod job it is about. The UPDATE then matches only while the row still belongs to
that attempt and that RunPod job, so a late answer about an older attempt changes nothing, and the
side rows (events, stream chunks) that belong to the write are added only when it matched.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ClauseElement,
    ColumnElement,
    Connection,
    CursorResult,
    Engine,
    Table,
    bindparam,
    case,
    func,
    insert,
    literal,
    null,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from jobs.jsonsafe import storable_text
from jobs.states import AT_RUNPOD, TERMINAL, JobStatus, sources_of
from jobs.storage import streams
from jobs.storage.models import JobEvent, JobMeta, JobRow, RunPodCancel, utcnow

JOBS: Table = JobRow.__table__  # type: ignore[attr-defined]
EVENTS: Table = JobEvent.__table__  # type: ignore[attr-defined]
META: Table = JobMeta.__table__  # type: ignore[attr-defined]
UNFINISHED = frozenset(JobStatus) - TERMINAL


class Source:
    """Who made a change, as recorded in job_events.source."""

    API = "api"
    SUBMIT = "submit"
    POLL = "poll"
    WEBHOOK = "webhook"
    OPERATOR = "operator"
    RECONCILER = "reconciler"
    CANCEL = "cancel"  # a worker telling RunPod to stop a job already CANCELLED here


@dataclass(frozen=True)
class Fence:
    """The attempt, and the RunPod job of that attempt (None before /run answered), that a write is
    made on behalf of. A write fenced to them matches only while the row still belongs to both."""

    attempt: int
    runpod_job_id: str | None

    @classmethod
    def of(cls, row: JobRow) -> Fence:
        return cls(attempt=row.attempt, runpod_job_id=row.runpod_job_id)

    def clauses(self) -> list[ColumnElement[bool]]:
        # The table's columns, not the ORM class's: an ORM attribute would send the whole statement
        # through the ORM's bulk-update path (session synchronisation) for nothing, on every write.
        runpod = (JOBS.c.runpod_job_id.is_(None) if self.runpod_job_id is None
                  else JOBS.c.runpod_job_id == self.runpod_job_id)
        return [JOBS.c.attempt == self.attempt, runpod]


def transition(
    session: Session,
    job_id: str,
    *,
    to: JobStatus,
    source: str,
    detail: str | None = None,
    expected: Iterable[JobStatus] | None = None,
    values: Mapping[str, Any] | None = None,
    fence: Fence | None = None,
    chunks: Sequence[tuple[str, Any]] = (),
) -> JobStatus | None:
    """Move a job to `to` if, and only if, its status is one of `expected` (and, with a `fence`, it
    still belongs to that attempt and RunPod job).

    `expected` defaults to every status the lifecycle allows into `to`. One UPDATE does the
    compare and the set, so a duplicate or late message is a no-op however the writers race.
    Only when it matched are the event row and the stream events written: `chunks` (progress and
    output seen by the same poll) go between the attempt's `started` and its `end` or `error`.
    Returns the status the job left, or None when nothing changed.
    """
    allowed = tuple(sorted(sources_of(to) if expected is None else set(expected)))
    now = utcnow()
    statement, params = _job_update(job_id, to=to, allowed=allowed, fence=fence, values=values or {}, now=now)
    changed = session.execute(statement, params).one_or_none()
    if changed is None:
        return None
    previous, attempt, streaming, output, error, output_missing = changed
    previous = JobStatus(previous)
    record_event(session, job_id, from_status=previous, to_status=to, source=source, detail=detail, at=now)
    streams.append(session, job_id, attempt, streams.for_transition(
        previous, to, streaming=streaming, output=output, error=error, detail=detail, chunks=chunks,
        output_missing=output_missing))
    return previous


def transition_all(
    session: Session,
    job_ids: Sequence[str],
    *,
    to: JobStatus,
    source: str,
    expected: Iterable[JobStatus],
    values: Mapping[str, Any] | None = None,
    detail: str | None = None,
) -> list[str]:
    """`transition` for many jobs with the same values: one UPDATE, then one INSERT of all their events
    (and their stream events, when the change means any), instead of two statements per job. Each job
    moves if, and only if, its status is one of `expected`. Returns the ids of the jobs that moved."""
    if not job_ids:
        return []
    now = utcnow()
    statement = (
        update(JOBS)
        .where(JOBS.c.id.in_(list(job_ids)), JOBS.c.status.in_(sorted(set(expected))))
        .values(previous_status=JOBS.c.status, status=to, updated_at=now, **dict(values or {}))
        .returning(JOBS.c.id, JOBS.c.previous_status, JOBS.c.attempt, JOBS.c.stream, JOBS.c.output, JOBS.c.error,
                   JOBS.c.output_missing)
    )
    moved = session.execute(statement).all()
    if not moved:
        return []
    stored_detail = storable_text(detail) if detail is not None else None
    session.execute(_NEW_EVENT, [{"job_id": job_id, "from_status": previous, "to_status": to, "source": source,
                                  "detail": stored_detail, "at": now, "repeats": 1} for job_id, previous, *_ in moved])
    for job_id, previous, attempt, streaming, output, error, output_missing in moved:
        streams.append(session, job_id, attempt, streams.for_transition(
            JobStatus(previous), to, streaming=streaming, output=output, error=error, detail=detail,
            output_missing=output_missing))
    return [job_id for job_id, *_ in moved]


def update_fields(
    session: Session, job_id: str, *, while_status: Iterable[JobStatus], values: Mapping[str, Any],
    fence: Fence | None = None,
) -> bool:
    """Change non-status fields, but only while the job is still in one of `while_status` (and, with a
    `fence`, still belongs to that attempt and RunPod job)."""
    statement, params = _job_update(job_id, to=None, allowed=tuple(sorted(set(while_status))), fence=fence,
                                    values=values, now=utcnow())
    result: CursorResult[Any] = session.execute(statement, params)  # type: ignore[assignment]
    return result.rowcount == 1


@dataclass(frozen=True)
class DueUnlessNow:
    """A value for `next_poll_at` (see `unless_due_now`)."""

    at: datetime


#: The UPDATEs of one job row, by shape: built once each, run with parameters.
_job_updates: dict[tuple[Any, ...], Any] = {}


def _job_update(job_id: str, *, to: JobStatus | None, allowed: tuple[JobStatus, ...], fence: Fence | None,
                values: Mapping[str, Any], now: datetime) -> tuple[Any, dict[str, Any]]:
    """The UPDATE `transition` (with `to`) or `update_fields` (without) runs, and its parameters.

    A statement is built, keyed and compiled once per shape (the status it sets, the statuses it
    expects, how it is fenced, which columns it sets) and then run with parameters: building and
    keying a new statement for every write cost more CPU than running it. Core on the table, not the
    ORM class: no session synchronisation to evaluate, on the hot path."""
    params: dict[str, Any] = {"w_id": job_id, "v_updated_at": now}
    plain, due, inline = [], [], {}
    for name, value in values.items():
        if isinstance(value, DueUnlessNow):
            due.append(name)
            params[f"v_{name}"] = value.at
        elif isinstance(value, ClauseElement):
            inline[name] = value  # an expression of the caller's: added to this write's statement alone
        else:  # None too: bound with the column's type, as .values() binds it (JSON columns keep JSON null)
            plain.append(name)
            params[f"v_{name}"] = value
    if fence is not None:
        params["w_attempt"] = fence.attempt
        if fence.runpod_job_id is not None:
            params["w_runpod_job_id"] = fence.runpod_job_id
    fenced = None if fence is None else fence.runpod_job_id is None
    key = (to, allowed, fenced, tuple(plain), tuple(due))
    statement = _job_updates.get(key)
    if statement is None:
        statement = _job_updates.setdefault(key, _build_job_update(to, allowed, fenced, plain, due))
    return (statement.values(**inline) if inline else statement), params


def _build_job_update(to: JobStatus | None, allowed: tuple[JobStatus, ...], fenced: bool | None, plain: list[str],
                      due: list[str]) -> Any:
    where = [JOBS.c.id == bindparam("w_id"), JOBS.c.status.in_(allowed)]
    if fenced is not None:
        where.append(JOBS.c.attempt == bindparam("w_attempt"))
        where.append(JOBS.c.runpod_job_id.is_(None) if fenced else JOBS.c.runpod_job_id == bindparam("w_runpod_job_id"))
    sets: dict[str, Any] = {"updated_at": bindparam("v_updated_at", type_=JOBS.c.updated_at.type)}
    sets.update({name: bindparam(f"v_{name}", type_=JOBS.c[name].type) for name in plain})
    # A claimed poll holds a lease, never NULL, so NULL can only be a request to poll now (see unless_due_now).
    sets.update({name: case((JOBS.c[name].is_(None), null()),
                            else_=bindparam(f"v_{name}", type_=JOBS.c[name].type)) for name in due})
    statement = update(JOBS).where(*where)
    if to is None:
        return statement.values(**sets)
    return statement.values(previous_status=JOBS.c.status, status=to, **sets).returning(
        JOBS.c.previous_status, JOBS.c.attempt, JOBS.c.stream, JOBS.c.output, JOBS.c.error, JOBS.c.output_missing)


def unless_due_now(poll_at: datetime) -> DueUnlessNow:
    """`next_poll_at` for a poll's own write: `poll_at`, unless a webhook (or an adoption) made the job
    due now (NULL) while the poll was in flight. A claimed poll holds a lease, never NULL, so NULL can
    only be that request, and RunPod's later news it stands for must not wait for the next poll.
    For the `values` of `transition` and `update_fields`."""
    return DueUnlessNow(poll_at)


def put_off_polls(session: Session, polls: Sequence[tuple[JobRow, datetime]]) -> int:
    """Move claimed polls to later without making them, in one statement: each (row as claimed, when),
    fenced like a poll's own write (same status, attempt and RunPod job; not if made due now meanwhile).
    Returns how many moved."""
    if not polls:
        return 0
    statement = (
        update(JOBS)
        .where(JOBS.c.id == bindparam("b_id"), JOBS.c.status == bindparam("b_status"),
               JOBS.c.attempt == bindparam("b_attempt"), JOBS.c.runpod_job_id == bindparam("b_runpod_job_id"),
               JOBS.c.next_poll_at.is_not(None))
        .values(next_poll_at=bindparam("b_at"))
    )
    result: CursorResult[Any] = session.execute(statement, [  # type: ignore[assignment]
        {"b_id": row.id, "b_status": row.status, "b_attempt": row.attempt, "b_runpod_job_id": row.runpod_job_id,
         "b_at": at} for row, at in polls])
    return result.rowcount


def claim_poll(session: Session, job_id: str, *, seen: datetime | None, lease_until: datetime, fence: Fence) -> bool:
    """Take the right to poll a job's RunPod job now: succeeds for exactly one of several racing polls.

    The claim is a compare-and-set on next_poll_at, fenced to the attempt and RunPod job the poll is
    about; the winner pushes next_poll_at to `lease_until`, so a poll that dies mid-call is found
    overdue by the reconciler once the lease runs out.
    """
    due = col(JobRow.next_poll_at).is_(None) if seen is None else col(JobRow.next_poll_at) == seen
    statement = (
        update(JOBS)
        .where(JOBS.c.id == job_id, JOBS.c.status.in_(sorted(AT_RUNPOD)), due, *fence.clauses())
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
    coalesce: bool = False,
) -> None:
    """Add a row to the job's history. `detail` often quotes RunPod, so it is made storable first.

    With `coalesce`, an event identical to the job's latest one (the same webhook call again, the
    same reconciler re-poll) bumps that row's `repeats` and `last_at` instead of adding a row."""
    at = at or utcnow()
    detail = storable_text(detail) if detail is not None else None
    if coalesce:
        write_side_rows(session)  # the latest event may be one kept back by side_rows_together
        latest = session.exec(select(JobEvent).where(JobEvent.job_id == job_id)
                              .order_by(col(JobEvent.id).desc()).limit(1)).first()
        if latest is not None and (latest.from_status, latest.to_status, latest.source, latest.detail) == (
                from_status, to_status, source, detail):
            latest.repeats += 1
            latest.last_at = at
            session.add(latest)
            return
    row = {"job_id": job_id, "from_status": from_status, "to_status": to_status, "source": source, "detail": detail,
           "at": at, "repeats": 1}
    kept: list[dict[str, Any]] | None = session.info.get(_KEPT_EVENTS)
    if kept is not None:
        kept.append(row)
    else:
        session.execute(_NEW_EVENT, row)


#: Built once, run with parameters: a statement built and keyed per event cost more than running it.
_NEW_EVENT = insert(EVENTS)
_KEPT_EVENTS = "rpq_kept_events"


@contextmanager
def side_rows_together(session: Session) -> Iterator[None]:
    """Within the block, the event rows and stream events that status changes and other writes add
    are kept back, and written when it ends: all events in one INSERT, all stream events in one more,
    instead of two or three statements per job. For a block that writes many jobs' changes in one
    transaction (`lifecycle.store_together`); the rows are still written in that transaction, each
    only if its write matched, in the order they were added. A read of them in the block (a coalesced
    event, `streams.outputs`) writes what was kept first. Not written if the block raises."""
    session.info[_KEPT_EVENTS] = []
    session.info[streams.KEPT] = []
    try:
        yield
        write_side_rows(session)
    finally:
        session.info.pop(_KEPT_EVENTS, None)
        session.info.pop(streams.KEPT, None)


def write_side_rows(session: Session) -> None:
    """Write the rows `side_rows_together` has kept back so far (nothing outside such a block)."""
    kept: list[dict[str, Any]] | None = session.info.get(_KEPT_EVENTS)
    if kept:
        session.execute(_NEW_EVENT, list(kept))
        kept.clear()
    streams.write_kept(session)


def add_runpod_cancel(session: Session, row: JobRow, *, attempt: int, runpod_job_id: str, reason: str) -> bool:
    """Put a RunPod job in the cancel outbox (once per job, attempt and RunPod id). True when added."""
    exists = session.exec(select(RunPodCancel.id).where(
        RunPodCancel.job_id == row.id, RunPodCancel.attempt == attempt,
        RunPodCancel.runpod_job_id == runpod_job_id)).first()
    if exists is not None:
        return False
    now = utcnow()
    session.add(RunPodCancel(job_id=row.id, attempt=attempt, endpoint_id=row.endpoint_id,
                             runpod_job_id=runpod_job_id, reason=reason, created_at=now, next_try_at=now))
    return True


def open_runpod_cancels(session: Session, job_id: str) -> Sequence[RunPodCancel]:
    statement = (select(RunPodCancel).where(RunPodCancel.job_id == job_id, col(RunPodCancel.done_at).is_(None))
                 .order_by(col(RunPodCancel.id)))
    return session.exec(statement).all()


#: The columns of a new job row that `insert_job` is given values for: every column without a value is NULL.
NEW_JOB_COLUMNS = ("id", "tenant", "endpoint_name", "endpoint_id", "status", "input", "policy", "webhook", "metadata",
                   "stream", "correlation_id", "idempotency_key", "attempt", "poll_count", "poll_errors",
                   "polls_since_change", "output_missing", "priority", "has_files", "worker_s3", "input_key",
                   "created_at", "updated_at")
_FIRST_EVENT_COLUMNS = ("job_id", "from_status", "to_status", "at", "source", "detail", "repeats")
_jobs = JobRow.__table__  # type: ignore[attr-defined]
_events = JobEvent.__table__  # type: ignore[attr-defined]
_new_job_statements: dict[str, Any] = {}
_sqlite_writers: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()


def insert_job(engine: Engine, values: Mapping[str, Any], *, source: str, detail: str,
               also: Callable[[Connection], None] | None = None) -> bool:
    """Write a new job row (`values`, keyed by NEW_JOB_COLUMNS) and its first event, `None → status`, at
    its `created_at`. False, and nothing written, when another job already has its (endpoint_id,
    idempotency_key, tenant). `also` writes what belongs with the job (its files) on the same connection, in the
    same transaction; if it raises, nothing is written.

    The ORM's flush and commit cost more CPU than the two inserts themselves, and each statement is a
    round trip, so this is SQLAlchemy Core with statements built once. On PostgreSQL both rows go in one
    statement (a data-modifying CTE), and one statement is atomic by itself, so it runs without
    BEGIN and COMMIT: one round trip in all (a job with files is a transaction, as it must be). SQLite has
    no data-modifying CTEs; a local file needs no saving of round trips, so there it is two inserts in one
    transaction (which takes the write lock up front, see `jobs.storage.db`). A key already taken is ON
    CONFLICT DO NOTHING, which waits for a concurrent insert of the same key to commit or roll back, so of
    two racing submits exactly one inserts."""
    # Bound as new_<column>: a bind parameter of an INSERT may not have its column's own name.
    params = {f"new_{name}": values[name] for name in NEW_JOB_COLUMNS}
    params.update(new_source=source, new_detail=storable_text(detail))
    dialect = engine.dialect.name
    statements = _new_job_statements.get(dialect) or _new_job_statements.setdefault(dialect, _build_insert_job(dialect))
    if dialect == "postgresql":
        if also is None:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                result: CursorResult[Any] = connection.execute(statements[0], params)
                return result.rowcount == 1
        with engine.begin() as connection:
            if connection.execute(statements[0], params).rowcount != 1:
                return False
            also(connection)
            return True
    # Submits in one process queue here for SQLite's one writer: its busy handler sleeps with growing
    # waits and serves no order, so with many at once some lost the lock again and again (p99 of seconds).
    with _sqlite_writers.setdefault(engine, threading.Lock()), engine.begin() as connection:
        result = connection.execute(statements[0], params)
        if result.rowcount != 1:
            return False
        connection.execute(statements[1], params)
        if also is not None:
            also(connection)
        return True


def _build_insert_job(dialect: str) -> tuple[Any, ...]:
    insert_new = postgresql.insert if dialect == "postgresql" else sqlite.insert if dialect == "sqlite" else None
    if insert_new is None:
        raise NotImplementedError(f"jobs.storage.store.insert_job supports PostgreSQL and SQLite, not {dialect}")
    job = (insert_new(_jobs)
           .values({name: bindparam(f"new_{name}", type_=_jobs.c[name].type) for name in NEW_JOB_COLUMNS})
           # No conflict target: the key is unique per tenant in one index, and among jobs without a tenant
           # in another (partial) one. The id is a fresh UUID and webhook_token_hash NULL, so only a key conflicts.
           .on_conflict_do_nothing()
           .execution_options(preserve_rowcount=True))  # an INSERT's rowcount is kept only when asked
    first_event = {"from_status": null(), "to_status": bindparam("new_status", type_=_events.c.to_status.type),
                   "source": bindparam("new_source", type_=_events.c.source.type),
                   "detail": bindparam("new_detail", type_=_events.c.detail.type), "repeats": literal(1)}
    if dialect == "sqlite":
        return job, insert(_events).values(job_id=bindparam("new_id", type_=_events.c.job_id.type),
                                           at=bindparam("new_created_at", type_=_events.c.at.type), **first_event)
    inserted = job.returning(_jobs.c.id, _jobs.c.created_at).cte("inserted")
    event_row = sa_select(inserted.c.id, first_event["from_status"], first_event["to_status"], inserted.c.created_at,
                       first_event["source"], first_event["detail"], first_event["repeats"])
    return (insert(_events).from_select(list(_FIRST_EVENT_COLUMNS), event_row)
            .execution_options(preserve_rowcount=True),)


def get_row(session: Session, job_id: str) -> JobRow | None:
    """The row as the database has it now. Always read: the writes above are Core statements, which do
    not refresh a row this session loaded before them."""
    return session.get(JobRow, job_id, populate_existing=True)


def find_by_idempotency_key(session: Session, endpoint_id: str, key: str, tenant: str | None) -> JobRow | None:
    """The job an earlier submit with this key made for this endpoint and tenant (None: without a tenant)."""
    statement = select(JobRow).where(JobRow.endpoint_id == endpoint_id, JobRow.idempotency_key == key,
                                     _tenant_is(tenant))
    return session.exec(statement).first()


def _tenant_is(tenant: str | None) -> ColumnElement[bool]:
    return col(JobRow.tenant).is_(None) if tenant is None else col(JobRow.tenant) == tenant


def count_unfinished(session: Session, tenant: str) -> int:
    """The tenant's jobs not yet in a final status: its jobs in flight, for its limit."""
    statement = (sa_select(func.count()).select_from(JOBS)
                 .where(JOBS.c.tenant == tenant, JOBS.c.status.in_(sorted(UNFINISHED))))
    return int(session.execute(statement).scalar_one())


def add_meta(connection: Connection | Session, job_id: str, values: Mapping[str, str]) -> None:
    """The job's values for the indexed metadata keys (see JobMeta), in the caller's transaction."""
    if values:
        connection.execute(insert(META), [{"job_id": job_id, "key": k, "value": v} for k, v in values.items()])


def events_of(session: Session, job_id: str) -> Sequence[JobEvent]:
    write_side_rows(session)
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
    tenant: str | None = None,
    meta: Mapping[str, str] | None = None,
) -> Sequence[JobRow]:
    """Jobs newest first. `tenant` None: every tenant's. `meta`: only jobs with each of these indexed
    metadata values (each one an index lookup in job_meta)."""
    statement = select(JobRow)
    if tenant is not None:
        statement = statement.where(col(JobRow.tenant) == tenant)
    for key, value in (meta or {}).items():
        statement = statement.where(sa_select(META.c.job_id).where(
            META.c.job_id == JOBS.c.id, META.c.key == key, META.c.value == value).exists())
    if statuses is not None:
        statement = statement.where(col(JobRow.status).in_(sorted(set(statuses))))
    if endpoint_ids is not None:
        statement = statement.where(col(JobRow.endpoint_id).in_(sorted(set(endpoint_ids))))
    if since is not None:
        statement = statement.where(col(JobRow.created_at) >= since)
    statement = statement.order_by(col(JobRow.created_at).desc(), col(JobRow.id)).offset(offset).limit(limit)
    return session.exec(statement).all()
