"""The HTTP API over real HTTP: uvicorn on a free loopback port in a thread, on SQLite and PostgreSQL.

The runtime records Celery messages instead of sending them, so every test can assert what was
stored and what was published.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import update

import jobs
from jobs.api import MAX_LIST_LIMIT, MAX_LIST_OFFSET
from jobs.errors import ConfigError
from jobs.flow.backoff import RetryPolicy
from jobs.flow.lifecycle import hash_token
from jobs.jsonsafe import MAX_DEPTH
from jobs.runpod.client import RunPodClient
from jobs.runtime import DISPATCH_TASK, Runtime
from jobs.settings import Secret, Settings
from jobs.states import JobStatus
from jobs.storage.db import make_engine, session_scope, upgrade
from jobs.storage.models import JobRow, utcnow
from jobs.storage.store import Source, transition
from jobs.web import create_app, new_token
from jobs.web.app import MAX_BODY_BYTES
from jobs.web.events import EVENTS_URL_CONTEXT, EVENTS_URL_PURPOSE
from jobs.web.signing import Sealer
from tests.conftest import ENDPOINT_ID, ROOT, Published, SimulatorProcess, free_port, stop_process, wait_until

pytestmark = pytest.mark.integration

TOKEN, TOKEN_ENTRY = new_token()
PLAIN_TOKEN = "plain-" + secrets.token_hex(16)
BODY_LIMIT = 64 * 1024
# Put in every bad request; it must never come back in an answer.
CANARY = "canary" + secrets.token_hex(8)
GOOD = {"endpoint": "tts", "input": {"text": CANARY}}
NESTED_TOO_DEEP: object = CANARY
for _ in range(MAX_DEPTH):
    NESTED_TOO_DEEP = [NESTED_TOO_DEEP]
UNAUTHORIZED = {"errors": [{"field": "authorization", "constraint": "auth",
                             "message": "missing or invalid bearer token"}]}


# -- the server ----------------------------------------------------------------------------------


@dataclass
class ApiServer:
    base_url: str
    _clients: list[httpx.Client] = field(default_factory=list)

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.base_url, headers=headers, timeout=30)
        self._clients.append(client)
        return client


@pytest.fixture
def start_api() -> Iterator[Callable[..., ApiServer]]:
    """Factory: serve `create_app(runtime, **options)` with uvicorn in a thread; stopped after the test."""
    running: list[tuple[uvicorn.Server, threading.Thread, ApiServer]] = []

    def start(runtime: Runtime, **options: Any) -> ApiServer:
        options = {"tokens": [TOKEN_ENTRY, PLAIN_TOKEN], "max_body_bytes": BODY_LIMIT, **options}
        app = create_app(runtime, **options)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None))
        thread = threading.Thread(target=server.run, name="rpq-api", daemon=True)
        thread.start()
        api = ApiServer(f"http://127.0.0.1:{server.config.port}")
        running.append((server, thread, api))
        wait_until(lambda: server.started, timeout=10, what="the API server to start")
        return api

    yield start
    for server, thread, api in running:
        for client in api._clients:
            client.close()
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def server(start_api: Callable[..., ApiServer], runtime: Runtime) -> ApiServer:
    return start_api(runtime)


@pytest.fixture
def api(server: ApiServer) -> httpx.Client:
    """A client with a valid token."""
    return server.client()


@pytest.fixture
def offline_runtime(tmp_path: Path) -> Iterator[Runtime]:
    """A runtime for tests that never get as far as a request."""
    url = f"sqlite:///{tmp_path / 'offline.db'}"
    rt = Runtime(settings=Settings(database_url=url), engine=make_engine(url), publish=Published(),
                 make_client=lambda: RunPodClient(api_key="unused"))
    yield rt
    rt.close()


# -- helpers -------------------------------------------------------------------------------------


def stored(rt: Runtime) -> list[jobs.Job]:
    return jobs.list_jobs(runtime=rt)


def published(rt: Runtime) -> Published:
    assert isinstance(rt.publish, Published)
    return rt.publish


def finish(rt: Runtime, job_id: str, status: JobStatus) -> None:
    """Put a PENDING job straight into a final status, as if RunPod had run it."""
    with session_scope(rt.engine) as session:
        left = transition(session, job_id, to=status, source=Source.OPERATOR, expected={JobStatus.PENDING},
                          values={"finished_at": utcnow()})
    assert left is JobStatus.PENDING


def backdate(rt: Runtime, job_id: str, age: timedelta) -> None:
    with session_scope(rt.engine) as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(created_at=utcnow() - age))  # type: ignore[arg-type]


def problems(response: httpx.Response) -> set[tuple[str, str]]:
    """The (field, constraint) pairs of an error answer, checking its shape on the way."""
    body = response.json()
    assert set(body) == {"errors"}
    assert all(set(error) == {"field", "constraint", "message"} for error in body["errors"])
    found = [(error["field"], error["constraint"]) for error in body["errors"]]
    assert len(found) == len(set(found)), f"a problem is reported twice: {found}"
    return set(found)


# -- submitting ----------------------------------------------------------------------------------


def test_a_new_job_is_answered_202_with_the_stored_job_and_published_once(api: httpx.Client, runtime: Runtime) -> None:
    response = api.post("/v1/jobs", json={"endpoint": "tts", "input": {"text": "hello"},
                                          "policy": {"ttl": 60_000, "lowPriority": True},
                                          "webhook": "https://example.com/hook", "metadata": {"user": 7},
                                          "stream": True})

    job = jobs.get(response.json()["id"], runtime=runtime)
    assert response.status_code == 202
    assert response.json() == {**job.to_dict(), "waiting": None}  # a submit writes; only a read looks at the queue
    assert response.headers["Location"] == f"/v1/jobs/{job.id}"
    assert (job.status, job.endpoint_id, job.input) == (JobStatus.PENDING, ENDPOINT_ID, {"text": "hello"})
    assert (job.policy, job.webhook, job.metadata, job.stream) == ({"ttl": 60_000, "lowPriority": True},
                                                                   "https://example.com/hook", {"user": 7}, True)
    assert published(runtime).of(DISPATCH_TASK) == [ENDPOINT_ID]  # its endpoint's dispatcher is woken


@dataclass(frozen=True)
class BadRequest:
    body: object
    problems: set[tuple[str, str]]
    status: int = 422
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def content(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


BAD_REQUESTS = {
    "missing endpoint": BadRequest({"input": {"text": CANARY}}, {("endpoint", "required")}),
    "empty object": BadRequest({}, {("endpoint", "required"), ("input", "required")}),
    "unknown endpoint": BadRequest({**GOOD, "endpoint": f"no such {CANARY}"}, {("endpoint", "known")}),
    "wrong types": BadRequest(
        {"endpoint": 7, "input": CANARY, "policy": CANARY, "webhook": 5, "correlation_id": [CANARY],
         "metadata": CANARY, "stream": CANARY},
        {("endpoint", "type"), ("policy", "type"), ("webhook", "type"), ("correlation_id", "type"),
         ("metadata", "type"), ("stream", "type")},
    ),
    "policy out of range": BadRequest({**GOOD, "policy": {"ttl": 5, "executionTimeout": 8 * 24 * 3600 * 1000}},
                                      {("policy.ttl", "range"), ("policy.executionTimeout", "range")}),
    "policy of the wrong types": BadRequest(
        {**GOOD, "policy": {"ttl": 60_000.5, "executionTimeout": "60000", "lowPriority": CANARY}},
        {("policy.ttl", "type"), ("policy.executionTimeout", "type"), ("policy.lowPriority", "type")},
    ),
    "unknown policy field": BadRequest({**GOOD, "policy": {CANARY: CANARY}}, {("policy", "unknown")}),
    "unknown field": BadRequest({**GOOD, CANARY: 1, "idempotency_key": CANARY}, {("body", "unknown")}),
    "input null": BadRequest({**GOOD, "input": None}, {("input", "required")}),
    "a lone surrogate in metadata": BadRequest({**GOOD, "metadata": {"name": "\udc80" + CANARY}},
                                               {("metadata", "text")}),
    "a lone surrogate as a metadata key": BadRequest({**GOOD, "metadata": {"\ud800" + CANARY: 1}},
                                                     {("metadata", "text")}),
    "a lone surrogate in the input": BadRequest({**GOOD, "input": ["\udfff", CANARY]}, {("input", "text")}),
    "input nested too deep": BadRequest({**GOOD, "input": NESTED_TOO_DEEP}, {("input", "depth")}),
    "metadata nested too deep and with a lone surrogate": BadRequest(
        {**GOOD, "metadata": {"deep": NESTED_TOO_DEEP, "odd": "\udc80"}},
        {("metadata", "depth"), ("metadata", "text")}),
    "NUL in the webhook": BadRequest({**GOOD, "webhook": f"https://example.com/\u0000{CANARY}"},
                                     {("webhook", "text")}),
    "NUL in the correlation id": BadRequest({**GOOD, "correlation_id": f"req\u0000{CANARY}"},
                                            {("correlation_id", "format")}),
    "webhook not http": BadRequest({**GOOD, "webhook": f"ftp://{CANARY}.example"}, {("webhook", "format")}),
    "metadata not an object": BadRequest({**GOOD, "metadata": [CANARY]}, {("metadata", "type")}),
    "correlation id too long": BadRequest({**GOOD, "correlation_id": CANARY * 20}, {("correlation_id", "format")}),
    "idempotency key too long": BadRequest(GOOD, {("Idempotency-Key", "format")},
                                           headers={"Idempotency-Key": CANARY + "k" * 255}),
    "correlation id header with spaces": BadRequest(GOOD, {("X-Correlation-ID", "format")},
                                                    headers={"X-Correlation-ID": f"has spaces {CANARY}"}),
    "everything wrong at once": BadRequest(
        {"endpoint": f"no such {CANARY}", "input": CANARY, "policy": {"ttl": 1, "speed": 2}, "webhook": CANARY,
         "metadata": CANARY, "extra": CANARY},
        {("endpoint", "known"), ("policy.ttl", "range"), ("policy", "unknown"), ("webhook", "format"),
         ("metadata", "type"), ("body", "unknown"), ("Idempotency-Key", "format")},
        headers={"Idempotency-Key": "k" * 256},
    ),
    "body not an object": BadRequest([GOOD], {("body", "type")}),
    "malformed JSON": BadRequest(b'{"endpoint": "tts", "input": "' + CANARY.encode(), {("body", "json")}, status=400),
    "NaN is not JSON": BadRequest(b'{"endpoint": "tts", "input": [NaN, "' + CANARY.encode() + b'"]}',
                                  {("body", "json")}, status=400),
    "not UTF-8": BadRequest(b'{"endpoint": "tts", "input": "\xff' + CANARY.encode() + b'"}',
                            {("body", "json")}, status=400),
    "empty body": BadRequest(b"", {("body", "json")}, status=400),
    "not sent as JSON": BadRequest(GOOD, {("Content-Type", "format")}, status=415, content_type="text/plain"),
    "oversized": BadRequest({"endpoint": "tts", "input": CANARY * (BODY_LIMIT // len(CANARY))},
                            {("body", "size")}, status=413),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_is_answered_with_all_its_problems_without_echoing_it_and_writes_nothing(
    api: httpx.Client, runtime: Runtime, case: BadRequest
) -> None:
    response = api.post("/v1/jobs", content=case.content(),
                        headers={"Content-Type": case.content_type, **case.headers})

    assert response.status_code == case.status
    assert problems(response) == case.problems
    assert CANARY not in response.text and CANARY not in str(response.headers)
    assert stored(runtime) == [] and published(runtime).messages == []


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(api: httpx.Client, runtime: Runtime) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"endpoint": "tts", "input": "'
        for _ in range(2 * BODY_LIMIT // 1024):
            yield b"x" * 1024
        yield b'"}'

    response = api.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})

    assert response.status_code == 413 and problems(response) == {("body", "size")}
    assert stored(runtime) == []


def test_an_input_over_runpods_10_mb_is_refused_by_jobs_submit_in_the_same_shape(
    start_api: Callable[..., ApiServer], runtime: Runtime
) -> None:
    client = start_api(runtime, max_body_bytes=MAX_BODY_BYTES).client()

    response = client.post("/v1/jobs", json={"endpoint": "tts", "input": CANARY * (10_000_000 // len(CANARY) + 1)})

    assert response.status_code == 422 and problems(response) == {("input", "size")}
    assert CANARY not in response.text and stored(runtime) == []


def test_a_repeated_idempotency_key_gets_the_same_job_with_200_one_row_and_one_publish(
    api: httpx.Client, runtime: Runtime
) -> None:
    first = api.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "order-42"})
    again = api.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "order-42"})
    other = api.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "order-43"})

    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 202)
    assert again.json() == first.json()
    assert sorted(job.id for job in stored(runtime)) == sorted([first.json()["id"], other.json()["id"]])
    assert published(runtime).of(DISPATCH_TASK) == [ENDPOINT_ID, ENDPOINT_ID]  # not for the repeat
    assert jobs.get(first.json()["id"], runtime=runtime).idempotency_key == "order-42"


# -- correlation ids ----------------------------------------------------------------------------


def test_the_correlation_id_header_is_stored_on_the_job_and_echoed(api: httpx.Client, runtime: Runtime) -> None:
    response = api.post("/v1/jobs", json=GOOD, headers={"X-Correlation-ID": "req-7f3a"})

    assert response.headers["X-Correlation-ID"] == "req-7f3a"
    assert jobs.get(response.json()["id"], runtime=runtime).correlation_id == "req-7f3a"


def test_a_correlation_id_is_generated_stored_and_echoed_when_none_is_given(
    api: httpx.Client, runtime: Runtime
) -> None:
    response = api.post("/v1/jobs", json=GOOD)

    generated = response.headers["X-Correlation-ID"]
    assert uuid.UUID(generated)
    assert jobs.get(response.json()["id"], runtime=runtime).correlation_id == generated


def test_the_body_correlation_id_wins_over_the_header(api: httpx.Client, runtime: Runtime) -> None:
    response = api.post("/v1/jobs", json={**GOOD, "correlation_id": "from-body"},
                        headers={"X-Correlation-ID": "from-header"})

    assert response.headers["X-Correlation-ID"] == "from-body"
    assert jobs.get(response.json()["id"], runtime=runtime).correlation_id == "from-body"


def test_every_answer_carries_the_correlation_id(server: ApiServer) -> None:
    answers = [
        server.client().get("/v1/jobs", headers={"X-Correlation-ID": "trace-1"}),
        server.client().get("/v1/jobs/no-such-job", headers={"X-Correlation-ID": "trace-1"}),
        server.client().get("/v1/jobs?limit=0", headers={"X-Correlation-ID": "trace-1"}),
        server.client(token=None).get("/v1/jobs", headers={"X-Correlation-ID": "trace-1"}),
        server.client(token=None).get("/healthz", headers={"X-Correlation-ID": "trace-1"}),
        server.client().get("/no/such/route", headers={"X-Correlation-ID": "trace-1"}),
    ]

    assert [a.status_code for a in answers] == [200, 404, 422, 401, 200, 404]
    assert {a.headers["X-Correlation-ID"] for a in answers} == {"trace-1"}


# -- reading and listing -------------------------------------------------------------------------


def test_a_job_is_read_back_as_everything_in_job_to_dict(api: httpx.Client, runtime: Runtime) -> None:
    job = jobs.submit("tts", {"text": "hi"}, metadata={"k": [1, 2]}, runtime=runtime)

    response = api.get(f"/v1/jobs/{job.id}")

    assert response.status_code == 200
    assert response.json() == jobs.get(job.id, runtime=runtime).to_dict()


def test_an_unknown_job_is_a_404_in_the_error_shape(api: httpx.Client) -> None:
    response = api.get(f"/v1/jobs/{CANARY}")

    assert response.status_code == 404 and problems(response) == {("id", "known")}
    assert CANARY not in response.text


def test_jobs_are_listed_newest_first_and_filtered_by_status_and_endpoint(api: httpx.Client, runtime: Runtime) -> None:
    first = jobs.submit("tts", 1, runtime=runtime).id
    second = jobs.submit("tts", 2, runtime=runtime).id
    third = jobs.submit("other-endpoint", 3, runtime=runtime).id
    jobs.cancel(second, runtime=runtime)

    def listed(**params: Any) -> list[str]:
        response = api.get("/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()["jobs"]]

    assert listed() == [third, second, first]
    assert listed(status="cancelled") == [second]
    assert listed(status=["PENDING", "CANCELLED"]) == [third, second, first]
    assert listed(endpoint="tts") == [second, first]
    assert listed(endpoint=["tts", "other-endpoint"]) == [third, second, first]
    assert listed(endpoint="tts", status="PENDING") == [first]


def test_since_takes_an_age_or_an_iso_time(api: httpx.Client, runtime: Runtime) -> None:
    old = jobs.submit("tts", 1, runtime=runtime).id
    new = jobs.submit("tts", 2, runtime=runtime).id
    backdate(runtime, old, timedelta(hours=2))

    def listed(since: str) -> list[str]:
        return [job["id"] for job in api.get("/v1/jobs", params={"since": since}).json()["jobs"]]

    assert listed("1h") == [new]
    assert listed("90m") == [new]
    assert listed("3h") == [new, old]
    assert listed((utcnow() - timedelta(hours=1)).isoformat()) == [new]
    assert listed((utcnow() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")) == [new, old]  # no zone: UTC


def test_limit_and_offset_page_through_the_jobs(api: httpx.Client, runtime: Runtime) -> None:
    ids = [jobs.submit("tts", n, runtime=runtime).id for n in range(5)][::-1]  # newest first

    pages = [api.get("/v1/jobs", params={"limit": 2, "offset": offset}).json() for offset in (0, 2, 4)]

    assert [[job["id"] for job in page["jobs"]] for page in pages] == [ids[0:2], ids[2:4], ids[4:]]
    assert [page["next_offset"] for page in pages] == [2, 4, None]


def test_bad_list_filters_are_answered_with_every_problem_at_once(api: httpx.Client) -> None:
    response = api.get("/v1/jobs", params={"status": ["PENDING", CANARY], "endpoint": f"no such {CANARY}",
                                           "since": CANARY,
                                           "limit": "many", "offset": -1, "colour": CANARY})

    assert response.status_code == 422
    assert problems(response) == {("status[1]", "known"), ("endpoint[0]", "known"), ("since", "format"),
                                  ("limit", "type"), ("offset", "range"), ("query", "unknown")}
    assert CANARY not in response.text


@pytest.mark.parametrize("params, problem", [
    ({"since": "999999999999d"}, ("since", "range")),
    ({"since": "0001-01-01T00:00:00+01:00"}, ("since", "range")),
    ({"offset": 10**30}, ("offset", "range")),
    ({"offset": MAX_LIST_OFFSET + 1}, ("offset", "range")),
    ({"limit": MAX_LIST_LIMIT + 1}, ("limit", "range")),
    ({"limit": "9" * 5000}, ("limit", "range")),
], ids=["an age past timedelta's range", "a time in year 0 in UTC", "an offset past bigint",
        "an offset past its bound", "a limit past its bound", "a limit of 5000 digits"])
def test_list_filters_past_their_bounds_are_a_422_not_a_crash(
    api: httpx.Client, params: dict[str, Any], problem: tuple[str, str]
) -> None:
    response = api.get("/v1/jobs", params=params)

    assert response.status_code == 422 and problems(response) == {problem}


def test_an_unknown_field_is_answered_with_the_known_ones_never_its_name(api: httpx.Client) -> None:
    body = api.post("/v1/jobs", json={**GOOD, CANARY: 1, "policy": {CANARY: 1}}).json()
    listed = api.get("/v1/jobs", params={CANARY: 1}).json()

    assert sorted(body["errors"], key=str) == [
        {"field": "body", "constraint": "unknown",
         "message": "unknown field (known: endpoint, input, policy, webhook, correlation_id, metadata, stream, "
                    "priority, files, outputs, offload)"},
        {"field": "policy", "constraint": "unknown",
         "message": "unknown field (known: executionTimeout, ttl, lowPriority)"},
    ]
    assert listed["errors"] == [{"field": "query", "constraint": "unknown",
                                 "message": "unknown field (known: status, endpoint, since, limit, offset)"}]


def test_a_refused_surrogate_leaves_reading_and_listing_working(api: httpx.Client, runtime: Runtime) -> None:
    kept = api.post("/v1/jobs", json=GOOD).json()["id"]

    refused = api.post("/v1/jobs", content=b'{"endpoint": "tts", "input": {}, "metadata": {"name": "\\udc80"}}',
                       headers={"Content-Type": "application/json"})

    assert refused.status_code == 422 and problems(refused) == {("metadata", "text")}
    assert api.get(f"/v1/jobs/{kept}").status_code == 200
    assert [job["id"] for job in api.get("/v1/jobs").json()["jobs"]] == [kept]


@pytest.mark.parametrize("path", ["/v1/jobs/a%00b", "/v1/jobs/a%00b/cancel", "/v1/jobs/a%00b/retry",
                                  "/v1/jobs/a%00b/events"])
def test_a_job_id_no_database_could_hold_is_a_404(api: httpx.Client, path: str) -> None:
    response = api.request("GET" if path.count("/") == 3 or path.endswith("events") else "POST", path)

    assert response.status_code == 404 and problems(response) == {("id", "known")}


@pytest.mark.parametrize("last_event_id", ["²".encode("latin-1"), b"9" * 19, b"9" * 5000, b"-1"],
                         ids=["a superscript digit", "past 64 bits", "5000 digits", "negative"])
def test_a_last_event_id_the_stream_never_sent_is_a_422(api: httpx.Client, runtime: Runtime,
                                                         last_event_id: bytes) -> None:
    job = jobs.submit("tts", {}, runtime=runtime)

    response = api.get(f"/v1/jobs/{job.id}/events", headers={"Last-Event-ID": last_event_id})

    assert response.status_code == 422 and problems(response) == {("Last-Event-ID", "format")}


# -- events URLs ---------------------------------------------------------------------------------

API_SECRET = "events-url-secret-" + "x" * 20


def test_an_events_url_streams_one_jobs_events_without_a_bearer_token(
    start_api: Callable[..., ApiServer], runtime: Runtime
) -> None:
    runtime.settings = runtime.settings.model_copy(update={"api_secret": Secret(API_SECRET)})
    server = start_api(runtime)
    job = jobs.submit("tts", 1, runtime=runtime)
    other = jobs.submit("tts", 2, runtime=runtime)
    jobs.cancel(job.id, runtime=runtime)

    made = server.client().post(f"/v1/jobs/{job.id}/events-url")
    anyone = server.client(token=None)
    with anyone.stream("GET", made.json()["path"]) as stream:
        body = stream.read().decode()

    assert made.status_code == 201 and made.json()["url"] == server.base_url + made.json()["path"]
    assert 0 < (datetime.fromisoformat(made.json()["expires_at"]) - utcnow()).total_seconds() <= 900
    assert stream.status_code == 200 and "event: error" in body and '"code":"cancelled"' in body
    access = made.json()["path"].split("access=")[1]
    refused = {
        "another job's path": anyone.get(f"/v1/jobs/{other.id}/events", params={"access": access}),
        "altered": anyone.get(f"/v1/jobs/{job.id}/events", params={"access": access[:-2] + "AA"}),
        "expired": anyone.get(f"/v1/jobs/{job.id}/events", params={"access": Sealer(
            API_SECRET, EVENTS_URL_CONTEXT).seal(EVENTS_URL_PURPOSE, {"job": job.id, "exp": 1})}),
        "no access at all": anyone.get(f"/v1/jobs/{job.id}/events"),
    }
    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 401)
    assert problems(refused["altered"]) == {("access", "auth")}


def test_without_rpq_api_secret_no_events_url_is_made(api: httpx.Client, runtime: Runtime) -> None:
    job = jobs.submit("tts", 1, runtime=runtime)

    response = api.post(f"/v1/jobs/{job.id}/events-url")

    assert response.status_code == 503 and problems(response) == {("events_url", "configured")}


# -- cancel and retry ----------------------------------------------------------------------------


def test_cancelling_a_pending_job_answers_200_and_stores_it_cancelled(api: httpx.Client, runtime: Runtime) -> None:
    job = jobs.submit("tts", 1, runtime=runtime)

    response = api.post(f"/v1/jobs/{job.id}/cancel")

    assert response.status_code == 200 and response.json()["status"] == "CANCELLED"
    assert jobs.get(job.id, runtime=runtime).status is JobStatus.CANCELLED


def test_cancelling_a_finished_job_is_a_409_and_changes_nothing(api: httpx.Client, runtime: Runtime) -> None:
    job = jobs.submit("tts", 1, runtime=runtime)
    finish(runtime, job.id, JobStatus.COMPLETED)

    response = api.post(f"/v1/jobs/{job.id}/cancel")

    assert response.status_code == 409 and problems(response) == {("status", "transition")}
    assert jobs.get(job.id, runtime=runtime).status is JobStatus.COMPLETED


def test_retrying_a_failed_job_answers_202_with_a_new_attempt_and_publishes_it(
    api: httpx.Client, runtime: Runtime
) -> None:
    job = jobs.submit("tts", 1, runtime=runtime)
    finish(runtime, job.id, JobStatus.FAILED)

    response = api.post(f"/v1/jobs/{job.id}/retry")

    stored_job = jobs.get(job.id, runtime=runtime)
    assert response.status_code == 202 and response.json() == {**stored_job.to_dict(), "waiting": None}
    assert (stored_job.status, stored_job.attempt) == (JobStatus.PENDING, 2)
    assert published(runtime).of(DISPATCH_TASK) == [ENDPOINT_ID, ENDPOINT_ID]


def test_retrying_a_completed_job_is_a_409_and_changes_nothing(api: httpx.Client, runtime: Runtime) -> None:
    job = jobs.submit("tts", 1, runtime=runtime)
    finish(runtime, job.id, JobStatus.COMPLETED)

    response = api.post(f"/v1/jobs/{job.id}/retry")

    assert response.status_code == 409 and problems(response) == {("status", "transition")}
    assert (jobs.get(job.id, runtime=runtime).status, published(runtime).of(DISPATCH_TASK)) == (
        JobStatus.COMPLETED, [ENDPOINT_ID])


def test_releasing_a_pending_job_answers_200_marks_it_released_and_wakes_its_dispatcher(
    api: httpx.Client, runtime: Runtime
) -> None:
    job = jobs.submit("tts", 1, runtime=runtime)

    response = api.post(f"/v1/jobs/{job.id}/release")

    assert response.status_code == 200 and response.json()["spend_released"] is True
    assert jobs.get(job.id, runtime=runtime).spend_released
    assert published(runtime).of(DISPATCH_TASK) == [ENDPOINT_ID, ENDPOINT_ID]


def test_releasing_a_finished_job_is_a_409_and_changes_nothing(api: httpx.Client, runtime: Runtime) -> None:
    job = jobs.submit("tts", 1, runtime=runtime)
    finish(runtime, job.id, JobStatus.COMPLETED)

    response = api.post(f"/v1/jobs/{job.id}/release")

    assert response.status_code == 409 and problems(response) == {("status", "transition")}
    assert not jobs.get(job.id, runtime=runtime).spend_released


@pytest.mark.parametrize("action", ["cancel", "retry", "release"])
def test_cancelling_or_retrying_an_unknown_job_is_a_404(api: httpx.Client, action: str) -> None:
    response = api.post(f"/v1/jobs/{uuid.uuid4()}/{action}")

    assert response.status_code == 404 and problems(response) == {("id", "known")}


# -- auth ----------------------------------------------------------------------------------------

BAD_AUTHORIZATION = {
    "no header": None,
    "bearer without a token": "Bearer",
    "wrong token": f"Bearer {new_token()[0]}",
    "another scheme": f"Basic {TOKEN}",
    "the sha256 entry as the token": f"Bearer {TOKEN_ENTRY}",
    "the token with a suffix": f"Bearer {TOKEN}x",
}


@pytest.mark.parametrize("authorization", BAD_AUTHORIZATION.values(), ids=BAD_AUTHORIZATION.keys())
def test_a_request_without_a_valid_token_gets_the_one_same_401_and_writes_nothing(
    server: ApiServer, runtime: Runtime, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    client = server.client(token=None)

    answers = [client.post("/v1/jobs", json=GOOD, headers=headers),
               client.post("/v1/jobs", content=b"{not json", headers=headers),
               client.get("/v1/jobs", params={"limit": "bad"}, headers=headers),
               client.get("/v1/endpoints/tts/health", headers=headers)]

    assert [a.status_code for a in answers] == [401] * 4
    assert all(a.json() == UNAUTHORIZED and a.headers["WWW-Authenticate"] == "Bearer" for a in answers)
    assert stored(runtime) == []


@pytest.mark.parametrize("token", [TOKEN, PLAIN_TOKEN], ids=["sha256 entry", "plain entry"])
def test_a_token_configured_as_sha256_or_plain_lets_requests_in(server: ApiServer, token: str) -> None:
    response = server.client(token=token).post("/v1/jobs", json=GOOD)

    assert response.status_code == 202


def test_healthz_and_the_schema_need_no_token(server: ApiServer) -> None:
    client = server.client(token=None)

    assert client.get("/healthz").json() == {"ok": True}
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_no_token_and_no_authorization_header_reaches_the_log(
    server: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="uvicorn")  # importing the runpod SDK sets it to WARNING
    wrong = new_token()[0]

    server.client().post("/v1/jobs", json=GOOD)
    server.client(token=wrong).get("/v1/jobs")
    server.client(token=PLAIN_TOKEN).get("/v1/endpoints/tts/health")

    # The test's own client logs the headers it receives at DEBUG; only the server's lines count.
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert "POST /v1/jobs" in logged  # the access log was captured, so the check means something
    assert not [secret for secret in (TOKEN, PLAIN_TOKEN, wrong, "Bearer") if secret in logged]
    # Not the header, by name or value (the refused request's own line names the problem's field, "authorization:auth").
    assert not [shape for shape in ("authorization: ", "'authorization'", '"authorization"', "bearer ")
                if shape in logged.lower()]
    assert "refused GET /v1/jobs with 401 (authorization:auth)" in logged


def test_rpq_api_logs_webhook_calls_without_their_token(tmp_path: Path, redis_url: str) -> None:
    database_url = f"sqlite:///{tmp_path / 'rpq.db'}"
    upgrade(database_url)
    runtime = Runtime(settings=Settings(database_url=database_url), engine=make_engine(database_url),
                      publish=Published(), make_client=lambda: RunPodClient(api_key="unused"))
    job = jobs.submit(ENDPOINT_ID, {}, runtime=runtime)
    known, unknown = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with session_scope(runtime.engine) as session:
        session.execute(update(JobRow).where(JobRow.id == job.id)  # type: ignore[arg-type]
                        .values(webhook_token_hash=hash_token(known)))
    runtime.close()
    port, log_path = free_port(), tmp_path / "api.log"
    env = {**os.environ, "DATABASE_URL": database_url, "RPQ_API_TOKENS": TOKEN_ENTRY, "CELERY_BROKER_URL": redis_url}
    with open(log_path, "wb") as log:
        api = subprocess.Popen([sys.executable, "-m", "jobs.cli", "api", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, timeout=60,
                   what="rpq api to answer /healthz")
        answers = [httpx.post(f"{base}/v1/webhooks/runpod/{token}?correlation_id=req-7", timeout=10).status_code
                   for token in (known, unknown)]
    finally:
        stop_process(api)

    logged = log_path.read_text()
    assert answers == [200, 404]
    assert logged.count('"POST /v1/webhooks/runpod/***?correlation_id=req-7 HTTP/1.1"') == 2  # the access log is on
    assert known not in logged and unknown not in logged


def test_rpq_api_with_two_workers_answers_from_two_processes_that_log(tmp_path: Path, redis_url: str) -> None:
    database_url = f"sqlite:///{tmp_path / 'rpq.db'}"
    upgrade(database_url)
    runtime = Runtime(settings=Settings(database_url=database_url), engine=make_engine(database_url),
                      publish=Published(), make_client=lambda: RunPodClient(api_key="unused"))
    job = jobs.submit(ENDPOINT_ID, {"text": "hi"}, runtime=runtime)
    runtime.close()
    port, log_path = free_port(), tmp_path / "api.log"
    env = {**os.environ, "DATABASE_URL": database_url, "RPQ_API_TOKENS": TOKEN_ENTRY, "CELERY_BROKER_URL": redis_url}
    with open(log_path, "wb") as log:
        api = subprocess.Popen([sys.executable, "-m", "jobs.cli", "api", "--port", str(port), "--workers", "2"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base, bearer = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}

    def answering_workers() -> set[int]:
        """The processes whose access log shows they answered a GET of the job."""
        return {int(pid) for pid in re.findall(r"\[(\d+)\] \[cid=[^]]+\] uvicorn\.access: .*\"GET /v1/jobs/",
                                                 log_path.read_text())}

    def both_answered() -> bool:
        # A new connection each time: whichever worker accepts it first answers it.
        answers = [httpx.get(f"{base}/v1/jobs/{job.id}", headers=bearer, timeout=10) for _ in range(10)]
        assert [(a.status_code, a.json()["id"]) for a in answers] == [(200, job.id)] * 10
        return len(answering_workers()) == 2

    try:
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, timeout=90,
                   what="rpq api to answer /healthz")
        wait_until(both_answered, timeout=60, interval=0, what="both workers to answer")
        parents = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                   for pid in answering_workers()}
    finally:
        stop_process(api)

    assert set(parents.values()) == {api.pid}  # two worker processes of that one `rpq api`
    assert TOKEN not in log_path.read_text()


def test_the_app_refuses_to_start_with_no_token_unless_no_auth_is_allowed_on_purpose(
    offline_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RPQ_API_TOKENS", raising=False)
    monkeypatch.delenv("RPQ_API_ALLOW_NO_AUTH", raising=False)

    with pytest.raises(ConfigError, match="RPQ_API_TOKENS: no API token configured"):
        create_app(offline_runtime)
    with pytest.raises(ConfigError, match="RPQ_API_TOKENS: no API token configured"):
        create_app(offline_runtime, tokens=[" ", ""])
    monkeypatch.setenv("RPQ_API_ALLOW_NO_AUTH", "yes please")
    with pytest.raises(ConfigError, match="RPQ_API_ALLOW_NO_AUTH: expected true or false"):
        create_app(offline_runtime)
    monkeypatch.setenv("RPQ_API_ALLOW_NO_AUTH", "true")
    assert create_app(offline_runtime).state.tokens.open


def test_tokens_are_read_from_the_environment(
    start_api: Callable[..., ApiServer], runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RPQ_API_TOKENS", f" {TOKEN_ENTRY} ,, {PLAIN_TOKEN}")
    server = start_api(runtime, tokens=None)

    answers = [server.client(token).get("/v1/jobs").status_code for token in (TOKEN, PLAIN_TOKEN, None)]

    assert answers == [200, 200, 401]


def test_with_no_auth_allowed_on_purpose_no_token_is_needed(
    start_api: Callable[..., ApiServer], runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RPQ_API_TOKENS", raising=False)
    monkeypatch.setenv("RPQ_API_ALLOW_NO_AUTH", "true")
    server = start_api(runtime, tokens=None)

    assert server.client(token=None).post("/v1/jobs", json=GOOD).status_code == 202


def test_a_malformed_sha256_entry_is_refused_without_being_quoted(offline_runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match="entry 2 is not sha256: followed by 64 hex digits") as caught:
        create_app(offline_runtime, tokens=[TOKEN_ENTRY, f"sha256:{CANARY}"])

    assert CANARY not in str(caught.value)


def test_new_token_makes_a_token_and_the_entry_that_accepts_it(offline_runtime: Runtime) -> None:
    token, entry = new_token()

    tokens = create_app(offline_runtime, tokens=[entry]).state.tokens
    assert token.startswith("rpq_") and entry.startswith("sha256:") and token not in entry
    assert tokens.accepts(token) and not tokens.accepts(new_token()[0])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_refused_request_is_logged_at_warning_with_its_correlation_id_and_the_route_not_the_path(
    server: ApiServer, runtime: Runtime
) -> None:
    import logging

    from jobs.observability.logcontext import ContextFilter

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.addFilter(ContextFilter())
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("rpq.web").addHandler(handler)
    try:
        server.client(token="wrong").get("/v1/jobs/some-job", headers={"X-Correlation-ID": "req-refused-1"})
        server.client().post("/v1/webhooks/runpod/" + "T" * 43, json={})  # a path that holds a token
    finally:
        logging.getLogger("rpq.web").removeHandler(handler)

    refused = [r for r in seen if r.levelno == logging.WARNING and r.getMessage().startswith("refused")]
    assert [(r.getMessage(), getattr(r, "correlation_id", None)) for r in refused][:2] == [
        ("refused GET /v1/jobs/{job_id} with 401 (authorization:auth)", "req-refused-1"),
        ("refused POST /v1/webhooks/runpod/{token} with 404 (token:known)", refused[1].correlation_id)]


# -- endpoint health -----------------------------------------------------------------------------


def test_endpoint_health_reports_every_runpod_counter_live(
    api: httpx.Client, runtime: Runtime, simulator: SimulatorProcess
) -> None:
    done = runtime.runpod.run(ENDPOINT_ID, {"output": 1})
    wait_until(lambda: runtime.runpod.status(ENDPOINT_ID, done.id).is_terminal, timeout=20, what="the job to finish")

    response = api.get("/v1/endpoints/tts/health")

    assert response.status_code == 200
    assert response.json() == {
        "endpoint": "tts", "endpoint_id": ENDPOINT_ID,
        "jobs": {"completed": 1, "failed": 0, "in_progress": 0, "in_queue": 0, "retried": 0},
        "workers": response.json()["workers"],
    }
    assert set(response.json()["workers"]) == {"idle", "initializing", "ready", "running", "throttled", "unhealthy"}
    assert sum(response.json()["workers"].values()) >= 1


def test_an_unknown_endpoint_name_has_no_health(api: httpx.Client, simulator: SimulatorProcess) -> None:
    response = api.get(f"/v1/endpoints/{CANARY}_x/health")

    assert response.status_code == 404 and problems(response) == {("name", "known")}
    assert CANARY not in response.text and simulator.jobs() == []


def runpod_calls(simulator: SimulatorProcess) -> dict[str, int]:
    """How many requests the simulator has had for the endpoint, by operation."""
    ops = simulator.control.get("/_sim/stats", params={"endpoint": ENDPOINT_ID}).json()["endpoints"]
    return {op: stats["requests"] for op, stats in ops.get(ENDPOINT_ID, {}).items()}


def test_the_panel_is_served_from_stored_rows_and_makes_no_runpod_call(
    api: httpx.Client, runtime: Runtime, simulator: SimulatorProcess
) -> None:
    from jobs.runpod import health

    health.collect(runtime)  # what beat does every RUNPOD_HEALTH_POLL_SECONDS
    jobs.submit("tts", 1, runtime=runtime)
    before = runpod_calls(simulator)

    listed = api.get("/v1/endpoints")
    one = api.get("/v1/endpoints/tts")

    assert runpod_calls(simulator) == before
    assert listed.status_code == one.status_code == 200
    [in_list], panel = listed.json()["endpoints"], one.json()
    assert {**in_list, "age_seconds": None} == {**panel, "age_seconds": None}  # read a moment apart
    assert (panel["endpoint"], panel["endpoint_id"], panel["state"]) == ("tts", ENDPOINT_ID, "cold")
    assert "cold start" in panel["reason"] and panel["age_seconds"] >= 0 and panel["error"] is None
    assert set(panel["workers"]) == {"ready", "running", "idle", "initializing", "throttled", "unhealthy"}
    assert panel["queue"]["PENDING"] == 1 and panel["queue"]["held_by_cap"] == 0
    assert panel["max_workers"] is None  # the endpoints collector has not run


def test_a_panel_before_any_observation_says_so_and_live_asks_runpod_once(
    api: httpx.Client, simulator: SimulatorProcess
) -> None:
    unknown = api.get("/v1/endpoints/tts").json()
    before = runpod_calls(simulator).get("health", 0)

    live = api.get("/v1/endpoints/tts", params={"live": "true"}).json()

    assert (unknown["state"], unknown["observed_at"], unknown["workers"]) == ("unknown", None, None)
    assert "no observation yet" in unknown["reason"]
    assert live["state"] == "cold" and live["age_seconds"] < 5
    assert runpod_calls(simulator)["health"] == before + 1


def test_warming_up_sends_one_job_and_a_second_call_says_one_is_in_flight(
    api: httpx.Client, runtime: Runtime
) -> None:
    first = api.post("/v1/endpoints/tts/warmup")
    second = api.post("/v1/endpoints/tts/warmup")

    assert first.status_code == second.status_code == 200
    assert first.json()["action"] == "submitted" and first.json()["workers_ready"] == 0
    assert second.json() == {"action": "none", "reason": "a warm-up job is already in flight",
                             "job_id": first.json()["job_id"], "workers_ready": 0}
    assert [j.id for j in jobs.list_jobs(runtime=runtime)] == [first.json()["job_id"]]


@pytest.mark.parametrize("route", ["/v1/endpoints/{name}", "/v1/endpoints/{name}/warmup"])
def test_a_panel_or_warmup_of_an_endpoint_rpq_does_not_configure_is_a_404(
    api: httpx.Client, simulator: SimulatorProcess, route: str
) -> None:
    path = route.format(name=ENDPOINT_ID)  # a bare RunPod id is not one of rpq's endpoints
    response = api.request("POST" if path.endswith("warmup") else "GET", path)

    assert response.status_code == 404 and problems(response) == {("name", "known")}
    assert simulator.jobs() == []


def test_a_runpod_server_error_is_a_502_without_a_stack_trace(api: httpx.Client, simulator: SimulatorProcess) -> None:
    simulator.set_faults({"op": "health", "kind": "5xx", "status": 500})

    response = api.get("/v1/endpoints/tts/health")

    assert response.status_code == 502 and problems(response) == {("runpod", "upstream")}
    assert "HTTP 500" in response.text and "Traceback" not in response.text
    assert simulator.api_key not in response.text


def test_a_runpod_timeout_is_a_504(start_api: Callable[..., ApiServer], runtime: Runtime,
                                   simulator: SimulatorProcess) -> None:
    impatient = replace(runtime, make_client=lambda: RunPodClient(
        api_key=simulator.api_key, base_url=simulator.base_url, timeout=0.3, retry=RetryPolicy(max_attempts=1)))
    simulator.set_faults({"op": "health", "kind": "slow", "delay": 2})

    response = start_api(impatient).client().get("/v1/endpoints/tts/health")
    impatient.runpod.close()

    assert response.status_code == 504 and problems(response) == {("runpod", "timeout")}


# -- server-side failures ------------------------------------------------------------------------


def test_a_configuration_problem_is_a_500_whose_details_go_only_to_the_log(
    start_api: Callable[..., ApiServer], runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    keyless = replace(runtime, make_client=lambda: RunPodClient(api_key=Settings().require_api_key()))

    response = start_api(keyless).client().get("/v1/endpoints/tts/health")

    assert response.status_code == 500 and problems(response) == {("server", "config")}
    assert "RUNPOD_API_KEY" not in response.text and "RUNPOD_API_KEY" in caplog.text


def test_an_unexpected_error_is_a_500_with_no_details_and_a_correlation_id(
    start_api: Callable[..., ApiServer], runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: Any) -> None:
        raise RuntimeError("secret internals at /srv/rpq")

    monkeypatch.setattr(jobs, "list_jobs", broken)
    response = start_api(runtime).client().get("/v1/jobs", headers={"X-Correlation-ID": "trace-500"})

    assert response.status_code == 500 and problems(response) == {("server", "internal")}
    assert response.headers["X-Correlation-ID"] == "trace-500"
    assert "Traceback" not in response.text and "secret" not in response.text


def test_a_database_that_cannot_be_reached_is_a_503_naming_it_with_retry_after(
    start_api: Callable[..., ApiServer], runtime: Runtime, tmp_path: Path
) -> None:
    broken = replace(runtime, engine=make_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'rpq.db'}"))
    api = start_api(broken).client()

    listed = api.get("/v1/jobs", headers={"X-Correlation-ID": "trace-503"})
    broken.engine.dispose()

    assert listed.status_code == 503 and problems(listed) == {("database", "available")}
    assert listed.headers["Retry-After"] == "5" and listed.headers["X-Correlation-ID"] == "trace-503"
    assert "Traceback" not in listed.text and "sqlite" not in listed.text.lower()


def test_a_wrong_method_is_a_405_in_the_error_shape(api: httpx.Client) -> None:
    response = api.delete("/v1/jobs")

    assert response.status_code == 405 and problems(response) == {("method", "allowed")}
    assert response.headers["Allow"]  # Starlette names the methods of the first route that matched the path


def test_a_waiting_job_is_read_and_listed_with_why_it_waits(start_api: Callable[..., ApiServer],
                                                            runtime: Runtime) -> None:
    runtime.settings = runtime.settings.model_copy(update={"max_in_flight": {"tts": 1}})
    api = start_api(runtime).client()
    first, second, done = (jobs.submit("tts", {"n": n}, runtime=runtime) for n in range(3))
    finish(runtime, done.id, JobStatus.COMPLETED)

    read = api.get(f"/v1/jobs/{second.id}").json()["waiting"]
    listed = {job["id"]: job["waiting"] for job in api.get("/v1/jobs").json()["jobs"]}

    assert read == {"reason": "max_in_flight", "jobs_ahead": 1, "in_flight": 0, "max_in_flight": 1,
                    "message": "endpoint tts has 0 of 1 jobs in flight (max_in_flight); 1 job ahead of this one",
                    "next_try_at": None}
    assert listed == {second.id: read, done.id: None, first.id: {
        "reason": "next", "jobs_ahead": 0, "in_flight": 0, "max_in_flight": 1, "next_try_at": None,
        "message": "next in line for endpoint tts: sent to RunPod when the dispatcher next runs"}}


# -- probes and the schema -----------------------------------------------------------------------


def test_healthz_answers_503_when_the_database_is_unreachable(
    start_api: Callable[..., ApiServer], runtime: Runtime, tmp_path: Path
) -> None:
    unreachable = replace(runtime, engine=make_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'rpq.db'}"))

    response = start_api(unreachable).client(token=None).get("/healthz")
    unreachable.engine.dispose()

    assert (response.status_code, response.json()) == (503, {"ok": False})


def test_the_openapi_schema_lists_every_route_and_resolves_every_reference(server: ApiServer) -> None:
    schema = server.client(token=None).get("/openapi.json").json()

    documented = {(path, method.upper()) for path, item in schema["paths"].items() for method in item}
    assert documented == {
        ("/v1/jobs", "POST"), ("/v1/jobs", "GET"), ("/v1/jobs/{job_id}", "GET"),
        ("/v1/jobs/{job_id}/cancel", "POST"), ("/v1/jobs/{job_id}/retry", "POST"),
        ("/v1/jobs/{job_id}/release", "POST"), ("/v1/jobs/{job_id}/events-url", "POST"),
        ("/v1/jobs/{job_id}/events", "GET"), ("/v1/webhooks/runpod/{token}", "POST"),
        ("/v1/uploads", "POST"), ("/v1/jobs/{job_id}/files", "GET"), ("/v1/jobs/{job_id}/files/{name}", "GET"),
        ("/v1/endpoints", "GET"), ("/v1/endpoints/{name}", "GET"), ("/v1/endpoints/{name}/warmup", "POST"),
        ("/v1/endpoints/{name}/health", "GET"), ("/healthz", "GET"),
    }
    # Every documented route is served: whatever it answers, it is not "no such route" or "wrong method".
    client = server.client()
    for path, method in documented:
        answer = client.request(method, path.format(job_id=uuid.uuid4(), name="tts", token="t"), json=GOOD)
        assert answer.status_code != 405 and ("path", "known") not in problems_or_nothing(answer), (method, path)
    submit = schema["paths"]["/v1/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobRequest"}
    assert {p["name"] for p in schema["paths"]["/v1/jobs"]["get"]["parameters"]} == {
        "status", "endpoint", "since", "limit", "offset"}
    assert set(schema["components"]["schemas"]["JobOut"]["properties"]) == set(jobs.Job.__dataclass_fields__)
    components = schema["components"]["schemas"]
    assert all(ref.removeprefix("#/components/schemas/") in components for ref in _references(schema))


def problems_or_nothing(response: httpx.Response) -> set[tuple[str, str]]:
    return problems(response) if response.status_code >= 400 else set()


def _references(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)
