"""Races between attempts, driven deterministically: RunPod's answer is held at the chosen moment.

Each test runs the real lifecycle against the simulator over HTTP, on SQLite and PostgreSQL. The
client is the real one; `Interposed` (tests/integration/conftest.py) only runs a hook after RunPod
has answered and before the caller sees the answer, which is exactly where a slow answer lets the
world move on.
"""

from __future__ import annotations

import pytest
from sqlmodel import col, select

import jobs
from jobs.flow.lifecycle import cancel_on_runpod, poll_job, submit_job
from jobs.runpod.client import JobState
from jobs.runtime import CANCEL_TASK, Runtime
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.models import RunPodCancel
from tests.conftest import ENDPOINT_ID, SimulatorProcess, wait_until
from tests.integration.conftest import Interposed
from tests.integration.test_lifecycle import make_due, poll_until_final, published

pytestmark = pytest.mark.integration

def runpod_status(simulator: SimulatorProcess, runpod_job_id: str | None) -> str:
    [job] = [j for j in simulator.jobs(ENDPOINT_ID) if j["id"] == runpod_job_id]
    return str(job["status"])


def finished_at_runpod(rt: Runtime, simulator: SimulatorProcess, job_input: dict[str, object],
                       status: str) -> tuple[jobs.Job, str | None]:
    """A job of 30 s submitted to RunPod, which has finished it (in `status`) before anyone polled it."""
    job = jobs.submit("tts", job_input, runtime=rt)
    submit_job(rt, job.id)
    runpod_id = jobs.get(job.id, runtime=rt).runpod_job_id
    simulator.advance(31)
    wait_until(lambda: runpod_status(simulator, runpod_id) == status, timeout=10, what=f"RunPod to say {status}")
    return job, runpod_id


def cancel_and_retry(rt: Runtime, job_id: str, *, submit: bool) -> jobs.Job:
    """What a user does while an answer about the old attempt is still on its way."""
    jobs.cancel(job_id, runtime=rt)
    jobs.retry(job_id, runtime=rt)
    if submit:
        submit_job(rt, job_id)
    return jobs.get(job_id, runtime=rt)


def outbox(rt: Runtime, job_id: str) -> list[tuple[int, str, bool]]:
    with session_scope(rt.engine, read_only=True) as session:
        rows = session.exec(select(RunPodCancel).where(RunPodCancel.job_id == job_id)
                            .order_by(col(RunPodCancel.id))).all()
        return [(r.attempt, r.runpod_job_id, r.done_at is not None) for r in rows]


# -- a late /status answer about an older attempt --------------------------------------------------------


def test_a_late_answer_about_attempt_one_never_completes_attempt_two(
    runtime: Runtime, interposed: Interposed, simulator: SimulatorProcess
) -> None:
    job, first_runpod_id = finished_at_runpod(runtime, simulator, {"sleep": 30, "output": "done"}, "COMPLETED")
    seen: dict[str, jobs.Job] = {}
    interposed.hooks["status"] = lambda: seen.setdefault("retried", cancel_and_retry(runtime, job.id, submit=True))

    make_due(runtime, job.id)
    step = poll_job(runtime, job.id)  # RunPod said COMPLETED about attempt 1, answering too late

    now = jobs.get(job.id, runtime=runtime)
    assert (now.attempt, now.status) == (2, JobStatus.IN_QUEUE)
    assert now.runpod_job_id == seen["retried"].runpod_job_id != first_runpod_id
    assert now.output is None and now.finished_at is None
    assert step.poll_in is None  # the stale poll chain ends; attempt 2 has its own
    assert [e.to_status for e in jobs.events(job.id, runtime=runtime)].count(JobStatus.COMPLETED) == 0
    simulator.advance(31)
    done = poll_until_final(runtime, job.id)
    assert (done.status, done.attempt, done.runpod_job_id) == (JobStatus.COMPLETED, 2, now.runpod_job_id)


def test_a_late_answer_never_lands_on_a_retry_that_reuses_the_same_runpod_job(
    runtime: Runtime, interposed: Interposed, simulator: SimulatorProcess
) -> None:
    job, runpod_id = finished_at_runpod(runtime, simulator, {"sleep": 30, "fail": "flaky GPU"}, "FAILED")

    def meanwhile() -> None:
        # Another poll (this one's lease ran out) stores FAILED, and the user retries through /retry.
        make_due(runtime, job.id)
        poll_job(runtime, job.id)
        jobs.retry(job.id, runtime=runtime)
        submit_job(runtime, job.id)

    interposed.hooks["status"] = meanwhile
    make_due(runtime, job.id)
    poll_job(runtime, job.id)  # still holding RunPod's FAILED about attempt 1

    now = jobs.get(job.id, runtime=runtime)
    assert (now.attempt, now.status, now.runpod_job_id) == (2, JobStatus.IN_QUEUE, runpod_id)  # same RunPod job
    assert [e.to_status for e in jobs.events(job.id, runtime=runtime)].count(JobStatus.FAILED) == 1


def test_a_late_404_about_attempt_one_never_expires_attempt_two(
    runtime: Runtime, interposed: Interposed, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 30, "output": "x"}, runtime=runtime)
    submit_job(runtime, job.id)
    simulator.advance(31 + 31 * 60)  # finished, and past RunPod's 30-minute retention: /status answers 404
    interposed.hooks["status"] = lambda: cancel_and_retry(runtime, job.id, submit=True)

    make_due(runtime, job.id)
    poll_job(runtime, job.id)

    now = jobs.get(job.id, runtime=runtime)
    assert (now.attempt, now.status) == (2, JobStatus.IN_QUEUE)
    assert JobStatus.EXPIRED not in [e.to_status for e in jobs.events(job.id, runtime=runtime)]


