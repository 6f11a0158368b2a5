"""The ASGI app: thin routes over `jobs.api`, one error translation, bearer auth, correlation ids."""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from http import HTTPStatus
from importlib.metadata import version
from typing import Annotated, Any
from urllib.parse import urlsplit

import anyio
import httpx
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import jobs
from jobs import ops
from jobs.api import (
    MAX_CORRELATION_ID_LENGTH,
    MAX_KEY_LENGTH,
    MAX_META_VALUE_LENGTH,
    InvalidJob,
    InvalidTransition,
    JobNotFound,
)
from jobs.bucket.access import FileNotFound, InvalidUpload
from jobs.bucket.store import R2_HOST_SUFFIX
from jobs.errors import (
    ConfigError,
    FilesNotConfigured,
    InvalidObjectName,
    ObjectStoreError,
    Problem,
    RpqError,
    RunPodError,
    RunPodNotFound,
    RunPodTransient,
)
from jobs.observability import logcontext, logs
from jobs.runpod.client import MAX_RUN_PAYLOAD_BYTES
from jobs.runpod.panel import endpoint_panel
from jobs.runtime import Runtime, get_runtime
from jobs.settings import Endpoint, Settings
from jobs.states import JobStatus
from jobs.storage.models import utcnow
from jobs.storage.store import Source
from jobs.tenants import TenantLimited
from jobs.web.auth import ADMIN, CANCEL, READ, RETRY, SUBMIT, Grant, Tokens
from jobs.web.bodies import media_type, read_bounded
from jobs.web.console import router as console
from jobs.web.events import EVENTS_URL_CONTEXT, EVENTS_URL_PURPOSE, JobId
from jobs.web.events import router as streams_and_webhooks
from jobs.web.schemas import (
    CORRELATION_ID_PATTERN,
    META_PREFIX,
    STREAM_EVENTS,
    EndpointHealth,
    EndpointPanel,
    EndpointPanels,
    ErrorBody,
    EventsUrl,
    FileUrl,
    FileUrlQuery,
    Healthz,
    JobFiles,
    JobFilter,
    JobList,
    JobOut,
    JobRequest,
    SubmitHeaders,
    UploadRequest,
    UploadTicketOut,
    WarmupOut,
    check,
    endpoint_schema,
    files_schema,
    header_schema,
    is_usable_correlation_id,
    joined_file_problems,
    meta_query,
    outputs_schema,
    problems_of,
    query_values,
)
from jobs.web.signing import Sealer

log = logging.getLogger("rpq.web")

#: RunPod's limit on a /run body, plus room for metadata, which stays here and is not sent.
MAX_BODY_BYTES = MAX_RUN_PAYLOAD_BYTES + 1_000_000
HEALTHZ_TIMEOUT_SECONDS = 5.0
CORRELATION_HEADER = "X-Correlation-ID"
_SCHEMA_REF = "#/components/schemas/{model}"


