"""The RunPod client against an injected transport: shapes, errors, retries and secrecy."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import httpx
import pytest

from jobs.errors import (
    PayloadTooLarge,
    RunOutcomeUnknown,
    RunPodAuthError,
    RunPodNotFound,
    RunPodProtocolError,
    RunPodRateLimited,
    RunPodRejected,
    RunPodTransient,
    StreamReadUnknown,
)
from jobs.flow.backoff import RetryPolicy
from jobs.runpod.client import (
    MAX_RUN_PAYLOAD_BYTES,
    EndpointHealth,
    RequestInvalid,
    RunPodClient,
    RunPodStatus,
    describe_error,
)

API_KEY = "rpa_TESTKEY_do_not_leak_0123456789"
Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that answers from a script and remembers every request."""

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


def make_client(recorder: Recorder, sleeps: list[float] | None = None, **kwargs: object) -> RunPodClient:
    return RunPodClient(
        api_key=API_KEY,
        base_url="https://api.runpod.ai/v2",
        transport=httpx.MockTransport(recorder),
        sleep=(sleeps.append if sleeps is not None else lambda _: None),
        rand=lambda: 0.0,
        **kwargs,  # type: ignore[arg-type]
    )


def ok(body: object, status: int = 200, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


# -- requests as RunPod documents them --------------------------------------------------------------


def test_run_posts_input_with_webhook_policy_and_s3_config_beside_it() -> None:
    recorder = Recorder(ok({"id": "job-1-u1", "status": "IN_QUEUE"}))
    client = make_client(recorder)

    job = client.run(
        "ep123abc", {"prompt": "héllo"},
        webhook="https://example.com/hook",
        policy={"executionTimeout": 900_000, "ttl": 3_600_000, "lowPriority": True},
        s3_config={"accessId": "a", "accessSecret": "b", "bucketName": "c", "endpointUrl": "https://s3"},
    )

    request = recorder.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "https://api.runpod.ai/v2/ep123abc/run"
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {
        "input": {"prompt": "héllo"},
        "webhook": "https://example.com/hook",
        "policy": {"executionTimeout": 900_000, "ttl": 3_600_000, "lowPriority": True},
        "s3Config": {"accessId": "a", "accessSecret": "b", "bucketName": "c", "endpointUrl": "https://s3"},
    }
    assert (job.id, job.status) == ("job-1-u1", RunPodStatus.IN_QUEUE)


def test_every_operation_uses_runpods_method_and_path() -> None:
    job = {"id": "j1", "status": "IN_PROGRESS"}
    recorder = Recorder(lambda request: {
        "/v2/ep1abc/runsync": ok({"id": "sync-1", "status": "COMPLETED", "output": 1}),
        "/v2/ep1abc/status/j1": ok(job),
        "/v2/ep1abc/stream/j1": ok({"status": "IN_PROGRESS", "stream": [{"output": "a"}, {"output": "b"}]}),
        "/v2/ep1abc/cancel/j1": ok({"id": "j1", "status": "CANCELLED"}),
        "/v2/ep1abc/retry/j1": ok({"id": "j1", "status": "IN_QUEUE"}),
        "/v2/ep1abc/purge-queue": ok({"removed": 2, "status": "completed"}),
        "/v2/ep1abc/health": ok({"jobs": {"inQueue": 2}, "workers": {"idle": 1}}),
    }[request.url.path])
    client = make_client(recorder)

    assert client.runsync("ep1abc", {"x": 1}, wait_ms=5000).output == 1
    assert client.status("ep1abc", "j1").status is RunPodStatus.IN_PROGRESS
    assert client.stream("ep1abc", "j1").chunks == ["a", "b"]
    assert client.cancel("ep1abc", "j1").status is RunPodStatus.CANCELLED
    assert client.retry("ep1abc", "j1").status is RunPodStatus.IN_QUEUE
    assert client.purge_queue("ep1abc") == 2
    health = client.health("ep1abc")

    assert [(r.method, r.url.path) for r in recorder.requests] == [
        ("POST", "/v2/ep1abc/runsync"), ("GET", "/v2/ep1abc/status/j1"), ("GET", "/v2/ep1abc/stream/j1"),
        ("POST", "/v2/ep1abc/cancel/j1"), ("POST", "/v2/ep1abc/retry/j1"), ("POST", "/v2/ep1abc/purge-queue"),
        ("GET", "/v2/ep1abc/health"),
    ]
    assert recorder.requests[0].url.params["wait"] == "5000"
    assert (health.jobs.in_queue, health.workers.idle, health.workers.unhealthy) == (2, 1, 0)


def test_runsync_reads_for_longer_than_runpod_waits() -> None:
    recorder = Recorder(ok({"id": "sync-1", "status": "IN_QUEUE"}))
    client = make_client(recorder)

    client.runsync("ep1abc", {}, wait_ms=120_000)

    assert recorder.requests[0].extensions["timeout"]["read"] >= 120


def test_a_job_object_is_read_into_typed_fields() -> None:
    recorder = Recorder(ok({"id": "j1", "status": "COMPLETED", "output": {"url": "s3://x"}, "delayTime": 824,
                            "executionTime": 3391, "workerId": "w-1"}))

    job = make_client(recorder).status("ep1abc", "j1")

    assert job.is_terminal and job.has_output
    assert (job.output, job.delay_time_ms, job.execution_time_ms) == ({"url": "s3://x"}, 824, 3391)
    assert job.worker_id == "w-1"


@pytest.mark.parametrize("status", ["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"])
def test_each_of_runpods_six_statuses_is_understood(status: str) -> None:
    job = make_client(Recorder(ok({"id": "j1", "status": status}))).status("ep1abc", "j1")

    assert job.status.value == status
    assert job.is_terminal == (status not in ("IN_QUEUE", "IN_PROGRESS"))


def test_running_from_the_job_states_page_reads_as_in_progress() -> None:
    assert RunPodStatus.parse("RUNNING") is RunPodStatus.IN_PROGRESS


@pytest.mark.parametrize("status", ["PAUSED", "completed", None, 3])
def test_an_unknown_status_is_an_error_never_a_guess(status: object) -> None:
    with pytest.raises(RunPodProtocolError, match="unknown RunPod job status"):
        make_client(Recorder(ok({"id": "j1", "status": status}))).status("ep1abc", "j1")


def test_health_reads_every_counter_and_defaults_missing_ones_to_zero() -> None:
    full = EndpointHealth.from_json({
        "jobs": {"completed": 1, "failed": 5, "inProgress": 3, "inQueue": 2, "retried": 4},
        "workers": {"idle": 1, "initializing": 2, "ready": 3, "running": 4, "throttled": 5, "unhealthy": 6},
    })
    sparse = EndpointHealth.from_json({"jobs": {"inQueue": 2}, "workers": {"idle": 0, "running": 0}})

    assert (full.jobs.completed, full.jobs.failed, full.jobs.in_progress, full.jobs.retried) == (1, 5, 3, 4)
    workers = full.workers
    assert (workers.initializing, workers.ready, workers.throttled, workers.unhealthy) == (2, 3, 5, 6)
    assert sparse.jobs.completed == 0 and sparse.workers.unhealthy == 0
    assert EndpointHealth.from_json({}).jobs.in_queue == 0


def test_a_health_counter_that_is_not_a_number_is_a_protocol_error() -> None:
    with pytest.raises(RunPodProtocolError):
        EndpointHealth.from_json({"jobs": {"inQueue": "two"}})


# -- errors, split by what the caller does --------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, RunPodRejected), (401, RunPodAuthError), (403, RunPodAuthError), (404, RunPodNotFound),
     (413, RunPodRejected), (422, RunPodRejected)],
)
def test_client_errors_are_translated_and_not_retried(status: int, error_type: type[Exception]) -> None:
    recorder = Recorder(ok({"error": "nope"}, status=status))

    with pytest.raises(error_type, match=f"HTTP {status}: nope") as caught:
        make_client(recorder).status("ep1abc", "j1")

    assert len(recorder.requests) == 1
    assert getattr(caught.value, "status_code", None) == status


