"""One typed settings object, read from the environment and validated at start-up.

`Settings.from_env()` reads every variable with pydantic-settings, and turns pydantic's list of
errors into one `ConfigError` naming each bad variable, so an operator fixes them all in one go.
`.env.example` lists every variable with a comment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    AliasGenerator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from jobs.errors import ConfigError
from jobs.runpod.budget import Limits, parse_limits
from jobs.tenants import EVERY_TENANT, TENANT_RE

T = TypeVar("T")

# RunPod endpoint ids are lowercase letters and digits ("fh46rj7dq9r3o5"); public endpoints add
# hyphens ("black-forest-labs-flux-1-schnell"). \Z, not $: $ also matches before a final newline.
ENDPOINT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{4,62}[a-z0-9]\Z")
MAX_POLL_GAP_SECONDS = 300.0
SUBMIT_STUCK_MARGIN_SECONDS = 30.0  # past a /run's worst case, for a busy worker to write its answer
ENDPOINT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}\Z")
# S3's bucket naming rules (R2 and MinIO follow them): 3-63 lowercase letters, digits, dots and hyphens.
S3_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
S3_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}\Z")
# Path segments of safe characters, joined by single slashes: no leading or trailing slash, no "..".
S3_PREFIX_RE = re.compile(r"^(?!.*(?:^|/)\.{1,2}(?:/|$))[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*\Z")
PRESIGN_MAX_SECONDS = 604_800  # 7 days: the longest a SigV4 presigned URL may live
MAX_SINGLE_PUT_BYTES = 5 * 1024**3  # S3 and R2 take at most 5 GiB in one PUT (larger needs multipart)
LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
# A metadata key that can be indexed: it is a query parameter's suffix (meta.user), so no dots.
METADATA_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
#: The console's cookie-signing secret: 32 characters of `openssl rand -hex 32` or more, so it cannot be guessed.
CONSOLE_SECRET_MIN_LENGTH = 32


class Secret(SecretStr):
    """pydantic's SecretStr (never in repr, str, f-strings, logs or tracebacks), and never pickled.

    Call `reveal()` at the one place the value is really needed (the Authorization header).
    """

    def reveal(self) -> str:
        return self.get_secret_value()

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling a secret would put it in a Celery message or a cache; refuse loudly.
        raise TypeError("a Secret cannot be pickled")


_PASSWORD_PARAMETER = re.compile(r"(?i)(^|&)(password=)[^&]*")


def redact_url(url: str) -> str:
    """`url` with its password masked, wherever a URL can carry one: in the user info
    (`postgresql://rpq:secret@db`, `redis://:secret@redis`) or as libpq's `?password=`."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")  # the last @: a password may hold one too
    netloc = f"{userinfo.partition(':')[0]}:***@{host}" if at and ":" in userinfo else parts.netloc
    query = _PASSWORD_PARAMETER.sub(r"\1\2***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # unchanged, rather than as urlunsplit would spell it
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclass(frozen=True)
class Endpoint:
    """A RunPod serverless endpoint as rpq knows it: the operator's name and RunPod's id."""

    name: str
    id: str


@dataclass(frozen=True)
class AutoscalePolicy:
    """How the autoscaler (jobs.runpod.autoscale) may move one endpoint's max workers: never below `floor` or
    above `ceiling`, raising when queued jobs would wait longer than `target_wait_seconds`, and deciding again
    only `cooldown_seconds` after any change."""

    floor: int
    ceiling: int
    target_wait_seconds: float
    cooldown_seconds: float = 300.0


def _url(*schemes: str) -> AfterValidator:
    """A URL kept as the string given (drivers get it as the operator wrote it), of one of `schemes`."""

    def check(value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in schemes or not (parts.netloc or parts.path):
            raise ValueError(f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return value.rstrip("/") if parts.scheme in ("http", "https") else value

    return AfterValidator(check)


def _matching(pattern: re.Pattern[str], what: str) -> AfterValidator:
    """A string `pattern` matches in full, else an error saying what was expected (not the regex)."""

    def check(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(f"expected {what}")
        return value

    return AfterValidator(check)


def _long_secret(value: Secret) -> Secret:
    # Only the length is said: the value is a secret, and pydantic's errors never quote it here.
    if len(value.reveal()) < CONSOLE_SECRET_MIN_LENGTH:
        raise ValueError(f"must be at least {CONSOLE_SECRET_MIN_LENGTH} characters (openssl rand -hex 32)")
    return value


WebUrl = Annotated[str, _url("http", "https")]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, Field(gt=0)]  # of seconds, days or jobs
S3Bucket = Annotated[str, _matching(S3_BUCKET_RE, "a bucket name: 3-63 lowercase letters, digits, '.' and '-'")]
S3Region = Annotated[str, _matching(S3_REGION_RE, "a region such as us-east-1, or auto for R2")]
S3Prefix = Annotated[str, Field(max_length=128), _matching(
    S3_PREFIX_RE, "letters, digits, '.', '_', '-' in parts joined by '/', with no '/' at either end and no '..'")]


class Settings(BaseSettings):
    # Each field's environment variable is its name in capitals, or the validation_alias it gives;
    # code and tests pass field names. tests/unit/test_settings.py holds .env.example to the same list.
    model_config = SettingsConfigDict(
        alias_generator=AliasGenerator(validation_alias=str.upper),
        frozen=True, validate_by_name=True, case_sensitive=True,
        hide_input_in_errors=True,  # a ValidationError never quotes a value: it may be a key or a password
        enable_decoding=False,  # lists have their own `name=value,...` syntax, not JSON
    )

    runpod_api_key: Secret | None = None
    runpod_serverless_url: WebUrl = "https://api.runpod.ai/v2"
    runpod_graphql_url: WebUrl = "https://api.runpod.io/graphql"
    # REST v1 (rest.runpod.io/v1) was retired on 2026-11-15; v2 is the management API now.
    runpod_rest_url: WebUrl = "https://api.runpod.io/v2"
    # Where RunPod can reach rpq's HTTP API: each job then carries a webhook that triggers an
    # immediate poll, and polls slow down to a safety net. None: polling only.
    runpod_webhook_base_url: WebUrl | None = None
    # Per request; a /run past this has an unknown outcome.
    runpod_timeout_seconds: Seconds = 30.0
    runpod_collection_interval_seconds: Count = 300
    runpod_health_poll_seconds: Count = 120
    runpod_job_retention_days: Count = 90
    endpoints: Mapping[str, Endpoint] = Field(default_factory=dict, validation_alias="RUNPOD_ENDPOINTS")
    database_url: Annotated[str, _url("sqlite", "postgresql", "postgresql+psycopg")] = "sqlite:///rpq.db"
    celery_broker_url: Annotated[str, _url("redis", "rediss")] = "redis://localhost:6379/0"
    # Polling: how soon after submission, and the longest gap once a job's status stops changing.
    # A lower cap notices long jobs finish sooner and costs more /status calls. Once an endpoint has
    # history, polls follow jobs.flow.pollplan: the cap then bounds the gaps across a job's likely end, and a
    # wait far from it may be longer (pollplan.LONG_WAIT_CAP_SECONDS, or this cap if higher). The cap
    # stays far below the broker's visibility timeout and RunPod's 30-minute result retention.
    poll_first_seconds: Seconds = Field(default=1.0, validation_alias="RPQ_POLL_FIRST_SECONDS")
    poll_max_seconds: Annotated[float, Field(ge=1, le=MAX_POLL_GAP_SECONDS, allow_inf_nan=False)] = Field(
        default=15.0, validation_alias="RPQ_POLL_MAX_SECONDS")
    # The reconciler: how often it runs, and when it decides a message was lost.
    reconcile_interval_seconds: Count = Field(default=30, validation_alias="RPQ_RECONCILE_SECONDS")
    # A poll this overdue (or a PENDING row this old) lost its message.
    poll_grace_seconds: Count = Field(default=30, validation_alias="RPQ_POLL_GRACE_SECONDS")
    # A SUBMITTING row older than this lost its worker mid-/run. None: derived from the client's own
    # bound on a /run (`submit_stuck_after_seconds`); a value at or below that bound is refused.
    submit_stuck_seconds: Count | None = Field(default=None, validation_alias="RPQ_SUBMIT_STUCK_SECONDS")
    # Per endpoint name: at most this many of its jobs at RunPod at once; the rest wait PENDING, in
    # order of priority then age, and go out as jobs finish. Unlisted endpoints have no cap.
    max_in_flight: Mapping[str, int] = Field(default_factory=dict, validation_alias="RPQ_MAX_IN_FLIGHT")
    # The autoscaler, per endpoint name: `tts=1:10:30` keeps max workers between 1 and 10 and raises it when
    # queued jobs would wait over 30 s (an optional fourth part is the cooldown in seconds, default 300).
    # Unlisted endpoints are never scaled by rpq.
    autoscale: Mapping[str, AutoscalePolicy] = Field(default_factory=dict, validation_alias="RPQ_AUTOSCALE")
    # rpq's own budget of RunPod requests per 10 s, per endpoint and operation, shared by every process
    # (jobs.runpod.budget). Below RunPod's documented limits, so rpq never draws a 429.
    runpod_limits: Limits = Field(default_factory=Limits, validation_alias="RPQ_RUNPOD_LIMITS")
    # Files (jobs.bucket): inputs and outputs in S3 or any S3-compatible store (Cloudflare R2, MinIO). No bucket:
    # files are off. Credentials come only from boto3's own chain (AWS_ACCESS_KEY_ID..., profiles, roles).
    s3_bucket: S3Bucket | None = Field(default=None, validation_alias="RPQ_S3_BUCKET")
    # None: AWS. R2: https://<account>.r2.cloudflarestorage.com; any http(s) URL for others.
    s3_endpoint_url: WebUrl | None = Field(default=None, validation_alias="RPQ_S3_ENDPOINT_URL")
    # None: boto3's chain (AWS_REGION, the profile); an R2 endpoint then gets "auto", the region R2 signs with.
    s3_region: S3Region | None = Field(default=None, validation_alias="RPQ_S3_REGION")
    s3_prefix: S3Prefix = Field(default="rpq", validation_alias="RPQ_S3_PREFIX")
    presign_seconds: Annotated[int, Field(ge=1, le=PRESIGN_MAX_SECONDS)] = Field(
        default=3600, validation_alias="RPQ_PRESIGN_SECONDS")
    # Only for jobs submitted with s3_config=True: the credentials RunPod hands the worker as `s3Config`, for
    # handlers that upload with the runpod SDK's helpers. Make them a key that can write to this bucket and
    # nothing more (an R2 token scoped to the bucket): rpq's own credentials never leave boto3's chain.
    worker_s3_access_key_id: Secret | None = Field(default=None, validation_alias="RPQ_WORKER_S3_ACCESS_KEY_ID")
    worker_s3_secret_access_key: Secret | None = Field(default=None,
                                                       validation_alias="RPQ_WORKER_S3_SECRET_ACCESS_KEY")
    # The spend guard (jobs.flow.spend_guard): new jobs are held, not lost, while the account spends at least this
    # many USD an hour, or its balance is at or below this. From the account collector's snapshots. None: off.
    budget_max_spend_per_hour: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, validation_alias="RPQ_BUDGET_MAX_SPEND_PER_HOUR")
    budget_min_balance: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        default=None, validation_alias="RPQ_BUDGET_MIN_BALANCE")
    # Per endpoint name (`tts=2.5,export=10`): that endpoint's new jobs are held while it spends at least this many
    # USD an hour: the larger of rpq's estimate for its jobs finished in the last hour and RunPod's billed amount
    # for its latest billed hour (which counts idle workers too, but lags).
    budget_endpoint_max_spend_per_hour: Mapping[str, float] = Field(
        default_factory=dict, validation_alias="RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR")
    # When set, while the guard holds an endpoint's jobs it also lowers the endpoint's max workers (and min, if
    # higher) to this, through the audited scale path, and puts back what it found once the hold clears. 0 stops
    # every worker: jobs already queued at RunPod then wait too. None: the guard never scales.
    budget_lower_workers_to: Annotated[int, Field(ge=0)] | None = Field(
        default=None, validation_alias="RPQ_BUDGET_LOWER_WORKERS_TO")
    # A completed job's output larger than this (as JSON) goes to the bucket, and the row keeps a reference
    # (`jobs.get` reads it back). Without a bucket every output stays in its row, as before.
    inline_output_max_bytes: Count = Field(default=1_048_576, validation_alias="RPQ_INLINE_OUTPUT_MAX_BYTES")
    # The largest file a direct upload (`jobs.prepare_upload`) may reserve: S3's limit on one PUT by default.
    upload_max_bytes: Annotated[int, Field(gt=0, le=MAX_SINGLE_PUT_BYTES)] = Field(
        default=MAX_SINGLE_PUT_BYTES, validation_alias="RPQ_UPLOAD_MAX_BYTES")
    # Log lines (jobs.observability.logs): text for people, or json, one object a line, for a log pipeline. Both
    # have the same fields. Every rpq process follows it: the CLI, the API, the metrics exporter, worker and beat.
    log_format: LogFormat = Field(default="text", validation_alias="RPQ_LOG_FORMAT")
    # The least a long-running rpq process (`rpq api`, `rpq metrics`, `rpq simulator`) logs. Celery's worker and
    # beat take their --loglevel instead; the CLI's other commands log warnings and rpq's own INFO (-v: DEBUG).
    log_level: LogLevel = Field(default="INFO", validation_alias="RPQ_LOG_LEVEL")
    # Per tenant (jobs.tenants): `shop=100,*=20`, `*` for every tenant not listed. Unset: no limit. A submit over
    # a limit is refused (HTTP 429 with Retry-After) and writes nothing. Jobs without a tenant have no limits.
    tenant_max_in_flight: Mapping[str, int] = Field(default_factory=dict, validation_alias="RPQ_TENANT_MAX_IN_FLIGHT")
    tenant_submits_per_minute: Mapping[str, int] = Field(default_factory=dict,
                                                         validation_alias="RPQ_TENANT_SUBMITS_PER_MINUTE")
    # Metadata keys whose values are indexed, so jobs can be listed by them (`GET /v1/jobs?meta.user=42`,
    # `jobs.list_jobs(meta={"user": "42"})`): `user,org`. A key is indexed for jobs submitted while it is listed.
    metadata_index: tuple[str, ...] = Field(default=(), validation_alias="RPQ_METADATA_INDEX")
    # The HTTP API signs the short-lived events URLs it hands out (POST /v1/jobs/{id}/events-url, for a browser's
    # EventSource, which cannot send a bearer token) with this. None: no events URLs. Changing it voids those out.
    api_secret: Annotated[Secret, AfterValidator(_long_secret)] | None = Field(
        default=None, validation_alias="RPQ_API_SECRET")
    # How long an events URL opens a stream for: a stream begun in time runs to its end, but a reconnect after
    # this needs a new URL.
    events_url_seconds: Annotated[int, Field(ge=10, le=86_400)] = Field(
        default=900, validation_alias="RPQ_EVENTS_URL_SECONDS")
    # The operator console (`rpq api` at /console, jobs.web.console) signs its session cookies and CSRF tokens with
    # this. None: the console is off. Changing it ends every console session.
    console_secret: Annotated[Secret, AfterValidator(_long_secret)] | None = Field(
        default=None, validation_alias="RPQ_CONSOLE_SECRET")
    # Where operators reach Flower and the metrics exporter, for the console's links only (rpq never calls them).
    flower_url: WebUrl | None = Field(default=None, validation_alias="RPQ_FLOWER_URL")
    metrics_url: WebUrl | None = Field(default=None, validation_alias="RPQ_METRICS_URL")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `environ` (the process's environment by default); every problem in one ConfigError."""
        try:
            return cls(**_Environment(cls, os.environ if environ is None else environ)())
        except ValidationError as exc:
            raise ConfigError(_problems(exc)) from None  # it says it all; pydantic's text would add noise

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments only: the environment is read by from_env() alone, never behind the back of
        # code that builds Settings(...) itself, and never a .env file (docker compose reads that).
        return (init_settings,)

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, raw: object, info: ValidationInfo) -> object:
        if not isinstance(raw, str):
            return raw
        return raw.strip().lower() if info.field_name == "log_format" else raw.strip().upper()

    @field_validator("endpoints", mode="before")
    @classmethod
    def _parse_endpoints(cls, raw: object) -> object:
        """`tts=fh46rj7dq9r3o5,export=abc123`; a bare id names itself."""
        if not isinstance(raw, str):
            return raw
        endpoints: dict[str, Endpoint] = {}
        problems: list[str] = []
        for item in _items(raw):
            name, sep, endpoint_id = (s.strip() for s in item.partition("="))
            if not sep:
                name, endpoint_id = item, item
            if not ENDPOINT_NAME_RE.match(name):
                problems.append(f"{name!r} is not a valid name (letters, digits, '-', '_')")
            elif not ENDPOINT_ID_RE.match(endpoint_id):
                problems.append(f"{endpoint_id!r} (for {name!r}) is not a RunPod endpoint id")
            elif name in endpoints:
                problems.append(f"{name!r} is listed twice")
            else:
                endpoints[name] = Endpoint(name=name, id=endpoint_id)
        if problems:
            raise ValueError(*problems)
        return endpoints

    @field_validator("max_in_flight", mode="before")
    @classmethod
    def _parse_caps(cls, raw: object, info: ValidationInfo) -> object:
        """`tts=50,export=4`: endpoint names from RUNPOD_ENDPOINTS, each with a whole number above 0."""
        def cap(value: str) -> int | str:
            if re.fullmatch(r"[0-9]{1,9}", value) and int(value) > 0:
                return int(value)
            return "is not NAME=N with N a whole number above 0"
        return _per_endpoint(raw, info, cap)

    @field_validator("budget_endpoint_max_spend_per_hour", mode="before")
    @classmethod
    def _parse_endpoint_budgets(cls, raw: object, info: ValidationInfo) -> object:
        """`tts=2.5,export=10`: endpoint names from RUNPOD_ENDPOINTS, each with USD an hour above 0."""
        def usd(value: str) -> float | str:
            if re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,6})?", value) and float(value) > 0:
                return float(value)
            return "is not NAME=USD with USD an hourly amount above 0"
        return _per_endpoint(raw, info, usd)

    @field_validator("autoscale", mode="before")
    @classmethod
    def _parse_autoscale(cls, raw: object, info: ValidationInfo) -> object:
        """`tts=1:10:30,export=0:4:120:600`: NAME=FLOOR:CEILING:TARGET_WAIT[:COOLDOWN], names from RUNPOD_ENDPOINTS."""
        def policy(value: str) -> AutoscalePolicy | str:
            parts = value.split(":")
            whole = [p.isdigit() and len(p) <= 6 for p in parts[:2]]
            seconds = [re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,3})?", p) is not None for p in parts[2:]]
            if len(parts) not in (3, 4) or not all(whole) or not all(seconds):
                return "is not NAME=FLOOR:CEILING:TARGET_WAIT[:COOLDOWN] (whole workers, seconds)"
            floor, ceiling = int(parts[0]), int(parts[1])
            target, cooldown = float(parts[2]), float(parts[3]) if len(parts) == 4 else 300.0
            if ceiling < 1 or floor > ceiling or target <= 0:
                return "the ceiling must be at least 1 and the floor, and the target wait above 0"
            return AutoscalePolicy(floor, ceiling, target, cooldown)
        return _per_endpoint(raw, info, policy)

    @field_validator("tenant_max_in_flight", "tenant_submits_per_minute", mode="before")
    @classmethod
    def _parse_tenant_limits(cls, raw: object) -> object:
        """`shop=100,*=20`: tenant names (or `*`, every other tenant), each with a whole number above 0."""
        if not isinstance(raw, str):
            return raw
        limits: dict[str, int] = {}
        problems: list[str] = []
        for item in _items(raw):
            name, sep, value = (s.strip() for s in item.partition("="))
            if not sep or not re.fullmatch(r"[0-9]{1,9}", value) or int(value) <= 0:
                problems.append(f"{item!r} is not TENANT=N with N a whole number above 0")
            elif name != EVERY_TENANT and not TENANT_RE.match(name):
                problems.append(f"{name!r} is not a tenant name (letters, digits, '.', '_', '-') or *")
            elif name in limits:
                problems.append(f"{name!r} is listed twice")
            else:
                limits[name] = int(value)
        if problems:
            raise ValueError(*problems)
        return limits

    @field_validator("metadata_index", mode="before")
    @classmethod
    def _parse_metadata_index(cls, raw: object) -> object:
        """`user,org`: metadata keys of 1 to 64 letters, digits, '_' or '-'."""
        if not isinstance(raw, str):
            return raw
        keys = _items(raw)
        problems = [f"{key!r} is not a metadata key that can be indexed (1 to 64 letters, digits, '_', '-')"
                    for key in keys if not METADATA_KEY_RE.match(key)]
        problems += [f"{key!r} is listed twice" for key in sorted(set(keys)) if keys.count(key) > 1]
        if problems:
            raise ValueError(*problems)
        return tuple(keys)

    @field_validator("runpod_limits", mode="before")
    @classmethod
    def _parse_limits(cls, raw: object) -> object:
        if not isinstance(raw, str):
            return raw
        problems: list[str] = []
        limits = parse_limits(raw, problems)
        if problems:  # parse_limits names the variable; _problems() does that for every field
            raise ValueError(*(problem.removeprefix("RPQ_RUNPOD_LIMITS: ") for problem in problems))
        return limits

    @model_validator(mode="after")
    def _submit_stuck_outlasts_a_run(self) -> Settings:
        if self.submit_stuck_seconds is not None and self.submit_stuck_seconds <= self.submit_bound_seconds:
            raise ValueError(f"RPQ_SUBMIT_STUCK_SECONDS: must be more than {self.submit_bound_seconds:.0f} "
                             "(the longest a /run can take with RUNPOD_TIMEOUT_SECONDS); a slower /run would "
                             "be called lost while its answer can still come")
        return self

    @property
    def runpod_connect_timeout_seconds(self) -> float:
        return min(5.0, self.runpod_timeout_seconds)

    @property
    def submit_budget_seconds(self) -> float:
        """How long a submit keeps trying /run: room for one retry after a refused connection or a 429
        (the only failures it retries). No attempt starts once it is spent."""
        return 2 * self.runpod_timeout_seconds + 10

    @property
    def submit_bound_seconds(self) -> float:
        """The longest one /run call can take: the budget, plus the last attempt's pool, connect, write
        and read timeouts, each cut to the budget by the client."""
        timeout = self.runpod_timeout_seconds
        return self.submit_budget_seconds + 3 * timeout + self.runpod_connect_timeout_seconds

    @property
    def submit_stuck_after_seconds(self) -> float:
        """When the reconciler calls a SUBMITTING row's worker lost: past anything a live /run can take,
        so a slow /run is never marked SUBMIT_UNKNOWN while its answer can still come."""
        if self.submit_stuck_seconds is not None:
            return float(self.submit_stuck_seconds)
        return self.submit_bound_seconds + SUBMIT_STUCK_MARGIN_SECONDS

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # Settings get logged and land in tracebacks; the API key is a Secret, and the URLs may hold passwords.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if isinstance(value, str) else value

    def require_api_key(self) -> Secret:
        """The API key, or a ConfigError saying which variable to set."""
        if self.runpod_api_key is None:
            raise ConfigError(["RUNPOD_API_KEY: not set; RunPod (and the simulator) need it"])
        return self.runpod_api_key

    def endpoint_name_for(self, endpoint_id: str) -> str | None:
        """The name RUNPOD_ENDPOINTS gives that RunPod endpoint id, if any (per-endpoint settings go by name)."""
        return next((name for name, endpoint in self.endpoints.items() if endpoint.id == endpoint_id), None)

    def max_in_flight_for(self, endpoint_id: str) -> int | None:
        """The cap on the endpoint's jobs at RunPod at once, if it has one."""
        name = self.endpoint_name_for(endpoint_id)
        return self.max_in_flight.get(name) if name is not None else None

    def resolve_endpoint(self, name_or_id: str) -> Endpoint:
        """The configured endpoint of that name, or a bare RunPod endpoint id taken as itself."""
        if name_or_id in self.endpoints:
            return self.endpoints[name_or_id]
        if ENDPOINT_ID_RE.match(name_or_id):
            return Endpoint(name=name_or_id, id=name_or_id)
        known = ", ".join(sorted(self.endpoints)) or "none configured"
        raise ConfigError(
            [f"unknown endpoint {name_or_id!r}: not in RUNPOD_ENDPOINTS ({known}) and not a RunPod endpoint id"]
        )


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over any mapping (tests pass a dict); blank is unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self.environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # The documented names only: with validate_by_name, pydantic-settings would read `endpoints` too.
        names = {field.validation_alias for field in self.settings_cls.model_fields.values()}
        return {name: value.strip() for name, value in self.environ.items() if name in names and value.strip()}