def create_app(
    runtime: Runtime | None = None,
    *,
    tokens: str | Iterable[str] | None = None,
    allow_no_auth: bool | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The HTTP API over `runtime` (default: this process's, from the environment).

    `tokens` are entries as in RPQ_API_TOKENS (`sha256:<hex>` or plain; a list or one comma-separated
    string) and `allow_no_auth` is RPQ_API_ALLOW_NO_AUTH; either one left None is read from the
    environment. With no token and no-auth not allowed this raises ConfigError: the API never
    starts open by accident.
    """
    runtime = runtime or get_runtime()
    accepted = Tokens.configure(tokens, allow_no_auth=allow_no_auth, endpoints=runtime.settings.endpoints.keys())
    # Here rather than in serve(): each of uvicorn's worker processes builds its own app with this.
    redact_webhook_tokens(logging.getLogger("uvicorn.access"))
    logcontext.quiet_botocore()
    if accepted.open:
        log.warning("the HTTP API is serving WITHOUT authentication (RPQ_API_ALLOW_NO_AUTH=true)")
    app = _Api(
        title="rpq",
        version=version("rpq"),
        summary="Enqueue and follow RunPod serverless jobs.",
        description="Every /v1 route needs `Authorization: Bearer <token>`. A tenant's token sees only its "
        "tenant's jobs (another tenant's job is a 404, as an unknown id is) and only what its scope allows (403 "
        "otherwise). Every answer carries an "
        "`X-Correlation-ID` header: the one you sent (1 to 128 visible ASCII characters), or a new one. "
        'Errors are `{"errors": [{"field", "constraint", "message"}, ...]}`, listing every problem at '
        "once; messages never quote what was sent.",
    )
    app.state.runtime = runtime
    app.state.tokens = accepted
    app.state.max_body_bytes = max_body_bytes
    app.add_middleware(CorrelationId)
    # The database's errors too: as an unexpected error, the answer would be sent and the connection dropped after it.
    for kind in (RpqError, ApiError, RequestValidationError, StarletteHTTPException, OperationalError, InterfaceError):
        app.add_exception_handler(kind, _error_response)
    app.add_exception_handler(Exception, _unexpected_error_response)
    app.include_router(v1)
    secret = runtime.settings.api_secret
    app.state.events_sealer = Sealer(secret.reveal(), EVENTS_URL_CONTEXT) if secret is not None else None
    events, webhooks = streams_and_webhooks(Depends(_events_grant), ApiError)
    app.include_router(events)
    app.include_router(webhooks)
    app.include_router(probes)
    app.include_router(console)  # the operator console at /console (off without RPQ_CONSOLE_SECRET)
    return app


def serve(host: str, port: int, *, workers: int = 1) -> None:
    """Serve the API with uvicorn until interrupted. Logs the URL, never a token.

    The API is CPU-bound (a few ms of Python per request), so past one core's worth of requests run
    several `workers` processes, each building its app (and its runtime: engine, Redis, Celery app)
    from the environment."""
    import uvicorn

    logs.configure(for_people=False)  # unless `rpq api` did already
    create_app()  # fail here, once, on a bad configuration (no tokens, say) rather than in each worker
    shown_host = f"[{host}]" if ":" in host else host
    log.info("rpq HTTP API serving http://%s:%d/v1 (schema at /openapi.json, docs at /docs) with %d worker "
             "process(es)", shown_host, port, workers)
    # The access log has the method, path and status only: no header, so no bearer token; a webhook's
    # path holds its token, which create_app's filter masks.
    # uvicorn kills a worker that does not answer its supervisor's ping in time and starts another. A new
    # worker imports rpq first (FastAPI, SQLAlchemy, Celery: seconds on a busy machine), which uvicorn's
    # default of 5 s did not always cover: workers were killed while starting, again and again.
    uvicorn.run("jobs.web.app:create_app", factory=True, workers=workers, host=host, port=port,
                log_config=worker_log_config() if workers > 1 else None, server_header=False,
                timeout_graceful_shutdown=5, timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS)


#: How long a worker may take to answer its supervisor (uvicorn) before it is replaced.
WORKER_HEALTHCHECK_SECONDS = 30


def worker_log_config() -> dict[str, Any]:
    """Logging for `serve`'s worker processes, as `logging.config.dictConfig` takes it.

    Each worker is a new interpreter (uvicorn spawns them), so it has none of this process's logging:
    without this its access log and warnings went nowhere. uvicorn applies it in every worker (and here).
    The level and RPQ_LOG_FORMAT are this process's, and each line names its process, since the workers write to
    one stream."""
    root = logging.getLogger()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"rpq": {"()": "jobs.observability.logs.formatter", "process": True}},
        "filters": {"tags": {"()": "jobs.observability.logcontext.ContextFilter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "rpq", "filters": ["tags"]}},
        "root": {"level": logging.getLevelName(root.getEffectiveLevel()), "handlers": ["stderr"]},
        # The CLI quietens httpx (a line per request to RunPod); so are the workers.
        "loggers": {"httpx": {"level": logging.getLevelName(logging.getLogger("httpx").getEffectiveLevel())}},
    }


_WEBHOOK_TOKEN = re.compile(r"(/webhooks/runpod/)[^/?#\s]+")


class RedactWebhookTokens(logging.Filter):
    """Masks the token in webhook paths: it is the only credential a webhook call needs, and an access
    log is read by more people than the database."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_WEBHOOK_TOKEN.sub(r"\1***", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = _WEBHOOK_TOKEN.sub(r"\1***", record.msg)
        return True


def redact_webhook_tokens(logger: logging.Logger) -> None:
    """Install `RedactWebhookTokens` on `logger`, once."""
    if not any(isinstance(f, RedactWebhookTokens) for f in logger.filters):
        logger.addFilter(RedactWebhookTokens())


# -- errors: the one translation -----------------------------------------------------------------


class ApiError(Exception):
    """An answer other than success, with every problem to report."""

    def __init__(self, status: int, problems: list[Problem], headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.problems, self.headers = status, problems, headers or {}


def translate(exc: Exception) -> ApiError:
    """The one place where an exception becomes an HTTP answer. Answers never quote the request."""
    match exc:
        case ApiError():
            return exc
        case InvalidJob() | InvalidUpload():
            return ApiError(422, exc.problems)
        case JobNotFound():
            return ApiError(404, [Problem("id", "known", "no job has this id")])
        case FileNotFound():
            return ApiError(404, [Problem("name", "known", "the job has no file of this name in the bucket (an "
                                                           "output is there once its job has completed)")])
        case TenantLimited():
            which = "jobs in flight" if exc.limit == "in_flight" else "submits per minute"
            return ApiError(429, [Problem("tenant", "limit", f"this tenant is at its limit of {exc.allowed} {which}; "
                                                             f"try again in {exc.retry_after} s")],
                            {"Retry-After": str(exc.retry_after)})
        case InvalidTransition():
            return ApiError(409, [Problem("status", "transition", f"cannot {exc.action} a job that is {exc.status}")])
        case RunPodError():
            return _runpod_error(exc)
        case FilesNotConfigured():
            # The server's configuration, not the request: a client can do nothing but go elsewhere.
            return ApiError(503, [Problem("files", "configured", "files are off on this server: RPQ_S3_BUCKET is "
                                                                 "not set")])
        case ObjectStoreError():
            # Built from the operation, the key and S3's error code: never a URL or a credential.
            log.warning("the object store failed: %s", exc)
            return ApiError(502, [Problem("store", "upstream", str(exc))])
        case InvalidObjectName():  # each "field: rule", as jobs.bucket.store words them
            return ApiError(422, [Problem(text.partition(": ")[0], "format", text.partition(": ")[2] or text)
                                  for text in exc.problems])
        case OperationalError() | InterfaceError():
            # The database is down or cut off (a restart, a failover): the client can only come back later.
            log.warning("the database did not answer: %s", type(exc.orig or exc).__name__)
            return ApiError(503, [Problem("database", "available", "the database is not answering; try again shortly "
                                          "(a submit repeated with the same Idempotency-Key makes no second job)")],
                            {"Retry-After": "5"})
        case ConfigError():
            log.error("cannot serve a request: %s", exc)
            return ApiError(500, [Problem("server", "config", "the server is misconfigured; its log says how")])
        case RequestValidationError():
            return ApiError(422, problems_of(list(exc.errors())))
        case StarletteHTTPException(status_code=404):
            return ApiError(404, [Problem("path", "known", "no such route")])
        case StarletteHTTPException(status_code=405):
            return ApiError(405, [Problem("method", "allowed", "method not allowed here")], dict(exc.headers or {}))
        case StarletteHTTPException():
            return ApiError(exc.status_code, [Problem("request", "http", "the request was refused")])
    # Only the type: the server (uvicorn) logs the traceback of an exception no handler expected.
    log.error("unexpected %s while serving a request", type(exc).__name__)
    return ApiError(500, [Problem("server", "internal", "unexpected error; the server log has the details")])


def _runpod_error(exc: RunPodError) -> ApiError:
    log.warning("a RunPod call failed: %s", exc)  # RunPod errors never contain the API key (jobs/errors.py)
    if isinstance(exc.__cause__, httpx.TimeoutException) or exc.status_code == 504:
        return ApiError(504, [Problem("runpod", "timeout", "RunPod did not answer in time; try again later")])
    # The public class's docstring says what happened (the private ones are markers).
    public = next(kind for kind in type(exc).__mro__ if kind.__module__ == "jobs.errors")
    message = (public.__doc__ or "RunPod did not do what was asked.").strip()
    if exc.status_code is not None:
        message += f" (RunPod answered HTTP {exc.status_code})"
    retry_after = exc.retry_after if isinstance(exc, RunPodTransient) else None
    headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after else None
    return ApiError(502, [Problem("runpod", "upstream", message)], headers)


def _error_body(error: ApiError) -> JSONResponse:
    return JSONResponse({"errors": [asdict(p) for p in error.problems]}, status_code=error.status,
                        headers=error.headers)


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    error = translate(exc)
    if 400 <= error.status < 500:
        _log_rejected(request, error)
    return _error_body(error)


def _log_rejected(request: Request, error: ApiError) -> None:
    """One WARNING per refused request, carrying its correlation id (bound by the middleware): the route's
    template, never the path as sent (a webhook's path holds its token), and each problem's field and rule."""
    route = request.scope.get("route")
    template = getattr(route, "path", None) or "(no such route)"
    said = ", ".join(f"{p.field}:{p.constraint}" for p in error.problems)
    log.warning("refused %s %s with %d (%s)", request.method, template, error.status, said)


async def _unexpected_error_response(request: Request, exc: Exception) -> JSONResponse:
    response = _error_body(translate(exc))
    # This answer is sent from outside the middleware stack, so it gets its correlation id here.
    response.headers[CORRELATION_HEADER] = getattr(request.state, "correlation_id", None) or str(uuid.uuid4())
    return response


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error answers."""
    return {code: {"model": ErrorBody, "description": HTTPStatus(code).phrase} for code in codes}


_TOO_MANY: dict[str, Any] = {
    "model": ErrorBody, "description": "The token's tenant is at its limit of jobs in flight or submits per minute.",
    "headers": {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}}}


# -- the schema of what is validated by hand -----------------------------------------------------


def _json_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(ref_template=_SCHEMA_REF)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = {"$ref": _SCHEMA_REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _query_parameters(model: type[BaseModel]) -> dict[str, Any]:
    properties = _json_schema(model)["properties"]
    return {"parameters": [{"name": name, "in": "query", "required": False, "schema": schema}
                           for name, schema in properties.items()]}


class _Api(FastAPI):
    """FastAPI documents what it validates; our bodies and queries are validated by hand (to report
    every problem at once), so their models are added to the schema here."""

    def openapi(self) -> dict[str, Any]:
        first = self.openapi_schema is None
        schema = super().openapi()
        if first:
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            models: list[type[BaseModel]] = [JobRequest, JobFilter, UploadRequest, *STREAM_EVENTS.values()]
            for model in models:
                definition = _json_schema(model)
                components.update(definition.pop("$defs", {}))
                components[model.__name__] = definition
            # Which strings are endpoints depends on this server's settings, not on the models alone.
            settings = self.state.runtime.settings
            endpoint = endpoint_schema(settings)
            components["JobRequest"]["properties"]["endpoint"].update(endpoint)
            components["JobFilter"]["properties"]["endpoint"]["items"] = endpoint
            listing = schema["paths"]["/v1/jobs"]["get"]["parameters"]
            for parameter in listing:
                if parameter["name"] == "endpoint":
                    parameter["schema"]["items"] = endpoint
            # The metadata keys this server indexes, each a parameter of its own: meta.user=42.
            listing += [{"name": f"{META_PREFIX}{key}", "in": "query", "required": False,
                         "description": f"Only jobs whose metadata has this value for {key!r} (a string, a whole "
                         "number or a boolean, compared as text).",
                         "schema": {"type": "string", "maxLength": MAX_META_VALUE_LENGTH, "pattern": "^[^\u0000]*$"}}
                        for key in settings.metadata_index]
            _document_files(components, settings)
        return schema


def _document_files(components: dict[str, Any], settings: Settings) -> None:
    """What this server takes for files: keys under its prefix, uploads up to its limit, or, with no bucket, none."""
    job = components["JobRequest"]["properties"]
    job["files"].update(files_schema(settings))
    job["outputs"].update(outputs_schema(settings))
    if settings.s3_bucket is None:
        job["offload"]["enum"] = [False]
        for name in ("files", "outputs", "offload"):
            job[name]["description"] += " This server has no bucket: RPQ_S3_BUCKET is not set."
    upload = components["UploadRequest"]
    for name in ("size", "max_bytes"):
        upload["properties"][name]["anyOf"][0]["maximum"] = settings.upload_max_bytes
    if (urlsplit(settings.s3_endpoint_url or "").hostname or "").endswith(R2_HOST_SUFFIX):
        upload["anyOf"] = [option for option in upload["anyOf"] if option["required"] == ["size"]]
        upload["properties"]["size"]["description"] += " This server's bucket is on R2: size is required."


# -- correlation ids and auth --------------------------------------------------------------------


class CorrelationId:
    """Gives each request a correlation id, the caller's X-Correlation-ID when usable or else a new
    UUID, kept in `request.state.correlation_id` and returned on every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # what `request.state` reads and writes
        given = Headers(scope=scope).get(CORRELATION_HEADER)
        state["correlation_id"] = given if given and is_usable_correlation_id(given) else str(uuid.uuid4())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[CORRELATION_HEADER] = state["correlation_id"]
            await send(message)

        with logcontext.scope():  # the request's log lines, the access log's too, carry its correlation id
            logcontext.bind(correlation_id=state["correlation_id"])
            await self.app(scope, receive, send_with_id)


_bearer = HTTPBearer(auto_error=False, description="A token listed (or whose sha256 is listed) in RPQ_API_TOKENS.")


# The dependencies are `async def` although they never wait: FastAPI runs a plain `def` dependency in the
# thread pool, and that hop (twice per request) cost the event loop more than the dependencies themselves.


async def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Grant:
    tokens: Tokens = request.app.state.tokens
    grant = tokens.grant_for(credentials.credentials if credentials else None)
    if grant is None:
        # One answer whatever was wrong (no header, another scheme, a wrong token): it reveals nothing.
        raise ApiError(401, [Problem("authorization", "auth", "missing or invalid bearer token")],
                       {"WWW-Authenticate": "Bearer"})
    logcontext.bind_tenant(grant.tenant)  # every line about the request names its tenant from here on
    return grant


def _scoped(scope: str) -> Any:
    """A dependency: the request's grant, when it has `scope` (403 otherwise). FastAPI calls require_token
    once a request however many dependencies name it."""

    async def check(grant: Annotated[Grant, Depends(require_token)]) -> Grant:
        if not grant.allows(scope):
            raise ApiError(403, [Problem("authorization", "scope", f"this token's scope does not include {scope}")])
        return grant

    return Depends(check)


async def _events_grant(
    request: Request, job_id: JobId,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    access: Annotated[str | None, Query(
        description="An events URL's signed access (POST /v1/jobs/{id}/events-url), instead of a bearer token: a "
        "browser's EventSource cannot send one.", max_length=1024)] = None,
) -> Grant:
    """Who may follow a job's events: a bearer token with the read scope, or the signed access of an events URL
    made for this very job (by a token that could read it) and not expired."""
    if access is None:
        grant = await require_token(request, credentials)
        if not grant.allows(READ):
            raise ApiError(403, [Problem("authorization", "scope", f"this token's scope does not include {READ}")])
        return grant
    sealer: Sealer | None = request.app.state.events_sealer
    payload = sealer.open(EVENTS_URL_PURPOSE, access) if sealer is not None else None
    if payload is None or payload.get("job") != job_id:
        raise ApiError(401, [Problem("access", "auth", "this events URL is not valid (any more): ask for a new one")])
    return Grant(tenant=None, scopes=frozenset({READ}))  # this job alone: its id is what was signed


SubmitGrant = Annotated[Grant, _scoped(SUBMIT)]
ReadGrant = Annotated[Grant, _scoped(READ)]
CancelGrant = Annotated[Grant, _scoped(CANCEL)]
RetryGrant = Annotated[Grant, _scoped(RETRY)]
AdminGrant = Annotated[Grant, _scoped(ADMIN)]


def _check_endpoint(grant: Grant, endpoint: str, settings: Settings) -> None:
    """403 unless the token may run work on `endpoint` (its allow-list; a bare RunPod id needs admin)."""
    if grant.may_use(endpoint, settings.endpoints.keys()):
        return
    allowed = ", ".join(grant.usable_endpoints(settings.endpoints.keys())) or "none"
    bare = endpoint not in settings.endpoints
    raise ApiError(403, [Problem("endpoint", "allowed",
                                 ("a bare RunPod endpoint id needs an admin token; name an endpoint" if bare
                                  else "this token may not use this endpoint") + f" (allowed: {allowed})")])


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _runtime_dependency(request: Request) -> Runtime:
    return _runtime(request)


RuntimeDep = Annotated[Runtime, Depends(_runtime_dependency)]

# 422 on every route: the schema then shows our error shape where FastAPI would show its own.
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=_errors(401, 403, 422))
probes = APIRouter()


# -- routes --------------------------------------------------------------------------------------


@v1.post(
    "/jobs",
    status_code=202,
    response_model=JobOut,
    summary="Submit a job",
    description="202 with the new job; 200 with the existing one when an earlier request had the same "
    "Idempotency-Key (for the same endpoint and tenant). Nothing is written for a request with any problem. 403 "
    "for an endpoint the token may not use; 429 (with Retry-After) when the token's tenant is at one of its limits.",
    responses={200: {"model": JobOut, "description": "The job an earlier request with this Idempotency-Key made."},
               **_errors(400, 413, 415, 502), 429: _TOO_MANY},
    openapi_extra=_json_body(JobRequest),
)
async def submit_job(
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    grant: SubmitGrant,
    # Checked with the body by SubmitHeaders, so that one answer has every problem; documented here.
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", description=f"1 to {MAX_KEY_LENGTH} characters; a retried request gets the same job.",
        json_schema_extra=header_schema(minLength=1, maxLength=MAX_KEY_LENGTH))] = None,
    correlation_header: Annotated[str | None, Header(
        alias=CORRELATION_HEADER, description="Stored on the job when the body has no correlation_id.",
        json_schema_extra=header_schema(maxLength=MAX_CORRELATION_ID_LENGTH, pattern=CORRELATION_ID_PATTERN))] = None,
) -> dict[str, Any]:
    job_request, headers = await _read_submission(request, runtime, idempotency_key, correlation_header)
    _check_endpoint(grant, job_request.endpoint, runtime.settings)
    correlation_id = job_request.correlation_id or request.state.correlation_id
    request.state.correlation_id = correlation_id
    started = utcnow()
    job = await run_in_threadpool(
        jobs.submit, job_request.endpoint, job_request.input, policy=job_request.policy_dict(),
        webhook=job_request.webhook, idempotency_key=headers.idempotency_key, correlation_id=correlation_id,
        metadata=job_request.metadata, stream=job_request.stream, priority=job_request.priority,
        files=job_request.files, outputs=job_request.outputs, offload=job_request.offload, tenant=grant.tenant,
        runtime=runtime,
    )
    # For a known Idempotency-Key, jobs.submit returns the first job: one made before this request
    # began. (Two first requests racing each other may both get 202; they get the same job.)
    if job.created_at < started:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job.to_dict()


