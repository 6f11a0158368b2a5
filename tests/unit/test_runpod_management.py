"""The management client against an injected transport, with bodies written from RunPod's v2 schemas:
parsing, error translation, retries by method, and secrecy of the key."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.errors import (
    ChangeOutcomeUnknown,
    RunOutcomeUnknown,
    RunPodAuthError,
    RunPodError,
    RunPodNotFound,
    RunPodProtocolError,
    RunPodRateLimited,
    RunPodRejected,
    RunPodTransient,
)
from jobs.flow.backoff import RetryPolicy
from jobs.runpod.client import RequestInvalid
from jobs.runpod.management import RunPodGraphQL, RunPodManagement, next_page, rate_limit_wait

API_KEY = "rpa_MGMTKEY_do_not_leak_9876543210"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "runpod_management"
Handler = Callable[[httpx.Request], httpx.Response]


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


class Recorder:
    """A MockTransport handler that answers from a script (the last answer repeats) and keeps every request."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer


def ok(body: object, status: int = 200, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"title": httpx.codes.get_reason_phrase(status), "status": status, "detail": detail}
    return httpx.Response(status, content=json.dumps(body).encode(),
                          headers={"Content-Type": "application/problem+json", **(headers or {})})


def rest(recorder: Recorder, sleeps: list[float] | None = None) -> RunPodManagement:
    return RunPodManagement(api_key=API_KEY, transport=httpx.MockTransport(recorder),
                            sleep=(sleeps.append if sleeps is not None else lambda _: None), rand=lambda: 0.0)


def graphql(recorder: Recorder, sleeps: list[float] | None = None) -> RunPodGraphQL:
    return RunPodGraphQL(api_key=API_KEY, transport=httpx.MockTransport(recorder),
                         sleep=(sleeps.append if sleeps is not None else lambda _: None), rand=lambda: 0.0)


# -- requests and parsing -------------------------------------------------------------------------


def test_get_endpoint_reads_the_documented_endpoint_into_a_config() -> None:
    recorder = Recorder(ok(fixture("endpoint.json")))

    endpoint = rest(recorder).get_endpoint("ep7q2kz9abcd")

    request = recorder.requests[0]
    assert (request.method, str(request.url)) == ("GET", "https://api.runpod.io/v2/serverless/ep7q2kz9abcd")
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert "api_key" not in str(request.url)
    assert (endpoint.id, endpoint.name, endpoint.type) == ("ep7q2kz9abcd", "sdxl-prod", "QUEUE")
    assert (endpoint.workers_min, endpoint.workers_max, endpoint.idle_timeout) == (0, 3, 5)
    assert (endpoint.scaling_type, endpoint.scaling_value) == ("QUEUE_DELAY", 4.0)
    assert (endpoint.gpu_pools, endpoint.gpu_count) == (("ADA_24", "AMPERE_24"), 1)
    assert (endpoint.timeout_ms, endpoint.flashboot) == (600_000, True)
    assert endpoint.raw["env"] == {"MODEL": "sdxl-base-1.0"}
    assert "env" not in repr(endpoint)


def test_list_endpoints_reads_gpu_and_cpu_endpoints_from_the_wrapped_list() -> None:
    recorder = Recorder(ok(fixture("endpoints.json")))

    gpu, cpu = rest(recorder).list_endpoints()

    assert recorder.requests[0].url.path == "/v2/serverless"
    assert (gpu.id, gpu.gpu_pools, gpu.idle_timeout) == ("ep7q2kz9abcd", ("ADA_24",), 5)
    # A REQUEST_COUNT endpoint has no idle timeout, and a CPU endpoint no GPU pools.
    assert (cpu.scaling_type, cpu.scaling_value, cpu.idle_timeout) == ("REQUEST_COUNT", 10.0, None)
    assert (cpu.gpu_pools, cpu.gpu_count, cpu.workers_min, cpu.workers_max) == ((), None, 1, 5)


