"""The Python API for web apps: submit a job, read it, list, cancel, retry, wait.

`submit()` commits the row and only then publishes the Celery message, and it never calls RunPod,
so it returns in milliseconds. If publishing fails the row stays PENDING and the reconciler sends
it later: a job is never lost between the web request and the worker.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update
from sqlmodel import Session

from jobs.bucket import jobfiles
from jobs.errors import ConfigError, PayloadTooLarge, Problem, RpqError
from jobs.flow.dispatch import GATHER_SECONDS
from jobs.flow.lifecycle import RUNPOD_RETRY_WINDOW, adopt_from_webhook, hash_token
from jobs.flow.waiting import Waiting, waiting_of, waiting_of_rows
from jobs.jsonsafe import json_problems, text_problems
from jobs.runpod.client import MAX_RUN_PAYLOAD_BYTES, POLICY_BOUNDS_MS, RequestInvalid, build_run_body, encode_body
from jobs.runtime import CANCEL_TASK, DISPATCH_TASK, POLL_DUE_TASK, Runtime, get_runtime
from jobs.settings import Endpoint, Settings
from jobs.states import AT_RUNPOD, RETRYABLE, TERMINAL, JobStatus
from jobs.storage import filerows, streams
from jobs.storage.db import session_scope
from jobs.storage.models import JobEvent, JobRow, utcnow
from jobs.storage.store import (
    JOBS,
    Fence,
    Source,
    add_meta,
    add_runpod_cancel,
    count_unfinished,
    find_by_idempotency_key,
    get_row,
    insert_job,
    list_rows,
    record_event,
    transition,
    update_fields,
)
from jobs.storage.store import events_of as _events_of
from jobs.tenants import IN_FLIGHT_RETRY_SECONDS, TENANT_RE, TenantLimited, limit_for

log = logging.getLogger("rpq.api")

MAX_KEY_LENGTH = 255
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
# Problems never quote what was sent (it may be large, or private): this one names no endpoint.
_UNKNOWN_ENDPOINT = Problem("endpoint", "known",
                            "unknown endpoint: not in RUNPOD_ENDPOINTS and not a RunPod endpoint id")
MAX_CORRELATION_ID_LENGTH = 128
#: Far longer than any real webhook URL; a text column holds it, and RunPod is sent it with every job.
MAX_WEBHOOK_LENGTH = 2048
#: `list_jobs` pages: a page is read whole into memory, and an offset is a count of rows skipped,
#: which every database (PostgreSQL's bigint, SQLite's 64-bit integer) can hold.
MAX_LIST_LIMIT = 10_000
MAX_LIST_OFFSET = 1_000_000_000
#: How far back `since` may reach as an age: far beyond any job's life (and RunPod's retention).
MAX_SINCE_AGE = timedelta(days=36_500)


class InvalidJob(RpqError):
    """The job was not accepted; nothing was written."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("job not accepted:\n" + "\n".join(f"  - {p}" for p in problems))


class JobNotFound(RpqError):
    """No job has that id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class InvalidTransition(RpqError):
    """The job is not in a status that allows this."""

    def __init__(self, job_id: str, status: JobStatus, action: str) -> None:
        self.job_id, self.status, self.action = job_id, status, action
        super().__init__(f"cannot {action} job {job_id}: it is {status}")


@dataclass(frozen=True)
class Job:
    """A job as callers see it: a snapshot of its row."""

    id: str
    status: JobStatus
    endpoint: str
    endpoint_id: str
    runpod_job_id: str | None
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
    created_at: datetime
    submitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    delay_time_ms: int | None
    execution_time_ms: int | None
    worker_id: str | None
    #: RunPod said COMPLETED but gave no output to store: how it shows a result over its ~20 MB limit.
    output_missing: bool = False
    #: Among an endpoint's PENDING jobs, higher goes to RunPod first; equal priorities go oldest first.
    priority: int = 0
    #: A declared output was not in the bucket when the job completed: see `files()` and the job's events.
    files_missing: bool = False
    #: Where an input sent with offload=True, and an output over RPQ_INLINE_OUTPUT_MAX_BYTES, live in the
    #: bucket. `get` and `wait` read them back into `input` and `output`; `list_jobs` leaves those None.
    input_key: str | None = None
    output_key: str | None = None
    #: What the job cost, estimated at list price when it finished (None when its endpoint's price was not known).
    cost_usd: float | None = None
    #: An operator let this job past the spend guard (`release`).
    spend_released: bool = False
    #: Who the job belongs to (see jobs.tenants); None for a job submitted without a tenant.
    tenant: str | None = None
    #: Why a PENDING job has not gone to RunPod yet (None for any other status). Read from the queue
    #: around the job by `get` and `list_jobs`; `submit` and `retry` do not read the queue (a submit
    #: stays a single write), so the job they return has None here. Not part of equality: two reads
    #: of an unchanged row are the same job even when the queue around it moved.
    waiting: Waiting | None = field(default=None, compare=False)

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @classmethod
    def from_row(cls, row: JobRow, waiting: Waiting | None = None) -> Job:
        return cls(
            id=row.id, status=JobStatus(row.status), endpoint=row.endpoint_name, endpoint_id=row.endpoint_id,
            runpod_job_id=row.runpod_job_id, input=row.input, output=row.output, error=row.error,
            progress=row.progress, attempt=row.attempt, poll_count=row.poll_count, policy=row.policy,
            webhook=row.webhook, correlation_id=row.correlation_id, idempotency_key=row.idempotency_key,
            metadata=row.meta, stream=row.stream, created_at=row.created_at, submitted_at=row.submitted_at,
            started_at=row.started_at, finished_at=row.finished_at, delay_time_ms=row.delay_time_ms,
            execution_time_ms=row.execution_time_ms, worker_id=row.worker_id, output_missing=row.output_missing,
            priority=row.priority, files_missing=row.files_missing, input_key=row.input_key,
            output_key=row.output_key, cost_usd=row.cost_usd, spend_released=row.spend_released, tenant=row.tenant,
            waiting=waiting,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 strings."""
        data: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            data[name] = (value.isoformat() if isinstance(value, datetime)
                          else value.to_dict() if isinstance(value, Waiting) else value)
        return data


