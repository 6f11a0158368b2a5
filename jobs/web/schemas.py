"""The HTTP API's request and response bodies, and how validation errors become `Problem`s.

Requests are validated by hand (`check`) rather than by FastAPI before the route runs: that is
what lets one answer carry every problem at once, the static ones (types, ranges, unknown
fields) and the one that needs the configuration (is the endpoint known?), which the models
check through the validation context. The schema FastAPI publishes comes from the same models.

The bounds are the domain's own constants and the rules for values (what can be stored and
served, what RunPod requires) are the domain's own functions, called through `domain_rule`, so
these models can refuse earlier than `jobs.submit` but never differently; `jobs.submit` still
checks everything (and alone knows the 10 MB limit).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from starlette.datastructures import QueryParams

from jobs import api as jobs_api
from jobs.api import (
    MAX_CORRELATION_ID_LENGTH,
    MAX_KEY_LENGTH,
    MAX_LIST_LIMIT,
    MAX_LIST_OFFSET,
    MAX_WEBHOOK_LENGTH,
    SinceOutOfRange,
)
from jobs.bucket import jobfiles
from jobs.bucket.jobfiles import MAX_FILES, RPQ_KEY
from jobs.bucket.store import CONTENT_TYPE_RE, MAX_KEY_BYTES, MAX_NAME_CHARS
from jobs.errors import ConfigError, Problem
from jobs.flow.waiting import WaitReason
from jobs.jsonsafe import MAX_DEPTH
from jobs.runpod.client import POLICY_BOUNDS_MS, JobCounts, WorkerCounts
from jobs.settings import ENDPOINT_ID_RE, PRESIGN_MAX_SECONDS, Settings
from jobs.states import JobStatus
from jobs.storage.models import FileRole, FileState

Model = TypeVar("Model", bound=BaseModel)

# Correlation ids travel in a response header, so they are kept to visible ASCII.
CORRELATION_ID_PATTERN = r"^[!-~]+$"
# Documents the ages parse_since accepts within MAX_SINCE_AGE (as many digits as every value fits in).
SINCE_AGE_PATTERN = r"^([0-9]{1,9}s|[0-9]{1,7}m|[0-9]{1,5}h|[0-9]{1,4}d)$"
# Documents jobs.api.webhook_problems for clients (and Schemathesis): an http(s) URL without NUL.
WEBHOOK_PATTERN = r"^https?://[^\u0000]*$"


# -- requests ------------------------------------------------------------------------------------

#: The pydantic error type that carries the domain's own Problems (see `domain_rule`).
DOMAIN_ERROR = "rpq_domain"


def domain_rule(rule: Callable[[Any], list[Problem]]) -> AfterValidator:
    """Check a field with the domain's rule (a `jobs.api` function), so an answer names the same
    problems `jobs.submit` would: all of them, each with the domain's field, constraint and message."""

    def check_value(value: Any) -> Any:
        problems = rule(value)
        if problems:
            raise PydanticCustomError(DOMAIN_ERROR, "{summary}", {
                "summary": "; ".join(p.message for p in problems), "problems": tuple(problems)})
        return value

    return AfterValidator(check_value)


def _known_endpoint(value: str, info: ValidationInfo) -> str:
    """The endpoint must resolve with the server's settings, which validation gets as its context."""
    settings = info.context.get("settings") if isinstance(info.context, Mapping) else None
    if isinstance(settings, Settings):
        try:
            settings.resolve_endpoint(value)
        except ConfigError:
            # Not the domain's message: that one quotes the value, and answers never echo input.
            known = ", ".join(sorted(settings.endpoints)) or "none configured"
            raise PydanticCustomError(
                "known", "unknown endpoint: not in RUNPOD_ENDPOINTS ({known}) and not a RunPod endpoint id",
                {"known": known},
            ) from None
    return value


EndpointName = Annotated[str, AfterValidator(_known_endpoint)]
# ENDPOINT_ID_RE as JSON Schema writes it (ECMA regex has no \Z; its $ ends the text).
_ENDPOINT_ID_PATTERN = ENDPOINT_ID_RE.pattern.removesuffix(r"\Z") + "$"


def endpoint_schema(settings: Settings) -> dict[str, Any]:
    """What `_known_endpoint` accepts with these settings, for the published schema: a configured name
    or a RunPod endpoint id, so a client (or Schemathesis) knows which strings are endpoints."""
    bare_id = {"type": "string", "pattern": _ENDPOINT_ID_PATTERN}
    names = sorted(settings.endpoints)
    return {"anyOf": [{"type": "string", "enum": names}, bare_id]} if names else bare_id


