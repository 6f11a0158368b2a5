"""The official runpod SDK (1.12.0), unchanged, against the simulator: proof it speaks RunPod's API."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import runpod

from tests.conftest import SimulatorProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def endpoint(simulator: SimulatorProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A ``runpod.Endpoint`` aimed at the simulator the documented way: module settings, then construct."""
    monkeypatch.setattr(runpod, "api_key", simulator.api_key)
    monkeypatch.setattr(runpod, "endpoint_url_base", simulator.base_url)
    endpoint_id = simulator.create_endpoint(f"sdk-{uuid.uuid4().hex[:8]}", cold_start_seconds=0)
    ep = runpod.Endpoint(endpoint_id)
    yield ep
    ep.rp_client.rp_session.close()


def test_run_then_status_then_output_with_a_timeout(endpoint: Any) -> None:
    job = endpoint.run({"sleep": 0.2, "output": {"text": "hi"}})

    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert job.output(timeout=10) == {"text": "hi"}
    assert job.status() == "COMPLETED"


def test_run_passes_webhook_and_policy_through_when_given_a_full_request(
    endpoint: Any, simulator: SimulatorProcess
) -> None:
    job = endpoint.run({"input": {"output": 3}, "policy": {"ttl": 60_000}, "webhook": "http://127.0.0.1:9/h"})

    assert job.output(timeout=10) == 3
    (record,) = simulator.jobs()
    assert record["policy"] == {"ttl": 60_000} and record["webhook"] == "http://127.0.0.1:9/h"


def test_run_sync_returns_the_output(endpoint: Any) -> None:
    assert endpoint.run_sync({"output": [1, 2, 3]}, timeout=30) == [1, 2, 3]


def test_stream_yields_every_chunk_of_a_generator_job_whose_output_is_then_empty_as_on_runpod(
    endpoint: Any,
) -> None:
    job = endpoint.run({"sleep": 0.5, "stream": ["a", "b", "c"]})

    assert list(job.stream()) == ["a", "b", "c"]
    assert job.output(timeout=10) == []  # without return_aggregate_stream the chunks are only in /stream


def test_with_return_aggregate_stream_the_output_is_every_chunk(endpoint: Any, simulator: SimulatorProcess) -> None:
    simulator.configure_endpoint(endpoint.endpoint_id, return_aggregate_stream=True)

    assert endpoint.run_sync({"stream": ["a", "b"]}, timeout=30) == ["a", "b"]


def test_cancel_stops_a_running_job(endpoint: Any) -> None:
    job = endpoint.run({"sleep": 60})
    wait_until(lambda: job.status() == "IN_PROGRESS", timeout=10, what="the job to start")

    assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
    assert job.status() == "CANCELLED"


def test_health_and_purge_queue_answer_runpods_shapes(endpoint: Any, simulator: SimulatorProcess) -> None:
    simulator.configure_endpoint(endpoint.endpoint_id, workers_max=0)
    endpoint.run({}), endpoint.run({})

    health = endpoint.health()
    purged = endpoint.purge_queue()

    assert health["jobs"]["inQueue"] == 2
    assert set(health["workers"]) == {"idle", "initializing", "ready", "running", "throttled", "unhealthy"}
    assert purged == {"removed": 2, "status": "completed"}
    assert endpoint.health()["jobs"]["inQueue"] == 0


def test_a_wrong_key_is_the_sdks_401_error(simulator: SimulatorProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runpod, "api_key", "not-the-key")
    monkeypatch.setattr(runpod, "endpoint_url_base", simulator.base_url)
    ep = runpod.Endpoint("sdk-auth")

    with pytest.raises(RuntimeError, match="401 Unauthorized"):
        ep.run({"x": 1})
    ep.rp_client.rp_session.close()


def test_an_endpoint_that_does_not_exist_is_an_http_404_error(
    simulator: SimulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runpod, "api_key", simulator.api_key)
    monkeypatch.setattr(runpod, "endpoint_url_base", simulator.base_url)
    ep = runpod.Endpoint("no-such-endpoint")
    try:
        calls = [lambda: ep.run({"x": 1}), lambda: ep.run_sync({"x": 1}, timeout=5), ep.health, ep.purge_queue,
                 lambda: runpod.endpoint.Job("no-such-endpoint", "some-job", ep.rp_client).status()]
        for call in calls:
            with pytest.raises(requests.HTTPError, match="404 Client Error"):
                call()
    finally:
        ep.rp_client.rp_session.close()
    assert simulator.jobs() == []
