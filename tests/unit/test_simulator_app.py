"""The simulator's configuration contract and its app wiring, in-process (Starlette's TestClient)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from starlette.testclient import TestClient

from jobs.simulator import SimulatorConfig, create_app

AUTH = {"Authorization": "Bearer k"}


@contextmanager
def client(**config: Any) -> Iterator[TestClient]:
    with TestClient(create_app(SimulatorConfig(api_key="k", **config))) as test_client:
        yield test_client


def test_every_config_field_has_help_and_a_type_the_cli_can_map() -> None:
    hints = typing.get_type_hints(SimulatorConfig)
    allowed = {int, float, str, bool, str | None}

    for spec in dataclasses.fields(SimulatorConfig):
        assert spec.metadata.get("help"), spec.name
        assert hints[spec.name] in allowed, spec.name


def test_the_api_key_never_shows_in_the_configs_repr() -> None:
    assert "s3cret" not in repr(SimulatorConfig(api_key="s3cret"))


@pytest.mark.parametrize(
    "bad",
    [
        {"execution_timeout_status": "CANCELLED"},
        {"workers_max": -1},
        {"fault_drop_rate": 1.5},
        {"webhook_attempts": 0},
        {"rate_limit_scale": 0},
    ],
)
def test_impossible_settings_are_refused_at_startup(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulatorConfig(**bad)


def test_config_fault_rates_fail_every_api_operation_but_never_the_control_api() -> None:
    with client(fault_5xx_rate=1.0) as c:
        assert c.get("/v2/ep/health", headers=AUTH).status_code == 503
        assert c.post("/v2/ep/run", json={"input": {}}, headers=AUTH).status_code == 503
        assert c.get("/_sim/health").json() == {"ok": True}
        assert c.get("/_sim/jobs").json() == {"jobs": []}


def test_a_config_429_rate_answers_with_retry_after() -> None:
    with client(fault_429_rate=1.0) as c:
        response = c.get("/v2/ep/status/x", headers=AUTH)

    assert response.status_code == 429 and response.headers["Retry-After"] == "1"


def test_rate_limits_can_be_switched_off() -> None:
    with client(rate_limits=False) as c:
        answers = [c.post("/v2/ep/purge-queue", headers=AUTH).status_code for _ in range(5)]

    assert answers == [200] * 5


def test_the_queue_full_rule_can_be_switched_off() -> None:
    with client(queue_full_limit=False, workers_max=0) as c:
        answers = {c.post("/v2/ep/run", json={"input": {}}, headers=AUTH).status_code for _ in range(60)}

    assert answers == {200}


def test_without_a_configured_key_any_non_empty_key_is_accepted() -> None:
    with TestClient(create_app(SimulatorConfig())) as c:
        assert c.get("/v2/ep/health", headers={"Authorization": "anything"}).status_code == 200
        assert c.get("/v2/ep/health").status_code == 401


def test_an_endpoint_setting_that_does_not_exist_or_has_the_wrong_type_is_400() -> None:
    with client() as c:
        unknown = c.post("/_sim/endpoints/ep", json={"gpu": "A100"})
        wrong = c.post("/_sim/endpoints/ep", json={"workers_max": "many"})
        fine = c.post("/_sim/endpoints/ep", json={"workers_max": 5, "cold_start_seconds": 0.5})

    assert unknown.status_code == wrong.status_code == 400
    assert fine.json() == {
        "id": "ep",
        "workers_max": 5,
        "workers_min": 0,
        "cold_start_seconds": 0.5,
        "idle_timeout_seconds": 5.0,
        "unhealthy": False,
        "throttled": False,
    }


def test_advancing_the_clock_backwards_is_400() -> None:
    with client() as c:
        assert c.post("/_sim/clock/advance", json={"seconds": -1}).status_code == 400