@dataclass(frozen=True)
class Event:
    at: datetime
    from_status: JobStatus | None
    to_status: JobStatus
    source: str
    detail: str | None
    repeats: int = 1  # the same event again (a webhook call, a re-poll) counts here, not as new rows
    last_at: datetime | None = None

    @classmethod
    def from_row(cls, row: JobEvent) -> Event:
        return cls(at=row.at, from_status=JobStatus(row.from_status) if row.from_status else None,
                   to_status=JobStatus(row.to_status), source=row.source, detail=row.detail,
                   repeats=row.repeats, last_at=row.last_at)

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "from": self.from_status, "to": self.to_status,
                "source": self.source, "detail": self.detail, "repeats": self.repeats,
                "last_at": self.last_at.isoformat() if self.last_at else None}


def submit(
    endpoint: str,
    input: Any,
    *,
    policy: Mapping[str, Any] | None = None,
    webhook: str | None = None,
    idempotency_key: str | None = None,
    correlation_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    stream: bool = False,
    priority: int = 0,
    files: Mapping[str, Any] | None = None,
    outputs: Sequence[str] | Mapping[str, str] | None = None,
    offload: bool = False,
    s3_config: bool = False,
    tenant: str | None = None,
    runtime: Runtime | None = None,
) -> Job:
    """Accept a job for `endpoint` (a configured name or a RunPod endpoint id) and return it.

    `priority` orders an endpoint's waiting jobs: higher first, equal ones oldest first (it matters when
    jobs wait: behind RunPod's /run limit, or an endpoint's `RPQ_MAX_IN_FLIGHT`). RunPod's own queue
    priority is the policy's `lowPriority`, passed through as it is.

    `stream=True` is for generator handlers: their chunks are collected from RunPod's /stream as
    they come and replayed by `stream_events()` (and the HTTP API's SSE route).

    Every problem with the arguments is reported at once in `InvalidJob`, and nothing is written.
    With `idempotency_key`, a second submit to the same endpoint (and tenant) returns the first job.

    `tenant` records who the job belongs to (see jobs.tenants): a tenant's API token sees only its jobs, an
    idempotency key is the tenant's own, a file named by key must be an upload the tenant prepared, and the
    tenant's limits apply (TenantLimited, nothing written, when it is at one). Values of the metadata keys in
    RPQ_METADATA_INDEX are indexed, for `list_jobs(meta=...)`.

    Files (they need RPQ_S3_BUCKET; see README "Files"): `files` maps a name to bytes, a `pathlib.Path`, a
    binary file object (each put in the bucket now) or `{"key": ...}` for an object already there (one
    `prepare_upload` made, checked by HEAD before the job is sent). `outputs` declares the files the handler
    will write, by name (or name: content type). The handler gets a URL for each under the input's "rpq"
    key (`rpq_worker` reads them). `offload=True` puts the input itself in the bucket, for one over RunPod's
    10 MB /run limit: the handler gets its URL instead. `s3_config=True` also sends RunPod's `s3Config`
    (the RPQ_WORKER_S3_* credentials, bucket and endpoint) for handlers that upload with the runpod SDK.
    """
    rt = runtime or get_runtime()
    policy = whole_milliseconds(policy)
    priority = whole_number(priority)  # type: ignore[assignment]  # JSON's 5.0 is 5
    resolved = _resolve(endpoint, rt.settings)
    problems = _submission_problems(endpoint, resolved, input, policy=policy, webhook=webhook,
                                    idempotency_key=idempotency_key, correlation_id=correlation_id, metadata=metadata,
                                    stream=stream, priority=priority, offload=offload)
    problems += tenant_problems(tenant)
    request, wrong_files = jobfiles.read_request(files, outputs, offload, input, s3_config)
    problems += wrong_files
    if request and not rt.has_files:
        problems.append(Problem(jobfiles.asked_for(request), "configured", FILES_OFF))
    if request.worker_s3 and not (rt.settings.worker_s3_access_key_id and rt.settings.worker_s3_secret_access_key):
        problems.append(_WORKER_S3_OFF)
    if problems or resolved is None:
        raise InvalidJob(problems)
    limited = tenant is not None and _has_limits(rt.settings, tenant)
    if (request or limited) and idempotency_key is not None:
        # Put nothing in the bucket, and count nothing against a limit, for a job that exists already.
        with session_scope(rt.engine, read_only=True) as session:
            existing = find_by_idempotency_key(session, resolved.id, idempotency_key, tenant)
        if existing is not None:
            return Job.from_row(existing)
    if limited:
        assert tenant is not None
        _within_limits(rt, tenant)

    job_id = str(uuid.uuid4())
    prepared = _prepare_files(rt, job_id, request, input, tenant) if request else None
    indexed = indexed_metadata(metadata, rt.settings.metadata_index)
    now = utcnow()
    job = Job(
        id=job_id, status=JobStatus.PENDING, endpoint=resolved.name, endpoint_id=resolved.id,
        runpod_job_id=None, input=input, output=None, error=None, progress=None, attempt=1, poll_count=0,
        policy=dict(policy) if policy else None, webhook=webhook, correlation_id=correlation_id,
        idempotency_key=idempotency_key, metadata=None if metadata is None else dict(metadata), stream=stream,
        created_at=now, submitted_at=None, started_at=None, finished_at=None, delay_time_ms=None,
        execution_time_ms=None, worker_id=None, output_missing=False, priority=priority,
        input_key=prepared.input_key if prepared else None, tenant=tenant,
    )
    values = {"id": job.id, "tenant": tenant, "endpoint_name": job.endpoint, "endpoint_id": job.endpoint_id,
              "status": job.status,
              "input": None if job.input_key else job.input, "worker_s3": request.worker_s3,
              "has_files": bool(prepared and (prepared.rows or request.worker_s3)),
              "input_key": job.input_key, "policy": job.policy, "webhook": job.webhook, "metadata": job.metadata,
              "stream": job.stream, "correlation_id": job.correlation_id, "idempotency_key": job.idempotency_key,
              "attempt": job.attempt, "poll_count": job.poll_count, "poll_errors": 0, "polls_since_change": 0,
              "output_missing": job.output_missing, "priority": job.priority, "created_at": now, "updated_at": now}
    try:
        inserted = insert_job(rt.engine, values, source=Source.API, detail=f"submitted to {job.endpoint}",
                              also=_side_rows_writer(job_id, prepared, indexed))
    except BaseException as exc:
        if prepared:
            jobfiles.forget(rt.objects, prepared.written)
        if isinstance(exc, filerows.UploadTaken):
            raise InvalidJob([Problem("files", "known", str(exc))]) from None
        raise
    if not inserted:
        if prepared:
            jobfiles.forget(rt.objects, prepared.written)
        # An earlier submit with this key (to this endpoint) made the job, or a concurrent one just did:
        # that job is the answer, and nothing was written or published for this call.
        with session_scope(rt.engine, read_only=True) as session:
            existing = find_by_idempotency_key(session, job.endpoint_id, idempotency_key or "", tenant)
        if existing is None:  # its job was deleted (by retention) between the insert and this read: rare enough
            raise RpqError("the job with this idempotency key was deleted while submitting; submit again")
        return Job.from_row(existing)

    _wake_dispatcher(rt, job.endpoint_id)
    return job


