"""Faults are features: Redis flushed mid-run, a worker killed mid-run. Nothing is lost, nothing reaches
RunPod twice (the simulator's own list of jobs is the proof)."""

from __future__ import annotations

import pytest
import redis

import jobs
from jobs.states import JobStatus
from tests.conftest import Pipeline, all_finished, wait_until

# SQLite alone: test_topology.py holds PostgreSQL to the same faults and more (a worker per queue, Redis
# restarted with and without its data, PostgreSQL itself away), and test_pipeline.py kills a worker with SIGKILL
# on both databases; the suite's time is short.
pytestmark = [pytest.mark.integration, pytest.mark.parametrize("pipeline", ["sqlite"], indirect=True)]


def submit_batch(pipeline: Pipeline, endpoint: str, count: int) -> list[str]:
    return [jobs.submit(endpoint, {"sleep": 1 + n % 4, "output": n}, runtime=pipeline.runtime).id
            for n in range(count)]


def test_redis_flushed_mid_run_loses_no_job_and_sends_none_twice(pipeline: Pipeline) -> None:
    endpoint = pipeline.simulator.create_endpoint()
    job_ids = submit_batch(pipeline, endpoint, 8)
    wait_until(lambda: any(jobs.get(j, runtime=pipeline.runtime).status is JobStatus.IN_PROGRESS for j in job_ids),
               timeout=30, what="some jobs to start")

    redis.Redis.from_url(pipeline.runtime.settings.celery_broker_url).flushall()

    finished = all_finished(pipeline, job_ids, timeout=90)
    assert {job.status for job in finished} == {JobStatus.COMPLETED}
    assert sorted(job.output for job in finished) == list(range(8))
    assert len(pipeline.simulator.jobs(endpoint)) == 8


def test_a_worker_killed_mid_run_loses_no_job_and_sends_none_twice(pipeline: Pipeline) -> None:
    endpoint = pipeline.simulator.create_endpoint()
    job_ids = submit_batch(pipeline, endpoint, 8)
    wait_until(lambda: any(jobs.get(j, runtime=pipeline.runtime).status is JobStatus.IN_PROGRESS for j in job_ids),
               timeout=30, what="some jobs to start")

    pipeline.kill_worker()
    pipeline.start_worker()

    finished = all_finished(pipeline, job_ids, timeout=90)
    assert {job.status for job in finished} == {JobStatus.COMPLETED}
    assert len(pipeline.simulator.jobs(endpoint)) == 8
