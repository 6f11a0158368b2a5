"""The SQL tables: `jobs` (the record of truth) and `job_events` (every transition).

Every time is an aware UTC datetime in Python, whatever the database does with zones. Table rows
are storage; callers get the frozen `Job` view from `jobs.api`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Dialect, Index, String, Text, UniqueConstraint, text
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from jobs.states import JobStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC in, aware UTC out: SQLite keeps no zone, PostgreSQL converts to the session's."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware UTC time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: A JSON document that is a bare number: SQLite would keep it as a number, not as the text sent.
_BARE_NUMBER = re.compile(r"-?[0-9][0-9.eE+-]*")


class JsonDocument(TypeDecorator[Any]):
    """JSON that reads back exactly as written, on SQLite too.

    SQLite gives a column declared JSON numeric affinity, so a document that is a bare number was
    stored as an SQL number and read back changed: 0.0 and -0.0 as 0, 100000000000000000000 as 1e+20.
    There such a document is bound as a BLOB, which no affinity converts. PostgreSQL keeps JSON text.
    """

    impl = JSON
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Any:
        serialize = super().bind_processor(dialect)
        if dialect.name != "sqlite" or serialize is None:
            return serialize

        def process(value: Any) -> Any:
            text = serialize(value)
            return text.encode() if isinstance(text, str) and _BARE_NUMBER.fullmatch(text) else text

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        load = super().result_processor(dialect, coltype)
        if dialect.name != "sqlite" or load is None:
            return load

        def process(value: Any) -> Any:
            return load(value.decode() if isinstance(value, bytes) else value)

        return process


class StatusString(TypeDecorator[JobStatus]):
    """A JobStatus stored as plain text (not a database enum: adding a status needs no ALTER TYPE)."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value: JobStatus | str | None, dialect: Dialect) -> str | None:
        return None if value is None else JobStatus(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> JobStatus | None:
        return None if value is None else JobStatus(value)


def _time(*, required: bool = False) -> Any:
    if required:
        return Field(default_factory=utcnow, sa_type=UtcDateTime, nullable=False)
    return Field(default=None, sa_type=UtcDateTime)


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        # One job per (endpoint, idempotency key) and tenant: a second submit gets the first job back, and
        # another tenant's same key is another job. NULLs are distinct in a unique constraint, so jobs without
        # a tenant have a partial index of their own. (Inserts name no conflict target: either index applies.)
        UniqueConstraint("endpoint_id", "idempotency_key", "tenant", name="uq_jobs_endpoint_idempotency_key_tenant"),
        Index("uq_jobs_endpoint_idempotency_key_untenanted", "endpoint_id", "idempotency_key", unique=True,
              sqlite_where=text("tenant IS NULL"), postgresql_where=text("tenant IS NULL")),
        # A tenant's jobs newest first (GET /v1/jobs with a tenant's token), and its jobs in flight (its limit).
        Index("ix_jobs_tenant_created_at", "tenant", "created_at"),
        Index("ix_jobs_tenant_status", "tenant", "status"),
        # The reconciler's and the poller's question: which in-flight jobs are due?
        Index("ix_jobs_status_next_poll_at", "status", "next_poll_at"),
        Index("ix_jobs_created_at", "created_at"),
        # The dispatcher's question: an endpoint's next PENDING jobs, by priority then age.
        Index("ix_jobs_dispatch", "endpoint_id", "status", "priority", "created_at"),
        # The poller's question: an endpoint's jobs at RunPod whose poll is due.
        Index("ix_jobs_poll_due", "endpoint_id", "status", "next_poll_at"),
        # An endpoint's newest completed jobs, for the poll plan (jobs.flow.endpoint_times) and health's estimate.
        Index("ix_jobs_endpoint_status_finished_at", "endpoint_id", "status", "finished_at"),
    )

    id: str = Field(primary_key=True, max_length=36)
    # Who the job belongs to (jobs.tenants): a tenant's API token sees only its tenant's jobs. None for jobs
    # submitted without one (from Python, by an admin token, or before tenants existed).
    tenant: str | None = Field(default=None, max_length=64)
    endpoint_name: str = Field(max_length=64)
    endpoint_id: str = Field(max_length=64)
    status: JobStatus = Field(sa_type=StatusString, index=True)
    # Written by the same UPDATE that changes `status` (SET previous_status = status, ...), so the
    # compare-and-set learns the status it replaced in one statement, on SQLite and PostgreSQL.
    previous_status: JobStatus | None = Field(default=None, sa_type=StatusString)
    runpod_job_id: str | None = Field(default=None, max_length=128, index=True)

    input: Any = Field(sa_column=Column(JsonDocument, nullable=False))
    policy: dict[str, Any] | None = Field(default=None, sa_column=Column(JsonDocument))
    webhook: str | None = Field(default=None, sa_column=Column(Text))
    output: Any = Field(default=None, sa_column=Column(JsonDocument))
    error: str | None = Field(default=None, sa_column=Column(Text))
    progress: Any = Field(default=None, sa_column=Column(JsonDocument))
    # "metadata" is reserved on SQLAlchemy models, so the attribute is `meta`.
    meta: dict[str, Any] | None = Field(default=None, sa_column=Column("metadata", JsonDocument))

    attempt: int = 1
    # Higher goes to RunPod first among an endpoint's PENDING jobs; equal priorities go oldest first.
    priority: int = 0
    poll_count: int = 0
    poll_errors: int = 0  # consecutive failed polls, for backoff; reset by a successful one
    polls_since_change: int = 0  # reset when RunPod's status changes: fast polls again
    # When the next poll is due; for a PENDING job that RunPod turned away, the next submit.
    next_poll_at: datetime | None = _time()
    deadline_at: datetime | None = _time()  # past this, RunPod's ttl has deleted the job
    last_runpod_status: str | None = Field(default=None, max_length=16)
    # Set by retry(): the next submit first asks RunPod's /retry to requeue this RunPod id.
    runpod_retry_of: str | None = Field(default=None, max_length=128)
    # Collect a generator handler's chunks from RunPod's /stream as they come (see job_stream).
    stream: bool = False
    # SHA-256 of the token in the webhook URL rpq gave RunPod for the current attempt, stored before
    # /run is called, so a webhook can prove a job ours even when /run's own answer was lost. The token
    # itself is never stored.
    webhook_token_hash: str | None = Field(default=None, max_length=64, unique=True)
    # RunPod said COMPLETED but gave no output (and no stream chunks to build one from): what RunPod
    # shows when a result over its ~20 MB limit was dropped. Not a silent success: flagged, evented, counted.
    output_missing: bool = False
    # The RunPod job id a webhook for this attempt named while /run's answer was still awaited. Not
    # trusted: used only if /run's outcome turns out unknown, and only once /status confirms it.
    webhook_runpod_job_id: str | None = Field(default=None, max_length=128)
    # The job has rows in job_files (inputs, declared outputs, an offloaded input): the submit and the final
    # poll read them only then, so a job without files costs no extra query.
    has_files: bool = False
    # A declared output was not in the bucket when the job completed (or could not be checked): flagged,
    # evented and counted like output_missing. The job stays COMPLETED: its RunPod result is real.
    files_missing: bool = False
    # An estimate of what the job cost: execution time x the endpoint's GPU list price per second x GPU count,
    # written when it finishes (None when the price was not known). List price: discounts are not in it.
    cost_usd: float | None = None
    # An operator let this PENDING job past the spend guard (`jobs.release`): it goes out while others are held.
    spend_released: bool = False
    # Submitted with s3_config=True: each /run carries RunPod's s3Config (RPQ_WORKER_S3_*), never stored here.
    worker_s3: bool = False
    # Where an input sent with offload=True lives in the bucket (the row's `input` is then JSON null), and
    # where an output over RPQ_INLINE_OUTPUT_MAX_BYTES was moved (`output` is then null). `jobs.get` reads both back.
    input_key: str | None = Field(default=None, sa_column=Column(Text))
    output_key: str | None = Field(default=None, sa_column=Column(Text))

    correlation_id: str | None = Field(default=None, max_length=128, index=True)
    idempotency_key: str | None = Field(default=None, max_length=255)

    created_at: datetime = _time(required=True)
    updated_at: datetime = _time(required=True)
    submitted_at: datetime | None = _time()
    started_at: datetime | None = _time()
    finished_at: datetime | None = _time()
    delay_time_ms: int | None = None
    execution_time_ms: int | None = None
    worker_id: str | None = Field(default=None, max_length=128)


