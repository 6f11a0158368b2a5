"""The console in a real browser: Debian's chromium driven by Playwright, against `rpq api`'s app on SQLite.

One browser for the module and a fresh context (no cookies) per test. Each test saves screenshots of the pages it
saw under artifacts/console/ (git-ignored; CI keeps the folder). With CI=true a missing browser or Playwright
fails; elsewhere the module skips, saying what to install.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import jobs
from jobs.api import select_jobs
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.web.console import access
from jobs.web.console.access import Principal
from jobs.web.console.session import Session
from tests.conftest import IN_CI, ROOT
from tests.integration.console_server import (
    FLOWER_URL,
    METRICS_URL,
    TOKEN,
    TOKEN_ENTRY,
    Served,
    console_runtime,
    empty,
    make_job,
    serve,
)

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("RPQ_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = ROOT / "artifacts" / "console"
#: How long an expectation may take before the test fails (the pages answer in milliseconds).
WAIT_MS = 10_000

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev dependencies have it
    sync_playwright = None  # type: ignore[assignment]


def _missing(message: str) -> None:
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        _missing("Playwright is not installed: scripts/setup installs the dev dependencies")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        _missing(f"no chromium at {CHROMIUM}: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {SCREENSHOTS}")
    rt = console_runtime(tmp_path_factory.mktemp("console-browser"))
    with serve(rt) as served:
        yield served
    rt.close()


@pytest.fixture
def rt(served: Served) -> Runtime:
    empty(served.runtime)
    return served.runtime


@pytest.fixture
def page(browser: Browser, served: Served) -> Iterator[Page]:
    context = browser.new_context(base_url=served.base_url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    blocked: list[str] = []
    # A page that breaks its own CSP (an inline style or script, something from elsewhere) is told so on the
    # browser's console; a script error is a page error. The pages must cause neither. (Refusals, 403 and 404,
    # are logged there too, as failed loads: some tests ask for them.)
    page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda error: blocked.append(str(error)))
    yield page
    context.close()
    assert not blocked, f"the browser reported: {blocked}"


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def log_in(page: Page, token: str = TOKEN) -> None:
    page.goto("/console/login")
    page.fill("input[name=token]", token)
    page.click("form.login button[type=submit]")


def status_on_page(page: Page) -> str:
    return page.inner_text("#status")


# -- the operator's way through -----------------------------------------------------------------------------------


def test_logged_out_the_console_sends_you_to_log_in_then_back_where_you_were(page: Page, rt: Runtime) -> None:
    job_id = make_job(rt)

    page.goto(f"/console/jobs/{job_id}")
    expect(page).to_have_url(re.compile(r"/console/login\?next="))
    shot(page, "01-login")
    page.fill("input[name=token]", TOKEN)
    page.click("form.login button[type=submit]")

    expect(page).to_have_url(re.compile(rf"/console/jobs/{job_id}$"))
    expect(page.locator("#status")).to_have_text("PENDING")


def test_log_in_filter_by_status_open_a_failed_job_retry_it_and_see_it_move(page: Page, rt: Runtime) -> None:
    failed = make_job(rt, status=JobStatus.FAILED)
    pending = make_job(rt)
    completed = make_job(rt, "export", JobStatus.COMPLETED)
    log_in(page)
    expect(page.locator("#jobs tbody tr")).to_have_count(3)
    shot(page, "02-jobs")

    page.select_option("select[name=status]", "FAILED")
    page.click("#filters button[type=submit]")
    expect(page.locator("#jobs tbody tr")).to_have_count(1)
    assert page.locator("#jobs tbody tr").get_attribute("data-id") == failed
    assert pending not in page.content() and completed not in page.content()
    shot(page, "03-jobs-failed")

    page.click(f"#jobs a[href='/console/jobs/{failed}']")
    expect(page.locator("#status")).to_have_text("FAILED")
    expect(page.locator("#events tbody tr").last).to_contain_text("FAILED")
    expect(page.locator("dd.error")).to_have_text("handler failed: out of memory")
    assert page.locator("#action-cancel").count() == 0  # a finished job cannot be cancelled
    shot(page, "04-job-failed")

    page.click("#action-retry")
    expect(page.locator("#confirm button")).to_have_text("Retry this job")
    shot(page, "05-confirm-retry")
    page.click("#confirm button")

    expect(page).to_have_url(re.compile(rf"/console/jobs/{failed}\?done=retry$"))
    expect(page.locator("#status")).to_have_text("PENDING")
    expect(page.locator("#done")).to_contain_text("Retry")
    expect(page.locator("#events tbody tr").last).to_contain_text("attempt 2")
    shot(page, "06-job-retried")
    job = jobs.get(failed, runtime=rt)
    assert (job.status, job.attempt) == (JobStatus.PENDING, 2)
    assert jobs.events(failed, runtime=rt)[-1].source == "operator"


def test_cancel_asks_first_then_cancels(page: Page, rt: Runtime) -> None:
    job_id = make_job(rt)
    log_in(page)

    page.goto(f"/console/jobs/{job_id}")
    page.click("#action-cancel")
    assert jobs.get(job_id, runtime=rt).status is JobStatus.PENDING  # the confirm page changed nothing
    page.click("#confirm button")

    expect(page.locator("#status")).to_have_text("CANCELLED")
    assert jobs.get(job_id, runtime=rt).status is JobStatus.CANCELLED


def test_bulk_retry_shows_the_dry_run_list_and_touches_exactly_those_jobs(page: Page, rt: Runtime) -> None:
    failed = [make_job(rt, status=JobStatus.FAILED) for _ in range(3)]
    timed_out = make_job(rt, status=JobStatus.TIMED_OUT)
    untouched = [make_job(rt), make_job(rt, status=JobStatus.COMPLETED), make_job(rt, "export", JobStatus.FAILED)]
    log_in(page)

    page.goto("/console/jobs?endpoint=tts")
    page.click("#bulk-retry")
    listed = page.locator("#jobs tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)")
    shot(page, "07-bulk-retry-dry-run")
    assert listed == [job.id for job in select_jobs("retry", endpoint="tts", runtime=rt)]  # the CLI's dry run
    assert set(listed) == {*failed, timed_out}
    expect(page.locator("#count")).to_contain_text("4")
    assert all(jobs.get(j, runtime=rt).status is not JobStatus.PENDING for j in failed)  # nothing done yet

    page.click("#confirm button")
    expect(page.locator("#results tbody tr")).to_have_count(4)
    shot(page, "08-bulk-retry-done")
    assert {j: jobs.get(j, runtime=rt).status for j in listed} == dict.fromkeys(listed, JobStatus.PENDING)
    assert [jobs.get(j, runtime=rt).status for j in untouched] == [JobStatus.PENDING, JobStatus.COMPLETED,
                                                                    JobStatus.FAILED]


def test_the_endpoint_panel_and_the_links_to_flower_and_metrics(page: Page, rt: Runtime) -> None:
    make_job(rt)
    log_in(page)

    page.click("header nav a:text('Endpoints')")
    expect(page.locator("#endpoint-tts")).to_contain_text("PENDING 1")
    expect(page.locator("#endpoint-export")).to_contain_text("no observation yet")
    assert page.get_attribute("header nav a:text('Flower')", "href") == FLOWER_URL
    assert page.get_attribute("header nav a:text('Metrics')", "href") == METRICS_URL
    shot(page, "09-endpoints")


# -- what is refused ----------------------------------------------------------------------------------------------


def test_a_forged_csrf_token_is_refused_and_the_job_is_unchanged(page: Page, rt: Runtime) -> None:
    job_id = make_job(rt, status=JobStatus.FAILED)
    log_in(page)

    page.goto(f"/console/jobs/{job_id}/retry")
    page.locator("#confirm input[name=csrf]").evaluate("field => field.value = 'forged'")
    page.click("#confirm button")

    expect(page.locator("#message")).to_contain_text("nothing was changed")
    shot(page, "10-forged-csrf")
    missing = page.request.post(f"/console/jobs/{job_id}/retry", form={"other": "x"}, max_redirects=0)
    assert missing.status == 403
    assert jobs.get(job_id, runtime=rt).status is JobStatus.FAILED
    assert len(jobs.events(job_id, runtime=rt)) == 2  # submitted, failed: no retry was recorded


def test_after_logout_the_pages_send_you_to_log_in_and_an_old_form_does_nothing(page: Page, rt: Runtime) -> None:
    job_id = make_job(rt)
    log_in(page)
    page.goto(f"/console/jobs/{job_id}/cancel")
    old_csrf = page.locator("#confirm input[name=csrf]").get_attribute("value")
    assert old_csrf

    page.click("form.logout button")
    expect(page).to_have_url(re.compile(r"/console/login$"))
    assert not [c for c in page.context.cookies() if c["name"] == "rpq_console"]
    page.goto("/console/jobs")
    expect(page).to_have_url(re.compile(r"/console/login\?next="))
    posted = page.request.post(f"/console/jobs/{job_id}/cancel", form={"csrf": old_csrf}, max_redirects=0)

    assert posted.status == 403
    assert jobs.get(job_id, runtime=rt).status is JobStatus.PENDING


def test_a_wrong_token_does_not_log_in(page: Page, rt: Runtime) -> None:
    log_in(page, "rpq_not-a-token")

    expect(page.locator("#error")).to_contain_text("does not open the console")
    assert not [c for c in page.context.cookies() if c["name"] == "rpq_console"]


def test_a_tenant_scoped_session_gets_a_404_for_another_tenants_job(
        page: Page, rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written against the console's one authorization hook: whatever authorize() decides a session is for, a
    job outside its tenant is not there, on its page, its confirm page, its POST and the listing."""
    others = make_job(rt, status=JobStatus.FAILED)  # of no tenant "shop": another tenant's, for this session

    def shop_admin(tokens: Any, digest: bytes, session: Session) -> Principal | None:
        return Principal(session=session, tenant="shop", admin=True)

    monkeypatch.setattr(access, "authorize", shop_admin)
    log_in(page)

    expect(page.locator("#jobs tbody tr")).to_have_text("no jobs")
    for path in (f"/console/jobs/{others}", f"/console/jobs/{others}/retry"):
        response = page.goto(path)
        assert response is not None and response.status == 404
        expect(page.locator("#message")).to_have_text("No job has this id.")
    shot(page, "11-other-tenant")
    csrf = page.locator("form.logout input[name=csrf]").get_attribute("value")
    posted = page.request.post(f"/console/jobs/{others}/retry", form={"csrf": csrf or ""}, max_redirects=0)
    assert posted.status == 404
    assert jobs.get(others, runtime=rt).status is JobStatus.FAILED