def _problems(error: ValidationError) -> list[str]:
    """Each of pydantic's errors as `VARIABLE: what is wrong`. A check of ours may report several
    problems as one ValueError's arguments; a model-wide check names its variable itself."""
    problems: list[str] = []
    for detail in error.errors(include_url=False, include_input=False):  # a value may be a secret
        cause = detail.get("ctx", {}).get("error")
        for message in cause.args if isinstance(cause, ValueError) else (detail["msg"],):
            problems.append(f"{detail['loc'][0]}: {message}" if detail["loc"] else str(message))
    return problems


def _per_endpoint(raw: object, info: ValidationInfo, value_of: Callable[[str], T | str]) -> object:
    """A `NAME=VALUE,...` variable as {name: value}, names from RUNPOD_ENDPOINTS; `value_of` gives a value or what
    is wrong with it. Names are checked here, not in a model validator, to be reported with every other problem.
    RUNPOD_ENDPOINTS validates first; when it is wrong itself (and reported), its names are not checked."""
    if not isinstance(raw, str):
        return raw
    known: Mapping[str, Endpoint] | None = info.data.get("endpoints")
    found: dict[str, T] = {}
    problems: list[str] = []
    for item in _items(raw):
        name, sep, text = (s.strip() for s in item.partition("="))
        value = value_of(text if sep else "")  # no value parses from "", so each parser names its own format
        if isinstance(value, str):
            # A malformed item is quoted: its text is the operator's own setting, never a secret.
            problems.append(f"{item!r} {value}" if value.startswith("is ") else f"{name!r}: {value}")
        elif known is not None and name not in known:
            problems.append(f"{name!r} is not an endpoint in RUNPOD_ENDPOINTS "
                            f"({', '.join(sorted(known)) or 'none configured'})")
        elif name in found:
            problems.append(f"{name!r} is listed twice")
        else:
            found[name] = value
    if problems:
        raise ValueError(*problems)
    return found


def _items(raw: str) -> list[str]:
    return [item for item in (part.strip() for part in raw.split(",")) if item]