FILES_OFF = "files are off: RPQ_S3_BUCKET is not set (files, outputs, offload and s3_config need a bucket)"


_WORKER_S3_OFF = Problem("s3_config", "configured", "RPQ_WORKER_S3_ACCESS_KEY_ID and RPQ_WORKER_S3_SECRET_ACCESS_KEY "
                         "are not set: s3_config hands the worker those credentials, never rpq's own")


def _prepare_files(rt: Runtime, job_id: str, request: jobfiles.FileRequest, input: Any,
                   tenant: str | None) -> jobfiles.Prepared:
    """Put the job's files in the bucket and return the rows to write with it; InvalidJob for keys that
    name no usable object (nothing is put then).

    A tenant's job may name by key only uploads that tenant prepared: any other key under the prefix could be
    another tenant's upload or output. Another tenant's upload is refused as if it did not exist."""
    store = rt.objects
    keys = [item.key for item in request.inputs if item.key is not None]
    with session_scope(rt.engine, read_only=True) as session:
        uploads = {key: upload for key, upload in filerows.uploads_named(session, keys).items()
                   if upload.tenant == tenant}
    if tenant is not None:
        foreign = [Problem(f"files[{item.index}].key", "known", jobfiles.NO_SUCH_UPLOAD)
                   for item in request.inputs if item.key is not None and item.key not in uploads]
        if foreign:
            raise InvalidJob(foreign)
    prepared, problems = jobfiles.prepare(store, job_id, request, input, uploads)
    if problems:
        raise InvalidJob(problems)
    return prepared


def _side_rows_writer(job_id: str, prepared: jobfiles.Prepared | None,
                      indexed: Mapping[str, str]) -> Callable[[Connection], None] | None:
    """What is written with the job, in its transaction: its files, its indexed metadata. None for neither,
    so the common submit stays one statement."""
    if prepared is None and not indexed:
        return None

    def write(connection: Connection) -> None:
        if prepared is not None:
            filerows.add(connection, prepared.rows)
            filerows.take_uploads(connection, prepared.uploads_taken)
        add_meta(connection, job_id, indexed)
    return write


def _has_limits(settings: Settings, tenant: str) -> bool:
    return (limit_for(settings.tenant_max_in_flight, tenant) is not None
            or limit_for(settings.tenant_submits_per_minute, tenant) is not None)


def _within_limits(rt: Runtime, tenant: str) -> None:
    """TenantLimited when the tenant is at a limit. Jobs in flight first, from the table: a submit refused for
    them takes no submit of the minute's."""
    in_flight = limit_for(rt.settings.tenant_max_in_flight, tenant)
    if in_flight is not None:
        with session_scope(rt.engine, read_only=True) as session:
            if count_unfinished(session, tenant) >= in_flight:
                raise TenantLimited(tenant, "in_flight", in_flight, IN_FLIGHT_RETRY_SECONDS)
    per_minute = limit_for(rt.settings.tenant_submits_per_minute, tenant)
    if per_minute is not None:
        wait = rt.submit_rate.take(tenant, per_minute)
        if wait is not None:
            raise TenantLimited(tenant, "per_minute", per_minute, wait)