class Policy(BaseModel):
    """RunPod's execution policy for the job."""

    model_config = ConfigDict(extra="forbid", strict=True)

    executionTimeout: Annotated[int | None, BeforeValidator(jobs_api.whole_number)] = Field(  # RunPod's names
        None, ge=POLICY_BOUNDS_MS["executionTimeout"][0], le=POLICY_BOUNDS_MS["executionTimeout"][1],
        description="Milliseconds a worker may run the job before RunPod stops it.",
    )
    ttl: Annotated[int | None, BeforeValidator(jobs_api.whole_number)] = Field(
        None, ge=POLICY_BOUNDS_MS["ttl"][0], le=POLICY_BOUNDS_MS["ttl"][1],
        description="Milliseconds RunPod keeps the job, queued or running, before deleting it.",
    )
    lowPriority: bool | None = Field(
        None, description="Queued jobs do not make RunPod start more workers.",
    )


# -- files ----------------------------------------------------------------------------------------

# check_name (jobs.bucket.store) as a pattern: parts joined by '/', none empty, '.' or '..', no leading '/'.
# "Printable" is stated as far as a pattern can: no control characters (ECMA regex has no \p{...} here).
_NAME_CHAR = r"[^/\u0000-\u001f\u007f-\u009f]"
_NAME_PART = (r"(?:[^/.\u0000-\u001f\u007f-\u009f]|\.[^/.\u0000-\u001f\u007f-\u009f]|\.\." + _NAME_CHAR + ")"
              + _NAME_CHAR + "*")
_NAME_PATH = f"{_NAME_PART}(?:/{_NAME_PART})*"
NAME_SCHEMA: dict[str, Any] = {
    "type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS, "pattern": f"^{_NAME_PATH}$",
    "description": "A file name: printable, parts joined by '/' (frames/0001.png), none empty, '.' or '..', no "
    "leading '/'.", "examples": ["audio.wav"]}
CONTENT_TYPE_SCHEMA: dict[str, Any] = {"type": "string", "pattern": CONTENT_TYPE_RE.pattern.removesuffix(r"\Z") + "$",
                                       "description": "A MIME type, printable ASCII.", "examples": ["video/mp4"]}
_NULL = {"type": "null"}
# What a client sends instead of a file: over HTTP a file is always an object the bucket holds already.
_FILE_REF_RULE = ("must be an object {key, content_type}: over HTTP a file is named by its key in the bucket "
                  "(upload it first with POST /v1/uploads)")


def key_schema(prefix: str | None) -> dict[str, Any]:
    """An object key as submit takes one (check_key), under this server's prefix when it is known."""
    start = prefix.replace(".", r"\.") + "/" if prefix else ""
    return {"type": "string", "minLength": 1, "maxLength": MAX_KEY_BYTES, "pattern": f"^{start}{_NAME_PATH}$",
            "description": "The key of an object in the bucket: an upload ticket's key, or any object under the "
            f"server's prefix{f' ({prefix}/)' if prefix else ''}. At most {MAX_KEY_BYTES} bytes in UTF-8."}


def files_schema(settings: Settings | None) -> dict[str, Any]:
    """`JobRequest.files` for clients: with `settings` that have no bucket, only an empty object or null."""
    if settings is not None and settings.s3_bucket is None:
        return {"anyOf": [{"type": "object", "maxProperties": 0}, _NULL]}
    file_ref = {
        "title": "FileRef", "type": "object", "required": ["key"], "additionalProperties": False,
        "properties": {"key": key_schema(settings.s3_prefix if settings else None),
                       "content_type": {"anyOf": [CONTENT_TYPE_SCHEMA, _NULL],
                                        "description": "Default: the upload's, else guessed from the name."}}}
    return {"anyOf": [{"type": "object", "maxProperties": MAX_FILES, "propertyNames": NAME_SCHEMA,
                       "additionalProperties": file_ref}, _NULL]}


def outputs_schema(settings: Settings | None) -> dict[str, Any]:
    """`JobRequest.outputs` for clients: with `settings` that have no bucket, only empty or null."""
    if settings is not None and settings.s3_bucket is None:
        return {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "object", "maxProperties": 0}, _NULL]}
    return {"anyOf": [
        {"type": "array", "items": NAME_SCHEMA, "uniqueItems": True, "maxItems": MAX_FILES},
        {"type": "object", "maxProperties": MAX_FILES, "propertyNames": NAME_SCHEMA,
         "additionalProperties": {"anyOf": [CONTENT_TYPE_SCHEMA, _NULL]}},
        _NULL]}


