"""A job's event stream: what `GET /v1/jobs/{id}/events` replays over Server-Sent Events.

Each attempt of a job streams `started`, then `progress` and `output` events, then exactly one of
`end` or `error`. Every event is written in the transaction of the job-row UPDATE it belongs to
(`store.transition` for status changes, with the chunks the same poll saw between `started` and
the final event; a fenced `store.update_fields` otherwise), only when that UPDATE matched, and after
it, so the row lock (PostgreSQL) or the write lock (SQLite) lets one writer at a time assign `seq`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, bindparam, func, insert
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from jobs.states import JobStatus
from jobs.storage.models import StreamEvent, utcnow

_TABLE: Table = StreamEvent.__table__  # type: ignore[attr-defined]

STARTED, PROGRESS, OUTPUT, END, ERROR = "started", "progress", "output", "end", "error"
FINAL_KINDS = frozenset({END, ERROR})


def for_transition(
    previous: JobStatus, to: JobStatus, *, streaming: bool, output: Any, error: str | None, detail: str | None,
    chunks: Sequence[tuple[str, Any]] = (), output_missing: bool = False,
) -> list[tuple[str, Any]]:
    """The stream events a status change means, with `chunks` (progress and output seen by the same
    poll) after `started` and before the final event. Pure: the table of cases is tested on its own."""
    events: list[tuple[str, Any]] = []
    ran = to is JobStatus.IN_PROGRESS or (
        to in (JobStatus.COMPLETED, JobStatus.FAILED) and previous in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS))
    if ran and previous is not JobStatus.IN_PROGRESS:
        events.append((STARTED, {}))
    events.extend(chunks)
    if to is JobStatus.COMPLETED:
        if not streaming and not output_missing:
            events.append((OUTPUT, output))  # a plain handler's whole output is its one chunk
        events.append((END, end_data(to, output_missing=output_missing)))
    elif to.is_terminal or to is JobStatus.SUBMIT_UNKNOWN:
        # An unknown submit ends the stream too: nothing more comes unless an operator acts (the stream then
        # goes on, and its reader skips this event once the job has moved on).
        events.append((ERROR, {"status": to.value, "error": error or detail}))
    return events


def end_data(status: JobStatus, *, output_missing: bool) -> dict[str, Any]:
    """What an `end` event carries: the final status, and the flag when RunPod gave no output."""
    return {"status": status.value, "output_missing": True} if output_missing else {"status": status.value}


def append(session: Session, job_id: str, attempt: int, events: Sequence[tuple[str, Any]]) -> None:
    if not events:
        return
    now = utcnow()
    rows = [{"a_job_id": job_id, "a_attempt": attempt, "a_kind": kind, "a_data": data, "a_at": now}
            for kind, data in events]
    kept: list[dict[str, Any]] | None = session.info.get(KEPT)
    if kept is not None:
        kept.extend(rows)  # written by store.side_rows_together, with the rest of its block's
    else:
        session.execute(_APPEND, rows)


def write_kept(session: Session) -> None:
    """Write the stream events kept back by `store.side_rows_together` so far."""
    kept: list[dict[str, Any]] | None = session.info.get(KEPT)
    if kept:
        session.execute(_APPEND, list(kept))
        kept.clear()


#: Where `store.side_rows_together` keeps stream events back (in the session's `info`).
KEPT = "rpq_kept_stream_events"
# One statement for any number of events, of any jobs: each event's seq is one past its job's highest,
# read by the INSERT itself, and the rows are inserted one after the other, so each sees the one before.
_APPEND = insert(_TABLE).from_select(
    ["job_id", "seq", "attempt", "kind", "data", "at"],
    sa_select(bindparam("a_job_id", type_=_TABLE.c.job_id.type), func.coalesce(func.max(_TABLE.c.seq), 0) + 1,
           bindparam("a_attempt", type_=_TABLE.c.attempt.type), bindparam("a_kind", type_=_TABLE.c.kind.type),
           bindparam("a_data", type_=_TABLE.c.data.type), bindparam("a_at", type_=_TABLE.c.at.type))
    .where(_TABLE.c.job_id == bindparam("a_job_id")))


def outputs(session: Session, job_id: str, *, attempt: int) -> list[Any]:
    """Every output chunk stored for this attempt, in order: a streamed job's output when RunPod gives none."""
    write_kept(session)
    statement = (select(StreamEvent.data).where(StreamEvent.job_id == job_id, StreamEvent.attempt == attempt,
                                                StreamEvent.kind == OUTPUT).order_by(col(StreamEvent.seq)))
    return list(session.exec(statement).all())


def read(session: Session, job_id: str, *, attempt: int, after: int = 0, limit: int = 500) -> list[StreamEvent]:
    """This attempt's events with seq > `after`, oldest first."""
    write_kept(session)
    statement = (
        select(StreamEvent)
        .where(StreamEvent.job_id == job_id, StreamEvent.attempt == attempt, col(StreamEvent.seq) > after)
        .order_by(col(StreamEvent.seq)).limit(limit)
    )
    return list(session.exec(statement).all())


def count(session: Session, job_id: str, *, attempt: int, kind: str, upto: int) -> int:
    """How many events of `kind` this attempt has with seq <= `upto`."""
    write_kept(session)
    return int(session.exec(select(func.count()).select_from(StreamEvent).where(
        StreamEvent.job_id == job_id, StreamEvent.attempt == attempt, StreamEvent.kind == kind,
        col(StreamEvent.seq) <= upto)).one())