def test_a_tenants_token_does_not_open_the_console_and_an_admins_shows_every_tenants_jobs(
        browser: Browser, tmp_path: Path) -> None:
    shop = "rpq_shop-" + "s" * 32
    rt = console_runtime(tmp_path)
    others = jobs.submit("tts", {}, tenant="other", runtime=rt).id
    entry = f"tenant=shop;scope=submit+read+cancel+retry;sha256:{hashlib.sha256(shop.encode()).hexdigest()}"
    with serve(rt, tokens=[TOKEN_ENTRY, entry]) as served:
        context = browser.new_context(base_url=served.base_url)
        context.set_default_timeout(3_000)
        page = context.new_page()
        log_in(page, shop)
        expect(page.locator("#error")).to_contain_text("does not open the console")
        refused = page.goto(f"/console/jobs/{others}")
        assert refused is not None and "/console/login?next=" in refused.url  # no session: sent to log in
        log_in(page, TOKEN)  # an operator's token sees every tenant's jobs
        shown = page.goto(f"/console/jobs/{others}")
        context.close()
    rt.close()
    assert shown is not None and shown.status == 200


# -- a browser's EventSource through an events URL -----------------------------------------------------------------


def test_a_browsers_event_source_follows_a_job_through_an_events_url_with_no_token_in_the_page(
        browser: Browser, tmp_path: Path) -> None:
    import httpx

    from jobs.settings import Secret

    rt = console_runtime(tmp_path, api_secret=Secret("events-" + "e" * 32))
    job_id = make_job(rt, status=JobStatus.CANCELLED)
    with serve(rt) as served:
        made = httpx.post(f"{served.base_url}/v1/jobs/{job_id}/events-url",
                          headers={"Authorization": f"Bearer {TOKEN}"}).json()
        context = browser.new_context(base_url=served.base_url)
        page = context.new_page()
        page.goto("/healthz")  # any page of the API's origin: the URL is same-origin, as behind a web app's proxy
        # The page knows the URL alone; EventSource sends no Authorization header.
        received = page.evaluate("""url => new Promise((resolve, reject) => {
            const events = new EventSource(url), seen = [];
            setTimeout(() => reject(new Error("no final event within 10 s: " + JSON.stringify(seen))), 10000);
            for (const kind of ["started", "output", "metrics", "end"]) {
                events.addEventListener(kind, e => seen.push([kind, JSON.parse(e.data)]));
            }
            events.addEventListener("error", e => {
                events.close();
                if (e.data) { seen.push(["error", JSON.parse(e.data)]); resolve(seen); }
                else reject(new Error("the stream failed: " + JSON.stringify(seen)));
            });
        })""", made["path"])
        context.close()
    rt.close()
    kind, data = received[-1]
    assert (kind, data["code"], data["status"]) == ("error", "cancelled", "CANCELLED")