def files_problems(files: dict[str, Any] | None) -> list[Problem]:
    """submit's rules for `files`, worded for HTTP where a file is always a key (Python also takes bytes and paths)."""
    if files is None:
        return []
    not_objects = {f"files[{i}]" for i, source in enumerate(files.values()) if not isinstance(source, dict)}
    return [Problem(p.field, p.constraint, _FILE_REF_RULE) if p.field in not_objects and p.constraint == "type"
            else p for p in jobfiles.read_request(files, None, False, {})[1]]


def outputs_problems(outputs: list[Any] | dict[str, Any] | None) -> list[Problem]:
    return jobfiles.read_request(None, outputs, False, {})[1]


def joined_file_problems(body: object, *, has_files: bool) -> list[Problem]:
    """submit's rules that join the files to the rest of the job: the input must be an object to add their URLs
    to, and the server must have a bucket. For a body its model refused, so that the answer still names every
    problem `jobs.submit` would (it checks these only once each field is right)."""
    if not isinstance(body, dict):
        return []
    request, problems = jobfiles.read_request(body.get("files"), body.get("outputs"), body.get("offload", False),
                                              body.get("input"))
    joined = [p for p in problems if p.message == jobfiles.INPUT_FOR_FILES_RULE]
    if request and not has_files:
        # submit's own problem, word for word
        joined.append(Problem(jobfiles.asked_for(request), "configured", jobs_api.FILES_OFF))
    return joined


# The rule `joined_file_problems` checks on the input, as JSON Schema states it: with files or outputs (and no
# offload) the input is an object without the key rpq adds.
_INPUT_FOR_FILES: dict[str, Any] = {
    # Only a non-empty declaration asks for files: `"outputs": {}` is a job without any.
    "if": {"anyOf": [{"required": ["files"], "properties": {"files": {"type": "object", "minProperties": 1}}},
                     {"required": ["outputs"], "properties": {"outputs": {"type": ["array", "object"],
                                                                          "minItems": 1, "minProperties": 1}}}],
           "not": {"required": ["offload"], "properties": {"offload": {"const": True}}}},
    "then": {"properties": {"input": {"type": "object", "not": {"required": [RPQ_KEY]}}}},
}


