"""The job lifecycle step by step, in-process, on SQLite and PostgreSQL against the simulator.

These call the functions the Celery tasks call, so each step's effect on the table can be
asserted exactly; test_pipeline.py runs the same lifecycle through a real worker.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

import jobs
from jobs.flow.lifecycle import cancel_on_runpod, poll_job, submit_job
from jobs.flow.reconcile import reconcile
from jobs.runpod.client import RunPodClient
from jobs.runtime import CANCEL_TASK, DISPATCH_TASK, POLL_DUE_TASK, Runtime
from jobs.settings import Secret
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.models import utcnow
from jobs.storage.store import update_fields
from tests.conftest import ENDPOINT_ID, Published, SimulatorProcess, wait_until

pytestmark = pytest.mark.integration


def published(rt: Runtime) -> Published:
    assert isinstance(rt.publish, Published)
    return rt.publish


def poll_until_final(rt: Runtime, job_id: str, timeout: float = 20) -> jobs.Job:
    def step() -> jobs.Job | None:
        make_due(rt, job_id)
        poll_job(rt, job_id)
        job = jobs.get(job_id, runtime=rt)
        return job if job.is_terminal else None

    return wait_until(step, timeout=timeout, interval=0.1, what=f"job {job_id} to finish")  # type: ignore[return-value]


def make_due(rt: Runtime, job_id: str) -> None:
    """Pretend the countdown has passed, so the next poll_job is not treated as early."""
    with session_scope(rt.engine) as session:
        update_fields(session, job_id, while_status={JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS},
                      values={"next_poll_at": utcnow()})


def history(rt: Runtime, job_id: str) -> list[tuple[str | None, str, str]]:
    return [(e.from_status, e.to_status, e.source) for e in jobs.events(job_id, runtime=rt)]


# -- submit --------------------------------------------------------------------------------------------


def test_submit_writes_a_pending_row_and_publishes_without_calling_runpod(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"text": "hello"}, correlation_id="req-1", metadata={"user": 7}, runtime=runtime)

    stored = jobs.get(job.id, runtime=runtime)
    assert (stored.status, stored.endpoint, stored.endpoint_id) == (JobStatus.PENDING, "tts", ENDPOINT_ID)
    assert (stored.input, stored.correlation_id, stored.metadata) == ({"text": "hello"}, "req-1", {"user": 7})
    assert published(runtime).of(DISPATCH_TASK) == [ENDPOINT_ID]  # its endpoint's dispatcher is woken
    assert history(runtime, job.id) == [(None, "PENDING", "api")]
    assert simulator.jobs() == []


def test_a_submitted_job_reaches_runpod_once_even_when_its_message_arrives_twice(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"output": 1}, runtime=runtime)

    first = submit_job(runtime, job.id)
    second = submit_job(runtime, job.id)

    stored = jobs.get(job.id, runtime=runtime)
    assert stored.status is JobStatus.IN_QUEUE and stored.runpod_job_id
    assert first.poll_in == runtime.schedule.first and second.poll_in is None
    assert [j["id"] for j in simulator.jobs()] == [stored.runpod_job_id]


def test_a_job_completes_with_its_output_timings_and_history(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 0.3, "output": {"wav": "s3://b/k.wav"}}, runtime=runtime)
    submit_job(runtime, job.id)

    done = poll_until_final(runtime, job.id)

    assert done.status is JobStatus.COMPLETED
    assert done.output == {"wav": "s3://b/k.wav"}
    assert done.execution_time_ms is not None and done.execution_time_ms >= 250
    assert done.delay_time_ms is not None and done.worker_id and done.finished_at and done.poll_count >= 1
    steps = [(frm, to) for frm, to, _ in history(runtime, job.id)]
    assert steps[:3] == [(None, "PENDING"), ("PENDING", "SUBMITTING"), ("SUBMITTING", "IN_QUEUE")]
    assert steps[-1][1] == "COMPLETED"


def test_a_failed_job_keeps_runpods_error(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"fail": "CUDA out of memory"}, runtime=runtime)
    submit_job(runtime, job.id)

    done = poll_until_final(runtime, job.id)

    assert done.status is JobStatus.FAILED
    assert done.error is not None and "CUDA out of memory" in done.error


def test_progress_is_stored_while_the_job_runs(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 3, "progress": ["10%", "60%"], "output": "ok"}, runtime=runtime)
    submit_job(runtime, job.id)

    def progressed() -> bool:
        make_due(runtime, job.id)
        poll_job(runtime, job.id)
        return jobs.get(job.id, runtime=runtime).progress is not None

    wait_until(progressed, timeout=10, interval=0.2, what="a progress update")
    assert jobs.get(job.id, runtime=runtime).progress in ("10%", "60%")


def test_a_job_runpod_no_longer_knows_is_expired_not_failed(runtime: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"output": "gone soon"}, runtime=runtime)
    submit_job(runtime, job.id)
    wait_until(lambda: simulator.jobs()[0]["status"] == "COMPLETED", timeout=10, what="RunPod to finish")
    simulator.advance(31 * 60)  # past RunPod's 30-minute retention, before we looked

    make_due(runtime, job.id)
    poll_job(runtime, job.id)

    stored = jobs.get(job.id, runtime=runtime)
    assert stored.status is JobStatus.EXPIRED and stored.output is None
    assert "404" in (jobs.events(job.id, runtime=runtime)[-1].detail or "")


def test_a_job_killed_by_its_ttl_is_expired(runtime: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"sleep": 600}, policy={"ttl": 10_000}, runtime=runtime)
    submit_job(runtime, job.id)
    simulator.advance(11)

    assert poll_until_final(runtime, job.id).status is JobStatus.EXPIRED


def test_a_run_that_times_out_is_marked_unknown_and_never_resubmitted(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    simulator.set_faults({"op": "run", "kind": "slow", "delay": 5, "count": 1, "when": "after"})
    job = jobs.submit("tts", {"output": 1}, runtime=runtime)

    step = submit_job(runtime, job.id)
    submit_job(runtime, job.id)  # a duplicate message
    report = reconcile(runtime, now=utcnow() + timedelta(hours=1))

    stored = jobs.get(job.id, runtime=runtime)
    assert stored.status is JobStatus.SUBMIT_UNKNOWN and step.poll_in is None
    assert report.woke_dispatch == []  # nothing PENDING: nothing to send again
    assert len(simulator.jobs()) == 1  # it did reach RunPod, once; an operator decides what next
    assert "else an operator decides" in (jobs.events(job.id, runtime=runtime)[-1].detail or "")


def test_a_run_refused_for_now_goes_back_to_pending_and_is_sent_later(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    simulator.set_faults({"op": "run", "kind": "429", "count": 5, "retry_after": 0, "when": "before"})
    job = jobs.submit("tts", {"output": 1}, runtime=runtime)

    later = submit_job(runtime, job.id)
    assert jobs.get(job.id, runtime=runtime).status is JobStatus.PENDING and later.again_in
    simulator.set_faults()
    submit_job(runtime, job.id)

    assert jobs.get(job.id, runtime=runtime).status is JobStatus.IN_QUEUE
    assert len(simulator.jobs()) == 1


def test_a_job_runpod_refuses_fails_with_the_reason(runtime: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"output": 1}, runtime=runtime)
    runtime.settings = runtime.settings.__class__(**{**runtime.settings.__dict__,
                                                     "runpod_api_key": Secret("wrong")})
    runtime.make_client = lambda: RunPodClient(
        api_key="wrong", base_url=simulator.base_url)

    submit_job(runtime, job.id)

    stored = jobs.get(job.id, runtime=runtime)
    assert stored.status is JobStatus.FAILED and "401" in (stored.error or "")
    assert simulator.jobs() == []


# -- cancel and retry -----------------------------------------------------------------------------------


def test_cancel_stops_the_job_here_at_once_and_at_runpod_through_a_task(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 60}, runtime=runtime)
    submit_job(runtime, job.id)

    cancelled = jobs.cancel(job.id, runtime=runtime)
    cancel_on_runpod(runtime, job.id)

    assert cancelled.status is JobStatus.CANCELLED
    assert published(runtime).of(CANCEL_TASK) == [job.id]
    assert simulator.jobs()[0]["status"] == "CANCELLED"
    assert poll_job(runtime, job.id).poll_in is None  # the poll chain ends


def test_a_job_cancelled_while_its_run_is_in_flight_is_cancelled_at_runpod_too(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    simulator.set_faults({"op": "run", "kind": "slow", "delay": 1.0, "count": 1, "when": "after"})
    job = jobs.submit("tts", {"sleep": 60}, runtime=runtime)
    submitter = threading.Thread(target=submit_job, args=(runtime, job.id))
    submitter.start()
    wait_until(lambda: jobs.get(job.id, runtime=runtime).status is JobStatus.SUBMITTING, timeout=5, what="submit")

    jobs.cancel(job.id, runtime=runtime)
    submitter.join(10)
    assert published(runtime).of(CANCEL_TASK) == [job.id]  # sent by the submit that found the row moved
    cancel_on_runpod(runtime, job.id)

    stored = jobs.get(job.id, runtime=runtime)
    assert stored.status is JobStatus.CANCELLED and stored.runpod_job_id
    assert simulator.jobs()[0]["status"] == "CANCELLED"


def test_cancelling_a_finished_job_changes_nothing(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"output": 1}, runtime=runtime)
    submit_job(runtime, job.id)
    poll_until_final(runtime, job.id)

    assert jobs.cancel(job.id, runtime=runtime).status is JobStatus.COMPLETED


def test_retry_of_a_failed_job_uses_runpods_retry_under_the_same_runpod_id(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"fail": "flaky"}, runtime=runtime)
    submit_job(runtime, job.id)
    first = poll_until_final(runtime, job.id)

    again = jobs.retry(job.id, runtime=runtime)
    submit_job(runtime, job.id)
    second = poll_until_final(runtime, job.id)

    assert (again.status, again.attempt, again.error) == (JobStatus.PENDING, 2, None)
    assert second.runpod_job_id == first.runpod_job_id and second.attempt == 2
    assert len(simulator.jobs()) == 1  # no new RunPod job
    statuses = [to for _, to, _ in history(runtime, job.id)]
    assert statuses.count("FAILED") == 2 and statuses.count("PENDING") == 2


def test_retry_of_a_cancelled_job_submits_it_afresh(runtime: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"output": "second time lucky"}, runtime=runtime)
    jobs.cancel(job.id, runtime=runtime)

    jobs.retry(job.id, runtime=runtime)
    submit_job(runtime, job.id)

    assert poll_until_final(runtime, job.id).output == "second time lucky"
    assert len(simulator.jobs()) == 1


def test_a_completed_job_cannot_be_retried(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"output": 1}, runtime=runtime)
    submit_job(runtime, job.id)
    poll_until_final(runtime, job.id)

    with pytest.raises(jobs.InvalidTransition, match="it is COMPLETED"):
        jobs.retry(job.id, runtime=runtime)


# -- polling ---------------------------------------------------------------------------------------------


def test_of_two_polls_due_at_once_only_one_asks_runpod(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=runtime)
    submit_job(runtime, job.id)
    make_due(runtime, job.id)
    start = threading.Barrier(2)

    def poll() -> None:
        start.wait()
        poll_job(runtime, job.id)

    threads = [threading.Thread(target=poll) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert jobs.get(job.id, runtime=runtime).poll_count == 1


def test_a_poll_hint_that_comes_early_is_dropped(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=runtime)
    submit_job(runtime, job.id)
    with session_scope(runtime.engine) as session:
        update_fields(session, job.id, while_status={JobStatus.IN_QUEUE},
                      values={"next_poll_at": utcnow() + timedelta(seconds=10)})

    step = poll_job(runtime, job.id)

    assert step.poll_in is None and jobs.get(job.id, runtime=runtime).poll_count == 0


def test_a_failed_poll_changes_nothing_but_the_schedule(runtime: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=runtime)
    submit_job(runtime, job.id)
    simulator.set_faults({"op": "status", "kind": "5xx", "status": 503})
    make_due(runtime, job.id)

    step = poll_job(runtime, job.id)

    stored = jobs.get(job.id, runtime=runtime)
    assert stored.status is JobStatus.IN_QUEUE and stored.poll_count == 1
    assert step.poll_in is not None and step.poll_in >= 1.0


# -- bad input changes nothing ------------------------------------------------------------------------


def test_bad_input_is_refused_with_every_problem_and_no_row(runtime: Runtime) -> None:
    with pytest.raises(jobs.InvalidJob) as caught:
        jobs.submit("no such endpoint!", {"when": object()}, policy={"ttl": 1}, webhook="nope",
                    idempotency_key="", metadata={"x": float("nan")}, runtime=runtime)

    assert len(caught.value.problems) == 6
    assert jobs.list_jobs(runtime=runtime) == []
    assert published(runtime).messages == []


def test_an_oversized_input_is_refused_with_no_row(runtime: Runtime) -> None:
    with pytest.raises(jobs.InvalidJob, match="too large"):
        jobs.submit("tts", {"audio": "x" * 10_000_001}, runtime=runtime)

    assert jobs.list_jobs(runtime=runtime) == []


def test_the_same_idempotency_key_returns_the_first_job(runtime: Runtime) -> None:
    first = jobs.submit("tts", {"text": "a"}, idempotency_key="order-42", runtime=runtime)
    again = jobs.submit("tts", {"text": "b"}, idempotency_key="order-42", runtime=runtime)
    other = jobs.submit(ENDPOINT_ID + "-2", {"text": "c"}, idempotency_key="order-42", runtime=runtime)

    assert again.id == first.id and again.input == {"text": "a"}
    assert other.id != first.id  # keys are per endpoint
    assert published(runtime).of(DISPATCH_TASK) == [ENDPOINT_ID, ENDPOINT_ID + "-2"]  # not for the repeat


def test_submit_returns_the_job_exactly_as_it_is_stored(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"text": "hi", "n": [1, 2.5, None]}, policy={"ttl": 60000.0, "lowPriority": True},
                      webhook="https://example.com/hook", idempotency_key="order-7", correlation_id="req-7",
                      metadata={"user": 7}, stream=True, runtime=runtime)

    assert jobs.get(job.id, runtime=runtime) == job
    assert job.policy == {"ttl": 60000, "lowPriority": True}
    assert [(e.from_status, e.to_status, e.source, e.detail, e.at) for e in jobs.events(job.id, runtime=runtime)] == [
        (None, JobStatus.PENDING, "api", "submitted to tts", job.created_at)]


def test_racing_submits_with_one_idempotency_key_make_one_job_one_event_and_one_publish(runtime: Runtime) -> None:
    barrier = threading.Barrier(8)
    returned: list[jobs.Job] = []

    def submit(n: int) -> None:
        barrier.wait()
        returned.append(jobs.submit("tts", {"n": n}, idempotency_key="race-1", runtime=runtime))

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    stored = jobs.list_jobs(runtime=runtime)
    assert len(stored) == 1 and len(returned) == 8
    assert {job.id for job in returned} == {stored[0].id}
    assert {repr(job.input) for job in returned} == {repr(stored[0].input)}
    assert history(runtime, stored[0].id) == [(None, "PENDING", "api")]
    assert published(runtime).of(DISPATCH_TASK) == [ENDPOINT_ID]  # one wake-up, by the one that inserted


def test_list_jobs_filters_by_status_endpoint_and_age(runtime: Runtime) -> None:
    a = jobs.submit("tts", {"n": 1}, runtime=runtime)
    b = jobs.submit(ENDPOINT_ID + "-2", {"n": 2}, runtime=runtime)
    jobs.cancel(b.id, runtime=runtime)

    assert [j.id for j in jobs.list_jobs(status="PENDING", runtime=runtime)] == [a.id]
    assert [j.id for j in jobs.list_jobs(endpoint="tts", runtime=runtime)] == [a.id]
    assert {j.id for j in jobs.list_jobs(since=timedelta(minutes=5), runtime=runtime)} == {a.id, b.id}
    assert jobs.list_jobs(since=utcnow() + timedelta(minutes=1), runtime=runtime) == []
    assert len(jobs.list_jobs(limit=1, offset=1, runtime=runtime)) == 1
    with pytest.raises(jobs.InvalidJob, match="unknown status"):
        jobs.list_jobs(status="DONE", runtime=runtime)


# -- the reconciler ----------------------------------------------------------------------------------------


def test_the_reconciler_rebuilds_lost_wakeups_from_the_table_alone(runtime: Runtime) -> None:
    never_sent = jobs.submit("tts", {"n": 1}, runtime=runtime)
    polling = jobs.submit("tts", {"sleep": 30}, runtime=runtime)
    submit_job(runtime, polling.id)
    stuck = jobs.submit("tts", {"n": 3}, runtime=runtime)
    with session_scope(runtime.engine) as session:
        update_fields(session, stuck.id, while_status={JobStatus.PENDING},
                      values={"status": JobStatus.SUBMITTING})
    published(runtime).messages.clear()

    report = reconcile(runtime, now=utcnow() + timedelta(hours=1))
    again = reconcile(runtime, now=utcnow() + timedelta(hours=1, seconds=1))

    assert report.woke_dispatch == [ENDPOINT_ID] and report.woke_poller == [ENDPOINT_ID]
    assert report.marked_unknown == [stuck.id] and again.marked_unknown == []
    assert jobs.get(stuck.id, runtime=runtime).status is JobStatus.SUBMIT_UNKNOWN
    assert jobs.get(never_sent.id, runtime=runtime).status is JobStatus.PENDING
    assert published(runtime).of(DISPATCH_TASK)[0] == ENDPOINT_ID
    assert published(runtime).of(POLL_DUE_TASK)[0] == ENDPOINT_ID
