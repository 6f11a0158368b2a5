"""rpq's management client against the simulator's management API, over real HTTP: the two were written
apart, each from RunPod's documented shapes, and are held to each other here (the client is also held to
fixture bodies of RunPod's own schemas in tests/unit/test_runpod_management.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta

import httpx
import pytest

from jobs.errors import RunPodAuthError, RunPodNotFound, RunPodRejected
from jobs.runpod.management import EndpointConfig, RunPodGraphQL, RunPodManagement
from jobs.storage.models import utcnow
from tests.conftest import SimulatorProcess, wait_until

pytestmark = pytest.mark.integration

ENDPOINT = "mgmt-endpoint"


@pytest.fixture(scope="module")
def sim(start_simulator: Callable[..., SimulatorProcess]) -> SimulatorProcess:
    return start_simulator("--endpoint", ENDPOINT, "--gpu-count", "2", "--cold-start-seconds", "0")


def settings_of(endpoint: EndpointConfig) -> EndpointConfig:
    """The parsed settings alone (a list and a read may differ in fields rpq does not read)."""
    return replace(endpoint, raw={})


@pytest.fixture
def management(sim: SimulatorProcess) -> Iterator[RunPodManagement]:
    with RunPodManagement(api_key=sim.api_key, base_url=f"{sim.root_url}/mgmt/v2") as client:
        yield client


def test_the_client_reads_the_simulators_endpoints_workers_catalog_and_pods(
        management: RunPodManagement) -> None:
    endpoints = {e.id: e for e in management.list_endpoints()}
    endpoint = management.get_endpoint(ENDPOINT)
    catalog = management.gpu_catalog()
    workers = management.list_workers(ENDPOINT)

    assert settings_of(endpoints[ENDPOINT]) == settings_of(endpoint)
    assert endpoint.gpu_count == 2 and endpoint.gpu_pools and endpoint.workers_max >= 1
    assert any(gpu.pool in endpoint.gpu_pools for gpu in catalog)
    assert workers.summary.total == len(workers.workers)
    assert management.list_pods() == []


def test_scaling_through_the_client_changes_what_the_simulator_reports(management: RunPodManagement) -> None:
    before = management.get_endpoint(ENDPOINT)

    after = management.update_workers(ENDPOINT, min=0, max=3, idle_timeout=7)

    assert (after.workers_min, after.workers_max, after.idle_timeout) == (0, 3, 7)
    assert settings_of(management.get_endpoint(ENDPOINT)) == settings_of(after)
    management.update_workers(ENDPOINT, min=before.workers_min, max=before.workers_max,
                              idle_timeout=before.idle_timeout)


def test_the_simulators_refusals_become_the_clients_errors(sim: SimulatorProcess,
                                                           management: RunPodManagement) -> None:
    with pytest.raises(RunPodNotFound):
        management.get_endpoint("no-such-endpoint")
    with pytest.raises(RunPodRejected, match=r"[Qq]uota|cap"):
        management.update_workers(ENDPOINT, min=0, max=500)
    with RunPodManagement(api_key="wrong-key", base_url=f"{sim.root_url}/mgmt/v2") as stranger, \
            pytest.raises(RunPodAuthError):
        stranger.list_endpoints()


def test_a_finished_job_is_billed_and_the_balance_falls_by_as_much(sim: SimulatorProcess,
                                                                  management: RunPodManagement) -> None:
    with RunPodGraphQL(api_key=sim.api_key, url=f"{sim.root_url}/mgmt/graphql") as graphql:
        before = graphql.account()
        start = utcnow() - timedelta(hours=1)
        run = httpx.post(f"{sim.base_url}/{ENDPOINT}/run", json={"input": {"sleep": 0.5}},
                         headers={"Authorization": f"Bearer {sim.api_key}"}, timeout=10).json()

        def finished() -> bool:
            status = httpx.get(f"{sim.base_url}/{ENDPOINT}/status/{run['id']}",
                               headers={"Authorization": f"Bearer {sim.api_key}"}, timeout=10).json()
            return status["status"] == "COMPLETED"

        wait_until(finished, timeout=30, what="the job to complete")
        billed = sum(r.total_amount for r in management.serverless_billing(ENDPOINT, start=start,
                                                                          end=utcnow() + timedelta(hours=1)))
        after = graphql.account()

    assert billed > 0
    assert before.balance - after.balance == pytest.approx(billed, rel=1e-6)