class JobEvent(SQLModel, table=True):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", ondelete="CASCADE", max_length=36)
    from_status: JobStatus | None = Field(default=None, sa_type=StatusString)
    to_status: JobStatus = Field(sa_type=StatusString)
    at: datetime = _time(required=True)
    source: str = Field(max_length=16)  # api, submit, poll, webhook, operator, reconciler
    detail: str | None = Field(default=None, sa_column=Column(Text))
    # The same event again (a webhook call, a reconciler re-poll) bumps these instead of adding a row,
    # so a chatty job's history stays bounded.
    repeats: int = 1
    last_at: datetime | None = _time()


class EndpointHealthRow(SQLModel, table=True):
    """One observation of an endpoint's /health. A failed call is stored as a failure, with its error,
    and NULL counters: never as zeros, which would read as an idle endpoint."""

    __tablename__ = "endpoint_health"
    __table_args__ = (Index("ix_endpoint_health_endpoint_observed", "endpoint_name", "observed_at"),)

    id: int | None = Field(default=None, primary_key=True)
    endpoint_name: str = Field(max_length=64)
    endpoint_id: str = Field(max_length=64)
    observed_at: datetime = _time(required=True)
    ok: bool
    error: str | None = Field(default=None, sa_column=Column(Text))
    jobs_completed: int | None = None
    jobs_failed: int | None = None
    jobs_in_progress: int | None = None
    jobs_in_queue: int | None = None
    jobs_retried: int | None = None
    workers_idle: int | None = None
    workers_initializing: int | None = None
    workers_ready: int | None = None
    workers_running: int | None = None
    workers_throttled: int | None = None
    workers_unhealthy: int | None = None


