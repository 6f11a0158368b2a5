"""The console's routes: each reads or acts through `jobs.api`, renders a template, and carries the console's
security headers. Authorization is asked of `access` alone."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool

from jobs import api
from jobs.api import BULK_ACTIONS, BULK_LIMIT, InvalidJob, InvalidTransition, Job, JobNotFound
from jobs.errors import Problem, RpqError
from jobs.jsonsafe import text_problems
from jobs.runpod.panel import endpoint_panel
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.storage.store import Source
from jobs.web.auth import Tokens
from jobs.web.bodies import media_type, read_bounded
from jobs.web.console import access
from jobs.web.console.access import Principal
from jobs.web.console.session import LOGIN_FORM_SECONDS, SESSION_SECONDS, Signer, token_digest

log = logging.getLogger("rpq.console")

PREFIX = "/console"
COOKIE = "rpq_console"
LOGIN_COOKIE = "rpq_console_login"
#: Forms are a few fields and at most BULK_LIMIT job ids.
MAX_FORM_BYTES = 256 * 1024
PAGE_SIZE = 50
#: The most of a job's input, output or stream item shown on its page.
SHOWN_CHARS = 20_000

#: Sent with every console answer. No inline script or style may run, nothing may frame a page, forms post only
#: here, and no URL (a job id, a filter) leaks to another site in a Referer.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
#: Pages show jobs and carry CSRF tokens: no cache or browser history keeps them.
PAGE_HEADERS = {**SECURITY_HEADERS, "Cache-Control": "no-store"}

#: What each action is called on the page, and what it does.
VERBS = {"cancel": "Cancel", "retry": "Retry", "release": "Release"}
EFFECTS = {
    "cancel": "The job becomes CANCELLED at once; RunPod is told to stop it if it is there.",
    "retry": "A new attempt starts with the same id (its history is kept): the job goes back to PENDING.",
    "release": "The PENDING job is sent to RunPod even while the spend guard holds its endpoint's other jobs.",
}

_HERE = Path(__file__).resolve().parent
_STATIC = {name: ((_HERE / "static" / name).read_bytes(), media_type)
           for name, media_type in (("console.css", "text/css"), ("favicon.svg", "image/svg+xml"))}


def _when(moment: datetime | str | None) -> str:
    if moment is None:
        return "-"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _shown(value: Any) -> str:
    """JSON for a page, cut to SHOWN_CHARS (the CLI and the API have it whole)."""
    text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str, ensure_ascii=False)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"\n… ({len(text) - SHOWN_CHARS:,} more)"


_environment = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=True, undefined=StrictUndefined)
_environment.filters["when"] = _when
_environment.filters["shown"] = _shown
templates = Jinja2Templates(env=_environment)

router = APIRouter(prefix=PREFIX, include_in_schema=False)


# -- plumbing ----------------------------------------------------------------------------------------------------


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _signer(request: Request) -> Signer | None:
    """None while RPQ_CONSOLE_SECRET is not set: the console is off."""
    secret = _runtime(request).settings.console_secret
    return Signer(secret.reveal()) if secret is not None else None


@dataclass
class _Page:
    """What every page shows around its content."""

    principal: Principal | None
    csrf: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _render(request: Request, name: str, page: _Page, *, status: int = 200) -> Response:
    settings = _runtime(request).settings
    context = {"principal": page.principal, "csrf": page.csrf, "flower_url": settings.flower_url,
               "metrics_url": settings.metrics_url, "prefix": PREFIX,
               "shows_endpoints": page.principal is not None and access.shows_endpoints(page.principal),
               **page.extra}
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers.update(PAGE_HEADERS)
    return response


def _message(request: Request, page: _Page, status: int, title: str, text: str) -> Response:
    return _render(request, "message.html", _Page(page.principal, page.csrf, {"title": title, "text": text}),
                   status=status)


def _redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303, headers=PAGE_HEADERS)


def _off(request: Request) -> Response:
    return _message(request, _Page(None), 503, "The console is off",
                    "This server has no RPQ_CONSOLE_SECRET, so it serves no console. Set it (32 characters or "
                    "more, e.g. from `openssl rand -hex 32`) and restart `rpq api`.")


def _to_login(request: Request) -> Response:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return _redirect(f"{PREFIX}/login?{urlencode({'next': here})}")


def _safe_next(target: str | None) -> str:
    """Where to go after login: a console page only (never another site: `//evil`, `/\\evil`)."""
    if target and target.startswith(PREFIX + "/") and not target.startswith(("//", "/\\")) and "\\" not in target:
        return target
    return f"{PREFIX}/jobs"


@dataclass
class _Caller:
    """A request's signer and principal; `refusal` is the answer when there is no console or no session."""

    signer: Signer | None
    principal: Principal | None
    refusal: Response | None = None

    @property
    def page(self) -> _Page:
        csrf = self.signer.csrf_token(self.principal.session) if self.signer and self.principal else ""
        return _Page(self.principal, csrf)


