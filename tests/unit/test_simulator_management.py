"""The management API's pure pieces: balance tiers, hour buckets, PATCH parsing and the GraphQL subset."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from jobs.simulator.management import (
    Account,
    Problem,
    bucket_start,
    graphql_answer,
    next_bucket,
    parse_patch,
    split_by_hour,
    worker_cap,
)


@pytest.mark.parametrize(
    ("balance", "cap"),
    [(0, 5), (99.99, 5), (100, 10), (199, 10), (200, 20), (300, 30), (500, 40), (700, 50), (900, 60), (5000, 60)],
)
def test_the_account_worker_cap_follows_runpods_balance_tiers(balance: float, cap: int) -> None:
    assert worker_cap(balance) == cap


def test_a_run_across_hour_boundaries_is_split_at_each_one() -> None:
    assert split_by_hour(3000, 7500) == [(3000, 3600), (3600, 7200), (7200, 7500)]
    assert split_by_hour(3600, 3600) == []


def test_buckets_snap_down_and_a_december_month_ends_in_january() -> None:
    moment = datetime(2026, 12, 17, 13, 45, tzinfo=UTC)  # a Thursday

    assert bucket_start(moment, "hour") == datetime(2026, 12, 17, 13, tzinfo=UTC)
    assert bucket_start(moment, "week") == datetime(2026, 12, 14, tzinfo=UTC)
    assert next_bucket(bucket_start(moment, "month"), "month") == datetime(2027, 1, 1, tzinfo=UTC)


def test_an_account_bills_gpu_seconds_at_the_pool_price_and_its_last_hour_spend_prorates() -> None:
    account = Account(100.0)
    account.bill("ep", "ADA_24", 2, 0, 3600)  # 1.10 USD per GPU-hour

    assert account.balance == pytest.approx(100 - 2.2)
    assert account.spend_in_last_hour(5400) == pytest.approx(1.1)


def test_a_patch_with_max_only_keeps_min() -> None:
    from jobs.simulator.engine import Endpoint, EndpointSettings

    ep = Endpoint("ep", EndpointSettings(workers_max=3, workers_min=1, cold_start_seconds=0, idle_timeout_seconds=5))

    assert parse_patch({"workers": {"max": 5}}, ep) == {"workers_max": 5}
    with pytest.raises(Problem) as refused:
        parse_patch({"workers": {"max": 0}}, ep)
    assert refused.value.errors == [{"field": "workers", "message": "min (1) must not exceed max (0)"}]


def test_graphql_refuses_syntax_it_does_not_serve_with_an_error_not_a_guess() -> None:
    account = Account(10.0)

    assert graphql_answer("{ myself { clientBalance } }", account, 80, 0) == {
        "data": {"myself": {"clientBalance": 10.0}}}
    assert "errors" in graphql_answer('{ myself(id: "x") { clientBalance } }', account, 80, 0)
    assert "errors" in graphql_answer("{ myself }", account, 80, 0)
    assert "errors" in graphql_answer(None, account, 80, 0)


def test_management_calls_over_the_minute_quota_are_429_problems_with_retry_after() -> None:
    from starlette.testclient import TestClient

    from jobs.simulator import SimulatorConfig, create_app

    config = SimulatorConfig(api_key="k", endpoints=("ep",), rate_limit_scale=0.05)  # 3 calls a minute
    with TestClient(create_app(config)) as c:
        # Eight quick calls cross at most one minute boundary, so at most six can pass.
        answers = [c.get("/mgmt/v2/serverless", headers={"Authorization": "Bearer k"}) for _ in range(8)]

    limited = [a for a in answers if a.status_code == 429]
    assert limited and all(a.status_code in (200, 429) for a in answers)
    assert limited[0].headers["content-type"] == "application/problem+json"
    assert int(limited[0].headers["Retry-After"]) >= 1
    assert limited[0].headers["RateLimit"].startswith('"minute";r=0;')


def test_an_account_over_its_worker_cap_can_still_lower_max_workers_but_not_raise_them() -> None:
    from starlette.testclient import TestClient

    from jobs.simulator import SimulatorConfig, create_app

    config = SimulatorConfig(api_key="k", endpoints=("a", "b", "c"), account_balance=0)  # 9 max workers, cap 5
    with TestClient(create_app(config)) as c:
        lowered = c.patch("/mgmt/v2/serverless/a", json={"workers": {"max": 2}}, headers={"Authorization": "Bearer k"})
        raised = c.patch("/mgmt/v2/serverless/a", json={"workers": {"max": 3}}, headers={"Authorization": "Bearer k"})

    assert lowered.status_code == 200 and lowered.json()["workers"]["max"] == 2
    assert raised.status_code == 400 and "cap of 5" in raised.json()["detail"]


def test_configured_pods_are_listed_running_and_none_by_default() -> None:
    from starlette.testclient import TestClient

    from jobs.simulator import SimulatorConfig, create_app

    auth = {"Authorization": "Bearer k"}
    with TestClient(create_app(SimulatorConfig(api_key="k", pods=("pod-a", "pod-b")))) as c:
        pods = c.get("/mgmt/v2/pods", headers=auth).json()["pods"]
    with TestClient(create_app(SimulatorConfig(api_key="k"))) as c:
        none = c.get("/mgmt/v2/pods", headers=auth).json()

    assert [(p["id"], p["status"], p["gpu"]["id"]) for p in pods] == [
        ("pod-a", "RUNNING", "NVIDIA GeForce RTX 4090"), ("pod-b", "RUNNING", "NVIDIA GeForce RTX 4090")]
    assert none == {"pods": []}