@v1.get("/jobs", response_model=JobList, summary="List jobs, newest first",
        openapi_extra=_query_parameters(JobFilter))
def list_jobs(request: Request, runtime: RuntimeDep, grant: ReadGrant) -> dict[str, Any]:
    query, meta, meta_problems = meta_query(request.query_params, runtime.settings.metadata_index)
    filters, problems = check(JobFilter, query_values(JobFilter, query), settings=runtime.settings, root="query")
    if filters is None or meta_problems:
        raise InvalidJob(problems + meta_problems)
    found = jobs.list_jobs(status=filters.status or None, endpoint=filters.endpoint or None, since=filters.since,
                           limit=filters.limit, offset=filters.offset, tenant=grant.sees, meta=meta, runtime=runtime)
    return {"jobs": [job.to_dict() for job in found], "limit": filters.limit, "offset": filters.offset,
            "next_offset": filters.offset + len(found) if len(found) == filters.limit else None}


@v1.get("/jobs/{job_id}", response_model=JobOut, summary="Get a job",
        description="An input sent with offload, or an output moved to the bucket, is read back from the bucket "
        "(502 when it cannot be read, 503 when this server has no bucket any more).", responses=_errors(404, 502, 503))
def get_job(job_id: JobId, runtime: RuntimeDep, grant: ReadGrant) -> dict[str, Any]:
    return jobs.get(job_id, tenant=grant.sees, runtime=runtime).to_dict()