class JobRequest(BaseModel):
    """A job to run. `Idempotency-Key` and `X-Correlation-ID` come as headers."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_INPUT_FOR_FILES)

    endpoint: EndpointName = Field(description="A name from RUNPOD_ENDPOINTS, or a RunPod endpoint id.",
                                   examples=["tts"])
    input: Annotated[Any, domain_rule(jobs_api.input_problems)] = Field(
        description="The handler's input: any JSON but null (RunPod requires an input; send {} for none), "
        f"nested at most {MAX_DEPTH} levels. With policy and webhook, at most 10 MB.",
        examples=[{"text": "hello"}], json_schema_extra={"not": {"type": "null"}})
    policy: Policy | None = None
    webhook: Annotated[str | None, domain_rule(jobs_api.webhook_problems)] = Field(
        None, description="An http(s) URL RunPod calls when the job finishes.",
        json_schema_extra={"maxLength": MAX_WEBHOOK_LENGTH, "pattern": WEBHOOK_PATTERN})
    correlation_id: str | None = Field(
        None, max_length=MAX_CORRELATION_ID_LENGTH, pattern=CORRELATION_ID_PATTERN,
        description="Your request or trace id, stored on the job. Default: the X-Correlation-ID header.",
    )
    metadata: Annotated[dict[str, Any] | None, domain_rule(jobs_api.metadata_problems)] = Field(
        None, description=f"Any JSON object, nested at most {MAX_DEPTH} levels, stored with the job for you.")
    stream: bool = Field(False, description="For generator handlers: collect their chunks as they come, "
                         "for the job's event stream.")
    priority: Annotated[int, BeforeValidator(jobs_api.whole_number)] = Field(
        0, ge=jobs_api.MIN_PRIORITY, le=jobs_api.MAX_PRIORITY,
        description="Among the endpoint's waiting jobs, higher goes to RunPod first; equal priorities go oldest "
        "first. (RunPod's own queue priority is policy.lowPriority.)")
    files: Annotated[dict[str, Any] | None, domain_rule(files_problems), WithJsonSchema(files_schema(None))] = Field(
        None, description="Inputs the handler reads, by name: each an object in the bucket, named by its key (upload "
        "it first with POST /v1/uploads). Checked by HEAD before the job goes to RunPod. The handler gets a "
        f"presigned GET for each under its input's {RPQ_KEY!r} key, so the input must then be an object "
        f"without one. Needs a bucket (RPQ_S3_BUCKET).")
    outputs: Annotated[list[Any] | dict[str, Any] | None, domain_rule(outputs_problems),
                       WithJsonSchema(outputs_schema(None))] = Field(
        None, description="Files the handler will write, by name (or an object of name: content type; the default "
        "is guessed from the name). The handler gets a presigned PUT for each; when the job completes each is looked "
        "for in the bucket, and one not there sets files_missing. Needs a bucket.")
    offload: bool = Field(False, description="Put the input itself in the bucket (for one over RunPod's 10 MB "
                          "limit): the handler gets its URL instead. Needs a bucket.")

    def policy_dict(self) -> dict[str, Any] | None:
        return self.policy.model_dump(exclude_none=True) if self.policy else None


def header_schema(**rules: Any) -> Callable[[dict[str, Any]], None]:
    """A `json_schema_extra` for an optional header: a string with `rules`. A header is absent or text,
    never null, so the `null` pydantic documents for `str | None` is left out."""

    def document(schema: dict[str, Any]) -> None:
        schema.pop("anyOf", None)
        schema.update(type="string", **rules)

    return document


def is_usable_correlation_id(value: str) -> bool:
    return len(value) <= MAX_CORRELATION_ID_LENGTH and re.fullmatch(CORRELATION_ID_PATTERN, value) is not None


class SubmitHeaders(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    idempotency_key: str | None = Field(None, alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LENGTH)
    correlation_id: str | None = Field(None, alias="X-Correlation-ID", max_length=MAX_CORRELATION_ID_LENGTH,
                                       pattern=CORRELATION_ID_PATTERN)


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def parse_since(value: object) -> object:
    """An age (`30m`, `1h`, `2d`) or an ISO 8601 time; a time without a zone is taken as UTC."""
    if not isinstance(value, str):
        return value
    try:
        return jobs_api.parse_since(value)
    except SinceOutOfRange as exc:
        raise PydanticCustomError("range", str(exc)) from None
    except ValueError as exc:
        raise PydanticCustomError("format", str(exc)) from None


class JobFilter(BaseModel):
    """The query of `GET /v1/jobs`."""

    model_config = ConfigDict(extra="forbid")

    status: list[Annotated[JobStatus, BeforeValidator(_upper)]] = Field(
        [], description="Only jobs in these statuses (repeat the parameter for several).")
    endpoint: list[EndpointName] = Field([], description="Only jobs for these endpoints (repeat for several).")
    since: Annotated[
        datetime | timedelta | None,
        BeforeValidator(parse_since),
        domain_rule(jobs_api.since_problems),
        WithJsonSchema({"type": "string", "anyOf": [{"pattern": SINCE_AGE_PATTERN}, {"format": "date-time"}],
                        "examples": ["1h", "2025-01-31T12:00:00Z"]}),
    ] = Field(None, description="Only jobs created since: an age (30s, 30m, 1h, 2d; at most "
              f"{jobs_api.MAX_SINCE_AGE.days} days) or an ISO 8601 time.")
    limit: int = Field(100, ge=1, le=MAX_LIST_LIMIT, description="At most this many jobs, newest first.")
    offset: int = Field(0, ge=0, le=MAX_LIST_OFFSET, description="Skip this many jobs first.")


_OPTIONAL_COUNT = {"anyOf": [{"type": "integer", "minimum": 1}, _NULL]}


class UploadRequest(BaseModel):
    """A file a client will upload straight to the bucket. Each value is checked by `jobs.prepare_upload` itself,
    which names every problem at once; the schema states its rules as far as JSON Schema can (not that size is
    at most max_bytes when both are given)."""

    # A size or a max_bytes: one of the two is needed (on R2 the size: see app._document_files).
    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": [field], "properties": {field: {"type": "integer"}}} for field in ("size", "max_bytes")]})

    name: Annotated[Any, WithJsonSchema(NAME_SCHEMA)] = Field(
        description="The file's name; the key ends with it.")
    content_type: Annotated[Any, WithJsonSchema({"anyOf": [CONTENT_TYPE_SCHEMA, _NULL]})] = Field(
        None, description="What the upload must send as Content-Type. Default: application/octet-stream.")
    size: Annotated[Any, BeforeValidator(jobs_api.whole_number),
                    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0}, _NULL]})] = Field(
        None, description="The file's exact size in bytes: the ticket is then a PUT whose signature binds it and the "
        "Content-Type. Required on R2, which has no POST policies.")
    max_bytes: Annotated[Any, BeforeValidator(jobs_api.whole_number), WithJsonSchema(_OPTIONAL_COUNT)] = Field(
        None, description="Without size: the ticket is an S3 POST policy allowing up to this many bytes.")
    expires: Annotated[Any, BeforeValidator(jobs_api.whole_number), WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 1, "maximum": PRESIGN_MAX_SECONDS}, _NULL]})] = Field(
        None, description="Seconds the ticket stays usable. Default: RPQ_PRESIGN_SECONDS.")


class FileUrlQuery(BaseModel):
    """The query of `GET /v1/jobs/{id}/files/{name}`."""

    model_config = ConfigDict(extra="forbid")

    expires: int | None = Field(None, ge=1, le=PRESIGN_MAX_SECONDS,
                                description="Seconds the URL stays valid. Default: RPQ_PRESIGN_SECONDS.")
    redirect: bool = Field(True, description="true: answer 302 with the URL in Location. false: answer 200 with "
                           "the URL in a JSON body.")


# -- responses -----------------------------------------------------------------------------------

_Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


class WaitingOut(BaseModel):
    """Why a PENDING job has not gone to RunPod yet: read from the queue around it when it is read."""

    reason: WaitReason = Field(description="max_in_flight: the endpoint's cap on jobs at RunPod is full, counting "
                               "the jobs ahead; queued: other jobs of the endpoint go first (by priority, then "
                               "age); next: first in line; deferred: its /run was put off until next_try_at; "
                               "spend: the spend guard holds new jobs while the account spends too fast or its "
                               "balance is too low.")
    message: str = Field(description="The reason as a sentence for people.",
                         examples=["endpoint tts has 10 of 10 jobs in flight (max_in_flight); 3 jobs ahead of "
                                   "this one"])
    jobs_ahead: int | None = Field(description="PENDING jobs of the endpoint that go before this one (null when "
                                   "deferred).")
    in_flight: int | None = Field(description="The endpoint's jobs at RunPod, or that RunPod may have (null when "
                                  "it has no max_in_flight).")
    max_in_flight: int | None = Field(description="The endpoint's cap (RPQ_MAX_IN_FLIGHT), if it has one.")
    next_try_at: _Time | None = Field(description="When a deferred /run is tried again.")


class JobOut(BaseModel):
    """A job: exactly `jobs.Job.to_dict()`. Times are ISO 8601, in UTC."""

    id: str
    status: JobStatus
    endpoint: str = Field(description="The endpoint's name (a bare endpoint id names itself).")
    endpoint_id: str
    runpod_job_id: str | None = Field(description="RunPod's id for the current attempt, once submitted.")
    input: Any
    output: Any
    error: str | None
    progress: Any
    attempt: int
    poll_count: int
    policy: dict[str, Any] | None
    webhook: str | None
    correlation_id: str | None
    idempotency_key: str | None
    metadata: dict[str, Any] | None
    stream: bool
    created_at: _Time
    submitted_at: _Time | None
    started_at: _Time | None
    finished_at: _Time | None
    delay_time_ms: int | None
    execution_time_ms: int | None
    worker_id: str | None
    output_missing: bool = Field(
        description="RunPod reported COMPLETED with no output to store (and no streamed chunks to build one "
        "from): how RunPod shows a result over its ~20 MB limit. Never a silent success.")
    priority: int = Field(description="Among the endpoint's waiting jobs, higher goes to RunPod first.")
    files_missing: bool = Field(
        description="A declared output was not in the bucket when the job completed: GET /v1/jobs/{id}/files "
        "says which.")
    input_key: str | None = Field(
        description="Where an input sent with offload lives in the bucket. GET /v1/jobs/{id} shows the input as "
        "sent; the list, cancel and retry answers leave input null for such a job.")
    output_key: str | None = Field(
        description="Where an output over RPQ_INLINE_OUTPUT_MAX_BYTES was moved in the bucket. GET /v1/jobs/{id} "
        "reads it back into output; the list leaves output null for such a job.")
    cost_usd: float | None = Field(
        description="What the job cost, estimated when it finished: execution time x its endpoint's GPU list "
        "price x GPU count (discounts, cold starts and idle workers are not in it). Null when no price was known.")
    spend_released: bool = Field(
        False, description="An operator let this job past the spend guard (rpq jobs release): it goes out while "
        "the guard holds others.")
    tenant: str | None = Field(
        None, description="Who the job belongs to: the tenant of the token that submitted it (null for none).")
    waiting: WaitingOut | None = Field(
        description="Why a PENDING job has not gone to RunPod yet; null for any other status. Read from the queue "
        "when the job is read (GET): the answers of POST /v1/jobs and /retry, which only write, carry null.")


class JobFileOut(BaseModel):
    """One of a job's files: exactly `jobs.JobFileInfo.to_dict()`."""

    name: str
    role: FileRole = Field(description="input: the handler reads it; output: it writes it; input_document: the "
                           "input sent with offload; result: an output over RPQ_INLINE_OUTPUT_MAX_BYTES, moved to "
                           "the bucket.")
    attempt: int = Field(description="0 for what every attempt shares (the inputs), else the attempt it belongs to.")
    key: str | None = Field(description="The object's key in the bucket. Not a credential: reading the object takes "
                            "a presigned URL (GET /v1/jobs/{id}/files/{name}).")
    state: FileState = Field(description="declared: not written, or not looked for yet (an input named by key is "
                             "looked for when the job goes to RunPod, an output when it completes); stored: the "
                             "bucket has it (size, etag and content_type are the bucket's); missing: looked for and "
                             "not found.")
    size: int | None
    etag: str | None
    content_type: str | None
    checked_at: _Time | None = Field(description="When the bucket was last asked about it.")


