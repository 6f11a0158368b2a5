"""The console over HTTP without a browser: its headers and cookies, who gets in, CSRF, and the bulk selection it
shares with the CLI. (test_console_browser.py drives the same pages in chromium.)"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import jobs
from jobs.api import BULK_ACTIONS, InvalidJob, select_jobs
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.web import new_token
from jobs.web.console.routes import COOKIE, SECURITY_HEADERS
from tests.integration.console_server import SECRET, TOKEN, Served, console_runtime, empty, make_job, serve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    rt = console_runtime(tmp_path_factory.mktemp("console"))
    with serve(rt) as served:
        yield served
    rt.close()


@pytest.fixture
def rt(served: Served) -> Runtime:
    empty(served.runtime)
    return served.runtime


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=30) as client:
        yield client


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, "the page has no CSRF field"
    return found.group(1)


def log_in(client: httpx.Client, token: str = TOKEN) -> httpx.Response:
    form = client.get("/console/login")
    return client.post("/console/login", data={"csrf": csrf_of(form), "token": token, "next": "/console/jobs"})


def test_every_console_answer_carries_the_security_headers_and_pages_are_never_cached(
        client: httpx.Client, rt: Runtime) -> None:
    job_id = make_job(rt)
    log_in(client)

    for path in ("/console/login", "/console/jobs", f"/console/jobs/{job_id}", f"/console/jobs/{job_id}/cancel",
                 "/console/endpoints", "/console/bulk/retry?status=FAILED", "/console/jobs/no-such-job"):
        response = client.get(path)
        assert response.headers["content-type"].startswith("text/html"), path
        assert {name: response.headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS, path
        assert response.headers["cache-control"] == "no-store", path
        assert "<script" not in response.text and " style=" not in response.text, path
    css = client.get("/console/static/console.css")
    assert (css.status_code, css.headers["content-type"].split(";")[0]) == (200, "text/css")
    assert css.headers["x-content-type-options"] == "nosniff"


def test_the_session_cookie_is_httponly_strict_scoped_to_the_console_and_holds_no_token(
        client: httpx.Client, rt: Runtime) -> None:
    response = log_in(client)

    assert (response.status_code, response.headers["location"]) == (303, "/console/jobs")
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}="))
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "samesite=strict" in cookie.lower() and "path=/console" in cookie.lower()
    assert "secure" not in attributes  # served over http here; over https it is Secure
    assert TOKEN not in cookie and SECRET not in cookie


def test_a_wrong_token_opens_no_session_and_no_log_line_shows_a_token(
        client: httpx.Client, rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "rpq_" + secrets.token_urlsafe(32)
    with caplog.at_level(logging.DEBUG):
        refused = log_in(client, wrong)
        log_in(client)

    assert refused.status_code == 403 and "does not open the console" in refused.text
    assert wrong not in refused.text
    assert not [c for c in refused.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}=")]
    assert not [r for r in caplog.records if wrong in r.getMessage() or TOKEN in r.getMessage()]


def test_a_session_ends_when_its_token_is_removed_from_the_configuration(
        client: httpx.Client, served: Served) -> None:
    log_in(client)
    session = client.cookies.get(COOKIE, path="/console")
    assert client.get("/console/jobs").status_code == 200

    _, other_entry = new_token()
    with serve(served.runtime, tokens=[other_entry]) as elsewhere, httpx.Client(base_url=elsewhere.base_url) as c:
        c.cookies.set(COOKIE, str(session), path="/console")
        assert c.get("/console/jobs").status_code == 303


def test_a_forged_or_missing_csrf_token_is_refused_and_nothing_changes(client: httpx.Client, rt: Runtime) -> None:
    job_id = make_job(rt)
    log_in(client)

    for form in ({"csrf": "forged"}, {}, {"csrf": csrf_of(client.get("/console/login"))}):  # the login form's
        response = client.post(f"/console/jobs/{job_id}/cancel", data=form)
        assert response.status_code == 403
    as_json = client.post(f"/console/jobs/{job_id}/cancel", json={"csrf": csrf_of(client.get("/console/jobs"))})
    assert as_json.status_code == 403  # a form only: the token must come as a form field
    assert jobs.get(job_id, runtime=rt).status is JobStatus.PENDING


def test_a_login_form_from_elsewhere_is_refused(client: httpx.Client, rt: Runtime) -> None:
    response = client.post("/console/login", data={"csrf": "forged", "token": TOKEN})

    assert response.status_code == 403
    assert client.cookies.get(COOKIE, path="/console") is None


def test_after_login_it_goes_to_a_console_page_only(client: httpx.Client, rt: Runtime) -> None:
    for target, landed in [("/console/endpoints", "/console/endpoints"), ("https://evil.example/", "/console/jobs"),
                           ("//evil.example/console/", "/console/jobs"), ("/console/\\evil", "/console/jobs")]:
        form = client.get("/console/login")
        response = client.post("/console/login", data={"csrf": csrf_of(form), "token": TOKEN, "next": target})
        assert response.headers["location"] == landed


def test_without_a_secret_the_console_is_off_and_says_which_variable(tmp_path: Path) -> None:
    rt = console_runtime(tmp_path, console_secret=None)
    with serve(rt) as served, httpx.Client(base_url=served.base_url) as client:
        response = client.get("/console/login")
        posted = client.post("/console/login", data={"token": TOKEN})
    rt.close()

    assert response.status_code == posted.status_code == 503
    assert "RPQ_CONSOLE_SECRET" in response.text


def test_the_console_is_not_part_of_the_api_schema(client: httpx.Client) -> None:
    assert not [path for path in client.get("/openapi.json").json()["paths"] if path.startswith("/console")]


# -- the bulk selection the console and the CLI share --------------------------------------------------------------


def test_a_bulk_selection_takes_only_the_statuses_its_action_allows(rt: Runtime) -> None:
    failed, cancelled, pending = (make_job(rt, status=s) for s in (JobStatus.FAILED, JobStatus.CANCELLED,
                                                                    JobStatus.PENDING))
    make_job(rt, "export", JobStatus.FAILED)

    assert {j.id for j in select_jobs("retry", endpoint="tts", runtime=rt)} == {failed, cancelled}
    assert [j.id for j in select_jobs("retry", status="failed", endpoint="tts", runtime=rt)] == [failed]
    assert [j.id for j in select_jobs("cancel", endpoint="tts", runtime=rt)] == [pending]
    assert select_jobs("cancel", status="FAILED", runtime=rt) == []  # selected, but not the action's to touch
    assert set(BULK_ACTIONS) == {"cancel", "retry", "release"}


def test_a_bulk_selection_refuses_an_unknown_status_or_endpoint_with_every_problem(rt: Runtime) -> None:
    with pytest.raises(InvalidJob) as caught:
        select_jobs("retry", status=["FAILED", "BROKEN"], endpoint="No Such Endpoint", runtime=rt)

    assert {(p.field, p.constraint) for p in caught.value.problems} == {("status", "known"), ("endpoint", "known")}