@v1.post("/jobs/{job_id}/cancel", response_model=JobOut, summary="Cancel a job that has not finished",
         responses=_errors(404, 409))
def cancel_job(job_id: JobId, runtime: RuntimeDep, grant: CancelGrant) -> dict[str, Any]:
    job = jobs.cancel(job_id, tenant=grant.sees, runtime=runtime)
    if job.status is not JobStatus.CANCELLED:
        # jobs.cancel leaves a finished job as it is; say so instead of answering as if it were cancelled.
        raise InvalidTransition(job.id, job.status, "cancel")
    return job.to_dict()


@v1.post("/jobs/{job_id}/retry", status_code=202, response_model=JobOut,
         summary="Start a new attempt of a job that failed, timed out, expired or was cancelled",
         responses=_errors(404, 409))
def retry_job(job_id: JobId, runtime: RuntimeDep, grant: RetryGrant) -> dict[str, Any]:
    return jobs.retry(job_id, tenant=grant.sees, runtime=runtime).to_dict()


@v1.post("/jobs/{job_id}/events-url", response_model=EventsUrl, status_code=201,
         summary="A short-lived URL that follows the job's events without a bearer token",
         description="For a browser's `EventSource`, which cannot send headers: the URL carries a signed access "
         "for this job alone, valid for RPQ_EVENTS_URL_SECONDS to open the stream (a stream opened in time runs to "
         "its end). 503 when the server has no RPQ_API_SECRET.", responses=_errors(404, 503))
