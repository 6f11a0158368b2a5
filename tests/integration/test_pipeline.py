"""The whole pipeline: jobs.submit -> Redis -> a real `celery -A tasks worker` -> the simulator over
HTTP -> the job table (SQLite and PostgreSQL), with beat running the reconciler.
"""

from __future__ import annotations

import uuid

import pytest

import jobs
from jobs.runtime import SUBMIT_TASK
from jobs.states import JobStatus
from tests.conftest import Pipeline, wait_until

pytestmark = pytest.mark.integration


def endpoint(pipeline: Pipeline) -> str:
    """A fresh endpoint per test, so the simulator's job list speaks of this test alone. It is created at
    "RunPod" first: like RunPod, the simulator answers 404 for an endpoint that does not exist."""
    return pipeline.simulator.create_endpoint()


def finished(pipeline: Pipeline, job_id: str, timeout: float = 45) -> jobs.Job:
    try:
        return jobs.wait(job_id, timeout=timeout, runtime=pipeline.runtime)
    except TimeoutError:
        print(pipeline.logs())
        raise


def test_a_job_completes_with_its_output_stored(pipeline: Pipeline) -> None:
    job = jobs.submit(endpoint(pipeline), {"sleep": 0.5, "output": {"wav": "s3://b/k.wav"}}, runtime=pipeline.runtime)

    done = finished(pipeline, job.id)

    assert done.status is JobStatus.COMPLETED
    assert done.output == {"wav": "s3://b/k.wav"}
    assert done.execution_time_ms is not None and done.execution_time_ms >= 450
    assert done.started_at is not None or done.poll_count >= 1
    assert len(pipeline.simulator.jobs(done.endpoint_id)) == 1


def test_a_failing_job_stores_runpods_error(pipeline: Pipeline) -> None:
    job = jobs.submit(endpoint(pipeline), {"sleep": 0.2, "fail": "speaker model missing"}, runtime=pipeline.runtime)

    done = finished(pipeline, job.id)

    assert done.status is JobStatus.FAILED
    assert "speaker model missing" in (done.error or "")


def test_a_cancelled_job_is_cancelled_here_and_at_runpod(pipeline: Pipeline) -> None:
    ep = endpoint(pipeline)
    job = jobs.submit(ep, {"sleep": 120}, runtime=pipeline.runtime)
    wait_until(lambda: jobs.get(job.id, runtime=pipeline.runtime).status is JobStatus.IN_PROGRESS, timeout=30,
               what="the job to start")

    jobs.cancel(job.id, runtime=pipeline.runtime)

    wait_until(lambda: pipeline.simulator.jobs(ep)[0]["status"] == "CANCELLED", timeout=30,
               what="RunPod to cancel the job")
    assert jobs.get(job.id, runtime=pipeline.runtime).status is JobStatus.CANCELLED


def test_a_job_past_its_ttl_ends_expired(pipeline: Pipeline) -> None:
    job = jobs.submit(endpoint(pipeline), {"sleep": 600}, policy={"ttl": 10_000}, runtime=pipeline.runtime)
    wait_until(lambda: jobs.get(job.id, runtime=pipeline.runtime).status is JobStatus.IN_PROGRESS, timeout=30,
               what="the job to start")

    pipeline.simulator.advance(11)

    assert finished(pipeline, job.id).status is JobStatus.EXPIRED


def test_a_result_runpod_dropped_before_we_saw_it_ends_expired_not_failed(pipeline: Pipeline) -> None:
    ep = endpoint(pipeline)
    pipeline.simulator.set_faults({"op": "status", "endpoint": ep, "kind": "5xx", "status": 502})
    job = jobs.submit(ep, {"output": "never seen"}, runtime=pipeline.runtime)
    wait_until(lambda: pipeline.simulator.jobs(ep) and pipeline.simulator.jobs(ep)[0]["status"] == "COMPLETED",
               timeout=30, what="RunPod to finish the job")

    pipeline.simulator.advance(31 * 60)
    pipeline.simulator.set_faults()

    done = finished(pipeline, job.id, timeout=90)
    assert done.status is JobStatus.EXPIRED and done.output is None