def test_an_error_body_that_is_not_json_is_quoted_as_text() -> None:
    recorder = Recorder(httpx.Response(404, text="404 page not found"))

    with pytest.raises(RunPodNotFound, match="404 page not found"):
        make_client(recorder).status("ep1abc", "j1")


def test_a_status_call_retries_5xx_and_timeouts_with_backoff_then_succeeds() -> None:
    sleeps: list[float] = []
    recorder = Recorder(
        ok({"error": "boom"}, status=503),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("dropped"),
        ok({"id": "j1", "status": "COMPLETED"}),
    )

    job = make_client(recorder, sleeps, retry=RetryPolicy(max_attempts=4, base_delay=1, max_delay=30)).status(
        "ep1abc", "j1")

    assert job.status is RunPodStatus.COMPLETED
    assert sleeps == [0.5, 1.0, 2.0]  # equal jitter with rand=0: half of 1, 2, 4


def test_a_status_call_gives_up_as_transient_when_attempts_run_out() -> None:
    recorder = Recorder(ok({"error": "down"}, status=502))

    with pytest.raises(RunPodTransient, match="HTTP 502"):
        make_client(recorder, retry=RetryPolicy(max_attempts=3)).status("ep1abc", "j1")

    assert len(recorder.requests) == 3


def test_a_429_honours_retry_after() -> None:
    sleeps: list[float] = []
    recorder = Recorder(ok({"error": "slow down"}, status=429, headers={"Retry-After": "4"}),
                        ok({"id": "j1", "status": "IN_QUEUE"}))

    make_client(recorder, sleeps).status("ep1abc", "j1")

    assert sleeps == [4.0]