class JobFiles(BaseModel):
    """A job's inputs, then its current attempt's outputs."""

    files: list[JobFileOut]


class FileUrl(BaseModel):
    """A download link. The URL is a credential until it expires: hand it to the one client that downloads."""

    url: str = Field(description="A presigned GET of the object. Send it no Authorization header: the store "
                     "refuses a second credential.")
    expires_in: int = Field(description="Seconds from now for which the URL works.")


class UploadTicketOut(BaseModel):
    """How to upload the file: exactly `jobs.UploadTicket.to_dict()`. The URL and fields are a credential until
    expires_at: hand them to the one client that uploads. Then submit the job with files: {name: {key}}."""

    key: str = Field(description="The object's key: name it in the job's files.")
    method: Literal["PUT", "POST"] = Field(
        description="PUT: send the file as the body to url with exactly these headers. POST: a multipart form to "
        "url with fields first and the file last, in a field named file.")
    url: str
    headers: dict[str, str] = Field(description="PUT: the headers to send, exactly (the signature binds them).")
    fields: dict[str, str] = Field(description="POST: the form fields, in any order, before the file.")
    content_type: str
    max_bytes: int = Field(description="The most the store accepts: the size, for a PUT.")
    expires_at: _Time


class JobList(BaseModel):
    jobs: list[JobOut]
    limit: int
    offset: int
    next_offset: int | None = Field(description="The offset of the next page; null when this page is not full.")