def events_url(job_id: JobId, request: Request, runtime: RuntimeDep, grant: ReadGrant) -> dict[str, Any]:
    sealer: Sealer | None = request.app.state.events_sealer
    if sealer is None:
        raise ApiError(503, [Problem("events_url", "configured", "this server makes no events URLs: "
                                                                 "RPQ_API_SECRET is not set")])
    jobs.api.peek(job_id, tenant=grant.sees, runtime=runtime)  # 404 unless the token sees the job
    expires = int(utcnow().timestamp()) + runtime.settings.events_url_seconds
    access = sealer.seal(EVENTS_URL_PURPOSE, {"job": job_id, "exp": expires})
    path = f"/v1/jobs/{job_id}/events?access={access}"
    return {"url": str(request.base_url).rstrip("/") + path, "path": path,
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat()}


@v1.post("/jobs/{job_id}/release", response_model=JobOut,
         summary="Let a PENDING job past the spend guard",
         description="The job is sent even while the spend guard holds its endpoint's other new jobs "
         "(`waiting.reason` is `spend` for those). 409 unless the job is PENDING.", responses=_errors(404, 409))
def release_job(job_id: JobId, runtime: RuntimeDep, grant: AdminGrant) -> dict[str, Any]:
    # An operator's decision over the spend guard, which holds every tenant's jobs: admin only.
    return jobs.release(job_id, source=Source.API, runtime=runtime).to_dict()