def test_a_429_with_a_retry_after_too_long_to_wait_is_raised_for_the_caller_to_schedule() -> None:
    recorder = Recorder(ok({"error": "slow down"}, status=429, headers={"Retry-After": "300"}))

    with pytest.raises(RunPodRateLimited) as caught:
        make_client(recorder).status("ep1abc", "j1")

    assert caught.value.retry_after == 300.0
    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    "failure",
    [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("dropped"), httpx.WriteTimeout("stuck"),
     ok({"error": "oops"}, status=500), ok({"error": "bad gateway"}, status=502)],
)
def test_a_run_whose_outcome_is_unknown_is_never_resent(failure: httpx.Response | Exception) -> None:
    recorder = Recorder(failure, ok({"id": "second", "status": "IN_QUEUE"}))

    with pytest.raises(RunOutcomeUnknown, match="a job may exist"):
        make_client(recorder).run("ep1abc", {"prompt": "x"})

    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError("refused"), httpx.ConnectTimeout("no route"),
     ok({"error": "slow down"}, status=429)],
)
def test_a_run_that_provably_did_not_reach_runpod_is_retried(failure: httpx.Response | Exception) -> None:
    recorder = Recorder(failure, ok({"id": "j1", "status": "IN_QUEUE"}))

    job = make_client(recorder).run("ep1abc", {"prompt": "x"})

    assert job.id == "j1"
    assert len(recorder.requests) == 2


def test_a_retry_call_that_times_out_is_not_repeated_blindly() -> None:
    recorder = Recorder(httpx.ReadTimeout("slow"), ok({"id": "j1", "status": "IN_QUEUE"}))

    with pytest.raises(RunPodTransient) as caught:
        make_client(recorder).retry("ep1abc", "j1")

    assert not isinstance(caught.value, RunOutcomeUnknown)
    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    "failure",
    [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("dropped"), ok({"error": "oops"}, status=503),
     httpx.Response(200, text='{"status": "IN_PROGRESS", "stream": [{"output": "a"}')],
)
def test_a_stream_read_whose_answer_was_lost_is_never_repeated(failure: httpx.Response | Exception) -> None:
    # RunPod hands each chunk out once: a second read would silently skip what the lost one took.
    recorder = Recorder(failure, ok({"status": "IN_PROGRESS", "stream": [{"output": "later"}]}))

    with pytest.raises(StreamReadUnknown, match="may be missing"):
        make_client(recorder).stream("ep1abc", "j1")

    assert len(recorder.requests) == 1


@pytest.mark.parametrize("failure", [httpx.ConnectError("refused"), ok({"error": "slow down"}, status=429)])
def test_a_stream_read_that_provably_took_nothing_is_retried(failure: httpx.Response | Exception) -> None:
    recorder = Recorder(failure, ok({"status": "IN_PROGRESS", "stream": [{"output": "a"}]}))

    assert make_client(recorder).stream("ep1abc", "j1").chunks == ["a"]
    assert len(recorder.requests) == 2


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_run_stops_retrying_when_its_budget_is_spent() -> None:
    clock = FakeClock()
    recorder = Recorder(httpx.ConnectError("refused"))
    client = RunPodClient(api_key=API_KEY, transport=httpx.MockTransport(recorder), sleep=clock.sleep,
                          clock=clock, rand=lambda: 1.0, retry=RetryPolicy(max_attempts=50, base_delay=1.0,
                                                                           max_delay=8.0))

    with pytest.raises(RunPodTransient):
        client.run("ep1abc", {"prompt": "x"}, budget_seconds=10.0)

    assert clock.now < 10.0  # never slept into a retry that could not start within the budget
    assert 1 < len(recorder.requests) < 50