class EndpointHealth(BaseModel):
    """RunPod's `/health` of the endpoint, read live; every counter, 0 when RunPod left it out."""

    endpoint: str
    endpoint_id: str
    jobs: JobCounts
    workers: WorkerCounts


class PanelWorkers(BaseModel):
    ready: int | None
    running: int | None
    idle: int | None = Field(description="RunPod's idle: slots scaled down, not billed (not warm workers)")
    initializing: int | None
    throttled: int | None
    unhealthy: int | None


class PanelJobs(BaseModel):
    in_queue: int | None
    in_progress: int | None
    completed: int | None
    failed: int | None


class PanelQueue(BaseModel):
    """rpq's own table: the endpoint's unfinished jobs by status, and the PENDING ones its cap or the spend guard
    holds."""

    PENDING: int
    SUBMITTING: int
    SUBMIT_UNKNOWN: int
    IN_QUEUE: int
    IN_PROGRESS: int
    held_by_cap: int
    held_by_spend: int


class EndpointPanel(BaseModel):
    """An endpoint's queue panel, from what rpq stored (beat's last /health, the collectors' last /workers, the
    job table): no RunPod call unless `live=true` was asked. Null where nothing was observed yet."""

    endpoint: str
    endpoint_id: str
    state: Literal["ready", "busy", "warming", "cold", "unhealthy", "unreachable", "unknown"]
    reason: str
    estimated_wait_seconds: float | None = Field(description="how long a new job would wait to start")
    observed_at: datetime | None = Field(description="when /health was read")
    age_seconds: float | None = Field(description="how old that observation is")
    error: str | None = Field(description="why the last /health read failed, if it did")
    workers: PanelWorkers | None = Field(description="RunPod's /health worker counts")
    jobs: PanelJobs | None = Field(description="RunPod's /health job counts")
    max_workers: int | None
    min_workers: int | None
    worker_states: dict[str, int | None] | None = Field(
        description="exact worker states from RunPod's /workers, as the endpoints collector last saw them")
    worker_states_observed_at: datetime | None
    queue: PanelQueue


