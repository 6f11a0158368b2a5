"""A finished job's cost estimate: its execution time x its endpoint's GPU list price x GPU count, from
what the collectors stored. In-process, on SQLite and PostgreSQL, against the simulator."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import update

import jobs
from jobs.flow.lifecycle import poll_job, submit_job
from jobs.runpod.cost import EndpointPrice, cost_report, estimate
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.storage.db import make_engine, session_scope
from jobs.storage.models import BillingRecordRow, EndpointSnapshot, GpuPrice, SpendHoldRow, utcnow
from jobs.storage.store import JOBS, update_fields
from tests.conftest import (
    ENDPOINT_ID,
    ENDPOINT_NAME,
    Published,
    SimulatorProcess,
    fast_client,
    make_settings,
    wait_until,
)

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


def test_the_report_sums_the_estimates_beside_what_runpod_billed_for_the_same_hours(runtime: Runtime) -> None:
    collected(runtime, pools="ADA_24", gpu_count=1, prices={"ADA_24": 3.6})  # $0.001 a second
    done = [finished(runtime, jobs.submit("tts", {"sleep": 0.2}, runtime=runtime).id) for _ in range(2)]
    unpriced = jobs.submit("tts", {"sleep": 0.1}, runtime=runtime)
    with session_scope(runtime.engine) as session:  # as if it finished before a price was known
        session.add(BillingRecordRow(endpoint_id=ENDPOINT_ID, start=utcnow().replace(minute=0, second=0,
                                     microsecond=0), end=utcnow() + timedelta(hours=1), total_amount=0.5,
                                     observed_at=utcnow()))
    runtime.prices.clear()
    with session_scope(runtime.engine) as session:
        session.execute(update(JOBS).where(JOBS.c.id == unpriced.id).values(
            status=JobStatus.COMPLETED, finished_at=utcnow(), cost_usd=None))

    with session_scope(runtime.engine, read_only=True) as session:
        by_endpoint = cost_report(session, since=utcnow() - timedelta(hours=1), by="endpoint")
        by_status = cost_report(session, since=utcnow() - timedelta(hours=1), by="status")

    assert [line.to_dict() for line in by_endpoint] == [{
        "group": ENDPOINT_NAME, "jobs": 3, "jobs_without_price": 1, "billed_usd": 0.5,
        "estimated_usd": round(sum(j.cost_usd or 0 for j in done), 6)}]
    assert [(line.group, line.jobs, line.billed_usd) for line in by_status] == [("COMPLETED", 3, None)]


def test_rpq_cost_prints_the_report_as_json(runtime: Runtime) -> None:
    import json
    import os
    import subprocess
    import sys

    collected(runtime, pools="ADA_24", gpu_count=1, prices={"ADA_24": 3.6})
    finished(runtime, jobs.submit("tts", {"sleep": 0.1}, runtime=runtime).id)
    env = {**os.environ, "DATABASE_URL": runtime.settings.database_url,
           "RUNPOD_ENDPOINTS": f"{ENDPOINT_NAME}={ENDPOINT_ID}"}

    done = subprocess.run([sys.executable, "-m", "jobs.cli", "cost", "--since", "1h", "--by", "day", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    [line] = json.loads(done.stdout)
    assert (line["group"], line["jobs"], line["jobs_without_price"]) == (utcnow().strftime("%Y-%m-%d"), 1, 0)
    assert line["estimated_usd"] > 0


def test_rpq_cost_lists_the_spells_the_spend_guard_held_new_jobs(runtime: Runtime) -> None:
    import os
    import subprocess
    import sys

    with session_scope(runtime.engine) as session:
        session.add(SpendHoldRow(scope="account", started_at=utcnow() - timedelta(minutes=30),
                                 ended_at=utcnow() - timedelta(minutes=10), reason="the balance is $4.00"))
        session.add(SpendHoldRow(scope=ENDPOINT_NAME, started_at=utcnow() - timedelta(minutes=5),
                                 reason="endpoint tts spends $9.00/h"))
        session.add(SpendHoldRow(scope="account", started_at=utcnow() - timedelta(hours=5),
                                 ended_at=utcnow() - timedelta(hours=4), reason="long ago"))
    env = {**os.environ, "DATABASE_URL": runtime.settings.database_url,
           "RUNPOD_ENDPOINTS": f"{ENDPOINT_NAME}={ENDPOINT_ID}"}

    done = subprocess.run([sys.executable, "-m", "jobs.cli", "cost", "--since", "1h"],
                          env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    spells = done.stdout.split("The spend guard held new jobs:")[1].splitlines()
    assert [line.split()[0] for line in spells if line.strip()] == ["SCOPE", ENDPOINT_NAME, "account"]
    assert "holding" in spells[2] and "$9.00/h" in spells[2] and "long ago" not in done.stdout


def test_rpq_costs_estimates_match_what_the_simulator_billed_within_one_percent(
        migrated_db: str, start_simulator: Callable[..., SimulatorProcess]) -> None:
    from jobs.runpod.collect import collect_all

    sim = start_simulator("--endpoint", ENDPOINT_ID, "--gpu-count", "2", "--cold-start-seconds", "0")
    rt = Runtime(settings=make_settings(migrated_db, sim, runpod_rest_url=f"{sim.root_url}/mgmt/v2",
                                        runpod_graphql_url=f"{sim.root_url}/mgmt/graphql"),
                 engine=make_engine(migrated_db), publish=Published(), make_client=lambda: fast_client(sim))
    try:
        collect_all(rt)  # the endpoint's pool and GPU count, and the catalog's prices
        for sleep in (0.4, 0.8, 1.2):
            finished(rt, jobs.submit("tts", {"sleep": sleep}, runtime=rt).id)
        collect_all(rt)  # what the simulator billed for those hours
        with session_scope(rt.engine, read_only=True) as session:
            [line] = cost_report(session, since=utcnow() - timedelta(hours=1))
    finally:
        rt.close()

    assert line.jobs == 3 and line.jobs_without_price == 0
    assert line.billed_usd and line.estimated_usd == pytest.approx(line.billed_usd, rel=0.01)