def tenant_problems(tenant: object) -> list[Problem]:
    if tenant is None:
        return []
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        return [Problem("tenant", "format", "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                                            "letter or digit")]
    return []


#: The longest indexed metadata value; a longer one is not indexed (a filter for it finds nothing).
MAX_META_VALUE_LENGTH = 255


def meta_text(value: object) -> str | None:
    """A metadata value as the index keeps it and a query string gives it: text for a string, a whole number
    or a boolean (42 and "42" are both "42"; true is "true"); None for what is not indexed."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        return None
    return text if len(text) <= MAX_META_VALUE_LENGTH else None


def indexed_metadata(metadata: Mapping[str, Any] | None, keys: Sequence[str]) -> dict[str, str]:
    """The values of `metadata` to index: those of `keys` that `meta_text` keeps."""
    if not metadata or not keys:
        return {}
    found = {key: meta_text(metadata[key]) for key in keys if key in metadata}
    return {key: text for key, text in found.items() if text is not None}


def submission_problems(
    endpoint: object,
    input: object,
    *,
    policy: object = None,
    webhook: object = None,
    idempotency_key: object = None,
    correlation_id: object = None,
    metadata: object = None,
    stream: object = False,
    priority: object = 0,
    settings: Settings,
) -> list[Problem]:
    """Every problem with `submit`'s arguments, each once, writing nothing: what `submit` checks first.

    The arguments are `object`: callers without a type checker pass anything, and get a Problem for it."""
    return _submission_problems(endpoint, _resolve(endpoint, settings), input, policy=whole_milliseconds(policy),
                                webhook=webhook, idempotency_key=idempotency_key, correlation_id=correlation_id,
                                metadata=metadata, stream=stream, priority=whole_number(priority))


def _resolve(endpoint: object, settings: Settings) -> Endpoint | None:
    """The endpoint `endpoint` names, or None when it names none (or is not a string)."""
    if not isinstance(endpoint, str):
        return None
    try:
        return settings.resolve_endpoint(endpoint)
    except ConfigError:
        return None


def _submission_problems(
    endpoint: object,
    resolved: Endpoint | None,
    input: object,
    *,
    policy: object,
    webhook: object,
    idempotency_key: object,
    correlation_id: object,
    metadata: object,
    stream: object,
    priority: object,
    offload: object = False,
) -> list[Problem]:
    """`submission_problems` once the endpoint is resolved and the policy's whole milliseconds are ints:
    `submit` does each of those once, for the check and for the row."""
    problems: list[Problem] = []
    if not isinstance(endpoint, str):
        problems.append(Problem("endpoint", "type", "must be a string: an endpoint name or a RunPod endpoint id"))
    elif resolved is None:
        problems.append(_UNKNOWN_ENDPOINT)
    options = webhook_problems(webhook)
    body: dict[str, Any] = {"input": input}
    try:
        # The webhook's problems are all in `options` already: build_run_body only adds it to the body.
        body = build_run_body(input, webhook=None if options else webhook, policy=policy)
    except RequestInvalid as exc:
        options += [_unnamed_policy_field(p) for p in exc.problems]
    problems += options
    input_wrong = input_problems(input)
    problems += input_wrong
    if not input_wrong and offload is not True:  # only storable JSON is encoded: the rest could crash or quote it
        try:  # the input's size is checked even when the options were wrong: every problem at once
            encode_body({"input": input} if options else body, limit=MAX_RUN_PAYLOAD_BYTES, operation="submit")
        except RequestInvalid as exc:
            problems += exc.problems
        except PayloadTooLarge as exc:
            problems.append(Problem("input", "size", f"too large: {exc}"))
    problems += key_problems("idempotency_key", idempotency_key, MAX_KEY_LENGTH)
    problems += key_problems("correlation_id", correlation_id, MAX_CORRELATION_ID_LENGTH)
    problems += metadata_problems(metadata)
    if not isinstance(stream, bool):
        problems.append(Problem("stream", "type", "must be true or false"))
    problems += priority_problems(priority)
    return list(dict.fromkeys(problems))  # two unknown policy fields are one problem


# -- the rules for each argument of submit: the HTTP API's models call these same functions -------------


def input_problems(input: object) -> list[Problem]:
    """The input must be present (RunPod refuses a /run without one) and storable JSON."""
    if input is None:
        return [Problem("input", "required", "is required: RunPod refuses a job without input (send {} for none)")]
    return json_problems(input, "input")


def priority_problems(priority: object) -> list[Problem]:
    if isinstance(priority, bool) or not isinstance(priority, int):
        return [Problem("priority", "type", "must be a whole number")]
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        return [Problem("priority", "range", f"must be between {MIN_PRIORITY} and {MAX_PRIORITY}")]
    return []


def whole_milliseconds(policy: Any) -> Any:
    """`policy` with 60000.0 as 60000: JSON has one kind of number, and JSON Schema's integer includes
    60000.0, which some clients send for 60000. 60000.5 stays, for RunPod's rule to refuse."""
    if not isinstance(policy, Mapping):
        return policy
    return {key: whole_number(value) if key in POLICY_BOUNDS_MS else value for key, value in policy.items()}


def whole_number(value: object) -> object:
    """An integral float as an int; anything else as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def webhook_problems(webhook: object) -> list[Problem]:
    """An http(s) URL (RunPod's rule, which `build_run_body` keeps) that a text column can keep."""
    if webhook is None:
        return []
    if not isinstance(webhook, str):
        return [Problem("webhook", "type", "must be a string: an http:// or https:// URL")]
    try:
        build_run_body({}, webhook=webhook)
    except RequestInvalid as exc:
        return exc.problems
    if len(webhook) > MAX_WEBHOOK_LENGTH:
        return [Problem("webhook", "format", f"must be at most {MAX_WEBHOOK_LENGTH} characters")]
    return text_problems(webhook, "webhook")


def key_problems(name: str, value: object, limit: int) -> list[Problem]:
    """An idempotency key or a correlation id: text a column can keep and an answer can carry."""
    if value is None:
        return []
    if not isinstance(value, str):
        return [Problem(name, "type", "must be a string")]
    if not value.strip() or len(value) > limit:
        return [Problem(name, "format", f"must be a non-empty string of at most {limit} characters")]
    return text_problems(value, name)


def metadata_problems(metadata: object) -> list[Problem]:
    if metadata is None:
        return []
    if not isinstance(metadata, Mapping):
        return [Problem("metadata", "type", "must be an object")]
    return json_problems(metadata, "metadata")


def _unnamed_policy_field(problem: Problem) -> Problem:
    """An unknown policy field is reported on `policy`: its name is what was sent, and is never quoted."""
    if problem.constraint == "unknown" and problem.field.startswith("policy."):
        return Problem("policy", problem.constraint, problem.message)
    return problem


def get(job_id: str, *, tenant: str | None = None, runtime: Runtime | None = None) -> Job:
    """The job as stored, and for a PENDING job why it waits (`Job.waiting`). With `tenant`, only that
    tenant's job: another tenant's is JobNotFound, as an unknown id is."""
    return _read(runtime or get_runtime(), job_id, explain=True, tenant=tenant)


def peek(job_id: str, *, tenant: str | None = None, explain: bool = False, runtime: Runtime | None = None) -> Job:
    """`get` without reading an offloaded input or a moved output back from the bucket (`input`/`output` are then
    None where a key stands in for them), and without `waiting` unless `explain`: for a caller that needs to know
    the job is there, or to show it when the bucket may not answer."""
    return _read(runtime or get_runtime(), job_id, explain=explain, documents=False, tenant=tenant)


def owned_row(session: Session, job_id: str, tenant: str | None) -> JobRow:
    """The job's row; JobNotFound when there is none or, with `tenant`, when it is another tenant's (the two
    are one answer, so a tenant cannot learn that another's job id exists)."""
    row = get_row(session, job_id)
    if row is None or (tenant is not None and row.tenant != tenant):
        raise JobNotFound(job_id)
    return row


def _read(rt: Runtime, job_id: str, *, explain: bool, documents: bool = True, tenant: str | None = None) -> Job:
    with session_scope(rt.engine, read_only=True) as session:
        row = owned_row(session, job_id, tenant)
        job = Job.from_row(row, waiting_of(session, row, rt.settings, utcnow()) if explain else None)
    return with_documents(rt, job) if documents else job


def with_documents(rt: Runtime, job: Job) -> Job:
    """`job` with an input sent with offload=True and an output moved to the bucket read back into `input`
    and `output`. ObjectStoreError when the bucket cannot be read."""
    if job.input_key is None and job.output_key is None:
        return job
    store = rt.objects
    return replace(job,
                   input=jobfiles.load_document(store, job.input_key) if job.input_key else job.input,
                   output=jobfiles.load_document(store, job.output_key) if job.output_key else job.output)


def events(job_id: str, *, tenant: str | None = None, runtime: Runtime | None = None) -> list[Event]:
    """The job's history, oldest first."""
    rt = runtime or get_runtime()
    with session_scope(rt.engine, read_only=True) as session:
        owned_row(session, job_id, tenant)
        return [Event.from_row(e) for e in _events_of(session, job_id)]


_AGE = re.compile(r"^([0-9]{1,12})([smhd])$")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SINCE_RANGE = f"an age must be at most {MAX_SINCE_AGE.days} days"


class SinceOutOfRange(ValueError):
    """`since` is well formed but reaches back too far (or to a time UTC cannot tell)."""


def parse_since(text: str) -> datetime | timedelta:
    """`list_jobs`'s `since` from text: an age (`30m`, `1h`, `2d`) or an ISO 8601 time (UTC if no zone).

    Raises ValueError with a message for people (SinceOutOfRange for an age past MAX_SINCE_AGE)."""
    match = _AGE.match(text.strip())
    if match:
        seconds = int(match.group(1)) * _AGE_SECONDS[match.group(2)]
        if seconds > MAX_SINCE_AGE.total_seconds():  # before building it: timedelta overflows past 10**9 days
            raise SinceOutOfRange(_SINCE_RANGE)
        return timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError("use an age like 30m, 1h, 2d or an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def since_problems(since: object) -> list[Problem]:
    """`since` is an age from 0 to MAX_SINCE_AGE, or a time that can be told in UTC."""
    if since is None:
        return []
    if isinstance(since, timedelta):
        if not timedelta(0) <= since <= MAX_SINCE_AGE:
            return [Problem("since", "range", _SINCE_RANGE + ", and not negative")]
        return []
    if isinstance(since, datetime):
        try:
            _as_utc(since)
        except OverflowError:  # 0001-01-01 at UTC+1 is in year 0, which Python and the databases lack
            return [Problem("since", "range", "must be a time between the years 1 and 9999 in UTC")]
        return []
    return [Problem("since", "type", "must be a datetime or a timedelta (an age)")]


def _as_utc(moment: datetime) -> datetime:
    # A time without a zone is UTC, as parse_since reads it.
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def list_jobs(
    *,
    status: JobStatus | str | Iterable[JobStatus | str] | None = None,
    endpoint: str | Iterable[str] | None = None,
    since: datetime | timedelta | None = None,
    limit: int = 100,
    offset: int = 0,
    tenant: str | None = None,
    meta: Mapping[str, str | int | bool] | None = None,
    runtime: Runtime | None = None,
) -> list[Job]:
    """Jobs newest first. `since` is a time or an age (`timedelta(hours=1)`). `tenant`: only that tenant's
    jobs (None: every tenant's and those without one). `meta`: only jobs whose metadata has each of these
    values, for keys in RPQ_METADATA_INDEX (`{"user": "42"}` finds `{"user": 42}` and `{"user": "42"}`)."""
    rt = runtime or get_runtime()
    problems: list[Problem] = tenant_problems(tenant)
    wanted = meta_filter_problems(meta, rt.settings.metadata_index, problems)
    statuses: list[JobStatus] | None = None
    if status is not None:
        statuses = []
        for value in _each(status, "status", (str, JobStatus), problems):
            try:
                statuses.append(JobStatus(value.upper()))
            except ValueError:
                problems.append(Problem("status", "known", f"unknown status (known: {', '.join(JobStatus)})"))
    endpoint_ids: list[str] | None = None
    if endpoint is not None:
        endpoint_ids = []
        for name in _each(endpoint, "endpoint", (str,), problems):
            try:
                endpoint_ids.append(rt.settings.resolve_endpoint(name).id)
            except ConfigError:
                problems.append(_UNKNOWN_ENDPOINT)
    problems += since_problems(since)
    problems += _count_problems("limit", limit, 1, MAX_LIST_LIMIT)
    problems += _count_problems("offset", offset, 0, MAX_LIST_OFFSET)
    if problems:
        raise InvalidJob(list(dict.fromkeys(problems)))
    after = utcnow() - since if isinstance(since, timedelta) else _as_utc(since) if since else None
    with session_scope(rt.engine, read_only=True) as session:
        rows = list_rows(session, statuses=statuses, endpoint_ids=endpoint_ids, since=after, limit=limit,
                         offset=offset, tenant=tenant, meta=wanted)
        waiting = waiting_of_rows(session, rows, rt.settings, utcnow())
        return [Job.from_row(r, waiting.get(r.id)) for r in rows]


def meta_filter_problems(meta: object, indexed: Sequence[str], problems: list[Problem]) -> dict[str, str]:
    """`list_jobs`'s `meta` as the index's text, adding a problem for each key not indexed and each value no
    job could have indexed."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        problems.append(Problem("meta", "type", "must be a mapping of metadata keys to values"))
        return {}
    wanted: dict[str, str] = {}
    for key, value in meta.items():
        if key not in indexed:
            # The key is not quoted: it is what was sent.
            problems.append(Problem("meta", "known", "filter only by indexed metadata keys (RPQ_METADATA_INDEX: "
                                                     f"{', '.join(indexed) or 'none'})"))
            continue
        text = meta_text(value) if isinstance(value, str | int | bool) else None
        if text is None or text_problems(text, "meta"):
            problems.append(Problem(f"meta.{key}", "format", "must be a string, a whole number or a boolean of at "
                                                             f"most {MAX_META_VALUE_LENGTH} characters"))
            continue
        wanted[key] = text
    return wanted


#: What each bulk action may touch: cancel what has not finished; retry what failed, timed out, expired, was
#: cancelled or is SUBMIT_UNKNOWN; release what waits PENDING.
BULK_ACTIONS: Mapping[str, frozenset[JobStatus]] = {
    "cancel": frozenset(JobStatus) - TERMINAL,
    "retry": RETRYABLE,
    "release": frozenset({JobStatus.PENDING}),
}
#: How many jobs one bulk action selects unless told otherwise.
BULK_LIMIT = 1000


def select_jobs(
    action: str,
    *,
    status: JobStatus | str | Iterable[JobStatus | str] | None = None,
    endpoint: str | Iterable[str] | None = None,
    since: datetime | timedelta | None = None,
    limit: int = BULK_LIMIT,
    tenant: str | None = None,
    runtime: Runtime | None = None,
) -> list[Job]:
    """The jobs a bulk `action` (a key of BULK_ACTIONS) over these filters touches, newest first: those the
    filters select, in the statuses the action allows only (no status given: all of those). A dry run lists
    exactly these; the CLI and the console both select with it. `tenant` as in list_jobs. Bad filters raise
    InvalidJob, as list_jobs does."""
    allowed = BULK_ACTIONS[action]
    wanted: set[JobStatus] = set(allowed)
    problems: list[Problem] = []
    if status is not None:
        wanted = set()
        for value in _each(status, "status", (str, JobStatus), problems):
            try:
                wanted.add(JobStatus(value.upper()))
            except ValueError:
                problems.append(Problem("status", "known", f"unknown status (known: {', '.join(JobStatus)})"))
    # An empty intersection selects nothing, but still goes through list_jobs to have the other filters checked,
    # so that one answer has every problem.
    try:
        found = list_jobs(status=sorted(wanted & allowed), endpoint=endpoint, since=since, limit=limit,
                          tenant=tenant, runtime=runtime)
    except InvalidJob as exc:
        raise InvalidJob(problems + exc.problems) from None
    if problems:
        raise InvalidJob(problems)
    return found


def _count_problems(field: str, value: object, low: int, high: int) -> list[Problem]:
    if not isinstance(value, int) or isinstance(value, bool):
        return [Problem(field, "type", "must be a whole number")]
    if not low <= value <= high:
        return [Problem(field, "range", f"must be between {low} and {high}")]
    return []


def _each(value: object, name: str, kinds: tuple[type, ...], problems: list[Problem]) -> list[str]:
    """A filter given as one value or as several: its values, or a type problem."""
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
    if values is None or not all(isinstance(v, kinds) for v in values):
        problems.append(Problem(name, "type", "must be a string or a list of strings"))
        return []
    return [str(v) for v in values]


def cancel(job_id: str, *, source: str = Source.API, tenant: str | None = None, runtime: Runtime | None = None) -> Job:
    """Cancel a job that has not finished. The row is CANCELLED at once; RunPod is told by a task.

    The RunPod job to stop goes into the cancel outbox in the same transaction, so a retry that
    starts a new attempt before the task runs cannot make it forget which RunPod job to stop.
    Cancelling a finished job changes nothing and returns it as it is.
    """
    rt = runtime or get_runtime()
    with session_scope(rt.engine) as session:
        if tenant is not None:
            owned_row(session, job_id, tenant)  # the tenant of a job never changes: checking first is enough
        left = transition(session, job_id, to=JobStatus.CANCELLED, source=source,
                          values={"finished_at": utcnow(), "next_poll_at": None}, detail="cancel requested")
        row = get_row(session, job_id)
        outbox = False
        if left in AT_RUNPOD and row is not None and row.runpod_job_id is not None:
            add_runpod_cancel(session, row, attempt=row.attempt, runpod_job_id=row.runpod_job_id,
                              reason=f"cancelled by {source}")
            outbox = True
    if row is None:
        raise JobNotFound(job_id)
    if outbox:
        _publish(rt, CANCEL_TASK, job_id)
    return Job.from_row(row)


def release(job_id: str, *, source: str = Source.OPERATOR, runtime: Runtime | None = None) -> Job:
    """Let a PENDING job past the spend guard: it goes out while the guard holds the others (the guard decides
    what is sent; an operator may decide otherwise for one job). InvalidTransition unless it is PENDING."""
    rt = runtime or get_runtime()
    with session_scope(rt.engine) as session:
        row = get_row(session, job_id)
        if row is None:
            raise JobNotFound(job_id)
        if not update_fields(session, job_id, while_status={JobStatus.PENDING}, values={"spend_released": True}):
            raise InvalidTransition(job_id, JobStatus(row.status), "release")
        record_event(session, job_id, from_status=JobStatus.PENDING, to_status=JobStatus.PENDING, source=source,
                     detail="released past the spend guard: sent even while it holds other jobs")
        row = get_row(session, job_id)
        assert row is not None
    _wake_dispatcher(rt, row.endpoint_id)
    return Job.from_row(row)


def retry(job_id: str, *, source: str = Source.API, tenant: str | None = None, runtime: Runtime | None = None) -> Job:
    """Start a new attempt of a finished (not completed) job, keeping its id and history.

    A FAILED or TIMED_OUT job still within RunPod's retention is requeued with RunPod's own
    `/retry` (same RunPod id, original input); anything else is submitted afresh.
    """
    rt = runtime or get_runtime()
    now = utcnow()
    with session_scope(rt.engine) as session:
        row = owned_row(session, job_id, tenant)
        # RunPod's /retry re-runs the old input, whose file URLs name the old attempt's folder and may have
        # expired: a job with files gets a fresh /run, with fresh URLs and its own folder.
        reuse = (not row.has_files and row.status in (JobStatus.FAILED, JobStatus.TIMED_OUT)
                 and row.runpod_job_id is not None
                 and row.finished_at is not None and now - row.finished_at < RUNPOD_RETRY_WINDOW)
        left = transition(session, job_id, to=JobStatus.PENDING, source=source, expected=RETRYABLE,
                          detail=f"attempt {row.attempt + 1}" + (" via RunPod /retry" if reuse else ""),
                          values={
                              "attempt": row.attempt + 1, "runpod_retry_of": row.runpod_job_id if reuse else None,
                              "runpod_job_id": None, "output": None, "error": None, "progress": None,
                              "submitted_at": None, "started_at": None, "finished_at": None,
                              "next_poll_at": None, "deadline_at": None, "last_runpod_status": None,
                              "polls_since_change": 0, "poll_errors": 0, "delay_time_ms": None,
                              "execution_time_ms": None, "worker_id": None, "output_missing": False,
                              "webhook_runpod_job_id": None, "files_missing": False, "output_key": None,
                              "cost_usd": None, "spend_released": False,
                          })
        if left is None:
            raise InvalidTransition(job_id, JobStatus(row.status), "retry")
        moved = get_row(session, job_id)
        assert moved is not None
    _wake_dispatcher(rt, moved.endpoint_id)
    return Job.from_row(moved)


@dataclass(frozen=True)
class StreamItem:
    """One event of a job's stream: `seq` is its SSE id."""

    seq: int
    kind: str  # started, progress, output, end, error
    data: Any
    at: datetime


def stream_events(job_id: str, *, after: int = 0, tenant: str | None = None,
                  runtime: Runtime | None = None) -> tuple[Job, list[StreamItem]]:
    """The job and its current attempt's stream events after `after` (a Last-Event-ID), oldest first."""
    rt = runtime or get_runtime()
    with session_scope(rt.engine, read_only=True) as session:
        row = owned_row(session, job_id, tenant)
        items = [StreamItem(e.seq, e.kind, e.data, e.at) for e in streams.read(session, job_id, attempt=row.attempt,
                                                                                 after=after)]
        return Job.from_row(row), items


def stream_outputs_before(job_id: str, *, attempt: int, seq: int, runtime: Runtime | None = None) -> int:
    """How many `output` events the attempt's stream has up to `seq`: where a resumed stream's numbering goes on."""
    rt = runtime or get_runtime()
    with session_scope(rt.engine, read_only=True) as session:
        return streams.count(session, job_id, attempt=attempt, kind=streams.OUTPUT, upto=seq)


def webhook_received(token: str, *, runpod_job_id: str | None = None, runtime: Runtime | None = None) -> bool:
    """RunPod called a job's webhook: poll that job now. False when no job has that token.

    The body is never trusted: RunPod's webhooks carry no signature, and once delivered null
    bodies for hours. The status always comes from /status. A duplicate or late call is harmless:
    it only makes an in-flight job's next poll due now (`next_poll_at` NULL: the poller's most urgent
    claim, ahead of every scheduled poll), one poller run polls it, and the history counts repeats on
    one row. For a SUBMIT_UNKNOWN job the call is the proof its /run
    reached RunPod (the token was in that request alone): the RunPod id the body names
    (`runpod_job_id`) is adopted once /status confirms it. Raises RunPodTransient when RunPod could
    not be asked, so the caller can have RunPod send the webhook again.
    """
    rt = runtime or get_runtime()
    digest = hash_token(token)
    with session_scope(rt.engine) as session:
        # The common case, a job at RunPod, in one statement: a webhook per finished job is the busiest
        # thing the API does when thousands of jobs end together.
        woken = session.execute(
            update(JOBS).where(JOBS.c.webhook_token_hash == digest, JOBS.c.status.in_(sorted(AT_RUNPOD)))
            .values(next_poll_at=None, updated_at=utcnow())
            .returning(JOBS.c.id, JOBS.c.status, JOBS.c.attempt, JOBS.c.endpoint_id)).one_or_none()
        row = woken or session.execute(
            select(JOBS.c.id, JOBS.c.status, JOBS.c.attempt, JOBS.c.endpoint_id)
            .where(JOBS.c.webhook_token_hash == digest)).one_or_none()
        if row is None:
            return False
        woke = woken is not None
        status = JobStatus(row.status)
        if status is JobStatus.SUBMITTING and runpod_job_id is not None:
            # Faster than /run's own answer: kept (unverified) in case that answer is lost.
            update_fields(session, row.id, while_status={JobStatus.SUBMITTING},
                          fence=Fence(attempt=row.attempt, runpod_job_id=None),
                          values={"webhook_runpod_job_id": runpod_job_id})
        what = ("polling now" if woke else "its /run answer is still awaited" if status is JobStatus.SUBMITTING
                else "confirming the RunPod job it names" if status is JobStatus.SUBMIT_UNKNOWN
                else "job already final")
        record_event(session, row.id, from_status=status, to_status=status, source=Source.WEBHOOK,
                     detail=f"RunPod called the webhook; {what}", coalesce=True)
    if woke:
        _wake_poller(rt, row.endpoint_id)
    elif status is JobStatus.SUBMIT_UNKNOWN:
        if runpod_job_id is None:
            with session_scope(rt.engine) as session:
                record_event(session, row.id, from_status=status, to_status=status, source=Source.WEBHOOK,
                             detail="the webhook's body named no RunPod job; not adopted", coalesce=True)
        else:
            adopt_from_webhook(rt, row.id, runpod_job_id)
    return True


def wait(job_id: str, *, timeout: float = 600.0, tenant: str | None = None, runtime: Runtime | None = None) -> Job:
    """Block until the job reaches a final status; `TimeoutError` after `timeout` seconds.

    Reads the table, never RunPod: waiting costs no API calls.
    """
    rt = runtime or get_runtime()
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        # Not get(): a waiter asks only whether the job is done, and 10,000 of them waiting on held jobs
        # should not count the jobs ahead of each, every second.
        job = _read(rt, job_id, explain=False, documents=False, tenant=tenant)
        if job.is_terminal:
            return with_documents(rt, job)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"job {job_id} is still {job.status} after {timeout}s")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 1.0)


def _wake_dispatcher(rt: Runtime, endpoint_id: str) -> None:
    """A job is PENDING: make sure the endpoint's dispatcher runs soon (one message, not one per job)."""
    try:
        rt.wake(DISPATCH_TASK, endpoint_id, GATHER_SECONDS)
    except Exception:
        # The row is committed; the reconciler will wake the dispatcher. Never fail the caller for this.
        log.warning("could not wake the dispatcher of endpoint %s; the reconciler will", endpoint_id, exc_info=True)


def _wake_poller(rt: Runtime, endpoint_id: str) -> None:
    """A job's poll is due now: make sure the endpoint's poller runs now (one message for many webhooks)."""
    try:
        rt.wake(POLL_DUE_TASK, endpoint_id)
    except Exception:
        log.warning("could not wake the poller of endpoint %s; the reconciler will", endpoint_id, exc_info=True)


def _publish(rt: Runtime, task: str, job_id: str) -> None:
    try:
        rt.publish(task, job_id, None)
    except Exception:
        # The row is committed; the reconciler will send it. Never fail the caller for this.
        log.warning("could not publish %s for job %s; the reconciler will pick it up", task, job_id,
                    exc_info=True)