class EndpointPanels(BaseModel):
    endpoints: list[EndpointPanel]


class EventsUrl(BaseModel):
    """A URL that follows one job's events without a bearer token, for a browser's EventSource."""

    url: str = Field(description="absolute, as this server was reached")
    path: str = Field(description="the same, from the API's root: for a page served from another origin's proxy")
    expires_at: datetime = Field(description="the stream must be opened by then; a reconnect after needs a new URL")


class WarmupOut(BaseModel):
    """What a warm-up did and why: `none` when workers are warm or starting, or a warm-up job is in flight
    already (its `job_id`); `submitted` with the warm-up job's id."""

    action: Literal["none", "submitted"]
    reason: str
    workers_ready: int | None = Field(description="warm workers (ready and running) RunPod's /health showed")
    job_id: str | None


class ErrorBody(BaseModel):
    """Every problem with the request, at once. Messages never quote what was sent."""

    errors: list[Problem]


class Healthz(BaseModel):
    ok: bool


# -- Server-Sent Events ----------------------------------------------------------------------------
# What each event of GET /v1/jobs/{id}/events carries as its `data` (JSON). The route's description names them;
# they are documented as components (the stream itself is text/event-stream, which OpenAPI cannot type).


class ErrorCode(StrEnum):
    """Why a job's stream ended with `error`."""

    HANDLER_FAILED = "handler_failed"  #: the handler raised or returned an error (FAILED)
    TIMED_OUT = "timed_out"  #: RunPod's execution timeout cut it (TIMED_OUT)
    CANCELLED = "cancelled"  #: a user or operator cancelled it (CANCELLED)
    EXPIRED = "expired"  #: RunPod no longer knows the job: its ttl or retention passed (EXPIRED)
    REJECTED = "rejected"  #: never accepted: RunPod refused the /run, or an input file failed its check (FAILED)
    OUTPUT_MISSING = "output_missing"  #: RunPod said COMPLETED but gave no output (a result over ~20 MB is dropped)
    SUBMIT_UNKNOWN = "submit_unknown"  #: /run's outcome is unknown; an operator decides (SUBMIT_UNKNOWN)


class StartedEvent(BaseModel):
    """`started`: a worker took the job (or it finished before rpq saw it running)."""

    job_id: str
    endpoint: str
    attempt: int = Field(ge=1)
    started_at: datetime


class OutputEvent(BaseModel):
    """`output`: one chunk of output, numbered from 0 within the attempt. A plain handler's whole output is one
    chunk; a generator's chunks come as RunPod gives them, unaggregated."""

    i: int = Field(ge=0)
    data: Any


class MetricsEvent(BaseModel):
    """`metrics`: RunPod's timings (and rpq's cost estimate, at list price), just before `end` or `error`. It has
    no event id: a client that reconnects after it gets it again, with the final event."""

    delay_ms: int | None
    execution_ms: int | None
    cost_usd: float | None = None


class EndFile(BaseModel):
    name: str
    state: str = Field(description="found, missing, or declared (not checked)")
    size: int | None = None
    content_type: str | None = None


class EndEvent(BaseModel):
    """`end`: the job COMPLETED; its output is in the `output` events and in GET /v1/jobs/{id}."""

    status: Literal["COMPLETED"]
    execution_ms: int | None
    files: list[EndFile] | None = Field(default=None, description="The attempt's output files, for a job with "
                                        "files; URLs come from GET /v1/jobs/{id}/files/{name}.")


class ErrorEvent(BaseModel):
    """`error`: the job ended without a usable result (or, for submit_unknown, waits for an operator)."""

    code: ErrorCode
    message: str
    status: JobStatus


