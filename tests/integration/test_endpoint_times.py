"""Learning from an endpoint's recent jobs: what is read from the table, how long it is kept, and where the
lifecycle then places a job's polls. On SQLite and PostgreSQL, against the simulator."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

import jobs
from jobs.flow.endpoint_times import EndpointTimesCache, load
from jobs.flow.lifecycle import poll_job, submit_job
from jobs.flow.poller import poll_due
from jobs.flow.pollplan import NO_HISTORY, EndpointTimes
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.storage.db import make_engine, session_scope
from jobs.storage.models import JobRow, utcnow
from jobs.storage.store import get_row
from tests.conftest import ENDPOINT_ID, SimulatorProcess, wait_until
from tests.integration.test_dispatch_and_poller import make_due as make_due_now

pytestmark = pytest.mark.integration


def finished(url: str, endpoint_id: str, *jobs_done: tuple[JobStatus, int | None, int | None, float]) -> None:
    """Rows of finished jobs: (status, execution_time_ms, delay_time_ms, finished how many seconds ago)."""
    engine = make_engine(url)
    now = utcnow()
    try:
        with session_scope(engine) as session:
            session.add_all(
                JobRow(id=str(uuid.uuid4()), endpoint_name="tts", endpoint_id=endpoint_id, status=status,
                       input={}, execution_time_ms=ran, delay_time_ms=queued,
                       finished_at=now - timedelta(seconds=ago))
                for status, ran, queued, ago in jobs_done
            )
    finally:
        engine.dispose()


def test_an_endpoints_newest_completed_jobs_are_read_and_nothing_else(migrated_db: str) -> None:
    finished(migrated_db, "ep-ours",
             (JobStatus.COMPLETED, 1_000, 10, 50),  # the oldest: past the limit
             (JobStatus.COMPLETED, 2_000, 20, 40),
             (JobStatus.COMPLETED, 3_000, None, 30),
             (JobStatus.COMPLETED, None, 30, 25),  # RunPod gave no executionTime
             (JobStatus.FAILED, 9_000, 40, 20),
             (JobStatus.CANCELLED, 9_000, 40, 15),
             (JobStatus.COMPLETED, 4_000, 50, 10))
    finished(migrated_db, "ep-other", (JobStatus.COMPLETED, 7_000, 70, 5))
    engine = make_engine(migrated_db)

    try:
        times = load(engine, "ep-ours", limit=3)
    finally:
        engine.dispose()

    assert times.execution == (2.0, 3.0, 4.0)
    assert times.delay == (0.02, 0.05)
    assert times.total == (2.02, 4.05)


def test_an_endpoint_with_no_finished_jobs_has_no_history(migrated_db: str) -> None:
    engine = make_engine(migrated_db)
    try:
        assert load(engine, "ep-new") == NO_HISTORY
    finally:
        engine.dispose()


def test_what_was_read_is_kept_for_the_ttl_and_read_again_after_it(migrated_db: str) -> None:
    finished(migrated_db, "ep-ours", *((JobStatus.COMPLETED, 1_000, 10, i) for i in range(20)))
    engine = make_engine(migrated_db)
    clock = [1000.0]
    cache = EndpointTimesCache(ttl=30.0, clock=lambda: clock[0])
    try:
        first = cache.get(engine, "ep-ours")
        finished(migrated_db, "ep-ours", (JobStatus.COMPLETED, 2_000, 10, 100))
        clock[0] += 29.0
        kept = cache.get(engine, "ep-ours")
        clock[0] += 2.0
        fresh = cache.get(engine, "ep-ours")
    finally:
        engine.dispose()

    assert first.samples == kept.samples == 20
    assert fresh.samples == 21 and fresh.execution[-1] == 2.0


def test_a_history_too_short_to_plan_from_is_read_again_sooner(migrated_db: str) -> None:
    finished(migrated_db, "ep-ours", (JobStatus.COMPLETED, 1_000, 10, 5))
    engine = make_engine(migrated_db)
    clock = [1000.0]
    cache = EndpointTimesCache(ttl=30.0, learning_ttl=5.0, clock=lambda: clock[0])
    try:
        first = cache.get(engine, "ep-ours")
        finished(migrated_db, "ep-ours", (JobStatus.COMPLETED, 2_000, 10, 1))
        clock[0] += 4.0
        kept = cache.get(engine, "ep-ours")
        clock[0] += 2.0
        fresh = cache.get(engine, "ep-ours")
    finally:
        engine.dispose()

    assert first.execution == kept.execution == (1.0,)
    assert fresh.execution == (1.0, 2.0)


def test_a_database_that_cannot_answer_means_the_doubling_schedule_not_a_failed_poll(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")  # no jobs table: every read fails
    calls = {"n": 0}

    def counting(engine_: Engine, endpoint_id: str) -> EndpointTimes:
        calls["n"] += 1
        return load(engine_, endpoint_id)

    cache = EndpointTimesCache(loader=counting)
    try:
        assert cache.get(engine, "ep-ours") == NO_HISTORY
        assert cache.get(engine, "ep-ours") == NO_HISTORY
    finally:
        engine.dispose()
    assert calls["n"] == 2  # a failure is not kept: the next poll asks again


# -- the lifecycle ---------------------------------------------------------------------------------------


def minute_long_history(url: str) -> None:
    """30 recent jobs on the configured endpoint that each ran about a minute, after 50 ms queued."""
    finished(url, ENDPOINT_ID, *((JobStatus.COMPLETED, 60_000 + 20 * i, 50, 100 + i) for i in range(30)))


def test_a_job_is_looked_at_once_started_then_polled_just_before_its_endpoints_jobs_usually_end(
    runtime: Runtime, simulator: SimulatorProcess, migrated_db: str
) -> None:
    minute_long_history(migrated_db)
    job = jobs.submit("tts", {"sleep": 90, "output": 1}, runtime=runtime)

    first = submit_job(runtime, job.id)
    wait_until(lambda: [j["status"] for j in simulator.jobs()] == ["IN_PROGRESS"], timeout=10,
               what="the job to start at RunPod")
    seen_running = poll_job(runtime, job.id)

    with session_scope(runtime.engine, read_only=True) as session:
        stored = get_row(session, job.id)
    assert first.poll_in == runtime.schedule.base / 2  # the endpoint's jobs start at once: look as soon as allowed
    assert stored is not None and stored.status is JobStatus.IN_PROGRESS and stored.poll_count == 1
    assert stored.delay_time_ms is not None  # RunPod's delayTime pins when it started
    assert seen_running.poll_in is not None and runtime.schedule.cap < seen_running.poll_in < 60
    assert stored.submitted_at is not None and stored.next_poll_at is not None
    assert 55 < (stored.next_poll_at - stored.submitted_at).total_seconds() < 60.5


def test_a_due_poll_the_plan_would_no_longer_make_is_put_off_without_a_call(
    runtime: Runtime, simulator: SimulatorProcess, migrated_db: str
) -> None:
    minute_long_history(migrated_db)
    job = jobs.submit("tts", {"sleep": 90, "output": 1}, runtime=runtime)
    submit_job(runtime, job.id)
    wait_until(lambda: [j["status"] for j in simulator.jobs()] == ["IN_PROGRESS"], timeout=10,
               what="the job to start at RunPod")
    poll_job(runtime, job.id)
    # As if its next poll had been placed before the endpoint had a history: due now, a minute early.
    make_due_now(runtime, job.id)
    [before] = simulator.jobs()

    outcome = poll_due(runtime, ENDPOINT_ID)

    [after] = simulator.jobs()
    with session_scope(runtime.engine, read_only=True) as session:
        stored = get_row(session, job.id)
    assert (outcome.polled, outcome.put_off) == (0, 1)
    assert after["status_calls"] == before["status_calls"]  # no /status call spent on it
    assert stored is not None and stored.poll_count == 1 and stored.next_poll_at is not None
    assert stored.submitted_at is not None
    assert 50 < (stored.next_poll_at - stored.submitted_at).total_seconds() < 60.5  # just before its likely end


def test_a_job_a_webhook_will_wake_keeps_the_safety_net_schedule_whatever_its_endpoint_learned(
    webhook_runtime: Runtime, migrated_db: str
) -> None:
    minute_long_history(migrated_db)
    job = jobs.submit("tts", {"sleep": 90, "output": 1}, runtime=webhook_runtime)

    step = submit_job(webhook_runtime, job.id)

    assert step.poll_in == webhook_runtime.webhook_schedule.first


def test_a_streaming_job_keeps_the_doubling_schedule_so_its_chunks_flow_as_they_come(
    runtime: Runtime, migrated_db: str
) -> None:
    minute_long_history(migrated_db)
    job = jobs.submit("tts", {"sleep": 90, "stream": ["a"]}, stream=True, runtime=runtime)

    step = submit_job(runtime, job.id)

    assert step.poll_in == runtime.schedule.first


def test_a_job_that_shows_progress_keeps_the_doubling_schedule_so_its_progress_is_seen_as_it_comes(
    runtime: Runtime, simulator: SimulatorProcess, migrated_db: str
) -> None:
    minute_long_history(migrated_db)
    job = jobs.submit("tts", {"sleep": 9, "progress": ["33%", "67%"], "output": 1}, runtime=runtime)
    submit_job(runtime, job.id)
    runpod_job_id = jobs.get(job.id, runtime=runtime).runpod_job_id
    assert runpod_job_id is not None
    wait_until(lambda: runtime.runpod.status(ENDPOINT_ID, runpod_job_id).output is not None, timeout=10,
               what="the job to report progress")

    step = poll_job(runtime, job.id)

    assert jobs.get(job.id, runtime=runtime).progress is not None
    assert step.poll_in is not None and step.poll_in <= 1.0  # the status just changed: doubling starts at 0.5-1 s