# -- RunPod's management API: what the collectors saw (issue 11) ------------------------------------------------
# A collector run that failed is recorded as a failure (ok False, its error, NULL figures), never as zeros,
# which would read as an endpoint scaled to nothing or an account with no balance.


class EndpointSnapshot(SQLModel, table=True):
    """One observation of an endpoint's configuration (`GET /serverless/{id}`) and its workers' exact states
    (`/serverless/{id}/workers`, which `/health` only approximates)."""

    __tablename__ = "endpoint_snapshots"
    __table_args__ = (Index("ix_endpoint_snapshots_endpoint_observed", "endpoint_name", "observed_at"),)

    id: int | None = Field(default=None, primary_key=True)
    endpoint_name: str = Field(max_length=64)
    endpoint_id: str = Field(max_length=64)
    observed_at: datetime = _time(required=True)
    ok: bool
    error: str | None = Field(default=None, sa_column=Column(Text))
    workers_min: int | None = None
    workers_max: int | None = None
    idle_timeout: int | None = None
    scaling_type: str | None = Field(default=None, max_length=32)
    scaling_value: float | None = None
    gpu_pools: str | None = Field(default=None, max_length=255)  # pool ids, comma-separated ("ADA_24,AMPERE_48")
    gpu_count: int | None = None
    timeout_ms: int | None = Field(default=None, sa_type=BigInteger)
    flashboot: bool | None = None
    workers_running: int | None = None
    workers_idle: int | None = None
    workers_initializing: int | None = None
    workers_throttled: int | None = None
    workers_unhealthy: int | None = None
    workers_total: int | None = None


class AccountSnapshot(SQLModel, table=True):
    """The account's balance, spend per hour and spend limit (GraphQL `myself`: v2 has no such route)."""

    __tablename__ = "account_snapshots"
    __table_args__ = (Index("ix_account_snapshots_observed", "observed_at"),)

    id: int | None = Field(default=None, primary_key=True)
    observed_at: datetime = _time(required=True)
    ok: bool
    error: str | None = Field(default=None, sa_column=Column(Text))
    balance: float | None = None
    spend_per_hour: float | None = None
    spend_limit: float | None = None


class BillingRecordRow(SQLModel, table=True):
    """RunPod's billed serverless amount for one endpoint and one hour (`/billing/serverless`). A bucket seen
    again is updated in place: RunPod bills every 5 minutes, so the current hour grows until it is over."""

    __tablename__ = "billing_records"
    __table_args__ = (UniqueConstraint("endpoint_id", "start", name="uq_billing_records_endpoint_start"),
                      Index("ix_billing_records_start", "start"))

    id: int | None = Field(default=None, primary_key=True)
    endpoint_id: str = Field(max_length=64)
    start: datetime = _time(required=True)
    end: datetime = _time(required=True)
    total_amount: float
    gpu_amount: float | None = None
    observed_at: datetime = _time(required=True)