def test_the_same_submit_message_delivered_twice_makes_one_runpod_job(pipeline: Pipeline) -> None:
    ep = endpoint(pipeline)
    job = jobs.submit(ep, {"sleep": 0.5, "output": 1}, runtime=pipeline.runtime)

    pipeline.runtime.publish(SUBMIT_TASK, job.id, None)
    pipeline.runtime.publish(SUBMIT_TASK, job.id, None)

    assert finished(pipeline, job.id).status is JobStatus.COMPLETED
    assert len(pipeline.simulator.jobs(ep)) == 1


def test_an_idempotency_key_gives_the_first_job_and_one_runpod_job(pipeline: Pipeline) -> None:
    ep = endpoint(pipeline)
    first = jobs.submit(ep, {"output": "a"}, idempotency_key="render-9", runtime=pipeline.runtime)
    second = jobs.submit(ep, {"output": "b"}, idempotency_key="render-9", runtime=pipeline.runtime)

    assert second.id == first.id
    assert finished(pipeline, first.id).output == "a"
    assert len(pipeline.simulator.jobs(ep)) == 1


def test_a_run_that_times_out_is_left_for_an_operator_and_not_resubmitted(pipeline: Pipeline) -> None:
    ep = endpoint(pipeline)
    pipeline.simulator.set_faults({"op": "run", "endpoint": ep, "kind": "slow", "delay": 4, "when": "after"})
    job = jobs.submit(ep, {"output": 1}, runtime=pipeline.runtime)

    wait_until(lambda: jobs.get(job.id, runtime=pipeline.runtime).status is JobStatus.SUBMIT_UNKNOWN, timeout=30,
               what="SUBMIT_UNKNOWN")
    pipeline.simulator.set_faults()
    # Several reconciler runs later it is still waiting for a person, and RunPod saw it once.
    wait_until(lambda: len(pipeline.simulator.jobs(ep)) == 1, timeout=10, what="the one RunPod job")
    reconciled = jobs.events(job.id, runtime=pipeline.runtime)
    assert jobs.get(job.id, runtime=pipeline.runtime).status is JobStatus.SUBMIT_UNKNOWN
    assert len(pipeline.simulator.jobs(ep)) == 1
    assert reconciled[-1].to_status is JobStatus.SUBMIT_UNKNOWN


# The schedule is the same whatever the database (the poll plan is tested on both in-process): one run is enough.
@pytest.mark.parametrize("pipeline", ["sqlite"], indirect=True)
def test_polls_back_off_so_a_long_job_costs_few_status_calls(pipeline: Pipeline) -> None:
    job = jobs.submit(endpoint(pipeline), {"sleep": 8, "output": "slow export"}, runtime=pipeline.runtime)

    done = finished(pipeline, job.id)

    # A fixed 1-second poller (the official SDK's Job.output) would make 8 or more calls here.
    assert done.status is JobStatus.COMPLETED
    assert 3 <= done.poll_count <= 6, done.poll_count


def test_a_worker_killed_with_sigkill_mid_poll_loses_no_job(pipeline: Pipeline) -> None:
    ep = endpoint(pipeline)
    job = jobs.submit(ep, {"sleep": 6, "output": "survived"}, runtime=pipeline.runtime)
    wait_until(lambda: jobs.get(job.id, runtime=pipeline.runtime).poll_count >= 1, timeout=30,
               what="the poll chain to start")

    pipeline.kill_worker()  # its countdown poll dies with it
    pipeline.start_worker()

    done = finished(pipeline, job.id, timeout=60)
    assert (done.status, done.output) == (JobStatus.COMPLETED, "survived")
    assert len(pipeline.simulator.jobs(ep)) == 1


def test_every_log_line_of_a_jobs_tasks_carries_its_correlation_id(pipeline: Pipeline) -> None:
    correlation_id = f"req-{uuid.uuid4().hex[:10]}"
    job = jobs.submit(endpoint(pipeline), {"sleep": 0.3, "output": 1}, correlation_id=correlation_id,
                      runtime=pipeline.runtime)

    finished(pipeline, job.id)

    lines = [line for line in pipeline.logs(tail=None).splitlines() if job.id in line]
    assert any("is RunPod job" in line for line in lines)
    assert any("RunPod says COMPLETED" in line for line in lines)
    assert all(f"cid={correlation_id}" in line for line in lines)
