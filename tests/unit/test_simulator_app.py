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
from jobs.simulator.stats import RequestStats

AUTH = {"Authorization": "Bearer k"}


@contextmanager
def client(**config: Any) -> Iterator[TestClient]:
    """The simulator in-process, with endpoint ``ep`` created at startup."""
    with TestClient(create_app(SimulatorConfig(api_key="k", **{"endpoints": ("ep",), **config}))) as test_client:
        yield test_client


def test_every_config_field_has_help_and_a_type_the_cli_can_map() -> None:
    hints = typing.get_type_hints(SimulatorConfig)
    allowed = {int, float, str, bool, str | None, tuple[str, ...]}

    for spec in dataclasses.fields(SimulatorConfig):
        assert spec.metadata.get("help"), spec.name
        assert hints[spec.name] in allowed, spec.name


def test_simulator_help_lists_every_flag_and_endpoint_is_repeatable(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from jobs import cli

    started: list[SimulatorConfig] = []
    monkeypatch.setattr("jobs.simulator.serve", lambda config, host, port: started.append(config))
    runner = CliRunner()

    shown = runner.invoke(cli.main, ["simulator", "--help"]).output
    runner.invoke(cli.main, ["simulator", "--api-key", "k", "--endpoint", "a", "--endpoint", "b"])

    for flag in ("--endpoint", "--return-aggregate-stream", "--max-result-bytes", "--max-stream-chunk-bytes",
                 "--status-sync-mode"):
        assert flag in shown
    assert [config.endpoints for config in started] == [("a", "b")]


def test_without_endpoint_flags_the_simulator_knows_the_ids_in_runpod_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from jobs import cli

    started: list[SimulatorConfig] = []
    monkeypatch.setattr("jobs.simulator.serve", lambda config, host, port: started.append(config))
    monkeypatch.setenv("RUNPOD_ENDPOINTS", "tts=fh46rj7dq9r3o5, abc123 ,export = x9")

    CliRunner().invoke(cli.main, ["simulator", "--api-key", "k"])

    assert [config.endpoints for config in started] == [("fh46rj7dq9r3o5", "abc123", "x9")]


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
        {"status_sync_mode": "eventually"},
        {"max_result_bytes": 0},
        {"max_stream_chunk_bytes": 3},
        {"endpoints": ("a/b",)},
        {"endpoints": ("",)},
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
    with TestClient(create_app(SimulatorConfig(endpoints=("ep",)))) as c:
        assert c.get("/v2/ep/health", headers={"Authorization": "anything"}).status_code == 200
        assert c.get("/v2/ep/health").status_code == 401


def test_an_endpoint_setting_that_does_not_exist_or_has_the_wrong_type_is_400() -> None:
    with client() as c:
        unknown = c.post("/_sim/endpoints/ep", json={"gpu": "A100"})
        wrong = c.post("/_sim/endpoints/ep", json={"workers_max": "many"})
        no_such_pool = c.post("/_sim/endpoints/ep", json={"gpu_pool": "VOODOO_3"})
        fine = c.post("/_sim/endpoints/ep", json={"workers_max": 5, "cold_start_seconds": 0.5})

    assert unknown.status_code == wrong.status_code == no_such_pool.status_code == 400
    assert fine.json() == {
        "id": "ep",
        "workers_max": 5,
        "workers_min": 0,
        "cold_start_seconds": 0.5,
        "idle_timeout_seconds": 5.0,
        "return_aggregate_stream": False,
        "unhealthy": False,
        "throttled": False,
        "gpu_pool": "ADA_24",
        "gpu_count": 1,
        "execution_timeout_ms": 600000,
        "flashboot": False,
        "scaling_type": "QUEUE_DELAY",
        "scaling_value": 4.0,
    }


def test_posting_settings_for_a_new_endpoint_creates_it_with_the_defaults_plus_those_settings() -> None:
    with client(return_aggregate_stream=True, workers_max=7) as c:
        before = c.get("/_sim/endpoints/fresh")
        refused = c.post("/_sim/endpoints/fresh", json={"workers_min": -1})
        still_unknown = c.get("/v2/fresh/health", headers=AUTH)
        created = c.post("/_sim/endpoints/fresh", json={"cold_start_seconds": 0})
        listed = c.get("/_sim/endpoints").json()["endpoints"]
        health = c.get("/v2/fresh/health", headers=AUTH)

    assert (before.status_code, refused.status_code, still_unknown.status_code) == (404, 400, 404)
    assert created.json()["workers_max"] == 7 and created.json()["return_aggregate_stream"] is True
    assert [ep["id"] for ep in listed] == ["ep", "fresh"]
    assert health.status_code == 200 and health.json()["workers"]["idle"] == 7


def test_an_unknown_endpoint_is_404_before_it_can_use_up_a_rate_limit() -> None:
    with client() as c:
        answers = [c.post("/v2/nope/purge-queue", headers=AUTH).status_code for _ in range(3)]
        c.post("/_sim/endpoints/nope")
        purges = [c.post("/v2/nope/purge-queue", headers=AUTH).status_code for _ in range(3)]

    assert answers == [404, 404, 404] and purges == [200, 200, 429]


def test_a_job_record_says_how_big_a_dropped_result_was() -> None:
    with client(max_result_bytes=50, cold_start_seconds=0) as c:
        done = c.post("/v2/ep/runsync", json={"input": {"output": "x" * 100}}, headers=AUTH).json()
        (record,) = c.get("/_sim/jobs").json()["jobs"]

    assert done["status"] == "COMPLETED" and "output" not in done
    assert record["dropped_result_bytes"] == len('{"output": "' + "x" * 100 + '"}')


def test_advancing_the_clock_backwards_is_400() -> None:
    with client() as c:
        assert c.post("/_sim/clock/advance", json={"seconds": -1}).status_code == 400


# -- /_sim/stats and what /_sim/jobs says about status calls -----------------------------------------------


def test_stats_count_requests_per_endpoint_and_operation_with_their_answers() -> None:
    with client(rate_limit_scale=0.5, cold_start_seconds=0) as c:  # purge-queue: 1 per 10 s
        c.post("/_sim/endpoints/other")
        job_id = c.post("/v2/ep/run", json={"input": {}}, headers=AUTH).json()["id"]
        for _ in range(2):
            c.get(f"/v2/ep/status/{job_id}", headers=AUTH)
        c.get("/v2/ep/status/no-such-job", headers=AUTH)
        purges = [c.post("/v2/other/purge-queue", headers=AUTH).status_code for _ in range(3)]
        c.get("/v2/never-created/health", headers=AUTH)
        stats = c.get("/_sim/stats").json()
        other_only = c.get("/_sim/stats", params={"endpoint": "other"}).json()

    ep = stats["endpoints"]["ep"]
    assert purges == [200, 429, 429]
    assert (ep["run"]["requests"], ep["run"]["responses"]) == (1, {"200": 1})
    assert (ep["status"]["requests"], ep["status"]["responses"]) == (3, {"200": 2, "404": 1})
    assert stats["endpoints"]["other"]["purge-queue"]["responses"] == {"200": 1, "429": 2}
    assert sorted(stats["endpoints"]) == ["ep", "other"]  # an id that does not exist is not counted
    assert list(other_only["endpoints"]) == ["other"]


def test_stats_show_the_busiest_ten_seconds_and_the_requests_of_each_second() -> None:
    with client() as c:
        for _ in range(4):
            c.get("/v2/ep/health", headers=AUTH)
        health = c.get("/_sim/stats").json()["endpoints"]["ep"]["health"]

    assert health["peak_10s"] == 4
    assert sum(count for _second, count in health["per_second"]) == 4


def test_the_peak_is_the_most_requests_any_ten_second_window_held() -> None:
    stats = RequestStats()
    for moment in (0.0, 1.0, 2.0, 9.5, 10.5, 11.0, 11.5, 30.0):
        stats.arrived("ep", "status", 1_000_000 + moment)

    status = stats.report()["endpoints"]["ep"]["status"]

    # The 10 s before 11.5 hold 2.0 to 11.5, five requests; no 10 s hold six (0.0 left at 10.0, 1.0 at 11.0).
    assert status["peak_10s"] == 5 and status["peak_10s_at"] == 1_000_011.5
    assert status["per_second"] == [[1_000_000, 1], [1_000_001, 1], [1_000_002, 1], [1_000_009, 1],
                                    [1_000_010, 1], [1_000_011, 2], [1_000_030, 1]]


def test_per_second_counts_keep_the_last_hour_only() -> None:
    stats = RequestStats()
    stats.arrived("ep", "run", 1_000_000.0)
    stats.arrived("ep", "run", 1_000_000.0 + 3599)
    stats.arrived("ep", "run", 1_000_000.0 + 3600)

    run = stats.report()["endpoints"]["ep"]["run"]

    assert [second for second, _count in run["per_second"]] == [1_003_599, 1_003_600]
    assert run["requests"] == 3


def test_a_reset_starts_the_stats_afresh() -> None:
    with client() as c:
        c.get("/v2/ep/health", headers=AUTH)
        c.post("/_sim/reset")
        after = c.get("/_sim/stats").json()

    assert after["endpoints"] == {} and after["window_seconds"] == 10


def test_a_job_record_counts_the_status_calls_that_found_it() -> None:
    with client(cold_start_seconds=0) as c:
        job_id = c.post("/v2/ep/run", json={"input": {"sleep": 30}}, headers=AUTH).json()["id"]
        (unseen,) = c.get("/_sim/jobs").json()["jobs"]
        c.get(f"/v2/ep/status/{job_id}", headers=AUTH)
        c.get(f"/v2/ep/status-sync/{job_id}", params={"wait": 1000}, headers=AUTH)
        (seen,) = c.get("/_sim/jobs").json()["jobs"]

    assert (unseen["status_calls"], unseen["first_status_at"], unseen["last_status_at"]) == (0, None, None)
    assert seen["status_calls"] == 2
    assert seen["created_at"] <= seen["first_status_at"] <= seen["last_status_at"]


@pytest.mark.parametrize(("dynamic", "answers"), [(True, [200, 200, 200]), (False, [200, 429, 429])])
def test_running_workers_raise_the_limits_unless_dynamic_limits_are_off(dynamic: bool, answers: list[int]) -> None:
    # purge-queue at half scale: 1 per 10 s; one running worker raises it to 50 x 0.5 = 25.
    with client(rate_limit_scale=0.5, cold_start_seconds=0, dynamic_rate_limits=dynamic) as c:
        c.post("/v2/ep/run", json={"input": {"sleep": 60}}, headers=AUTH)
        assert c.get("/v2/ep/health", headers=AUTH).json()["workers"]["running"] == 1
        purges = [c.post("/v2/ep/purge-queue", headers=AUTH).status_code for _ in range(3)]

    assert purges == answers