def test_list_endpoints_follows_a_next_cursor_until_none_is_named() -> None:
    first, second = fixture("endpoints.json")["endpoints"]
    recorder = Recorder(ok({"endpoints": [first], "pagination": {"nextCursor": "c2"}}),
                        ok({"endpoints": [second], "pagination": {"nextCursor": None}}))

    endpoints = rest(recorder).list_endpoints()

    assert [e.id for e in endpoints] == ["ep7q2kz9abcd", "epcpu0000xyz"]
    assert [dict(r.url.params) for r in recorder.requests] == [{}, {"cursor": "c2"}]


def test_list_pods_follows_page_numbers_too() -> None:
    running, exited = fixture("pods.json")["pods"]
    recorder = Recorder(ok({"pods": [running], "page": 1, "totalPages": 2}),
                        ok({"pods": [exited], "page": 2, "totalPages": 2}))

    pods = rest(recorder).list_pods()

    assert [p.id for p in pods] == ["pod-abc123", "pod-def456"]
    assert [dict(r.url.params) for r in recorder.requests] == [{}, {"page": "2"}]


def test_a_list_that_keeps_naming_the_same_next_page_is_a_protocol_error_not_a_loop() -> None:
    recorder = Recorder(ok({"endpoints": [], "nextCursor": "again"}))

    with pytest.raises(RunPodProtocolError, match="same next page"):
        rest(recorder).list_endpoints()

    assert len(recorder.requests) == 2


def test_a_body_without_pagination_is_the_whole_list() -> None:
    assert next_page(fixture("endpoints.json")) is None
    assert next_page({"pods": [], "page": 3, "totalPages": 3}) is None
    assert next_page({"pods": [], "meta": {"page": 1, "hasMore": True}}) == {"page": "2"}


def test_update_workers_patches_min_and_max_together_and_returns_the_endpoint() -> None:
    updated = {**fixture("endpoint.json"), "workers": {"min": 1, "max": 5, "idleTimeout": 60}}
    recorder = Recorder(ok(updated))

    endpoint = rest(recorder).update_workers("ep7q2kz9abcd", min=1, max=5, idle_timeout=60)

    request = recorder.requests[0]
    assert (request.method, request.url.path) == ("PATCH", "/v2/serverless/ep7q2kz9abcd")
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"workers": {"min": 1, "max": 5, "idleTimeout": 60}}
    assert (endpoint.workers_min, endpoint.workers_max, endpoint.idle_timeout) == (1, 5, 60)


def test_update_workers_without_an_idle_timeout_leaves_it_out_of_the_body() -> None:
    recorder = Recorder(ok(fixture("endpoint.json")))

    rest(recorder).update_workers("ep7q2kz9abcd", min=0, max=0)

    assert json.loads(recorder.requests[0].content) == {"workers": {"min": 0, "max": 0}}


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"min": -1, "max": 2}, "min"), ({"min": 0, "max": True}, "max"), ({"min": 3, "max": 2}, "min"),
    ({"min": 0, "max": 2, "idle_timeout": 0}, "idle_timeout"),
    ({"min": 0, "max": 2, "idle_timeout": 3601}, "idle_timeout"),
])
def test_update_workers_refuses_bounds_runpod_would_refuse_without_sending(kwargs: dict[str, Any],
                                                                           field: str) -> None:
    recorder = Recorder(ok(fixture("endpoint.json")))

    with pytest.raises(RequestInvalid) as caught:
        rest(recorder).update_workers("ep7q2kz9abcd", **kwargs)

    assert [p.field for p in caught.value.problems] == [field]
    assert recorder.requests == []


def test_an_id_that_would_change_the_path_is_refused_without_sending() -> None:
    recorder = Recorder(ok({}))

    with pytest.raises(RequestInvalid):
        rest(recorder).get_endpoint("../pods")

    assert recorder.requests == []


