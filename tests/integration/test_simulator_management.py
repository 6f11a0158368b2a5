"""RunPod's management API as the simulator serves it (``/mgmt/v2`` and ``/mgmt/graphql``), over real HTTP.

Each test runs against a simulator with two startup endpoints, ``alpha`` and ``beta`` (3 max workers each), and
a $150 balance (RunPod's tier: 10 max workers for the account). Days pass with the clock-advance control.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import SimulatorProcess, endpoint_flags, wait_until

pytestmark = pytest.mark.integration

DAY = 86400.0
LONG_POLICY = {"executionTimeout": 3 * 3600 * 1000}


@pytest.fixture(scope="module")
def _account_simulator(start_simulator: Callable[..., SimulatorProcess]) -> SimulatorProcess:
    return start_simulator("--cold-start-seconds", "0", "--account-balance", "150", *endpoint_flags("alpha", "beta"))


@dataclass
class Mgmt:
    sim: SimulatorProcess
    rest: httpx.Client
    jobs: httpx.Client
    graphql_url: str

    def get(self, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.rest.get(path, **kwargs)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def patch(self, endpoint_id: str, body: Any) -> httpx.Response:
        return self.rest.patch(f"/serverless/{endpoint_id}", json=body)

    def graphql(self, query: str) -> httpx.Response:
        return self.rest.post(self.graphql_url, json={"query": query})

    def myself(self) -> dict[str, Any]:
        response = self.graphql("query { myself { clientBalance currentSpendPerHr spendLimit } }")
        assert response.status_code == 200 and "errors" not in response.json(), response.text
        body: dict[str, Any] = response.json()["data"]["myself"]
        return body

    def run(self, endpoint_id: str, job_input: dict[str, Any], **extra: Any) -> str:
        response = self.jobs.post(f"/{endpoint_id}/run", json={"input": job_input, **extra})
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def status(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        response = self.jobs.get(f"/{endpoint_id}/status/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def statuses(self, endpoint_id: str) -> list[str]:
        return sorted(str(job["status"]) for job in self.sim.jobs(endpoint_id))

    def engine_settings(self, endpoint_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.sim.control.get(f"/_sim/endpoints/{endpoint_id}").json()
        return body


@pytest.fixture
def mgmt(_account_simulator: SimulatorProcess) -> Iterator[Mgmt]:
    sim = _account_simulator
    sim.reset()
    headers = {"Authorization": f"Bearer {sim.api_key}"}
    with (
        httpx.Client(base_url=f"{sim.root_url}/mgmt/v2", headers=headers, timeout=15) as rest,
        httpx.Client(base_url=sim.base_url, headers=headers, timeout=15) as jobs,
    ):
        yield Mgmt(sim, rest, jobs, f"{sim.root_url}/mgmt/graphql")


# -- inventory ------------------------------------------------------------------------------------------


def test_endpoints_are_listed_and_read_in_runpods_v2_shape_with_rate_limit_headers(mgmt: Mgmt) -> None:
    listing = mgmt.rest.get("/serverless")
    alpha = mgmt.get("/serverless/alpha")

    assert listing.status_code == 200
    assert [ep["id"] for ep in listing.json()["endpoints"]] == ["alpha", "beta"]
    assert listing.headers["RateLimit-Policy"].startswith('"minute";q=60;w=60')
    assert listing.headers["RateLimit"].startswith('"minute";r=')
    assert alpha["type"] == "QUEUE"
    assert alpha["workers"] == {"min": 0, "max": 3, "idleTimeout": 5}
    assert alpha["gpu"]["pools"] == ["ADA_24"] and alpha["gpu"]["count"] == 1
    assert alpha["requestUrls"]["run"] == f"{mgmt.sim.base_url}/alpha/run"
    assert alpha["timeout"] == 600000 and alpha["scaling"] == {"type": "QUEUE_DELAY", "queueDelay": 4.0}


def test_the_catalog_lists_gpus_with_their_pool_and_serverless_price(mgmt: Mgmt) -> None:
    gpus = {gpu["pool"]: gpu for gpu in mgmt.get("/catalog/gpus")["gpus"]}
    unqualified = mgmt.rest.get("/catalog/gpus", params={"include": "AVAILABILITY"})

    assert gpus["ADA_24"]["id"] == "NVIDIA GeForce RTX 4090" and gpus["ADA_24"]["memory"] == 24
    assert set(gpus["ADA_24"]["price"]) == {"secure", "community", "serverless"}
    assert unqualified.status_code == 400
    assert unqualified.headers["content-type"] == "application/problem+json"


def test_pods_are_an_empty_wrapped_list(mgmt: Mgmt) -> None:
    assert mgmt.get("/pods") == {"pods": []}


# -- PATCH ----------------------------------------------------------------------------------------------


def test_a_patch_changes_only_the_fields_present_and_the_engine_follows(mgmt: Mgmt) -> None:
    raised = mgmt.patch("alpha", {"workers": {"max": 5}})
    tuned = mgmt.patch("alpha", {"timeout": 30000, "flashboot": True, "workers": {"idleTimeout": 60}})
    read_back = mgmt.get("/serverless/alpha")

    assert raised.status_code == 200 and raised.json()["workers"] == {"min": 0, "max": 5, "idleTimeout": 5}
    assert tuned.status_code == 200
    assert read_back["workers"] == {"min": 0, "max": 5, "idleTimeout": 60}
    assert read_back["timeout"] == 30000 and read_back["flashboot"] is True
    engine = mgmt.engine_settings("alpha")
    assert engine["workers_max"] == 5 and engine["idle_timeout_seconds"] == 60
    assert mgmt.get("/serverless/beta")["workers"]["max"] == 3


def test_the_endpoint_timeout_ends_jobs_whose_policy_names_none(mgmt: Mgmt) -> None:
    assert mgmt.patch("alpha", {"timeout": 10_000}).status_code == 200
    plain = mgmt.run("alpha", {"sleep": 60})
    own = mgmt.run("alpha", {"sleep": 60}, policy={"executionTimeout": 120_000})
    wait_until(lambda: mgmt.statuses("alpha") == ["IN_PROGRESS"] * 2, timeout=10, what="both jobs to start")

    mgmt.sim.advance(60)

    assert mgmt.status("alpha", plain)["status"] == "FAILED"
    assert mgmt.status("alpha", own)["status"] == "COMPLETED"


def test_scaling_on_request_count_drops_idle_timeout_and_refuses_one(mgmt: Mgmt) -> None:
    switched = mgmt.patch("alpha", {"scaling": {"type": "REQUEST_COUNT", "requestCount": 2}})
    refused = mgmt.patch("alpha", {"workers": {"idleTimeout": 10}})

    assert switched.status_code == 200
    assert switched.json()["scaling"] == {"type": "REQUEST_COUNT", "requestCount": 2}
    assert switched.json()["workers"] == {"min": 0, "max": 3}
    assert refused.status_code == 400 and refused.json()["errors"][0]["field"] == "workers.idleTimeout"


def test_raising_max_workers_lets_more_jobs_run_at_once(mgmt: Mgmt) -> None:
    assert mgmt.patch("alpha", {"workers": {"min": 0, "max": 1}}).status_code == 200
    for _ in range(3):
        mgmt.run("alpha", {"sleep": 600})
    wait_until(lambda: mgmt.statuses("alpha") == ["IN_PROGRESS", "IN_QUEUE", "IN_QUEUE"], timeout=10,
               what="one job running under max 1")
    assert mgmt.get("/serverless/alpha/workers")["summary"]["running"] == 1

    assert mgmt.patch("alpha", {"workers": {"min": 0, "max": 3}}).status_code == 200

    wait_until(lambda: mgmt.statuses("alpha") == ["IN_PROGRESS"] * 3, timeout=10, what="three jobs running")
    workers = mgmt.get("/serverless/alpha/workers")
    assert workers["summary"] == {"running": 3, "idle": 0, "initializing": 0, "throttled": 0, "unhealthy": 0,
                                  "total": 3}
    assert {w["status"] for w in workers["workers"]} == {"RUNNING"}
    assert {w["gpuTypeId"] for w in workers["workers"]} == {"NVIDIA GeForce RTX 4090"}


def test_a_bad_patch_is_a_400_problem_listing_every_fault_and_changes_nothing(mgmt: Mgmt) -> None:
    response = mgmt.patch("alpha", {"workers": {"min": -1, "max": 2.5, "idleTimeout": 0, "standby": 1},
                                    "timeout": "soon", "colour": "blue"})

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 400 and body["title"] == "Bad Request"
    assert {e["field"] for e in body["errors"]} == {
        "colour", "workers.standby", "workers.min", "workers.max", "workers.idleTimeout", "timeout"}
    assert mgmt.get("/serverless/alpha")["workers"] == {"min": 0, "max": 3, "idleTimeout": 5}


def test_unknown_endpoints_are_404_and_calls_without_a_bearer_key_are_401(mgmt: Mgmt) -> None:
    missing = mgmt.rest.get("/serverless/no-such-endpoint")
    patch_missing = mgmt.patch("no-such-endpoint", {"workers": {"max": 1}})
    bare_key = httpx.get(f"{mgmt.sim.root_url}/mgmt/v2/serverless", headers={"Authorization": mgmt.sim.api_key})
    wrong_key = httpx.get(f"{mgmt.sim.root_url}/mgmt/v2/serverless", headers={"Authorization": "Bearer nope"})

    for response, status in ((missing, 404), (patch_missing, 404), (bare_key, 401), (wrong_key, 401)):
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == status and response.json()["title"] and response.json()["detail"]
    assert mgmt.sim.api_key not in bare_key.text


# -- the account: billing, balance, tier cap ------------------------------------------------------------


def serverless_price(mgmt: Mgmt, pool: str) -> float:
    (gpu,) = [gpu for gpu in mgmt.get("/catalog/gpus")["gpus"] if gpu["pool"] == pool]
    return float(gpu["price"]["serverless"])


def test_execution_is_billed_per_hour_bucket_at_the_catalog_price_per_gpu_and_lowers_the_balance(mgmt: Mgmt) -> None:
    mgmt.sim.configure_endpoint("alpha", gpu_count=2)
    job_id = mgmt.run("alpha", {"sleep": 1800}, policy=LONG_POLICY)
    wait_until(lambda: mgmt.statuses("alpha") == ["IN_PROGRESS"], timeout=10, what="the job to start")
    mgmt.sim.advance(1800)
    done = mgmt.status("alpha", job_id)

    assert done["status"] == "COMPLETED"
    expected = done["executionTime"] / 1000 * serverless_price(mgmt, "ADA_24") / 3600 * 2
    billing = mgmt.get("/billing/serverless", params={"bucketSize": "hour", "serverlessId": "alpha"})
    assert billing["records"], billing
    for record in billing["records"]:
        assert record["serverlessId"] == "alpha"
        assert record["startTime"].endswith(":00:00Z") and record["endTime"].endswith(":00:00Z")
    assert sum(r["totalAmount"] for r in billing["records"]) == pytest.approx(expected, abs=1e-4)
    assert billing["metadata"]["totals"]["totalAmount"] == pytest.approx(expected, abs=1e-4)
    assert billing["metadata"]["uniqueServerlessCount"] == 1
    assert mgmt.get("/billing/serverless", params={"serverlessId": "beta"})["records"] == []
    account = mgmt.myself()
    assert account["clientBalance"] == pytest.approx(150 - expected, abs=1e-4)
    assert account["currentSpendPerHr"] == pytest.approx(expected, abs=1e-4)
    mgmt.sim.advance(2 * 3600)
    assert mgmt.myself()["currentSpendPerHr"] == 0


def test_a_patch_over_the_balance_tier_cap_is_refused_and_the_cap_falls_with_the_balance(mgmt: Mgmt) -> None:
    # $150 buys a 10-worker account; beta holds 3 of them.
    over = mgmt.patch("alpha", {"workers": {"max": 8}})
    at_cap = mgmt.patch("alpha", {"workers": {"max": 7}})

    assert over.status_code == 400
    assert over.json()["title"] == "Worker quota exceeded" and "cap of 10" in over.json()["detail"]
    assert at_cap.status_code == 200 and at_cap.json()["workers"]["max"] == 7

    # Two hours on eight H200s costs about $89: the balance drops under $100, and so the cap to 5.
    assert mgmt.patch("alpha", {"workers": {"max": 1}}).status_code == 200
    mgmt.sim.configure_endpoint("alpha", gpu_pool="HOPPER_141", gpu_count=8)
    job_id = mgmt.run("alpha", {"sleep": 7200}, policy=LONG_POLICY)
    wait_until(lambda: mgmt.statuses("alpha") == ["IN_PROGRESS"], timeout=10, what="the job to start")
    mgmt.sim.advance(7200)
    assert mgmt.status("alpha", job_id)["status"] == "COMPLETED"
    assert mgmt.myself()["clientBalance"] < 100

    assert mgmt.patch("alpha", {"workers": {"max": 3}}).status_code == 400
    assert mgmt.patch("alpha", {"workers": {"max": 2}}).status_code == 200


# -- RunPod's own scale-downs ---------------------------------------------------------------------------


def test_an_idle_endpoint_drops_to_2_max_workers_after_3_days_and_0_after_7(mgmt: Mgmt) -> None:
    assert mgmt.patch("alpha", {"workers": {"max": 6}}).status_code == 200

    mgmt.sim.advance(3 * DAY - 60)
    assert mgmt.get("/serverless/alpha")["workers"]["max"] == 6
    mgmt.sim.advance(60)
    assert mgmt.get("/serverless/alpha")["workers"]["max"] == 2
    assert mgmt.get("/serverless/beta")["workers"]["max"] == 2
    mgmt.sim.advance(4 * DAY)
    assert mgmt.get("/serverless/alpha")["workers"]["max"] == 0
    assert mgmt.engine_settings("alpha")["workers_max"] == 0

    # The cut is real capacity, and it stays: a new job waits in the queue.
    job_id = mgmt.run("alpha", {"sleep": 1})
    mgmt.sim.advance(60)
    assert mgmt.status("alpha", job_id)["status"] == "IN_QUEUE"
    assert mgmt.get("/serverless/alpha")["workers"]["max"] == 0


def test_jobs_keep_an_endpoint_from_counting_as_idle(mgmt: Mgmt) -> None:
    mgmt.sim.advance(2 * DAY)
    job_id = mgmt.run("alpha", {"sleep": 1})
    mgmt.sim.advance(5)
    assert mgmt.status("alpha", job_id)["status"] == "COMPLETED"

    mgmt.sim.advance(2 * DAY)

    assert mgmt.get("/serverless/alpha")["workers"]["max"] == 3
    assert mgmt.get("/serverless/beta")["workers"]["max"] == 2


# -- GraphQL --------------------------------------------------------------------------------------------


def test_graphql_answers_the_account_fields_and_200_errors_for_unknown_ones(mgmt: Mgmt) -> None:
    account = mgmt.myself()
    unknown = mgmt.graphql("query { myself { clientBalance pods { id } } gpuTypes { id } }")
    broken = mgmt.graphql("query { myself { clientBalance }")

    assert account == {"clientBalance": 150, "currentSpendPerHr": 0, "spendLimit": 80}
    assert unknown.status_code == 200 and "data" not in unknown.json()
    assert [e["message"] for e in unknown.json()["errors"]] == [
        'Cannot query field "gpuTypes" on type "Query".', 'Cannot query field "pods" on type "User".']
    assert broken.status_code == 200 and broken.json()["errors"][0]["message"].startswith("Syntax Error")


def test_graphql_takes_the_key_as_the_docs_show_it_too_and_refuses_a_wrong_one(mgmt: Mgmt) -> None:
    query = {"query": "{ myself { clientBalance } }"}
    url = f"{mgmt.sim.root_url}/mgmt/graphql"

    in_url = httpx.post(url, params={"api_key": mgmt.sim.api_key}, json=query)
    wrong = httpx.post(url, params={"api_key": "nope"}, json=query)
    missing = httpx.post(url, json=query)

    assert in_url.status_code == 200 and in_url.json() == {"data": {"myself": {"clientBalance": 150}}}
    assert wrong.status_code == missing.status_code == 401