def test_each_run_attempt_gets_only_what_is_left_of_the_budget() -> None:
    clock = FakeClock()
    seen: list[dict[str, float]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        clock.now += 7.0  # the refused connection took a while
        raise httpx.ConnectError("refused")

    client = RunPodClient(api_key=API_KEY, transport=httpx.MockTransport(answer), sleep=clock.sleep, clock=clock,
                          rand=lambda: 0.0, timeout=httpx.Timeout(30.0, connect=5.0),
                          retry=RetryPolicy(max_attempts=4, base_delay=0.5, max_delay=1.0))

    with pytest.raises(RunPodTransient):
        client.run("ep1abc", {"prompt": "x"}, budget_seconds=10.0)

    assert seen[0]["read"] == 10.0 and seen[0]["connect"] == 5.0
    assert seen[1]["read"] == pytest.approx(10.0 - 7.0 - 0.25)


def test_a_2xx_that_is_not_json_is_a_protocol_error() -> None:
    with pytest.raises(RunPodProtocolError, match="not JSON"):
        make_client(Recorder(httpx.Response(200, text="<html>"))).status("ep1abc", "j1")


# -- bad input changes nothing -----------------------------------------------------------------------


def test_an_oversized_payload_is_refused_before_any_request() -> None:
    recorder = Recorder(ok({"id": "j1", "status": "IN_QUEUE"}))

    with pytest.raises(PayloadTooLarge, match="at most 10,000,000"):
        make_client(recorder).run("ep1abc", {"blob": "x" * MAX_RUN_PAYLOAD_BYTES})

    assert recorder.requests == []


def test_runsync_accepts_twice_the_payload_of_run() -> None:
    recorder = Recorder(ok({"id": "sync-1", "status": "COMPLETED"}))

    make_client(recorder).runsync("ep1abc", {"blob": "x" * (MAX_RUN_PAYLOAD_BYTES + 10)})

    assert len(recorder.requests) == 1


def test_input_that_is_not_json_is_refused_before_any_request() -> None:
    recorder = Recorder(ok({"id": "j1", "status": "IN_QUEUE"}))

    for bad in ({"when": object()}, {"x": float("nan")}, {1, 2}):
        with pytest.raises(RequestInvalid, match="not JSON-serialisable"):
            make_client(recorder).run("ep1abc", bad)

    assert recorder.requests == []


def test_every_policy_problem_is_reported_at_once() -> None:
    recorder = Recorder(ok({"id": "j1", "status": "IN_QUEUE"}))

    with pytest.raises(RequestInvalid) as caught:
        make_client(recorder).run("ep1abc", {}, webhook="ftp://x",
                                  policy={"ttl": 5_000, "executionTimeout": "10m", "lowPriority": 1, "speed": 3})

    assert len(caught.value.problems) == 5
    assert recorder.requests == []


def test_wait_outside_runpods_range_is_refused_before_any_request() -> None:
    recorder = Recorder(ok({}))

    with pytest.raises(RequestInvalid, match="between 1000 and 300000"):
        make_client(recorder).runsync("ep1abc", {}, wait_ms=500)

    assert recorder.requests == []


def test_a_body_nested_past_pythons_stack_is_a_protocol_error_not_a_crash() -> None:
    body = '{"id": "j1", "status": "COMPLETED", "output": ' + "[" * 100_000 + "]" * 100_000 + "}"

    with pytest.raises(RunPodProtocolError):
        make_client(Recorder(httpx.Response(200, text=body))).status("ep1abc", "j1")


@pytest.mark.parametrize("job_id", ["", "x" * 129, "a/b", "line\nbreak", 42])
def test_a_job_id_rpq_could_not_store_or_address_is_a_protocol_error(job_id: object) -> None:
    with pytest.raises(RunPodProtocolError):
        make_client(Recorder(ok({"id": job_id, "status": "IN_QUEUE"}))).run("ep1abc", {"prompt": "x"})


def test_ids_cannot_escape_their_path_segment() -> None:
    recorder = Recorder(ok({}))

    with pytest.raises(RequestInvalid):
        make_client(recorder).status("ep1abc", "../../other/run")

    assert recorder.requests == []


# -- the key never travels -------------------------------------------------------------------------


def test_the_api_key_appears_in_no_error_log_line_or_repr(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    failures: list[httpx.Response | Exception] = [
        ok({"error": "Unauthorized"}, status=401), ok({}, status=404), ok({"error": "x"}, status=429),
        ok({}, status=500), httpx.ReadTimeout("slow"), httpx.ConnectError("refused"),
        httpx.Response(200, text="not json"),
    ]
    messages = []
    for failure in failures:
        client = make_client(Recorder(failure), retry=RetryPolicy(max_attempts=2))
        messages.append(repr(client))
        for operation, args in (("status", ("ep1abc", "j1")), ("run", ("ep1abc", {}))):
            with pytest.raises(Exception) as caught:
                getattr(client, operation)(*args)
            messages += [str(caught.value), repr(caught.value)]
            cause = caught.value.__cause__
            messages += [str(cause), repr(cause)] if cause else []

    assert len(messages) > 20
    for text in messages + [record.getMessage() for record in caplog.records]:
        assert API_KEY not in text


def test_describe_error_reads_the_worker_sdks_json_string() -> None:
    sdk_error = json.dumps({"error_type": "<class 'ValueError'>", "error_message": "boom",
                            "error_traceback": "Traceback...", "hostname": "h", "worker_id": "w",
                            "runpod_version": "1.12.0"})

    assert describe_error(sdk_error) == "<class 'ValueError'>: boom"
    assert describe_error("soft failure") == "soft failure"
    assert describe_error({"code": 3}) == '{"code": 3}'
    assert describe_error(None) == ""