def test_list_workers_reads_each_worker_and_runpods_summary() -> None:
    recorder = Recorder(ok(fixture("workers.json")))

    view = rest(recorder).list_workers("ep7q2kz9abcd")

    assert recorder.requests[0].url.path == "/v2/serverless/ep7q2kz9abcd/workers"
    running, starting = view.workers
    assert (running.id, running.status, running.is_stale, running.version) == ("wk-1a2b3c", "RUNNING", False, 4)
    assert running.started_at == datetime(2026, 8, 20, 9, 55, 1, tzinfo=UTC)
    assert (running.gpu_type_id, running.data_center_id, running.uptime_seconds) == (
        "NVIDIA GeForce RTX 4090", "EU-RO-1", 312)
    assert (starting.status, starting.is_stale, starting.started_at) == ("INITIALIZING", True, None)
    assert (view.summary.running, view.summary.initializing, view.summary.total) == (1, 1, 2)
    assert view.endpoint_version == 4


def test_gpu_catalog_reads_serverless_price_per_gpu_hour_and_pool() -> None:
    recorder = Recorder(ok(fixture("gpus.json")))

    rtx, h100 = rest(recorder).gpu_catalog()

    assert recorder.requests[0].url.path == "/v2/catalog/gpus"
    assert (rtx.id, rtx.pool, rtx.memory_gb, rtx.serverless_price) == ("NVIDIA GeForce RTX 4090", "ADA_24", 24, 1.1)
    assert (rtx.secure_price, rtx.community_price) == (0.69, 0.34)
    assert (h100.pool, h100.serverless_price, h100.community_price) == (None, None, None)


def test_serverless_billing_sends_rfc3339_times_in_utc_and_reads_each_record() -> None:
    recorder = Recorder(ok(fixture("billing_serverless.json")))
    cest = timezone(timedelta(hours=2))

    records = rest(recorder).serverless_billing(
        "ep7q2kz9abcd", start=datetime(2026, 8, 20, 10, 0, tzinfo=cest), end=datetime(2026, 8, 20, 10, 0, tzinfo=UTC))

    request = recorder.requests[0]
    assert request.url.path == "/v2/billing/serverless"
    assert dict(request.url.params) == {"serverlessId": "ep7q2kz9abcd", "startTime": "2026-08-20T08:00:00Z",
                                        "endTime": "2026-08-20T10:00:00Z", "bucketSize": "hour"}
    first, second = records
    assert (first.start, first.end) == (datetime(2026, 8, 20, 8, tzinfo=UTC), datetime(2026, 8, 20, 9, tzinfo=UTC))
    assert (first.endpoint_id, first.total_amount, first.gpu_amount, first.fee_amount) == (
        "ep7q2kz9abcd", 0.4213, 0.3901, 0.03)
    assert second.total_amount == 0.0


def test_serverless_billing_for_every_endpoint_sends_only_the_bucket() -> None:
    recorder = Recorder(ok({"records": [], "metadata": {"recordCount": 0}}))

    assert rest(recorder).serverless_billing(bucket="day") == []
    assert dict(recorder.requests[0].url.params) == {"bucketSize": "day"}


@pytest.mark.parametrize("kwargs", [
    {"bucket": "minute"}, {"start": datetime(2026, 8, 20)},
    {"start": datetime(2026, 8, 20, tzinfo=UTC), "end": datetime(2026, 8, 19, tzinfo=UTC)},
])
def test_serverless_billing_refuses_what_runpod_cannot_read_without_sending(kwargs: dict[str, Any]) -> None:
    recorder = Recorder(ok({"records": []}))

    with pytest.raises(RequestInvalid):
        rest(recorder).serverless_billing(**kwargs)

    assert recorder.requests == []


