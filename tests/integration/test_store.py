"""The job table on SQLite and PostgreSQL: migrations, compare-and-set, racing writers."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from jobs.states import JobStatus
from jobs.storage.db import make_engine, session_scope
from jobs.storage.models import JobRow
from jobs.storage.store import Fence, Source, claim_poll, events_of, get_row, transition

pytestmark = pytest.mark.integration


def add_job(url: str, status: JobStatus = JobStatus.PENDING, **fields: object) -> str:
    engine = make_engine(url)
    row = JobRow(id=str(uuid.uuid4()), endpoint_name="tts",
                 endpoint_id="abc123", status=status, input={"text": "hi"}, **fields)
    try:
        with session_scope(engine) as session:
            session.add(row)
    finally:
        engine.dispose()
    return row.id


def test_the_migrations_build_exactly_the_models_schema(migrated_db: str) -> None:
    engine = make_engine(migrated_db)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    engine.dispose()

    assert differences == []


def test_a_transition_moves_the_job_and_records_who_and_why(migrated_db: str) -> None:
    job_id = add_job(migrated_db)
    engine = make_engine(migrated_db)

    with session_scope(engine) as session:
        left = transition(session, job_id, to=JobStatus.SUBMITTING, source=Source.SUBMIT, detail="claimed")

    with session_scope(engine) as session:
        row = get_row(session, job_id)
        history = events_of(session, job_id)
    assert left is JobStatus.PENDING
    assert row is not None and row.status == JobStatus.SUBMITTING and row.previous_status == JobStatus.PENDING
    assert [(e.from_status, e.to_status, e.source, e.detail) for e in history] == [
        (JobStatus.PENDING, JobStatus.SUBMITTING, "submit", "claimed")
    ]
    engine.dispose()


def test_a_duplicate_transition_is_a_no_op_that_writes_no_event(migrated_db: str) -> None:
    job_id = add_job(migrated_db)
    engine = make_engine(migrated_db)
    with session_scope(engine) as session:
        transition(session, job_id, to=JobStatus.SUBMITTING, source=Source.SUBMIT)

    with session_scope(engine) as session:
        again = transition(session, job_id, to=JobStatus.SUBMITTING, source=Source.SUBMIT)

    with session_scope(engine) as session:
        assert again is None
        assert len(events_of(session, job_id)) == 1
    engine.dispose()


def test_a_late_message_cannot_move_a_finished_job(migrated_db: str) -> None:
    job_id = add_job(migrated_db, JobStatus.COMPLETED, output={"ok": 1})
    engine = make_engine(migrated_db)

    with session_scope(engine) as session:
        moved = transition(session, job_id, to=JobStatus.IN_PROGRESS, source=Source.POLL)
        row = get_row(session, job_id)

    assert moved is None
    assert row is not None and row.status == JobStatus.COMPLETED and row.output == {"ok": 1}
    engine.dispose()


def test_of_many_racing_writers_exactly_one_wins(migrated_db: str) -> None:
    job_id = add_job(migrated_db)
    engine = make_engine(migrated_db)
    start = threading.Barrier(8)
    results: list[JobStatus | None] = []

    def writer() -> None:
        start.wait()
        with session_scope(engine) as session:
            results.append(transition(session, job_id, to=JobStatus.SUBMITTING, source=Source.SUBMIT))

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    with session_scope(engine) as session:
        history = events_of(session, job_id)
    assert results.count(JobStatus.PENDING) == 1
    assert results.count(None) == 7
    assert len(history) == 1
    engine.dispose()


def test_of_two_racing_polls_exactly_one_claims_the_job(migrated_db: str) -> None:
    due = datetime.now(UTC) - timedelta(seconds=1)
    job_id = add_job(migrated_db, JobStatus.IN_PROGRESS, runpod_job_id="rp-1", next_poll_at=due)
    engine = make_engine(migrated_db)
    start = threading.Barrier(4)
    wins: list[bool] = []

    def poller() -> None:
        start.wait()
        with session_scope(engine) as session:
            wins.append(claim_poll(session, job_id, seen=due, lease_until=due + timedelta(minutes=3),
                                   fence=Fence(attempt=1, runpod_job_id="rp-1")))

    threads = [threading.Thread(target=poller) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(wins) == [False, False, False, True]
    engine.dispose()


def test_times_come_back_as_aware_utc(migrated_db: str) -> None:
    moment = datetime(2026, 11, 23, 15, 0, 0, 123456, tzinfo=UTC)
    job_id = add_job(migrated_db, JobStatus.IN_QUEUE, next_poll_at=moment.astimezone(ZoneInfo("Asia/Tokyo")))
    engine = make_engine(migrated_db)

    with session_scope(engine) as session:
        row = get_row(session, job_id)

    assert row is not None and row.next_poll_at == moment and row.next_poll_at.tzinfo is UTC
    assert row.created_at.tzinfo is UTC
    engine.dispose()


def test_a_naive_time_is_refused_rather_than_guessed(migrated_db: str) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        add_job(migrated_db, JobStatus.IN_QUEUE, next_poll_at=datetime(2026, 1, 1))


def test_a_read_does_not_wait_for_a_writer_holding_the_lock(migrated_db: str) -> None:
    job_id = add_job(migrated_db)
    engine = make_engine(migrated_db)
    writing, done = threading.Event(), threading.Event()

    def slow_writer() -> None:
        with session_scope(engine) as session:
            transition(session, job_id, to=JobStatus.SUBMITTING, source=Source.SUBMIT)
            writing.set()
            done.wait(10)  # holds its transaction (and on SQLite the write lock) open

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert writing.wait(10)
    try:
        with session_scope(engine, read_only=True) as session:
            row = get_row(session, job_id)
        assert row is not None and row.status == JobStatus.PENDING  # the writer has not committed
    finally:
        done.set()
        writer.join(10)
        engine.dispose()
