"""A finished job's cost estimate: its execution time x its endpoint's GPU list price x GPU count, from
what the collectors stored. In-process, on SQLite and PostgreSQL, against the simulator."""

from __future__ import annotations

import pytest

import jobs
from jobs.flow.lifecycle import poll_job, submit_job
from jobs.runpod.cost import EndpointPrice, estimate
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.models import EndpointSnapshot, GpuPrice, utcnow
from jobs.storage.store import update_fields
from tests.conftest import ENDPOINT_ID, ENDPOINT_NAME, wait_until

pytestmark = pytest.mark.integration


def collected(rt: Runtime, *, pools: str, gpu_count: int, prices: dict[str, float]) -> None:
    """What the collectors would have stored: the endpoint's configuration and the catalog's prices."""
    now = utcnow()
    with session_scope(rt.engine) as session:
        session.add(EndpointSnapshot(endpoint_name=ENDPOINT_NAME, endpoint_id=ENDPOINT_ID, observed_at=now, ok=True,
                                     gpu_pools=pools, gpu_count=gpu_count, workers_min=0, workers_max=3))
        for pool, per_hour in prices.items():
            session.add(GpuPrice(observed_at=now, gpu_id=f"GPU {pool}", pool=pool, serverless_per_hour=per_hour))


def finished(rt: Runtime, job_id: str) -> jobs.Job:
    submit_job(rt, job_id)

    def step() -> jobs.Job | None:
        with session_scope(rt.engine) as session:
            update_fields(session, job_id, while_status={JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS},
                          values={"next_poll_at": utcnow()})
        poll_job(rt, job_id)
        job = jobs.get(job_id, runtime=rt)
        return job if job.is_terminal else None

    return wait_until(step, timeout=30, interval=0.1, what="the job to finish")  # type: ignore[return-value]


def test_a_finished_job_costs_its_execution_time_at_its_first_pools_list_price_times_its_gpus(
        runtime: Runtime) -> None:
    collected(runtime, pools="ADA_24,AMPERE_48", gpu_count=2, prices={"ADA_24": 0.72, "AMPERE_48": 1.90})

    done = finished(runtime, jobs.submit("tts", {"sleep": 0.3}, runtime=runtime).id)

    assert done.status is JobStatus.COMPLETED and done.execution_time_ms
    assert done.cost_usd == pytest.approx(done.execution_time_ms / 1000 * 0.72 * 2 / 3600)
    assert done.to_dict()["cost_usd"] == done.cost_usd


def test_a_failed_job_costs_its_execution_too(runtime: Runtime) -> None:
    collected(runtime, pools="ADA_24", gpu_count=1, prices={"ADA_24": 0.72})

    done = finished(runtime, jobs.submit("tts", {"sleep": 0.2, "fail": "oom"}, runtime=runtime).id)

    assert done.status is JobStatus.FAILED and done.cost_usd is not None and done.cost_usd > 0


def test_without_a_stored_price_a_job_has_no_cost_rather_than_zero(runtime: Runtime) -> None:
    done = finished(runtime, jobs.submit("tts", {"sleep": 0.1}, runtime=runtime).id)

    assert done.status is JobStatus.COMPLETED and done.cost_usd is None


def test_the_estimate_is_none_without_either_fact() -> None:
    price = EndpointPrice(pool="ADA_24", gpu_count=1, per_gpu_hour=3.6, observed_at=utcnow())
    assert estimate(1500, price) == pytest.approx(0.0015)
    assert estimate(None, price) is None and estimate(1500, None) is None