def _caller(request: Request, *, posting: bool = False) -> _Caller:
    signer = _signer(request)
    if signer is None:
        return _Caller(None, None, _off(request))
    principal = access.console_principal(request, signer, request.cookies.get(COOKIE))
    if principal is None:
        # A form posted without a session does nothing; a page asked for without one goes to the login.
        refusal = (_message(request, _Page(None), 403, "Not logged in",
                            "Your session has ended or was never opened: nothing was changed. Log in again.")
                   if posting else _to_login(request))
        return _Caller(signer, None, refusal)
    return _Caller(signer, principal)


async def _form(request: Request) -> dict[str, list[str]] | None:
    """An urlencoded form body, or None when it is not one or is too large."""
    if media_type(request) != "application/x-www-form-urlencoded":
        return None
    body = await read_bounded(request, MAX_FORM_BYTES)
    if body is None:
        return None
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=BULK_LIMIT + 20)
    except (UnicodeDecodeError, ValueError):
        return None


def _first(form: dict[str, list[str]], name: str) -> str:
    values = form.get(name)
    return values[0] if values else ""


async def _posted(request: Request) -> tuple[_Caller, dict[str, list[str]]] | Response:
    """The caller and form of a POST whose session and CSRF token are good, or the refusal. A forged or missing
    CSRF token changes nothing."""
    caller = _caller(request, posting=True)
    if caller.refusal is not None:
        return caller.refusal
    assert caller.signer is not None and caller.principal is not None
    form = await _form(request)
    if form is None or not caller.signer.csrf_ok(caller.principal.session, _first(form, "csrf")):
        log.warning("console: a POST to %s was refused: missing or wrong CSRF token", request.url.path)
        return _message(request, caller.page, 403, "Refused",
                        "The form's security token is missing or wrong, so nothing was changed. Reload the page "
                        "and try again.")
    return caller, form


def _set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


# -- static ------------------------------------------------------------------------------------------------------