# -- files ---------------------------------------------------------------------------------------

#: A presigned URL is a credential: no cache, proxy or browser history keeps an answer holding one, and no
#: page the client opens next learns it from a Referer.
_CREDENTIAL_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
_CREDENTIAL_HEADER_DOCS = {"Cache-Control": {"description": "no-store: the answer holds a credential.",
                                             "schema": {"type": "string"}}}
_BUCKET_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"model": ErrorBody, "description": "The bucket did not answer as asked."},
    503: {"model": ErrorBody, "description": "This server has no bucket: RPQ_S3_BUCKET is not set."},
}


@v1.post(
    "/uploads",
    status_code=201,
    response_model=UploadTicketOut,
    summary="Prepare a direct upload of one file",
    description="Reserves a key and signs an upload of the file straight to the bucket, bound to that key, its "
    "content type and its size: with `size`, a PUT of exactly that many bytes; without it, an S3 POST policy of "
    "at most `max_bytes` (R2 has none: give `size`). Then submit the job with `files: {name: {\"key\": key}}`; "
    "the object is checked by HEAD before the job goes to RunPod. The ticket is a credential until it expires.",
    responses={201: {"headers": _CREDENTIAL_HEADER_DOCS}, **_errors(400, 413, 415), **_BUCKET_ERRORS},
    openapi_extra=_json_body(UploadRequest),
)
async def prepare_upload(request: Request, response: Response, runtime: RuntimeDep,
                         grant: SubmitGrant) -> dict[str, Any]:
    upload, problems = check(UploadRequest, await _read_json(request))
    if upload is None:
        raise InvalidUpload(problems)
    ticket = await run_in_threadpool(jobs.prepare_upload, upload.name, upload.content_type, upload.max_bytes,
                                     size=upload.size, expires=upload.expires, tenant=grant.tenant, runtime=runtime)
    response.headers.update(_CREDENTIAL_HEADERS)
    return ticket.to_dict()