def test_list_pods_reads_cost_per_hour_and_status() -> None:
    recorder = Recorder(ok(fixture("pods.json")))

    running, exited = rest(recorder).list_pods()

    assert recorder.requests[0].url.path == "/v2/pods"
    assert (running.id, running.status, running.cost_per_hour, running.gpu_count) == ("pod-abc123", "RUNNING", 0.69, 1)
    assert (exited.status, exited.cost_per_hour, exited.gpu_count) == ("EXITED", 0.0, None)


def test_fields_runpod_adds_later_are_tolerated_and_kept_in_raw() -> None:
    body = {**fixture("endpoint.json"), "brandNewField": {"x": 1}}
    body["workers"] = {**body["workers"], "standby": 2}
    recorder = Recorder(ok(body))

    endpoint = rest(recorder).get_endpoint("ep7q2kz9abcd")

    assert endpoint.workers_max == 3
    assert endpoint.raw["brandNewField"] == {"x": 1}


@pytest.mark.parametrize(("drop", "named"), [
    (("id",), "endpoint.id"), (("workers", "max"), "endpoint.workers.max"), (("workers",), "endpoint.workers"),
])
def test_a_missing_required_field_is_a_protocol_error_that_names_it(drop: tuple[str, ...], named: str) -> None:
    body = fixture("endpoint.json")
    holder = body
    for key in drop[:-1]:
        holder = holder[key]
    del holder[drop[-1]]

    with pytest.raises(RunPodProtocolError, match=f"{named} is missing"):
        rest(Recorder(ok(body))).get_endpoint("ep7q2kz9abcd")


def test_a_missing_field_inside_a_list_item_names_the_item() -> None:
    body = fixture("workers.json")
    del body["workers"][1]["status"]

    with pytest.raises(RunPodProtocolError, match=r"workers view\.workers\[1\]\.status is missing"):
        rest(Recorder(ok(body))).list_workers("ep7q2kz9abcd")


def test_a_field_of_the_wrong_type_is_a_protocol_error() -> None:
    body = {**fixture("endpoint.json"), "workers": {"min": "zero", "max": 3}}

    with pytest.raises(RunPodProtocolError, match=r"endpoint\.workers\.min must be a whole number"):
        rest(Recorder(ok(body))).get_endpoint("ep7q2kz9abcd")


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "error_type", "says"), [
    (400, RunPodRejected, "request body failed validation"),
    (401, RunPodAuthError, "the API key was refused"),
    (403, RunPodAuthError, "valid but has no access"),
    (404, RunPodNotFound, "HTTP 404"),
    (402, RunPodRejected, "insufficient balance"),
    (422, RunPodRejected, "request body failed validation"),
])
def test_problem_bodies_are_translated_and_not_retried(status: int, error_type: type[Exception], says: str) -> None:
    recorder = Recorder(problem(status, "request body failed validation"))

    with pytest.raises(error_type, match=says) as caught:
        rest(recorder).get_endpoint("ep7q2kz9abcd")

    assert len(recorder.requests) == 1
    assert getattr(caught.value, "status_code", None) == status


def test_a_403_says_a_restricted_key_may_lack_management_scope() -> None:
    with pytest.raises(RunPodAuthError, match="Restricted key that runs jobs may lack management scope"):
        rest(Recorder(problem(403, "forbidden"))).list_endpoints()


def test_a_problems_errors_list_is_in_the_message() -> None:
    recorder = Recorder(httpx.Response(400, json=fixture("problem_400.json")))

    with pytest.raises(RunPodRejected, match=r"failed validation: body\.workers\.idleTimeout: must be at most 3600"):
        rest(recorder).update_workers("ep7q2kz9abcd", min=0, max=1, idle_timeout=3600)


def test_a_v1_style_message_body_is_read_too() -> None:
    with pytest.raises(RunPodNotFound, match="endpoint not found"):
        rest(Recorder(ok({"message": "endpoint not found"}, status=404))).get_endpoint("ep7q2kz9abcd")


