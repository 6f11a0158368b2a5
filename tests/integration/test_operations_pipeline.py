"""Operations with the whole stack running: beat's health rounds, Flower, `rpq metrics`, the operator CLI."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import httpx
import pytest

import jobs
from jobs.runpod import health
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from tests.conftest import ENDPOINT_ID, Pipeline, free_port, stop_process, wait_until

# SQLite alone: the operator's commands, Flower and beat's health rounds against a real worker, for the wiring.
# The queries behind them are held to both databases in-process (test_operations.py, test_cli*.py), and
# test_topology.py runs beat and workers on PostgreSQL; the suite's time is short.
pytestmark = [pytest.mark.integration, pytest.mark.parametrize("pipeline", ["sqlite"], indirect=True)]


def test_beat_stores_health_rows_on_schedule_and_failures_as_failures(pipeline: Pipeline) -> None:
    def observations() -> list[bool]:
        with session_scope(pipeline.runtime.engine) as session:
            row = health.latest(session, "tts")
            return [] if row is None else [row.ok]

    wait_until(lambda: observations() == [True], timeout=30, what="a successful health row")
    pipeline.simulator.set_faults({"op": "health", "endpoint": ENDPOINT_ID, "kind": "5xx", "status": 500})
    try:
        wait_until(lambda: observations() == [False], timeout=30, what="a failed health row")
    finally:
        pipeline.simulator.set_faults()


def test_endpoints_health_shows_a_panel_a_label_and_an_estimated_wait(pipeline: Pipeline) -> None:
    done = jobs.submit("tts", {"sleep": 0.5, "output": 1}, runtime=pipeline.runtime)
    jobs.wait(done.id, timeout=30, runtime=pipeline.runtime)

    live = pipeline.run_cli("endpoints", "health", "tts", "--live", "--json")
    text = pipeline.run_cli("endpoints", "health", "tts", "--live")

    [panel] = json.loads(live.stdout)
    assert panel["state"] in ("ready", "cold")  # a worker stays warm for RunPod's idle timeout, then goes
    assert set(panel["workers"]) == {"ready", "idle", "running", "initializing", "throttled", "unhealthy"}
    assert panel["estimated_wait_seconds"] is not None
    assert "workers" in text.stdout and "a new job would wait" in text.stdout


@pytest.fixture
def flower(pipeline: Pipeline) -> Iterator[str]:
    port = free_port()
    process = pipeline.spawn("flower", [sys.executable, "-m", "celery", "-A", "tasks", "flower",
                                        "--conf=flower.conf", f"--port={port}"],
                             env={"FLOWER_BASIC_AUTH": "ops:s3cret-pass"})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthcheck", timeout=2).status_code == 200, timeout=60,
               what="Flower to start")
    yield url
    stop_process(process)


def test_flower_answers_with_credentials_and_refuses_without(flower: str) -> None:
    assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{flower}/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401

    def queues() -> set[str]:
        answer = httpx.get(f"{flower}/api/queues/length", auth=("ops", "s3cret-pass"), timeout=10)
        answer.raise_for_status()
        return {queue["name"] for queue in answer.json()["active_queues"]}

    wait_until(lambda: {"rpq.submit", "rpq.poll", "rpq.maintenance"} <= queues(), timeout=30,
               what="Flower to list every rpq queue")


def test_flower_refuses_to_start_without_credentials(pipeline: Pipeline) -> None:
    process = pipeline.spawn("flower-open", [sys.executable, "-m", "celery", "-A", "tasks", "flower",
                                             "--conf=flower.conf", f"--port={free_port()}"],
                             env={"FLOWER_BASIC_AUTH": ""})

    assert process.wait(60) != 0
    assert "set FLOWER_BASIC_AUTH" in (pipeline.log_dir / "flower-open.log").read_text()


def test_rpq_metrics_serves_the_scrape_over_http(pipeline: Pipeline) -> None:
    port = free_port()
    process = pipeline.spawn("metrics", [sys.executable, "-m", "jobs.cli", "metrics", "--port", str(port)])
    try:
        done = jobs.submit("tts", {"output": 1}, runtime=pipeline.runtime)
        jobs.wait(done.id, timeout=30, runtime=pipeline.runtime)

        def scrape() -> str:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

        text = wait_until(lambda: "rpq_job_latency_seconds_count" in scrape() and scrape(), timeout=30,
                          what="a scrape with latencies")
    finally:
        stop_process(process)

    for series in ("rpq_jobs{", "rpq_queue_messages{", "rpq_endpoint_health_ok{", "rpq_endpoint_workers{",
                   "rpq_endpoint_jobs{", "rpq_submits_total{", "rpq_polls_total{", "rpq_job_latency_seconds_bucket{",
                   "rpq_poll_lag_seconds"):
        assert series in str(text), series


def test_bulk_retry_touches_exactly_what_dry_run_listed(pipeline: Pipeline) -> None:
    endpoint = pipeline.simulator.create_endpoint()
    failed = [jobs.submit(endpoint, {"fail": f"bad {n}"}, runtime=pipeline.runtime).id for n in range(3)]
    ok = jobs.submit(endpoint, {"output": 1}, runtime=pipeline.runtime).id
    for job_id in [*failed, ok]:
        jobs.wait(job_id, timeout=30, runtime=pipeline.runtime)

    dry = pipeline.run_cli("jobs", "retry", "--status", "FAILED", "--endpoint", endpoint, "--since", "1h",
                           "--dry-run", "--json")
    listed = {job["id"] for job in json.loads(dry.stdout)["would_retry"]}
    assert {jobs.get(j, runtime=pipeline.runtime).status for j in failed} == {JobStatus.FAILED}  # dry run: no change

    real = pipeline.run_cli("jobs", "retry", "--status", "FAILED", "--endpoint", endpoint, "--since", "1h", "--json")
    touched = {job["id"] for job in json.loads(real.stdout)}

    assert listed == touched == set(failed)
    assert all(jobs.get(j, runtime=pipeline.runtime).attempt == 2 for j in failed)
    assert jobs.get(ok, runtime=pipeline.runtime).attempt == 1


def test_bulk_cancel_dry_run_changes_nothing(pipeline: Pipeline) -> None:
    endpoint = pipeline.simulator.create_endpoint()
    slow = [jobs.submit(endpoint, {"sleep": 60}, runtime=pipeline.runtime).id for _ in range(2)]

    dry = pipeline.run_cli("jobs", "cancel", "--endpoint", endpoint, "--dry-run", "--json")
    real = pipeline.run_cli("jobs", "cancel", "--endpoint", endpoint, "--json")

    assert {job["id"] for job in json.loads(dry.stdout)["would_cancel"]} == set(slow)
    assert {job["status"] for job in json.loads(real.stdout)} == {"CANCELLED"}


def test_warmup_from_the_cli_is_idempotent(pipeline: Pipeline) -> None:
    pipeline.simulator.configure_endpoint(ENDPOINT_ID, cold_start_seconds=30)
    try:
        first = json.loads(pipeline.run_cli("endpoints", "warmup", "tts", "--json").stdout)
        second = json.loads(pipeline.run_cli("endpoints", "warmup", "tts", "--json").stdout)
    finally:
        pipeline.simulator.configure_endpoint(ENDPOINT_ID, cold_start_seconds=0.2)

    assert first["action"] in ("submitted", "none")
    assert second["action"] == "none"


def test_queue_purge_asks_first_and_purges_with_yes(pipeline: Pipeline) -> None:
    endpoint = pipeline.simulator.create_endpoint(workers_max=0)
    queued = [jobs.submit(endpoint, {"n": n}, runtime=pipeline.runtime).id for n in range(2)]
    wait_until(lambda: len(pipeline.simulator.jobs(endpoint)) == 2, timeout=30, what="jobs at RunPod")

    refused = pipeline.run_cli("queue", "purge", endpoint, stdin="n\n")
    purged = pipeline.run_cli("queue", "purge", endpoint, "--yes", "--json")

    assert refused.returncode != 0
    assert json.loads(purged.stdout) == {"endpoint": endpoint, "removed": 2}
    for job_id in queued:
        assert jobs.wait(job_id, timeout=30, runtime=pipeline.runtime).status is JobStatus.CANCELLED