class GpuPrice(SQLModel, table=True):
    """A GPU type's serverless list price per GPU-hour, as the catalog gave it (negotiated discounts are not in it)."""

    __tablename__ = "gpu_prices"
    __table_args__ = (Index("ix_gpu_prices_pool_observed", "pool", "observed_at"),)

    id: int | None = Field(default=None, primary_key=True)
    observed_at: datetime = _time(required=True)
    gpu_id: str = Field(max_length=128)
    pool: str | None = Field(default=None, max_length=64)
    serverless_per_hour: float | None = None


class PodSnapshot(SQLModel, table=True):
    __tablename__ = "pod_snapshots"
    __table_args__ = (Index("ix_pod_snapshots_observed", "observed_at"),)

    id: int | None = Field(default=None, primary_key=True)
    observed_at: datetime = _time(required=True)
    pod_id: str = Field(max_length=128)
    name: str | None = Field(default=None, max_length=255)
    status: str | None = Field(default=None, max_length=32)
    cost_per_hour: float | None = None


class CollectorRun(SQLModel, table=True):
    """Every run of every collector (endpoints, account, billing, catalog, pods): when, and whether it worked.
    A catalog or pod list that could not be read is this row with its error, and no data rows."""

    __tablename__ = "collector_runs"
    __table_args__ = (Index("ix_collector_runs_collector_at", "collector", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    collector: str = Field(max_length=32)
    at: datetime = _time(required=True)
    ok: bool
    error: str | None = Field(default=None, sa_column=Column(Text))
    rows: int = 0


class ScaleChange(SQLModel, table=True):
    """One change of an endpoint's workers, by an operator, the autoscaler or the budget guard: what it was,
    what was asked, what RunPod showed after. Written whether or not RunPod took it."""

    __tablename__ = "scale_audit"
    __table_args__ = (Index("ix_scale_audit_endpoint_at", "endpoint_name", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _time(required=True)
    endpoint_name: str = Field(max_length=64)
    endpoint_id: str = Field(max_length=64)
    actor: str = Field(max_length=128)  # "operator:<user>", "autoscaler", "budget-guard"
    reason: str | None = Field(default=None, sa_column=Column(Text))
    before_min: int | None = None
    before_max: int | None = None
    before_idle_timeout: int | None = None
    asked_min: int | None = None
    asked_max: int | None = None
    asked_idle_timeout: int | None = None
    after_min: int | None = None
    after_max: int | None = None
    after_idle_timeout: int | None = None
    ok: bool
    error: str | None = Field(default=None, sa_column=Column(Text))


class SpendHoldRow(SQLModel, table=True):
    """One spell of the spend guard holding new jobs, for the account or for one endpoint: when it began, why,
    and when it ended (NULL while it holds). At most one open spell per scope, which the unique partial index
    enforces, so two dispatchers that see a hold begin at once record it once."""

    __tablename__ = "spend_holds"
    __table_args__ = (
        Index("ix_spend_holds_scope_open", "scope", unique=True,
              sqlite_where=text("ended_at IS NULL"), postgresql_where=text("ended_at IS NULL")),
        Index("ix_spend_holds_started_at", "started_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(max_length=64)  # "account", or an endpoint's name
    started_at: datetime = _time(required=True)
    ended_at: datetime | None = _time()
    reason: str = Field(sa_column=Column(Text, nullable=False))


class Lock(SQLModel, table=True):
    """A named lease, so that of two beats (or two overlapping runs) only one does a periodic job."""

    __tablename__ = "rpq_locks"

    name: str = Field(primary_key=True, max_length=64)
    owner: str = Field(max_length=128)
    expires_at: datetime = _time(required=True)


class RunPodCancel(SQLModel, table=True):
    """A RunPod job that must be cancelled at RunPod: the outbox of cancels.

    Written in the same transaction as the decision (a job cancelled here, or a RunPod job created for
    an attempt that no longer owns its row), so the RunPod id is never lost with a message: the cancel
    task works through the open rows, and the reconciler re-sends it for rows left open."""

    __tablename__ = "runpod_cancels"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", "runpod_job_id", name="uq_runpod_cancels_job_attempt_runpod"),
        Index("ix_runpod_cancels_open", "done_at", "next_try_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", ondelete="CASCADE", max_length=36)
    attempt: int
    endpoint_id: str = Field(max_length=64)
    runpod_job_id: str = Field(max_length=128)
    reason: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _time(required=True)
    next_try_at: datetime = _time(required=True)
    tries: int = 0
    done_at: datetime | None = _time()
    result: str | None = Field(default=None, sa_column=Column(Text))


class FileRole(StrEnum):
    INPUT = "input"  # a file the handler reads (attempt 0: every attempt reads it)
    OUTPUT = "output"  # a declared output: attempt 0 is the declaration, attempt N what attempt N left
    INPUT_DOCUMENT = "input_document"  # an input sent with offload=True (attempt 0)
    RESULT = "result"  # an output over RPQ_INLINE_OUTPUT_MAX_BYTES, moved to the bucket (attempt N)


class FileState(StrEnum):
    DECLARED = "declared"  # promised, not checked yet: an output to be written, an upload to be made
    STORED = "stored"  # HEAD found it: size, ETag and content type are the store's
    MISSING = "missing"  # looked for and not found (or the store could not be asked: see the job's events)


class JobFile(SQLModel, table=True):
    """An object in the bucket that belongs to a job. Written with the write it belongs to: the submit's
    insert, the final poll's transition. Retention deletes the objects of the rows it removes."""

    __tablename__ = "job_files"
    __table_args__ = (UniqueConstraint("job_id", "attempt", "role", "name", name="uq_job_files_job_attempt_role_name"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", ondelete="CASCADE", max_length=36)
    # 0 for what every attempt shares (inputs, the declaration of outputs); N for what attempt N left.
    attempt: int = 0
    role: str = Field(max_length=16)  # FileRole
    name: str = Field(max_length=255)
    key: str | None = Field(default=None, sa_column=Column(Text))  # None for a declaration: each attempt has its own
    content_type: str | None = Field(default=None, max_length=255)
    size: int | None = Field(default=None, sa_type=BigInteger)
    etag: str | None = Field(default=None, max_length=128)
    state: str = Field(max_length=16)  # FileState
    # rpq made the object (an upload, a job's input or output folder): retention deletes it with the job.
    # An object the caller named by key is theirs, and is left alone.
    owned: bool = True
    # An input from a direct upload: the most bytes its signature allowed, checked again by HEAD before /run.
    max_bytes: int | None = Field(default=None, sa_type=BigInteger)
    created_at: datetime = _time(required=True)
    checked_at: datetime | None = _time()


class Upload(SQLModel, table=True):
    """A key reserved for a direct upload (`jobs.prepare_upload`) and not used yet: what its signature allows,
    so the submit that names it can check the object against it. That submit moves it into job_files, in its
    own transaction, so an upload serves one job. Unused ones are purged with their objects."""

    __tablename__ = "file_uploads"
    __table_args__ = (Index("ix_file_uploads_created_at", "created_at"),)

    key: str = Field(primary_key=True, max_length=1024)
    # The tenant that prepared it: only that tenant's submits may use it (None: only submits without a tenant).
    tenant: str | None = Field(default=None, max_length=64)
    name: str = Field(max_length=255)
    content_type: str = Field(max_length=255)
    max_bytes: int = Field(sa_type=BigInteger)
    created_at: datetime = _time(required=True)
    expires_at: datetime = _time(required=True)


class StreamEvent(SQLModel, table=True):
    """What a job's event stream (SSE) replays, in order: started, progress and output chunks, then
    exactly one of end or error. Written by the poll in the transaction that observed it."""

    __tablename__ = "job_stream"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_stream_job_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", ondelete="CASCADE", max_length=36)
    seq: int  # 1, 2, 3 ... per job across attempts; the SSE event id, so a client resumes with Last-Event-ID
    attempt: int  # a retry starts a new stream: started ... end|error again
    kind: str = Field(max_length=16)  # started, progress, output, end, error
    data: Any = Field(default=None, sa_column=Column(JsonDocument))
    at: datetime = _time(required=True)


class JobMeta(SQLModel, table=True):
    """A job's value for one indexed metadata key (RPQ_METADATA_INDEX), as text, written in the submit's
    transaction, so `GET /v1/jobs?meta.user=42` is an index lookup.

    A side table rather than an index on the JSON column: it is the same table, index and query on SQLite and
    PostgreSQL (an expression index differs by dialect, needs a migration per key, and compares JSON's types
    where a query string has only text), and keys are added by setting a variable, not by changing the schema."""

    __tablename__ = "job_meta"
    __table_args__ = (Index("ix_job_meta_key_value", "key", "value", "job_id"),)

    job_id: str = Field(foreign_key="jobs.id", ondelete="CASCADE", max_length=36, primary_key=True)
    key: str = Field(max_length=64, primary_key=True)
    value: str = Field(max_length=255)