@v1.get("/jobs/{job_id}/files", response_model=JobFiles, summary="List a job's files",
        description="Its inputs, then its current attempt's outputs, each with what the bucket said about it. "
        "No URLs: GET /v1/jobs/{id}/files/{name} makes one.", responses=_errors(404))
def job_files(job_id: JobId, runtime: RuntimeDep, grant: ReadGrant) -> dict[str, Any]:
    return {"files": [info.to_dict() for info in jobs.files(job_id, tenant=grant.sees, runtime=runtime)]}


@v1.get(
    "/jobs/{job_id}/files/{name:path}",
    response_class=Response,
    summary="Download one of a job's files",
    description="A presigned GET of the file `name` (an output of the current attempt first, then an input): by "
    "default a 302 to it, so `curl -L` downloads the file; with `redirect=false` a 200 with the URL in JSON. A "
    "client following the redirect must not send this API's Authorization header on to the bucket (curl and "
    "httpx drop it for another host; the store refuses a request with two credentials). The URL is a "
    "credential until it expires: never cached, and never written to this server's log. 404 until the file is "
    "in the bucket (an output once its job has completed).",
    responses={
        200: {"model": FileUrl, "description": "With redirect=false: the URL.", "headers": _CREDENTIAL_HEADER_DOCS},
        302: {"description": "The URL, in Location.",
              "headers": {"Location": {"description": "The presigned GET.", "schema": {"type": "string"}},
                          **_CREDENTIAL_HEADER_DOCS}},
        **_errors(404), **_BUCKET_ERRORS,
    },
    openapi_extra=_query_parameters(FileUrlQuery),
)
def job_file(job_id: JobId, name: str, request: Request, runtime: RuntimeDep, grant: ReadGrant) -> Response:
    query, problems = check(FileUrlQuery, query_values(FileUrlQuery, request.query_params), root="query")
    if query is None:
        raise InvalidJob(problems)
    url = jobs.file_url(job_id, name, expires=query.expires, tenant=grant.sees, runtime=runtime)
    if query.redirect:
        return RedirectResponse(url, status_code=302, headers=_CREDENTIAL_HEADERS)
    return JSONResponse({"url": url, "expires_in": query.expires or runtime.settings.presign_seconds},
                        headers=_CREDENTIAL_HEADERS)


def _configured(runtime: Runtime, name: str) -> Endpoint:
    """An endpoint RUNPOD_ENDPOINTS names (the panel is of rpq's endpoints, not of any RunPod id), else a 404."""
    endpoint = runtime.settings.endpoints.get(name)
    if endpoint is None:
        raise ApiError(404, [Problem("name", "known", "unknown endpoint: not in RUNPOD_ENDPOINTS")])
    return endpoint


@v1.get("/endpoints", response_model=EndpointPanels, summary="Every configured endpoint's queue panel",
        description="From what rpq stored: beat's last /health, the collectors' last /workers, the job table. "
        "Makes no RunPod call, so a page may refresh it often.")
def endpoint_panels(runtime: RuntimeDep, grant: ReadGrant) -> dict[str, Any]:
    configured = sorted(runtime.settings.endpoints.items())
    # A tenant's token sees the endpoints it may use, no more: the others' names are not its business.
    return {"endpoints": [endpoint_panel(runtime, endpoint) for name, endpoint in configured
                          if grant.may_use(name, runtime.settings.endpoints.keys())]}


@v1.get("/endpoints/{name}", response_model=EndpointPanel, summary="An endpoint's queue panel",
        description="From what rpq stored, with no RunPod call; `live=true` (admin scope only) reads RunPod's /health "
        "now instead (it spends the request budget every process shares).", responses=_errors(404, 422, 502, 504))
def endpoint_panel_route(name: str, runtime: RuntimeDep, grant: ReadGrant, live: bool = False) -> dict[str, Any]:
    endpoint = _configured(runtime, name)
    _check_endpoint(grant, name, runtime.settings)
    if live:
        _live_needs_admin(grant)
    return endpoint_panel(runtime, endpoint, live=live)