def test_a_2xx_body_that_is_not_json_is_a_protocol_error() -> None:
    with pytest.raises(RunPodProtocolError, match="not JSON"):
        rest(Recorder(httpx.Response(200, content=b"<html>"))).get_endpoint("ep7q2kz9abcd")


# -- retries by method -----------------------------------------------------------------------------


def test_a_get_is_retried_after_5xx_and_connection_errors() -> None:
    recorder = Recorder(problem(503, "down"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("dropped"),
                        ok(fixture("endpoint.json")))
    sleeps: list[float] = []

    assert rest(recorder, sleeps).get_endpoint("ep7q2kz9abcd").id == "ep7q2kz9abcd"

    assert len(recorder.requests) == 4
    assert sleeps == [0.25, 0.5, 1.0]


def test_a_get_gives_up_after_the_policys_attempts_with_a_transient_error() -> None:
    recorder = Recorder(problem(502, "bad gateway"))

    with pytest.raises(RunPodTransient, match="HTTP 502: bad gateway"):
        rest(recorder).list_pods()

    assert len(recorder.requests) == RetryPolicy().max_attempts


def test_a_429_is_retried_for_a_patch_after_retry_after() -> None:
    recorder = Recorder(problem(429, "minute window exceeded", {"Retry-After": "3"}), ok(fixture("endpoint.json")))
    sleeps: list[float] = []

    rest(recorder, sleeps).update_workers("ep7q2kz9abcd", min=0, max=3)

    assert [r.method for r in recorder.requests] == ["PATCH", "PATCH"]
    assert sleeps == [3.0]


def test_a_5xx_on_a_patch_is_not_repeated_and_tells_the_caller_to_read_back() -> None:
    recorder = Recorder(problem(500, "internal"), ok(fixture("endpoint.json")))

    with pytest.raises(ChangeOutcomeUnknown, match="read the resource back") as caught:
        rest(recorder).update_workers("ep7q2kz9abcd", min=0, max=3)

    assert isinstance(caught.value, RunOutcomeUnknown)
    assert len(recorder.requests) == 1


def test_a_patch_whose_answer_was_lost_is_not_repeated() -> None:
    recorder = Recorder(httpx.ReadTimeout("slow"), ok(fixture("endpoint.json")))

    with pytest.raises(ChangeOutcomeUnknown):
        rest(recorder).update_workers("ep7q2kz9abcd", min=0, max=3)

    assert len(recorder.requests) == 1


def test_a_patch_that_never_connected_is_sent_again() -> None:
    recorder = Recorder(httpx.ConnectError("refused"), ok(fixture("endpoint.json")))

    rest(recorder).update_workers("ep7q2kz9abcd", min=0, max=3)

    assert len(recorder.requests) == 2


def test_a_retry_after_longer_than_the_policy_allows_is_not_waited_out() -> None:
    recorder = Recorder(problem(429, "day window exceeded", {"Retry-After": "3600"}))

    with pytest.raises(RunPodRateLimited) as caught:
        rest(recorder).list_endpoints()

    assert caught.value.retry_after == 3600.0
    assert len(recorder.requests) == 1


def test_an_exhausted_ratelimit_window_lengthens_the_wait_past_retry_after() -> None:
    recorder = Recorder(
        problem(429, "minute", {"Retry-After": "2", "RateLimit": '"minute";r=0;t=7, "hour";r=2900;t=1800'}),
        ok(fixture("gpus.json")))
    sleeps: list[float] = []

    rest(recorder, sleeps).gpu_catalog()

    assert sleeps == [7.0]


@pytest.mark.parametrize(("headers", "wait"), [
    ({}, None),
    ({"Retry-After": "4"}, 4.0),
    ({"RateLimit": '"minute";r=0;t=9'}, 9.0),
    ({"RateLimit": '"minute";r=5;t=9'}, None),
    ({"RateLimit": '"minute";r=0;t=9, "day";r=0;t=600', "Retry-After": "9"}, 600.0),
    ({"RateLimit": "limit=60, remaining=0, reset=12"}, 12.0),
    ({"RateLimit-Remaining": "0", "RateLimit-Reset": "5", "Retry-After": "1"}, 5.0),
])
def test_rate_limit_wait_takes_the_longest_of_what_runpod_says(headers: dict[str, str], wait: float | None) -> None:
    assert rate_limit_wait(httpx.Headers(headers)) == wait


# -- GraphQL ---------------------------------------------------------------------------------------


def test_account_reads_balance_spend_rate_and_limit_with_a_bearer_header() -> None:
    recorder = Recorder(ok(fixture("graphql_myself.json")))

    account = graphql(recorder).account()

    request = recorder.requests[0]
    assert (request.method, str(request.url)) == ("POST", "https://api.runpod.io/graphql")
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert "api_key" not in str(request.url)
    assert json.loads(request.content) == {"query": "query { myself { clientBalance currentSpendPerHr spendLimit } }"}
    assert (account.balance, account.spend_per_hour, account.spend_limit) == (123.45, 0.82, 80.0)


@pytest.mark.parametrize(("body", "error_type"), [
    ({"errors": [{"message": "Unauthorized request, please check your API key"}], "data": None}, RunPodAuthError),
    ({"errors": [{"message": "nope", "extensions": {"code": "FORBIDDEN"}}]}, RunPodAuthError),
    ({"errors": [{"message": "no such thing", "extensions": {"code": "NOT_FOUND"}}]}, RunPodNotFound),
    ({"errors": [{"message": "Syntax Error: Unexpected Name"}]}, RunPodRejected),
    ({"data": {"myself": None}}, RunPodNotFound),
    ({"data": None}, RunPodNotFound),
])
def test_graphql_errors_with_http_200_and_null_data_become_the_same_errors(body: object,
                                                                          error_type: type[Exception]) -> None:
    recorder = Recorder(ok(body))

    with pytest.raises(error_type):
        graphql(recorder).account()

    assert len(recorder.requests) == 1


def test_a_graphql_internal_error_is_retried_like_a_read() -> None:
    recorder = Recorder(ok({"errors": [{"message": "boom", "extensions": {"code": "INTERNAL_SERVER_ERROR"}}]}),
                        ok(fixture("graphql_myself.json")))

    assert graphql(recorder).account().balance == 123.45
    assert len(recorder.requests) == 2


def test_graphql_http_errors_go_through_the_same_translation() -> None:
    with pytest.raises(RunPodAuthError, match="HTTP 401"):
        graphql(Recorder(ok({"errors": [{"message": "bad key"}]}, status=401))).account()


def test_a_missing_account_field_names_it() -> None:
    with pytest.raises(RunPodProtocolError, match=r"myself\.clientBalance is missing"):
        graphql(Recorder(ok({"data": {"myself": {"currentSpendPerHr": 0}}}))).account()


# -- secrecy ---------------------------------------------------------------------------------------


def test_the_api_key_appears_in_no_error_log_line_or_repr(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echoing = Recorder(lambda request: problem(400, f"bad header {request.headers['Authorization']}"))
    errors: list[RunPodError] = []
    client, gql = rest(Recorder(problem(503, "down"))), graphql(
        Recorder(lambda request: ok({"errors": [{"message": f"key {request.headers['Authorization']} refused"}]})))
    for call in (client.list_endpoints, lambda: rest(echoing).get_endpoint("ep1"), gql.account,
                 lambda: rest(Recorder(httpx.ReadTimeout("slow"))).update_workers("ep1", min=0, max=1)):
        with pytest.raises(RunPodError) as caught:
            call()
        errors.append(caught.value)

    texts = [str(e) for e in errors] + [repr(e) for e in errors] + [repr(client), repr(gql), caplog.text]
    for text in texts:
        assert API_KEY not in text
    assert "**********" in str(errors[1])


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        RunPodManagement(api_key="")
