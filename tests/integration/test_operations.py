"""Operations on SQLite and PostgreSQL: health rows, the reconciler's lock, retention, warm-up, metrics."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from sqlmodel import func, select

import jobs
from jobs import ops
from jobs.flow.lifecycle import submit_job
from jobs.flow.reconcile import reconcile, reconcile_on_schedule
from jobs.observability.metrics import RpqCollector
from jobs.observability.metrics_recorder import RedisRecorder
from jobs.runpod import health
from jobs.runtime import DISPATCH_TASK, QUEUES, Runtime
from jobs.states import JobStatus
from jobs.storage import retention
from jobs.storage.db import session_scope
from jobs.storage.models import EndpointHealthRow, JobEvent, JobRow, utcnow
from jobs.storage.store import update_fields
from tests.conftest import ENDPOINT_ID, Published, SimulatorProcess, wait_until
from tests.integration.test_lifecycle import poll_until_final

pytestmark = pytest.mark.integration


def count(rt: Runtime, model: type[JobRow] | type[JobEvent] | type[EndpointHealthRow]) -> int:
    with session_scope(rt.engine) as session:
        return int(session.exec(select(func.count()).select_from(model)).one())


# -- health -------------------------------------------------------------------------------------------------


def test_a_health_round_stores_every_counter(runtime: Runtime, simulator: SimulatorProcess) -> None:
    simulator.configure_endpoint(ENDPOINT_ID, workers_max=1)
    job = jobs.submit("tts", {"sleep": 30}, runtime=runtime)
    submit_job(runtime, job.id)
    jobs.submit("tts", {"sleep": 1}, runtime=runtime)
    wait_until(lambda: runtime.runpod.health(ENDPOINT_ID).workers.running == 1, timeout=10, what="a worker")

    [row] = health.collect(runtime)

    assert row.ok and row.error is None
    assert (row.workers_running, row.jobs_in_progress) == (1, 1)
    assert row.workers_idle == 0 and row.workers_unhealthy == 0 and row.jobs_completed == 0


def test_a_failed_health_call_is_stored_as_a_failure_not_as_zeros(runtime: Runtime,
                                                                    simulator: SimulatorProcess) -> None:
    simulator.set_faults({"op": "health", "kind": "5xx", "status": 503})

    [row] = health.collect(runtime)

    assert not row.ok and "503" in (row.error or "")
    assert row.workers_idle is None and row.jobs_in_queue is None
    with session_scope(runtime.engine) as session:
        stored = health.latest(session, "tts")
    assert stored is not None and not stored.ok


def test_two_health_rounds_in_one_interval_store_one_observation(runtime: Runtime) -> None:
    first = health.collect_on_schedule(runtime)
    second = health.collect_on_schedule(runtime)

    assert first is not None and second is None
    assert count(runtime, EndpointHealthRow) == 1


# -- the reconciler's lock ------------------------------------------------------------------------------------


def test_two_reconcilers_at_once_act_once(runtime: Runtime) -> None:
    for n in range(5):
        jobs.submit("tts", {"n": n}, runtime=runtime)
    published = runtime.publish
    assert isinstance(published, Published)
    published.messages.clear()
    start = threading.Barrier(2)
    reports = []

    def run() -> None:
        start.wait()
        reports.append(reconcile(runtime, now=utcnow() + timedelta(hours=1)))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(r.skipped for r in reports) == [False, True]
    assert published.of(DISPATCH_TASK) == [ENDPOINT_ID]  # woken once, by one of them


def test_the_reconciler_runs_again_once_the_last_run_is_over(runtime: Runtime) -> None:
    assert not reconcile(runtime).skipped
    assert not reconcile(runtime).skipped


def test_beats_reconciler_rounds_act_once_per_interval_however_many_beats_send_them(runtime: Runtime) -> None:
    from sqlalchemy import update

    from jobs.flow.reconcile import LOCK
    from jobs.storage.models import Lock

    # Two beats each send a round every interval: the second one's round of this interval finds the lease kept.
    assert not reconcile_on_schedule(runtime).skipped
    assert reconcile_on_schedule(runtime).skipped

    with session_scope(runtime.engine) as session:  # the next interval
        session.execute(update(Lock).where(Lock.name == LOCK).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert not reconcile_on_schedule(runtime).skipped


def test_beats_retention_runs_act_once_per_interval_however_many_beats_send_them(runtime: Runtime) -> None:
    hour = timedelta(seconds=0.8 * retention.INTERVAL_SECONDS)
    assert not retention.purge(runtime, keep_for=hour).skipped
    assert retention.purge(runtime, keep_for=hour).skipped


def test_a_reconciler_killed_holding_its_lease_holds_up_the_next_run_only_briefly(runtime: Runtime) -> None:
    from sqlalchemy import update

    from jobs.flow.reconcile import LOCK, lease_for
    from jobs.storage.locks import try_acquire
    from jobs.storage.models import Lock

    # A worker took the lease for a run and was killed with SIGKILL before it could release it.
    try_acquire(runtime.engine, LOCK, owner="worker-killed-mid-run", lease=lease_for(runtime))
    assert reconcile(runtime).skipped

    assert lease_for(runtime) == timedelta(seconds=2 * runtime.settings.reconcile_interval_seconds)  # not minutes
    with session_scope(runtime.engine) as session:  # ... and that much time has passed
        session.execute(update(Lock).where(Lock.name == LOCK).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert not reconcile(runtime).skipped


# -- retention --------------------------------------------------------------------------------------------


def test_retention_deletes_old_finished_jobs_and_health_rows_in_batches(runtime: Runtime) -> None:
    old = utcnow() - timedelta(days=91)
    stale = [jobs.submit("tts", {"n": n}, runtime=runtime).id for n in range(5)]
    for job_id in stale:
        jobs.cancel(job_id, runtime=runtime)
    recent = jobs.submit("tts", {"n": "recent"}, runtime=runtime)
    jobs.cancel(recent.id, runtime=runtime)
    running_long = jobs.submit("tts", {"n": "old but unfinished"}, runtime=runtime)
    with session_scope(runtime.engine) as session:
        for job_id in stale:
            update_fields(session, job_id, while_status={JobStatus.CANCELLED}, values={"finished_at": old})
        update_fields(session, running_long.id, while_status={JobStatus.PENDING}, values={"created_at": old})
        session.add(EndpointHealthRow(endpoint_name="tts", endpoint_id=ENDPOINT_ID, ok=True, observed_at=old))
        session.add(EndpointHealthRow(endpoint_name="tts", endpoint_id=ENDPOINT_ID, ok=True))

    purged = retention.purge(runtime, batch=2)

    assert (purged.jobs, purged.health_rows) == (5, 1)
    left = {job.id for job in jobs.list_jobs(runtime=runtime)}
    assert left == {recent.id, running_long.id}
    with session_scope(runtime.engine) as session:
        assert not session.exec(select(JobEvent).where(JobEvent.job_id.in_(stale))).all()  # type: ignore[attr-defined]
    assert count(runtime, EndpointHealthRow) == 1


# -- warm-up ----------------------------------------------------------------------------------------------


def test_warmup_of_a_cold_endpoint_sends_one_job_however_often_it_is_asked(runtime: Runtime) -> None:
    first = ops.warmup(runtime, "tts")
    again = ops.warmup(runtime, "tts")

    assert first.action == "submitted" and first.job_id
    assert again.action == "none" and again.job_id == first.job_id
    assert [j.id for j in jobs.list_jobs(runtime=runtime)] == [first.job_id]


def test_warmup_of_a_warm_endpoint_does_nothing(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=runtime)
    submit_job(runtime, job.id)
    wait_until(lambda: runtime.runpod.health(ENDPOINT_ID).workers.running == 1, timeout=10, what="a worker")

    result = ops.warmup(runtime, "tts")

    assert result.action == "none" and "warm" in result.reason
    assert len(jobs.list_jobs(runtime=runtime)) == 1


def test_warmup_of_an_endpoint_whose_workers_scaled_down_to_idle_sends_a_job(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    done = jobs.submit("tts", {"output": 1}, runtime=runtime)
    submit_job(runtime, done.id)
    poll_until_final(runtime, done.id)
    assert ops.warmup(runtime, "tts").reason == "1 worker(s) already warm"  # ready for its idle timeout

    simulator.advance(6)  # past RunPod's 5 s idle timeout: the worker is scaled down
    workers = runtime.runpod.health(ENDPOINT_ID).workers
    result = ops.warmup(runtime, "tts")

    assert (workers.idle, workers.ready, workers.running) == (3, 0, 0)  # RunPod's idle: scaled down, not warm
    assert result.action == "submitted" and result.job_id


def test_purge_queue_removes_runpods_queued_jobs(runtime: Runtime, simulator: SimulatorProcess) -> None:
    simulator.configure_endpoint(ENDPOINT_ID, workers_max=0)
    for n in range(3):
        submit_job(runtime, jobs.submit("tts", {"n": n}, runtime=runtime).id)

    assert ops.purge_queue(runtime, "tts") == 3
    assert {j["status"] for j in simulator.jobs(ENDPOINT_ID)} == {"CANCELLED"}


# -- metrics ----------------------------------------------------------------------------------------------


def test_the_metrics_scrape_has_every_series_with_plausible_values(runtime: Runtime, redis_url: str) -> None:
    broker = redis.Redis.from_url(redis_url)
    broker.delete("rpq:metrics")
    runtime.metrics = RedisRecorder(redis_url)
    runtime.settings = runtime.settings.__class__(**{**runtime.settings.__dict__, "celery_broker_url": redis_url})
    done = jobs.submit("tts", {"output": 1}, runtime=runtime)
    submit_job(runtime, done.id)
    poll_until_final(runtime, done.id)
    jobs.submit("tts", {"n": 2}, runtime=runtime)  # stays PENDING
    health.collect(runtime)
    broker.lpush("rpq.submit", b"{}")  # one ready message
    registry = CollectorRegistry()
    registry.register(RpqCollector(runtime, broker, QUEUES))

    text = generate_latest(registry).decode()
    broker.delete("rpq.submit", "rpq:metrics")

    expected = [
        'rpq_jobs{endpoint="tts",status="COMPLETED"} 1.0',
        'rpq_jobs{endpoint="tts",status="PENDING"} 1.0',
        'rpq_queue_messages{queue="rpq.submit",state="ready"} 1.0',
        'rpq_queue_messages{queue="rpq.poll",state="held"} 0.0',
        'rpq_endpoint_health_ok{endpoint="tts"} 1.0',
        'rpq_endpoint_jobs{endpoint="tts",state="completed"} 1.0',
        'rpq_endpoint_workers{endpoint="tts",state="unhealthy"} 0.0',
        'rpq_submits_total{endpoint="tts",outcome="accepted"} 1.0',
        'rpq_job_latency_seconds_count{endpoint="tts",status="COMPLETED"} 1.0',
        'rpq_job_latency_seconds_bucket{endpoint="tts",le="+Inf",status="COMPLETED"} 1.0',
        "rpq_poll_lag_seconds 0.0",
    ]
    for line in expected:
        assert line in text, line
    assert 'rpq_polls_total{endpoint="tts"}' in text
    assert "rpq_endpoint_health_age_seconds" in text and "rpq_runpod_errors_total" not in text.split("# TYPE")[0]