def _live_needs_admin(grant: Grant) -> None:
    """Every live read spends the RunPod request budget all processes share: an operator's call, not a web page's
    (a page refreshing it for each of its users would spend the budget the dispatcher and poller need)."""
    if not grant.admin:
        raise ApiError(403, [Problem("live", "scope", "reading RunPod live needs the admin scope; "
                                                      "GET /v1/endpoints/{name} serves the stored panel")])


@v1.post("/endpoints/{name}/warmup", response_model=WarmupOut, summary="Warm an endpoint up, idempotently",
         description="Reads RunPod's /health, then sends one warm-up job only if no worker is warm or starting and "
         "no warm-up job is in flight; says what it did and why.", responses=_errors(404, 502, 504))
def endpoint_warmup(name: str, runtime: RuntimeDep, grant: AdminGrant) -> dict[str, Any]:
    # Admin only: a warm-up job belongs to no tenant, so no tenant's limits would count it.
    return asdict(ops.warmup(runtime, _configured(runtime, name).name))


@v1.get("/endpoints/{name}/health", response_model=EndpointHealth, summary="RunPod's /health of an endpoint, live",
        description="Deprecated: calls RunPod on every request, so it needs the admin scope. GET "
        "/v1/endpoints/{name} serves the panel from stored rows to any reader.", deprecated=True,
        responses=_errors(404, 502, 504))
def endpoint_health(name: str, runtime: RuntimeDep, grant: ReadGrant) -> EndpointHealth:
    try:
        endpoint = runtime.settings.resolve_endpoint(name)
    except ConfigError:
        raise ApiError(404, [Problem("name", "known", "unknown endpoint: not in RUNPOD_ENDPOINTS and not a "
                                                      "RunPod endpoint id")]) from None
    _check_endpoint(grant, name, runtime.settings)
    _live_needs_admin(grant)
    try:
        health = runtime.runpod.health(endpoint.id)
    except RunPodNotFound:
        # RunPod's 404 for an endpoint id it does not know: the name is wrong, not RunPod broken.
        raise ApiError(404, [Problem("name", "known", f"RunPod does not know endpoint {endpoint.id}: deleted, or "
                                                      "the id is wrong")]) from None
    return EndpointHealth(endpoint=endpoint.name, endpoint_id=endpoint.id, jobs=health.jobs, workers=health.workers)


@probes.get("/healthz", response_model=Healthz, summary="Is the database answering? (No token needed.)",
            responses={503: {"model": Healthz}})
async def healthz(request: Request) -> JSONResponse:
    engine = _runtime(request).engine
    try:
        with anyio.fail_after(HEALTHZ_TIMEOUT_SECONDS):
            await anyio.to_thread.run_sync(_select_one, engine, abandon_on_cancel=True)
    except Exception as exc:
        log.warning("healthz: the database did not answer: %s: %s", type(exc).__name__, exc)
        return JSONResponse({"ok": False}, status_code=503)
    return JSONResponse({"ok": True})


def _select_one(engine: Engine) -> None:
    # A DBAPI cursor, not a Session: on SQLite every SQLAlchemy transaction begins IMMEDIATE, which
    # would queue the probe behind the writers it is not meant to wait for.
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT 1")
        cursor.fetchone()
        cursor.close()
    finally:
        connection.close()


# -- helpers -------------------------------------------------------------------------------------


async def _read_submission(
    request: Request, runtime: Runtime, idempotency_key: str | None, correlation_header: str | None
) -> tuple[JobRequest, SubmitHeaders]:
    """The body and headers of `POST /v1/jobs`, or InvalidJob with every problem in either."""
    body = await _read_json(request)
    job_request, problems = check(JobRequest, body, settings=runtime.settings)
    if job_request is None:
        problems += [p for p in joined_file_problems(body, has_files=runtime.has_files) if p not in problems]
    headers, header_problems = check(SubmitHeaders, {"Idempotency-Key": idempotency_key,
                                                     CORRELATION_HEADER: correlation_header})
    if job_request is None or headers is None:
        raise InvalidJob(problems + header_problems)
    return job_request, headers


async def _read_json(request: Request) -> object:
    limit: int = request.app.state.max_body_bytes
    sent_as = media_type(request)
    if sent_as != "application/json" and not sent_as.endswith("+json"):
        raise ApiError(415, [Problem("Content-Type", "format", "must be application/json")])
    body = await read_bounded(request, limit)
    if body is None:
        raise ApiError(413, [Problem("body", "size", f"must be at most {limit:,} bytes")])
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(400, [Problem("body", "json", f"not valid JSON (line {exc.lineno}, column {exc.colno})")]
                       ) from None
    except (ValueError, RecursionError):  # not UTF-8, NaN or Infinity, nested too deep
        raise ApiError(400, [Problem("body", "json", "not valid JSON")]) from None


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")

