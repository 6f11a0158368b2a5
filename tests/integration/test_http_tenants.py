"""Tenants over real HTTP: two tenants' tokens, an admin token and a read-only one, against uvicorn as in
test_http_api.py. Every route that takes a job id answers another tenant's job exactly as an unknown id;
scopes, endpoint allow-lists, uploads and idempotency keys hold per tenant; limits are shared by two API
instances through one Redis. SQLite only: the database does not matter here (test_tenants_store.py runs the
storage side on both)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

import jobs
from jobs.runtime import Runtime
from jobs.settings import Endpoint, Secret
from jobs.states import JobStatus
from jobs.tenants import SubmitRate
from jobs.web.auth import entry_for, new_token
from tests.conftest import ENDPOINT_ID, SimulatorProcess, make_runtime, wait_until
from tests.integration.test_http_api import ApiServer, finish, problems
from tests.integration.test_http_api import start_api as start_api  # the fixture, shared
from tests.integration.test_http_files import REGION, upload

pytestmark = pytest.mark.integration

SHOP, SHOP_LINE = new_token()
APP, APP_LINE = new_token()
READER, READER_LINE = new_token()
ADMIN, ADMIN_LINE = new_token()
ENTRIES = [entry_for(SHOP_LINE, tenant="shop", endpoints=["tts"]), entry_for(APP_LINE, tenant="app"),
           entry_for(READER_LINE, tenant="shop", scopes=["read"]), ADMIN_LINE]  # the last: a bare entry, admin
EXPORT_ID = "export-endpoint"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'rpq.db'}"


@pytest.fixture
def tenant_runtime(runtime: Runtime) -> Runtime:
    runtime.settings = runtime.settings.model_copy(update={
        "endpoints": {"tts": Endpoint("tts", ENDPOINT_ID), "export": Endpoint("export", EXPORT_ID)},
        "metadata_index": ("user",), "api_secret": Secret("s" * 32)})
    return runtime


@pytest.fixture
def server(start_api: Callable[..., ApiServer], tenant_runtime: Runtime) -> ApiServer:
    return start_api(tenant_runtime, tokens=ENTRIES)


def not_found(client: httpx.Client, method: str, path: str) -> tuple[int, Any]:
    response = client.request(method, path)
    return response.status_code, response.json()


def test_every_route_answers_another_tenants_job_as_an_unknown_id(
    server: ApiServer, tenant_runtime: Runtime, s3_bucket: str, s3_endpoint_url: str
) -> None:
    tenant_runtime.settings = tenant_runtime.settings.model_copy(update={
        "s3_bucket": s3_bucket, "s3_endpoint_url": s3_endpoint_url, "s3_region": REGION})
    shop, app, admin = server.client(SHOP), server.client(APP), server.client(ADMIN)
    ticket = upload(shop, b"take one", name="audio.wav", content_type="audio/wav", size=8)
    spare = upload(shop, b"take two", name="audio.wav", content_type="audio/wav", size=8)
    submitted = shop.post("/v1/jobs", json={"endpoint": "tts", "input": {}, "files": {"audio": {"key": ticket["key"]}},
                                             "metadata": {"user": 42}}, headers={"Idempotency-Key": "order-1"})
    job_id = submitted.json()["id"]
    # A job whose file is in the bucket already, so that its download is a 302 for its own tenant.
    stored = jobs.submit("tts", {}, files={"notes.txt": b"notes"}, tenant="shop", runtime=tenant_runtime)
    unknown = str(uuid.uuid4())
    routes = [("GET", "/v1/jobs/{id}"), ("POST", "/v1/jobs/{id}/cancel"), ("POST", "/v1/jobs/{id}/retry"),
              ("GET", "/v1/jobs/{id}/events"), ("POST", "/v1/jobs/{id}/events-url"), ("GET", "/v1/jobs/{id}/files"),
              ("GET", "/v1/jobs/{id}/files/notes.txt")]

    # Another tenant: every route answers exactly as for an id no job has, and changes nothing.
    for method, path in routes:
        theirs = not_found(app, method, path.format(id=stored.id))
        assert theirs == not_found(app, method, path.format(id=unknown)), path
        assert theirs[0] == 404 and problems(app.request(method, path.format(id=stored.id))) == {("id", "known")}
    assert jobs.get(stored.id, runtime=tenant_runtime).status is JobStatus.PENDING
    assert [j["id"] for j in app.get("/v1/jobs").json()["jobs"]] == []
    # Its idempotency key is its own, and its upload cannot be named by another tenant.
    again = app.post("/v1/jobs", json={"endpoint": "tts", "input": {}}, headers={"Idempotency-Key": "order-1"})
    borrowed = app.post("/v1/jobs", json={"endpoint": "tts", "input": {}, "files": {"audio": {"key": spare["key"]}}})
    never = app.post("/v1/jobs", json={"endpoint": "tts", "input": {},
                                       "files": {"audio": {"key": spare["key"] + "-never-made"}}})
    assert again.status_code == 202 and again.json()["id"] != job_id and again.json()["tenant"] == "app"
    assert borrowed.status_code == 422 and borrowed.json() == never.json()

    # The tenant itself: every route works, and a repeated key is its own earlier job.
    redirect = shop.get(f"/v1/jobs/{stored.id}/files/notes.txt")
    assert submitted.status_code == 202 and submitted.json()["tenant"] == "shop"
    assert shop.post("/v1/jobs", json={"endpoint": "tts", "input": {}},
                     headers={"Idempotency-Key": "order-1"}).json()["id"] == job_id
    assert shop.get(f"/v1/jobs/{job_id}").json()["metadata"] == {"user": 42}
    assert [f["name"] for f in shop.get(f"/v1/jobs/{job_id}/files").json()["files"]] == ["audio"]
    assert redirect.status_code == 302 and httpx.get(redirect.headers["Location"]).content == b"notes"
    assert shop.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    with shop.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        assert events.status_code == 200 and "event: error" in events.read().decode()
    assert shop.post(f"/v1/jobs/{job_id}/retry").status_code == 202
    assert {j["id"] for j in shop.get("/v1/jobs").json()["jobs"]} == {job_id, stored.id}
    # The admin token (a bare entry) sees every tenant's jobs.
    assert {j["id"] for j in admin.get("/v1/jobs").json()["jobs"]} == {job_id, stored.id, again.json()["id"]}
    assert admin.get(f"/v1/jobs/{job_id}").status_code == 200


def test_a_token_lacking_a_scope_gets_403_and_changes_nothing(server: ApiServer, tenant_runtime: Runtime) -> None:
    job = jobs.submit("tts", {}, tenant="shop", runtime=tenant_runtime)
    reader = server.client(READER)

    answers = {"submit": reader.post("/v1/jobs", json={"endpoint": "tts", "input": {}}),
               "upload": reader.post("/v1/uploads", json={"name": "a.wav", "size": 1}),
               "cancel": reader.post(f"/v1/jobs/{job.id}/cancel"),
               "retry": reader.post(f"/v1/jobs/{job.id}/retry")}

    assert {name: (a.status_code, problems(a)) for name, a in answers.items()} == {
        name: (403, {("authorization", "scope")}) for name in answers}
    assert answers["cancel"].json()["errors"][0]["message"] == "this token's scope does not include cancel"
    # Letting a job past the spend guard, which holds every tenant's jobs, is for admin tokens alone.
    assert server.client(SHOP).post(f"/v1/jobs/{job.id}/release").status_code == 403
    assert server.client(ADMIN).post(f"/v1/jobs/{job.id}/release").status_code == 200
    assert reader.get(f"/v1/jobs/{job.id}").status_code == 200
    assert [j.id for j in jobs.list_jobs(runtime=tenant_runtime)] == [job.id]
    assert jobs.get(job.id, runtime=tenant_runtime).status is JobStatus.PENDING


def test_a_tenants_token_runs_work_only_on_its_allowed_endpoint_names(
    server: ApiServer, tenant_runtime: Runtime
) -> None:
    shop, app, admin = server.client(SHOP), server.client(APP), server.client(ADMIN)

    answers = {"allowed": shop.post("/v1/jobs", json={"endpoint": "tts", "input": {}}),
               "not on its list": shop.post("/v1/jobs", json={"endpoint": "export", "input": {}}),
               "a bare id": app.post("/v1/jobs", json={"endpoint": ENDPOINT_ID, "input": {}}),
               "health not on its list": shop.get("/v1/endpoints/export/health"),
               "admin, a bare id": admin.post("/v1/jobs", json={"endpoint": ENDPOINT_ID, "input": {}})}

    assert {name: a.status_code for name, a in answers.items()} == {
        "allowed": 202, "not on its list": 403, "a bare id": 403, "health not on its list": 403,
        "admin, a bare id": 202}
    assert problems(answers["not on its list"]) == {("endpoint", "allowed")}
    assert answers["not on its list"].json()["errors"][0]["message"].endswith("(allowed: tts)")
    # Reading RunPod live spends the budget every process shares: admin tokens only. The stored panel is for all.
    assert shop.get("/v1/endpoints/tts/health").status_code == 403
    assert problems(shop.get("/v1/endpoints/tts", params={"live": "true"})) == {("live", "scope")}
    assert admin.get("/v1/endpoints/tts", params={"live": "true"}).status_code == 200
    # The queue panels: a tenant's token sees the endpoints it may use; warming one up is for admin tokens.
    assert [e["endpoint"] for e in shop.get("/v1/endpoints").json()["endpoints"]] == ["tts"]
    assert [e["endpoint"] for e in admin.get("/v1/endpoints").json()["endpoints"]] == ["export", "tts"]
    assert (shop.get("/v1/endpoints/tts").status_code, shop.get("/v1/endpoints/export").status_code) == (200, 403)
    assert app.post("/v1/endpoints/tts/warmup").status_code == 403
    assert len(jobs.list_jobs(runtime=tenant_runtime)) == 2


def test_a_web_app_lists_one_users_jobs_by_indexed_metadata(server: ApiServer, tenant_runtime: Runtime) -> None:
    shop, app, admin = server.client(SHOP), server.client(APP), server.client(ADMIN)
    mine = [shop.post("/v1/jobs", json={"endpoint": "tts", "input": {}, "metadata": {"user": user}}).json()["id"]
            for user in (42, "42", 43)]
    theirs = app.post("/v1/jobs", json={"endpoint": "tts", "input": {}, "metadata": {"user": 42}}).json()["id"]

    found = shop.get("/v1/jobs", params={"meta.user": "42"}).json()["jobs"]
    everyone = admin.get("/v1/jobs", params={"meta.user": "42", "limit": 10}).json()["jobs"]
    bad = {"not indexed": shop.get("/v1/jobs", params={"meta.org": "1"}),
           "twice": shop.get("/v1/jobs", params=[("meta.user", "1"), ("meta.user", "2")]),
           "too long, with a bad limit": shop.get("/v1/jobs", params={"meta.user": "9" * 256, "limit": 0})}
    schema = shop.get("/openapi.json").json()["paths"]["/v1/jobs"]["get"]["parameters"]

    assert {j["id"] for j in found} == set(mine[:2])
    assert {j["id"] for j in everyone} == {*mine[:2], theirs}
    assert {name: (a.status_code, problems(a)) for name, a in bad.items()} == {
        "not indexed": (422, {("meta", "known")}), "twice": (422, {("meta.user", "format")}),
        "too long, with a bad limit": (422, {("meta.user", "format"), ("limit", "range")})}
    assert any(p["name"] == "meta.user" for p in schema)


# -- limits, shared through Redis by two API instances ---------------------------------------------


def redis_second_of_minute(url: str) -> float:
    client = redis.Redis.from_url(url)
    try:
        seconds, micros = client.time()
    finally:
        client.close()
    return seconds % 60 + micros / 1e6


def test_two_api_instances_share_each_tenants_limits_and_answer_429_with_retry_after(
    start_api: Callable[..., ApiServer], tenant_runtime: Runtime, database_url: str, simulator: SimulatorProcess,
    redis_url: str,
) -> None:
    limits = {"tenant_submits_per_minute": {"shop": 3}, "tenant_max_in_flight": {"app": 2}}
    runtimes = [tenant_runtime, make_runtime(database_url, simulator)]
    for rt in runtimes:
        rt.settings = tenant_runtime.settings.model_copy(update=limits)
        rt.submit_rate_counter = SubmitRate(redis_url)
    first, second = (start_api(rt, tokens=ENTRIES) for rt in runtimes)
    shop = [first.client(SHOP), second.client(SHOP)]
    app = [first.client(APP), second.client(APP)]
    body = {"endpoint": "tts", "input": {}}
    # The window is a minute of Redis's clock: start early in one, so that all four submits fall in it.
    wait_until(lambda: redis_second_of_minute(redis_url) < 55, timeout=10, what="a fresh minute on Redis's clock")

    shop_answers = [shop[0].post("/v1/jobs", json=body), shop[1].post("/v1/jobs", json=body),
                    shop[1].post("/v1/jobs", json=body), shop[0].post("/v1/jobs", json=body),
                    shop[1].post("/v1/jobs", json=body, headers={"Idempotency-Key": "new"})]
    app_answers = [app[0].post("/v1/jobs", json=body), app[1].post("/v1/jobs", json=body),
                   app[0].post("/v1/jobs", json=body)]
    finish(tenant_runtime, app_answers[0].json()["id"], JobStatus.COMPLETED)
    after_one_finished = app[1].post("/v1/jobs", json=body)

    assert [a.status_code for a in shop_answers] == [202, 202, 202, 429, 429]
    assert problems(shop_answers[3]) == {("tenant", "limit")}
    assert 1 <= int(shop_answers[3].headers["Retry-After"]) <= 60
    assert [a.status_code for a in app_answers] == [202, 202, 429]
    assert app_answers[2].headers["Retry-After"] == "5"
    assert "limit of 2 jobs in flight" in app_answers[2].json()["errors"][0]["message"]
    assert after_one_finished.status_code == 202
    assert len(jobs.list_jobs(runtime=tenant_runtime)) == 3 + 3  # nothing was written for a 429
    runtimes[1].close()


def test_with_redis_unreachable_submits_per_minute_fail_open_and_jobs_in_flight_still_hold(
    tenant_runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    tenant_runtime.settings = tenant_runtime.settings.model_copy(update={
        "tenant_submits_per_minute": {"*": 1}, "tenant_max_in_flight": {"*": 3}})
    tenant_runtime.submit_rate_counter = SubmitRate("redis://127.0.0.1:9/0", socket_timeout=0.2)  # nothing listens

    started = time.monotonic()
    made = [jobs.submit("tts", {}, tenant="shop", runtime=tenant_runtime) for _ in range(3)]
    with pytest.raises(jobs.TenantLimited) as caught:
        jobs.submit("tts", {}, tenant="shop", runtime=tenant_runtime)

    assert len(made) == 3 and caught.value.limit == "in_flight"
    assert time.monotonic() - started < 5  # Redis is asked once, not once a submit
    assert "submits per minute are not counted" in caplog.text