# -- a /run answer that arrives after the attempt lost the row --------------------------------------------


def test_cancel_and_retry_during_run_never_adopts_the_old_runpod_job_and_cancels_it(
    runtime: Runtime, interposed: Interposed, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 60}, runtime=runtime)
    seen: dict[str, jobs.Job] = {}
    interposed.hooks["run"] = lambda: seen.setdefault("retried", cancel_and_retry(runtime, job.id, submit=True))

    submit_job(runtime, job.id)  # attempt 1's /run answers after attempt 2 has its own RunPod job

    now = jobs.get(job.id, runtime=runtime)
    second = seen["retried"].runpod_job_id
    [first] = [j["id"] for j in simulator.jobs(ENDPOINT_ID) if j["id"] != second]
    assert (now.attempt, now.status, now.runpod_job_id) == (2, JobStatus.IN_QUEUE, second)
    assert outbox(runtime, job.id) == [(1, first, False)]
    assert published(runtime).of(CANCEL_TASK) == [job.id]

    cancel_on_runpod(runtime, job.id)

    assert runpod_status(simulator, first) == "CANCELLED"
    assert runpod_status(simulator, second) != "CANCELLED"
    assert outbox(runtime, job.id) == [(1, first, True)]
    said = " ".join(e.detail or "" for e in jobs.events(job.id, runtime=runtime))
    assert f"RunPod job {first} was created for attempt 1, which no longer owns the job" in said


def test_cancel_and_retry_before_the_new_submit_leaves_no_runpod_job_running(
    runtime: Runtime, interposed: Interposed, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 60}, runtime=runtime)
    interposed.hooks["run"] = lambda: cancel_and_retry(runtime, job.id, submit=False)

    submit_job(runtime, job.id)
    cancel_on_runpod(runtime, job.id)

    now = jobs.get(job.id, runtime=runtime)
    assert (now.attempt, now.status, now.runpod_job_id) == (2, JobStatus.PENDING, None)
    assert [j["status"] for j in simulator.jobs(ENDPOINT_ID)] == ["CANCELLED"]


def test_a_cancelled_job_retried_before_its_cancel_task_ran_is_still_cancelled_at_runpod(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 60}, runtime=runtime)
    submit_job(runtime, job.id)
    first = jobs.get(job.id, runtime=runtime).runpod_job_id

    jobs.cancel(job.id, runtime=runtime)
    jobs.retry(job.id, runtime=runtime)  # the row no longer names the RunPod job to stop
    cancel_on_runpod(runtime, job.id)  # the cancel task, late

    assert runpod_status(simulator, first) == "CANCELLED"
    assert outbox(runtime, job.id) == [(1, first, True)]


def test_a_cancel_outbox_row_left_open_is_sent_again_by_the_reconciler(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    from datetime import timedelta

    from jobs.flow.reconcile import reconcile
    from jobs.storage.models import utcnow

    job = jobs.submit("tts", {"sleep": 60}, runtime=runtime)
    submit_job(runtime, job.id)
    jobs.cancel(job.id, runtime=runtime)
    published(runtime).messages.clear()  # the cancel task's message is lost

    report = reconcile(runtime, now=utcnow() + timedelta(minutes=5))
    again = reconcile(runtime, now=utcnow() + timedelta(minutes=5, seconds=1))

    assert report.recancelled == [job.id] and again.recancelled == []
    assert published(runtime).of(CANCEL_TASK) == [job.id]


# -- side rows go only with the write they belong to -------------------------------------------------------


def test_chunks_read_by_a_poll_for_an_attempt_that_ended_are_not_appended_after_its_end(
    runtime: Runtime, interposed: Interposed, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 40, "stream": ["a", "b", "c"]}, stream=True, runtime=runtime)
    submit_job(runtime, job.id)
    simulator.advance(11)  # "a" is out (one chunk every 10 s)
    make_due(runtime, job.id)
    poll_job(runtime, job.id)  # IN_PROGRESS, "a" stored
    simulator.advance(10)  # "b" is out
    interposed.hooks["stream"] = lambda: jobs.cancel(job.id, runtime=runtime)

    make_due(runtime, job.id)
    poll_job(runtime, job.id)  # drained "b", and meanwhile the job was cancelled

    kinds = [item.kind for item in jobs.stream_events(job.id, runtime=runtime)[1]]
    assert kinds == ["started", "output", "error"]  # nothing after the end


# -- text from RunPod is stored whatever it holds -----------------------------------------------------------


def hostile(state: JobState) -> JobState:
    return JobState.from_json({
        "id": state.id, "status": "FAILED", "workerId": "w" * 500, "executionTime": 10**12, "delayTime": -5,
        "error": "CUDA \x00 error \udc80 in kernel", "output": {"partial\udc80": ["nul\x00", float("nan")]},
    }, operation="status")


def test_an_error_holding_nul_and_lone_surrogates_is_stored_and_served(
    runtime: Runtime, interposed: Interposed
) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=runtime)
    submit_job(runtime, job.id)
    interposed.replace["status"] = hostile

    make_due(runtime, job.id)
    poll_job(runtime, job.id)

    stored = jobs.get(job.id, runtime=runtime)
    assert stored.status is JobStatus.FAILED
    assert stored.error == "CUDA \ufffd error \ufffd in kernel"
    assert stored.output == {"partial\ufffd": ["nul\x00", None]}
    assert stored.worker_id == "w" * 128 and stored.execution_time_ms is None and stored.delay_time_ms is None
    import json

    json.dumps(stored.to_dict(), ensure_ascii=False, allow_nan=False).encode("utf-8")  # servable as it is
    assert jobs.stream_events(job.id, runtime=runtime)[1][-1].kind == "error"