@router.get("/static/{name}")
def static(name: str) -> Response:
    """The stylesheet and the icon (without one, a browser asks for /favicon.ico, outside the console)."""
    if name not in _STATIC:
        return Response(status_code=404, headers=SECURITY_HEADERS)
    content, media_type = _STATIC[name]
    return Response(content, media_type=media_type,
                    headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=300"})


# -- login -------------------------------------------------------------------------------------------------------


@router.get("")
@router.get("/")
def home(request: Request) -> Response:
    return _redirect(f"{PREFIX}/jobs")


def _login_page(request: Request, signer: Signer, *, status: int = 200, error: str = "") -> Response:
    cookie, csrf = signer.new_login_nonce()
    response = _render(request, "login.html", _Page(None, csrf, {
        "error": error, "next": _safe_next(request.query_params.get("next"))}), status=status)
    _set_cookie(response, request, LOGIN_COOKIE, cookie, LOGIN_FORM_SECONDS)
    return response


@router.get("/login")
def login_form(request: Request) -> Response:
    signer = _signer(request)
    if signer is None:
        return _off(request)
    return _login_page(request, signer)


@router.post("/login")
async def login(request: Request) -> Response:
    signer = _signer(request)
    if signer is None:
        return _off(request)
    form = await _form(request)
    if form is None or not signer.login_csrf_ok(request.cookies.get(LOGIN_COOKIE), _first(form, "csrf")):
        return _login_page(request, signer, status=403, error="The login form had expired or was not this "
                                                              "server's. Try again.")
    token = _first(form, "token").strip()
    tokens: Tokens = request.app.state.tokens
    principal = None
    # Tokens are ASCII; anything else is no token (and the comparison works on bytes).
    if token.isascii() and token.isprintable() and tokens.accepts(token):
        session, cookie = signer.new_session(token_digest(token))
        principal = access.authorize(tokens, session.token_digest, session)
    if not access.is_admin(principal):
        # The same answer for every failure, and never the token: logs and pages show neither.
        log.warning("console: a login was refused")
        return _login_page(request, signer, status=403, error="That token does not open the console.")
    response = _redirect(_safe_next(_first(form, "next")))
    _set_cookie(response, request, COOKIE, cookie, SESSION_SECONDS)
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
    log.info("console: a session was opened")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    posted = await _posted(request)
    if isinstance(posted, Response):
        return posted
    response = _redirect(f"{PREFIX}/login")
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


# -- jobs --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobQuery:
    """The console's filters, as the jobs page and the bulk pages take them from a query string."""

    status: str = ""
    endpoint: str = ""
    tenant: str = ""
    since: str = ""
    offset: int = 0

    @classmethod
    def read(cls, values: Any) -> tuple[JobQuery, list[Problem]]:
        problems: list[Problem] = []
        raw_offset = str(values.get("offset") or "0").strip()
        offset = int(raw_offset) if raw_offset.isdigit() and len(raw_offset) <= 10 else 0
        if not (raw_offset.isdigit() and len(raw_offset) <= 10):
            problems.append(Problem("offset", "type", "must be a whole number"))
        text = {name: str(values.get(name) or "").strip()[:200] for name in ("status", "endpoint", "tenant", "since")}
        for name, value in text.items():
            if text_problems(value, name):
                problems.append(Problem(name, "format", "must be text"))
                text[name] = ""
        return cls(offset=offset, **text), problems

    @property
    def filtered(self) -> bool:
        return bool(self.status or self.endpoint or self.tenant or self.since)

    def arguments(self, principal: Principal, problems: list[Problem]) -> dict[str, Any]:
        """list_jobs's and select_jobs's filter arguments (a bad `since` is added to `problems`)."""
        since = None
        if self.since:
            try:
                since = api.parse_since(self.since)
            except ValueError as exc:
                problems.append(Problem("since", "format", str(exc)))
        tenant = access.tenant_filter(principal, self.tenant or None)
        return {"status": self.status or None, "endpoint": self.endpoint or None, "since": since,
                **access.tenant_arguments(tenant)}

    def query_string(self, **changes: Any) -> str:
        values = {"status": self.status, "endpoint": self.endpoint, "tenant": self.tenant, "since": self.since,
                  "offset": self.offset, **changes}
        return urlencode({k: v for k, v in values.items() if v not in ("", 0)})


def _visible(principal: Principal, query: JobQuery, found: list[Job]) -> list[Job]:
    """The jobs the principal may see among `found`, of the tenant asked for. (Kept after the tenant filter reaches
    the query: a listing never shows a job its page would refuse.)"""
    tenant = access.tenant_filter(principal, query.tenant or None)
    return [job for job in found if access.sees(principal, job)
            and (tenant is None or access.job_tenant(job) == tenant)]


@router.get("/jobs")
def jobs_page(request: Request) -> Response:
    caller = _caller(request)
    if caller.refusal is not None:
        return caller.refusal
    assert caller.principal is not None
    rt = _runtime(request)
    query, problems = JobQuery.read(request.query_params)
    arguments = query.arguments(caller.principal, problems)
    found: list[Job] = []
    if not problems:
        try:
            found = api.list_jobs(**arguments, limit=PAGE_SIZE, offset=query.offset, runtime=rt)
        except InvalidJob as exc:
            problems = exc.problems
    page = caller.page
    page.extra = {
        "query": query, "problems": problems, "jobs": _visible(caller.principal, query, found),
        "statuses": [s.value for s in JobStatus], "endpoints": sorted(rt.settings.endpoints),
        "newer": query.query_string(offset=max(0, query.offset - PAGE_SIZE)) if query.offset else None,
        "older": query.query_string(offset=query.offset + PAGE_SIZE) if len(found) == PAGE_SIZE else None,
        "bulk_query": query.query_string(offset=0), "actions": VERBS,
    }
    return _render(request, "jobs.html", page, status=422 if problems else 200)


def _visible_job(rt: Runtime, principal: Principal, job_id: str, *, documents: bool = True) -> Job | None:
    """The job, or None when there is none or the principal may not see it: both are the same 404, so a job id of
    another tenant tells nothing."""
    if text_problems(job_id, "id"):
        return None
    try:
        # Without documents: an offloaded input or output stays in the bucket (one that cannot be read there
        # must not keep an operator from cancelling or retrying its job).
        job = api.get(job_id, runtime=rt) if documents else api.peek(job_id, explain=True, runtime=rt)
    except JobNotFound:
        return None
    return job if access.sees(principal, job) else None


def _no_job(request: Request, caller: _Caller) -> Response:
    return _message(request, caller.page, 404, "No such job", "No job has this id.")


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> Response:
    caller = _caller(request)
    if caller.refusal is not None:
        return caller.refusal
    assert caller.principal is not None
    rt = _runtime(request)
    note = ""
    try:
        job = _visible_job(rt, caller.principal, job_id)
    except RpqError as exc:  # an offloaded input or output the bucket could not give back
        job = _visible_job(rt, caller.principal, job_id, documents=False)
        note = f"The job's input or output is in the bucket and could not be read: {exc}"
    if job is None:
        return _no_job(request, caller)
    _, stream = api.stream_events(job.id, runtime=rt)
    page = caller.page
    page.extra = {
        "job": job, "note": note, "events": api.events(job.id, runtime=rt), "stream": stream,
        "actions": {action: VERBS[action] for action in VERBS if job.status in BULK_ACTIONS[action]},
        "done": VERBS.get(request.query_params.get("done", "")),
    }
    return _render(request, "job.html", page)


def _check_action(action: str) -> bool:
    return action in VERBS


@router.get("/jobs/{job_id}/{action}")
def confirm_action(request: Request, job_id: str, action: str) -> Response:
    caller = _caller(request)
    if caller.refusal is not None:
        return caller.refusal
    assert caller.principal is not None
    job = _visible_job(_runtime(request), caller.principal, job_id, documents=False) if _check_action(action) else None
    if job is None:
        return _no_job(request, caller)
    page = caller.page
    page.extra = {"job": job, "action": action, "verb": VERBS[action], "effect": EFFECTS[action],
                  "allowed": job.status in BULK_ACTIONS[action]}
    return _render(request, "confirm.html", page)


def _act(rt: Runtime, action: str, job_id: str) -> Job:
    """Do `action` to one job, as an operator. InvalidTransition when its status does not allow it."""
    if action == "cancel":
        job = api.cancel(job_id, source=Source.OPERATOR, runtime=rt)
        if job.status is not JobStatus.CANCELLED:  # api.cancel leaves a finished job as it is
            raise InvalidTransition(job.id, job.status, "cancel")
        return job
    act: Callable[..., Job] = api.retry if action == "retry" else api.release
    return act(job_id, source=Source.OPERATOR, runtime=rt)


@router.post("/jobs/{job_id}/{action}")
async def do_action(request: Request, job_id: str, action: str) -> Response:
    posted = await _posted(request)
    if isinstance(posted, Response):
        return posted
    caller, _ = posted
    assert caller.principal is not None
    rt = _runtime(request)
    job = await run_in_threadpool(_visible_job, rt, caller.principal, job_id, documents=False) \
        if _check_action(action) else None
    if job is None:
        return _no_job(request, caller)
    try:
        await run_in_threadpool(_act, rt, action, job.id)
    except InvalidTransition as exc:
        return _message(request, caller.page, 409, "Not done",
                        f"Cannot {action} a job that is {exc.status}: nothing was changed.")
    log.info("console: %s of job %s", action, job.id)
    return _redirect(f"{PREFIX}/jobs/{job.id}?done={action}")


# -- bulk --------------------------------------------------------------------------------------------------------


def _selection(rt: Runtime, principal: Principal, action: str, query: JobQuery,
               problems: list[Problem]) -> list[Job]:
    """What a bulk `action` over the query touches: api.select_jobs's list (the CLI's dry run), as the principal
    may see it. Refuses (a problem) to select without a filter, as the CLI does."""
    if not query.filtered:
        problems.append(Problem("filters", "required", "select jobs with a status, endpoint, tenant or age first"))
        return []
    arguments = query.arguments(principal, problems)
    if problems:
        return []
    try:
        found = api.select_jobs(action, **arguments, limit=BULK_LIMIT, runtime=rt)
    except InvalidJob as exc:
        problems.extend(exc.problems)
        return []
    return _visible(principal, query, found)


@router.get("/bulk/{action}")
def confirm_bulk(request: Request, action: str) -> Response:
    caller = _caller(request)
    if caller.refusal is not None:
        return caller.refusal
    assert caller.principal is not None
    if not _check_action(action):
        return _message(request, caller.page, 404, "No such action", "The console can cancel, retry or release.")
    query, problems = JobQuery.read(request.query_params)
    selected = _selection(_runtime(request), caller.principal, action, query, problems) if not problems else []
    page = caller.page
    page.extra = {"action": action, "verb": VERBS[action], "effect": EFFECTS[action], "query": query,
                  "problems": problems, "jobs": selected, "limit": BULK_LIMIT,
                  "back": query.query_string(offset=0)}
    return _render(request, "bulk.html", page, status=422 if problems else 200)


@router.post("/bulk/{action}")
async def do_bulk(request: Request, action: str) -> Response:
    posted = await _posted(request)
    if isinstance(posted, Response):
        return posted
    caller, form = posted
    assert caller.principal is not None
    if not _check_action(action):
        return _message(request, caller.page, 404, "No such action", "The console can cancel, retry or release.")
    query, problems = JobQuery.read({name: _first(form, name) for name in form})
    rt = _runtime(request)
    # The jobs the operator was shown, still selected now: never one that was not on the list, nor one that has
    # moved out of the selection since (finished, retried by someone else).
    shown = list(dict.fromkeys(form.get("id", [])))
    selected = await run_in_threadpool(_selection, rt, caller.principal, action, query, problems)
    if problems:
        return _message(request, caller.page, 422, "Not done", "; ".join(p.message for p in problems))
    now_selected = {job.id for job in selected}
    results: list[dict[str, str]] = []
    for job_id in shown:
        if job_id not in now_selected:
            results.append({"id": job_id, "outcome": "skipped: no longer selected"})
            continue
        try:
            job = await run_in_threadpool(_act, rt, action, job_id)
        except (InvalidTransition, JobNotFound) as exc:
            results.append({"id": job_id, "outcome": f"not done: {exc}"})
            continue
        results.append({"id": job_id, "outcome": f"done: now {job.status.value}"})
    log.info("console: bulk %s of %d job(s)", action, sum(r["outcome"].startswith("done") for r in results))
    page = caller.page
    page.extra = {"verb": VERBS[action], "results": results, "back": query.query_string(offset=0)}
    return _render(request, "bulk_done.html", page)


# -- endpoints ---------------------------------------------------------------------------------------------------


@router.get("/endpoints")
def endpoints_page(request: Request) -> Response:
    caller = _caller(request)
    if caller.refusal is not None:
        return caller.refusal
    assert caller.principal is not None
    if not access.shows_endpoints(caller.principal):
        return _message(request, caller.page, 403, "Not yours",
                        "The endpoint panel counts every tenant's jobs: operators of every tenant see it.")
    rt = _runtime(request)
    panels = [endpoint_panel(rt, endpoint) for _, endpoint in sorted(rt.settings.endpoints.items())]
    page = caller.page
    page.extra = {"panels": panels, "seconds": lambda s: "-" if s is None else str(timedelta(seconds=round(s)))}
    return _render(request, "endpoints.html", page)