#: Each event's name and what its data is. `progress` carries what the handler reported, as it reported it.
STREAM_EVENTS: dict[str, type[BaseModel]] = {
    "started": StartedEvent, "output": OutputEvent, "metrics": MetricsEvent, "end": EndEvent, "error": ErrorEvent}


# -- validation ----------------------------------------------------------------------------------


def check(model: type[Model], data: object, *, settings: Settings | None = None,
          root: str = "body") -> tuple[Model | None, list[Problem]]:
    """`data` as a `model`, or every problem with it. `root` names the whole of `data` (the body, the query)."""
    try:
        return model.model_validate(data, context={"settings": settings}), []
    except ValidationError as exc:
        return None, problems_of(exc.errors(include_input=False, include_url=False), model=model, root=root)


META_PREFIX = "meta."


def meta_query(params: QueryParams, indexed: Sequence[str]) -> tuple[QueryParams, dict[str, str], list[Problem]]:
    """A query's `meta.KEY=VALUE` filters apart from the rest: (the rest, the filters, their problems). The rules
    are `jobs.list_jobs`'s; a key may be given once (two values of one key would find no job)."""
    rest = QueryParams([(k, v) for k, v in params.multi_items() if not k.startswith(META_PREFIX)])
    given: dict[str, str] = {}
    problems: list[Problem] = []
    for name, value in params.multi_items():
        if not name.startswith(META_PREFIX):
            continue
        key = name.removeprefix(META_PREFIX)
        if key in given and key in indexed:
            problems.append(Problem(name, "format", "give each metadata key once"))
        given[key] = value
    wanted = jobs_api.meta_filter_problems(given, indexed, problems)
    return rest, wanted, list(dict.fromkeys(problems))


def query_values(model: type[BaseModel], params: Any) -> dict[str, object]:
    """A query string (Starlette's multi-dict) as `model` input: list fields get every value."""
    lists = {name for name, spec in model.model_fields.items() if get_origin(spec.annotation) is list}
    return {key: params.getlist(key) if key in lists else params[key] for key in params}


# pydantic's error types, by the `constraint` words of `jobs.errors.Problem`.
_CONSTRAINTS = {
    "missing": "required",
    "extra_forbidden": "unknown",
    "greater_than": "range",
    "greater_than_equal": "range",
    "less_than": "range",
    "less_than_equal": "range",
    "string_too_short": "format",
    "string_too_long": "format",
    "string_pattern_mismatch": "format",
    "enum": "known",
    "literal_error": "known",
    "int_parsing_size": "range",  # a number of thousands of digits
}
# The constraints our own PydanticCustomErrors are named after; any other pydantic error is one of type.
_OWN_CONSTRAINTS = {"known", "format", "range"}


def problems_of(errors: list[ErrorDetails], *, model: type[BaseModel] | None = None,
                root: str = "body") -> list[Problem]:
    """pydantic's errors as Problems, each once. Only `msg` is kept: pydantic's messages name the rule,
    never the value (which pydantic keeps apart, in `input`, and which is never sent back).

    An unknown field is reported on the object that holds it, with the fields it knows: its own name
    is what was sent, and answers never quote what was sent."""
    problems: list[Problem] = []
    for error in errors:
        kind, loc = error["type"], error["loc"]
        if kind == DOMAIN_ERROR:
            problems += error.get("ctx", {}).get("problems", ())
            continue
        if kind == "extra_forbidden":
            known = _known_fields(model, loc[:-1])
            message = f"unknown field (known: {', '.join(known)})" if known else "unknown field"
            problems.append(Problem(field_name(loc[:-1], root), "unknown", message))
            continue
        constraint = _CONSTRAINTS.get(kind, kind if kind in _OWN_CONSTRAINTS else "type")
        message = "required" if kind == "missing" else error["msg"]
        problems.append(Problem(field_name(loc, root), constraint, message))
    return list(dict.fromkeys(problems))


def _known_fields(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> list[str]:
    """The field names (as sent: aliases) of the model found at `loc` inside `model`."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        model = next((kind for kind in (annotation, *get_args(annotation))
                      if isinstance(kind, type) and issubclass(kind, BaseModel)), None)
    if model is None:
        return []
    return [spec.alias or name for name, spec in model.model_fields.items()]


def field_name(loc: tuple[int | str, ...], root: str = "body") -> str:
    """`("policy", "ttl")` → `policy.ttl`, `("status", 1)` → `status[1]`, `()` → `body` (the root)."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name or root
