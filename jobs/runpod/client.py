"""A client for RunPod's serverless job API (`https://api.runpod.ai/v2/{endpoint_id}/...`).

Facts it relies on (statuses, shapes, limits) are in RunPod's docs; the team's fact sheet cites
them. The client speaks the documented API exactly, so it works against RunPod and against the
simulator (`rpq simulator`) alike.

Four kinds of operation, by what is safe to repeat:

* idempotent (status, health, cancel): every transient error is retried with backoff;
* submits (run, runsync): retried only when the request provably did not reach RunPod (the
  connection was refused, or RunPod answered 429), and never past the caller's time budget.
  Anything else ambiguous — a read timeout, a dropped connection, a 5xx — raises
  `RunOutcomeUnknown`: a job may exist, and a blind resubmit could pay for the GPU twice;
* consuming reads (stream): RunPod hands each chunk out once, so a read whose answer was lost may
  have taken chunks with it. Retried like submits; an ambiguous failure raises `StreamReadUnknown`,
  and the caller records that chunks may be missing;
* other writes (retry, purge-queue): retried like submits; an ambiguous failure raises
  `RunPodTransient` without a retry, and the caller checks the job's status before trying again.

With a `budget` (`jobs.runpod.budget`), every attempt of a budgeted operation (every one but /health),
retries included, first takes a token from it, waiting at most `budget_wait` seconds. With none in
time, the call raises `RunPodBudgetExhausted` and sends nothing.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from jobs.errors import (
    PayloadTooLarge,
    Problem,
    RunOutcomeUnknown,
    RunPodAuthError,
    RunPodBudgetExhausted,
    RunPodError,
    RunPodNotFound,
    RunPodProtocolError,
    RunPodRateLimited,
    RunPodRejected,
    RunPodTransient,
    StreamReadUnknown,
)
from jobs.flow.backoff import RetryPolicy, parse_retry_after, retry_delay
from jobs.runpod.budget import OPERATION_OF_PATH, Budget
from jobs.settings import Secret

log = logging.getLogger("rpq.runpod")

DEFAULT_BASE_URL = "https://api.runpod.ai/v2"

# RunPod documents the limits as "10 MB" and "20 MB"; we count decimal megabytes, the stricter
# reading, so a body we let through is never refused for size.
MAX_RUN_PAYLOAD_BYTES = 10_000_000
MAX_RUNSYNC_PAYLOAD_BYTES = 20_000_000

# `?wait=` bounds for /runsync and /stream, in milliseconds.
MIN_WAIT_MS = 1_000
MAX_WAIT_MS = 300_000

# The longest RunPod job id rpq stores (the jobs table's column); RunPod's are about 40 characters.
MAX_JOB_ID_LENGTH = 128

# policy bounds, in milliseconds (RunPod: executionTimeout >= 5 s, ttl >= 10 s, both <= 7 days).
_SEVEN_DAYS_MS = 7 * 24 * 3600 * 1000
POLICY_BOUNDS_MS = {"executionTimeout": (5_000, _SEVEN_DAYS_MS), "ttl": (10_000, _SEVEN_DAYS_MS)}


class RunPodStatus(enum.StrEnum):
    """A job's status as RunPod reports it."""

    IN_QUEUE = "IN_QUEUE"  #: waiting for a worker
    IN_PROGRESS = "IN_PROGRESS"  #: a worker is running it
    COMPLETED = "COMPLETED"  #: finished; `output` holds the result
    FAILED = "FAILED"  #: the handler failed; `error` says why
    CANCELLED = "CANCELLED"  #: cancelled (or purged from the queue)
    TIMED_OUT = "TIMED_OUT"  #: expired before a worker took it, or the worker never reported back

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @classmethod
    def parse(cls, raw: object) -> RunPodStatus:
        """The status named by `raw`; an unknown value is an error, never a guess."""
        if isinstance(raw, str):
            if raw in cls.__members__:
                return cls(raw)
            # RunPod's job-states page lists RUNNING although the API is reported to send only
            # IN_PROGRESS; accept both readings.
            if raw == "RUNNING":
                return cls.IN_PROGRESS
        raise RunPodProtocolError(f"unknown RunPod job status {raw!r}")


TERMINAL_STATUSES = frozenset(
    {RunPodStatus.COMPLETED, RunPodStatus.FAILED, RunPodStatus.CANCELLED, RunPodStatus.TIMED_OUT}
)


@dataclass(frozen=True)
class JobState:
    """What RunPod says about one job (`/run`, `/runsync`, `/status`, `/cancel`, `/retry`)."""

    id: str
    status: RunPodStatus
    output: Any = None
    error: Any = None
    delay_time_ms: int | None = None
    execution_time_ms: int | None = None
    worker_id: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def has_output(self) -> bool:
        return "output" in self.raw

    @classmethod
    def from_json(cls, body: object, *, operation: str) -> JobState:
        if not isinstance(body, Mapping) or not is_job_id(body.get("id")):
            raise RunPodProtocolError(f"{operation}: expected a job object with an id", operation=operation)
        return cls(
            id=body["id"],
            status=RunPodStatus.parse(body.get("status")),
            output=body.get("output"),
            error=body.get("error"),
            delay_time_ms=_optional_int(body, "delayTime", operation),
            execution_time_ms=_optional_int(body, "executionTime", operation),
            worker_id=body.get("workerId") if isinstance(body.get("workerId"), str) else None,
            raw=dict(body),
        )


@dataclass(frozen=True)
class StreamBatch:
    """One `/stream` call's worth of chunks: the call drains what RunPod had buffered."""

    status: RunPodStatus
    chunks: list[Any]


@dataclass(frozen=True)
class JobCounts:
    completed: int = 0
    failed: int = 0
    in_progress: int = 0
    in_queue: int = 0
    retried: int = 0


@dataclass(frozen=True)
class WorkerCounts:
    idle: int = 0
    initializing: int = 0
    ready: int = 0
    running: int = 0
    throttled: int = 0
    unhealthy: int = 0


@dataclass(frozen=True)
class EndpointHealth:
    """`/health`. Every counter is optional in RunPod's answers, so a missing one reads as 0."""

    jobs: JobCounts
    workers: WorkerCounts

    @classmethod
    def from_json(cls, body: object) -> EndpointHealth:
        if not isinstance(body, Mapping):
            raise RunPodProtocolError("health: expected a JSON object", operation="health")
        jobs = _counters(body.get("jobs"), {
            "completed": "completed", "failed": "failed", "inProgress": "in_progress",
            "inQueue": "in_queue", "retried": "retried",
        })
        workers = _counters(body.get("workers"), {
            name: name for name in ("idle", "initializing", "ready", "running", "throttled", "unhealthy")
        })
        return cls(jobs=JobCounts(**jobs), workers=WorkerCounts(**workers))


class RequestInvalid(RunPodRejected):
    """The request is malformed; nothing was sent."""

    def __init__(self, problems: list[Problem], *, operation: str) -> None:
        self.problems = problems
        super().__init__(f"{operation}: " + "; ".join(map(str, problems)), operation=operation)


def build_run_body(
    input: Any,
    *,
    webhook: object = None,
    policy: object = None,
    s3_config: object = None,
    operation: str = "run",
) -> dict[str, Any]:
    """The JSON body of a /run or /runsync request, checked against RunPod's rules.

    Every problem is reported at once in one `RequestInvalid`.
    """
    problems: list[Problem] = []
    body: dict[str, Any] = {"input": input}
    if webhook is not None:
        if not isinstance(webhook, str) or not webhook.startswith(("http://", "https://")):
            problems.append(Problem("webhook", "format", "must be an http:// or https:// URL"))
        body["webhook"] = webhook
    if policy is not None:
        problems.extend(_policy_problems(policy))
        body["policy"] = dict(policy) if isinstance(policy, Mapping) else policy
    if s3_config is not None:
        if not isinstance(s3_config, Mapping):
            problems.append(Problem("s3Config", "type", "must be an object"))
        body["s3Config"] = dict(s3_config) if isinstance(s3_config, Mapping) else s3_config
    if problems:
        raise RequestInvalid(problems, operation=operation)
    return body


def encode_body(body: Mapping[str, Any], *, limit: int, operation: str) -> bytes:
    """Serialise `body` as RunPod will receive it, refusing what is not JSON or too large."""
    try:
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise RequestInvalid([Problem("input", "type", f"not JSON-serialisable ({exc})")],
                             operation=operation) from exc
    if len(data) > limit:
        raise PayloadTooLarge(
            f"{operation}: request body is {len(data):,} bytes; RunPod accepts at most {limit:,}",
            operation=operation,
        )
    return data


class RunPodClient:
    """Synchronous client for one RunPod account (or one simulator).

    `transport` is injectable (an `httpx.MockTransport` in unit tests); `sleep`, `rand` and `clock`
    too, so retry timing and time budgets can be tested without waiting. `budget` is the request
    budget shared with every other process (`jobs.runpod.budget.RedisBudget`); None spends without limit.
    """

    def __init__(
        self,
        *,
        api_key: Secret | str,
        base_url: str = DEFAULT_BASE_URL,
        timeout: httpx.Timeout | float = httpx.Timeout(30.0, connect=5.0),
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        budget: Budget | None = None,
        budget_wait: float = 2.0,
    ) -> None:
        key = api_key if isinstance(api_key, Secret) else Secret(api_key)
        if not key.reveal():
            raise ValueError("api_key is empty")
        self.base_url = base_url.rstrip("/")
        self.retry_policy = retry
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self.budget = budget
        self.budget_wait = budget_wait
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {key.reveal()}", "Accept": "application/json"},
        )

    def __repr__(self) -> str:
        return f"RunPodClient(base_url={self.base_url!r}, api_key=Secret('**********'))"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RunPodClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations ---------------------------------------------------------------------------

    def run(
        self,
        endpoint_id: str,
        input: Any,
        *,
        webhook: str | None = None,
        policy: Mapping[str, Any] | None = None,
        s3_config: Mapping[str, Any] | None = None,
        budget_seconds: float | None = None,
    ) -> JobState:
        """Queue a job (`POST /run`). Returns its id and status (IN_QUEUE).

        With `budget_seconds`, no attempt starts once the budget is spent, and each attempt's timeouts
        are cut to what is left of it (`Settings.submit_bound_seconds` is the worst case)."""
        body = build_run_body(input, webhook=webhook, policy=policy, s3_config=s3_config, operation="run")
        data = encode_body(body, limit=MAX_RUN_PAYLOAD_BYTES, operation="run")
        answer = self._call("run", "POST", endpoint_id, _path(endpoint_id, "run"), content=data, kind=_SUBMIT,
                            time_budget=budget_seconds)
        return JobState.from_json(answer, operation="run")

    def runsync(
        self,
        endpoint_id: str,
        input: Any,
        *,
        wait_ms: int | None = None,
        webhook: str | None = None,
        policy: Mapping[str, Any] | None = None,
        s3_config: Mapping[str, Any] | None = None,
    ) -> JobState:
        """Run a job and wait for it (`POST /runsync`) up to `wait_ms` (RunPod's default: 90 s).

        A job that outlives the wait comes back with a non-terminal status; poll `status()` after.
        """
        body = build_run_body(input, webhook=webhook, policy=policy, s3_config=s3_config, operation="runsync")
        params = _wait_params(wait_ms, operation="runsync")
        data = encode_body(body, limit=MAX_RUNSYNC_PAYLOAD_BYTES, operation="runsync")
        answer = self._call(
            "runsync", "POST", endpoint_id, _path(endpoint_id, "runsync"), content=data, params=params,
            kind=_SUBMIT, server_wait=(wait_ms or 90_000) / 1000,
        )
        return JobState.from_json(answer, operation="runsync")

    def status(self, endpoint_id: str, job_id: str) -> JobState:
        """A job's status, output and timings (`GET /status/{job_id}`)."""
        answer = self._call("status", "GET", endpoint_id, _path(endpoint_id, "status", job_id), kind=_IDEMPOTENT)
        return JobState.from_json(answer, operation="status")

    def stream(self, endpoint_id: str, job_id: str, *, wait_ms: int | None = None) -> StreamBatch:
        """Drain the chunks a generator handler produced since the last call (`GET /stream`).

        A consuming read: RunPod gives each chunk out once. Never retried once it may have reached
        RunPod; an answer lost on the way raises `StreamReadUnknown` (those chunks may be gone)."""
        params = _wait_params(wait_ms, operation="stream")
        answer = self._call(
            "stream", "GET", endpoint_id, _path(endpoint_id, "stream", job_id), params=params, kind=_CONSUMING,
            server_wait=(wait_ms or 10_000) / 1000,
        )
        if not isinstance(answer, Mapping) or not isinstance(answer.get("stream", []), list):
            raise RunPodProtocolError("stream: expected {status, stream: [...]}", operation="stream")
        chunks = []
        for item in answer.get("stream", []):
            if not isinstance(item, Mapping) or "output" not in item:
                raise RunPodProtocolError("stream: each chunk must be {output: ...}", operation="stream")
            chunks.append(item["output"])
        return StreamBatch(status=RunPodStatus.parse(answer.get("status")), chunks=chunks)

    def cancel(self, endpoint_id: str, job_id: str) -> JobState:
        """Cancel a queued or running job (`POST /cancel/{job_id}`)."""
        answer = self._call("cancel", "POST", endpoint_id, _path(endpoint_id, "cancel", job_id), kind=_IDEMPOTENT)
        return JobState.from_json(answer, operation="cancel")

    def retry(self, endpoint_id: str, job_id: str) -> JobState:
        """Requeue a FAILED or TIMED_OUT job under the same id (`POST /retry/{job_id}`)."""
        answer = self._call("retry", "POST", endpoint_id, _path(endpoint_id, "retry", job_id), kind=_WRITE)
        return JobState.from_json(answer, operation="retry")

    def purge_queue(self, endpoint_id: str) -> int:
        """Remove every queued (not running) job of an endpoint; returns how many were removed."""
        answer = self._call("purge-queue", "POST", endpoint_id, _path(endpoint_id, "purge-queue"), kind=_WRITE)
        removed = answer.get("removed") if isinstance(answer, Mapping) else None
        if not isinstance(removed, int) or isinstance(removed, bool):
            raise RunPodProtocolError("purge-queue: expected {removed: N}", operation="purge-queue")
        return removed

    def health(self, endpoint_id: str) -> EndpointHealth:
        """Queue and worker counters of an endpoint (`GET /health`)."""
        answer = self._call("health", "GET", endpoint_id, _path(endpoint_id, "health"), kind=_IDEMPOTENT)
        return EndpointHealth.from_json(answer)

    # -- the one place requests are sent and errors translated -------------------------------

    def _call(
        self,
        operation: str,
        method: str,
        endpoint_id: str,
        path: str,
        *,
        kind: str,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        server_wait: float | None = None,
        time_budget: float | None = None,
    ) -> Any:
        headers = {"Content-Type": "application/json"} if content is not None else None
        timeout = self._http.timeout
        if server_wait is not None:
            # RunPod may hold the answer this long (runsync, stream): our read timeout starts after it.
            timeout = httpx.Timeout(
                connect=timeout.connect, read=server_wait + (timeout.read or 0),
                write=timeout.write, pool=timeout.pool,
            )
        started = self._clock()
        attempt = 0
        while True:
            self._take_token(operation, endpoint_id, path, time_left=None if time_budget is None else
                             time_budget - (self._clock() - started))
            request_timeout = timeout if time_budget is None else \
                _within(timeout, time_budget - (self._clock() - started))
            try:
                response = self._http.request(
                    method, path, content=content, params=params, headers=headers, timeout=request_timeout
                )
                return _read_answer(operation, path, response, kind=kind)
            except RunPodTransient as exc:
                error: RunPodError = exc
            except httpx.TransportError as exc:
                error = _translate_transport_error(operation, path, exc, kind=kind)
            if not isinstance(error, RunPodTransient) or not _may_retry(error, kind):
                raise error
            delay = retry_delay(attempt, self.retry_policy, retry_after=error.retry_after, rand=self._rand)
            if delay is None or (time_budget is not None and self._clock() - started + delay >= time_budget):
                raise error
            log.info("runpod %s %s failed (%s); retry %d in %.2fs", operation, path, error, attempt + 1, delay)
            self._sleep(delay)
            attempt += 1

    def _take_token(self, operation: str, endpoint_id: str, path: str, *, time_left: float | None) -> None:
        """One token from the budget before an attempt, or RunPodBudgetExhausted with nothing sent.

        A /run waits no longer than what is left of its time budget, so its bound stays what
        `Settings.submit_bound_seconds` says."""
        op = OPERATION_OF_PATH.get(operation)
        if self.budget is None or op is None:
            return
        max_wait = self.budget_wait if time_left is None else max(0.0, min(self.budget_wait, time_left))
        free_in = self.budget.acquire(endpoint_id, op, max_wait=max_wait)
        if free_in is not None:
            raise RunPodBudgetExhausted(
                f"{operation} {path}: rpq's request budget for {op} on this endpoint is spent; not sent "
                f"(a token is free in {free_in:.2f}s)", operation=operation, retry_after=free_in,
            )


_IDEMPOTENT = "idempotent"
_SUBMIT = "submit"
_CONSUMING = "consuming"
_WRITE = "write"

# Transport errors raised before a single byte of the request could have been processed.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)

def _within(timeout: httpx.Timeout, remaining: float) -> httpx.Timeout:
    """`timeout` with each phase cut to what is left of a budget (never below a tenth of a second)."""
    left = max(remaining, 0.1)

    def cut(phase: float | None) -> float:
        return left if phase is None else min(phase, left)

    return httpx.Timeout(connect=cut(timeout.connect), read=cut(timeout.read), write=cut(timeout.write),
                         pool=cut(timeout.pool))


class _NotSent(RunPodTransient):
    """Marker: the request provably never reached RunPod."""


def _may_retry(error: RunPodTransient, kind: str) -> bool:
    if kind == _IDEMPOTENT:
        return True
    # Submits and writes repeat only what RunPod provably did not act on.
    return isinstance(error, RunPodRateLimited | _NotSent)


def _translate_transport_error(operation: str, path: str, exc: httpx.TransportError, *, kind: str) -> RunPodError:
    what = type(exc).__name__
    if isinstance(exc, _NOT_SENT):
        error: RunPodError = _NotSent(f"{operation} {path}: could not reach RunPod ({what})", operation=operation)
    elif kind == _SUBMIT:
        error = RunOutcomeUnknown(
            f"{operation} {path}: the request may have reached RunPod but no answer came back ({what}); "
            "a job may exist", operation=operation,
        )
    elif kind == _CONSUMING:
        error = StreamReadUnknown(
            f"{operation} {path}: the read may have reached RunPod but no answer came back ({what}); "
            "chunks it handed out may be missing", operation=operation,
        )
    else:
        error = RunPodTransient(f"{operation} {path}: no answer from RunPod ({what})", operation=operation)
    error.__cause__ = exc
    return error


def _read_answer(operation: str, path: str, response: httpx.Response, *, kind: str) -> Any:
    code = response.status_code
    if 200 <= code < 300:
        try:
            return response.json()
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested past Python's stack
            message = f"{operation} {path}: HTTP {code} with a body that is not JSON (or nests too deep to read)"
            if kind == _CONSUMING:  # the chunks it carried were handed out all the same
                raise StreamReadUnknown(message + "; chunks it carried may be missing", status_code=code,
                                        operation=operation) from exc
            raise RunPodProtocolError(message, status_code=code, operation=operation) from exc
    detail = _error_detail(response)
    message = f"{operation} {path}: HTTP {code}" + (f": {detail}" if detail else "")
    if code in (401, 403):
        raise RunPodAuthError(message, status_code=code, operation=operation)
    if code == 404:
        raise RunPodNotFound(message, status_code=code, operation=operation)
    if code == 429:
        raise RunPodRateLimited(
            message, status_code=code, operation=operation,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    if 400 <= code < 500:
        raise RunPodRejected(message, status_code=code, operation=operation)
    if code >= 500 and kind == _SUBMIT:
        # A 5xx after the body was read does not say whether a job was queued.
        raise RunOutcomeUnknown(message + "; a job may exist", status_code=code, operation=operation)
    if code >= 500 and kind == _CONSUMING:
        # Nor whether the chunks were handed out before the failure.
        raise StreamReadUnknown(message + "; chunks may be missing", status_code=code, operation=operation)
    if code >= 500:
        raise RunPodTransient(message, status_code=code, operation=operation,
                              retry_after=parse_retry_after(response.headers.get("Retry-After")))
    raise RunPodProtocolError(message, status_code=code, operation=operation)


def _error_detail(response: httpx.Response) -> str:
    """RunPod's own words about an error: `{"error": ...}` when JSON, else the start of the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300]
    if isinstance(body, Mapping):
        for key in ("error", "message", "detail", "title"):
            if isinstance(body.get(key), str):
                return str(body[key])[:300]
    return json.dumps(body)[:300]


def _path(endpoint_id: str, operation: str, job_id: str | None = None) -> str:
    for label, value in (("endpoint id", endpoint_id), ("job id", job_id)):
        if value is not None and (not isinstance(value, str) or not value or "/" in value):
            raise RequestInvalid([Problem(label.replace(" ", "_"), "format", f"{value!r} is not a valid id")],
                                 operation=operation)
    parts = [quote(endpoint_id, safe=""), operation]
    if job_id is not None:
        parts.append(quote(job_id, safe=""))
    return "/".join(parts)


def _wait_params(wait_ms: int | None, *, operation: str) -> dict[str, str] | None:
    if wait_ms is None:
        return None
    if not MIN_WAIT_MS <= wait_ms <= MAX_WAIT_MS:
        raise RequestInvalid([Problem("wait", "range", f"must be between {MIN_WAIT_MS} and {MAX_WAIT_MS} ms")],
                             operation=operation)
    return {"wait": str(wait_ms)}


def _policy_problems(policy: object) -> list[Problem]:
    if not isinstance(policy, Mapping):
        return [Problem("policy", "type", "must be an object")]
    problems = []
    for key, value in policy.items():
        if key in POLICY_BOUNDS_MS:
            low, high = POLICY_BOUNDS_MS[key]
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(Problem(f"policy.{key}", "type", "must be a whole number of milliseconds"))
            elif not low <= value <= high:
                problems.append(Problem(f"policy.{key}", "range", f"must be between {low} and {high} ms"))
        elif key == "lowPriority":
            if not isinstance(value, bool):
                problems.append(Problem("policy.lowPriority", "type", "must be true or false"))
        else:
            problems.append(Problem(f"policy.{key}", "unknown",
                                    "unknown field (RunPod knows executionTimeout, ttl, lowPriority)"))
    return problems


def is_job_id(value: object) -> bool:
    """A RunPod job id rpq can store (its column) and put in a URL path segment."""
    return isinstance(value, str) and 0 < len(value) <= MAX_JOB_ID_LENGTH and value.isprintable() and \
        "/" not in value


def _optional_int(body: Mapping[str, Any], key: str, operation: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RunPodProtocolError(f"{operation}: {key} must be a number", operation=operation)
    return int(value)


def _counters(section: object, names: Mapping[str, str]) -> dict[str, int]:
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise RunPodProtocolError("health: counters must be an object", operation="health")
    counts = {}
    for wire, attr in names.items():
        value = section.get(wire, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RunPodProtocolError(f"health: {wire} must be a whole number", operation="health")
        counts[attr] = value
    return counts


def describe_error(error: Any) -> str:
    """A one-line reading of a FAILED job's `error`.

    RunPod's worker SDK reports an uncaught exception as a JSON *string* holding error_type,
    error_message and a traceback; a handler may also return any string or object.
    """
    if isinstance(error, str):
        try:
            decoded = json.loads(error)
        except ValueError:
            return error
        if isinstance(decoded, Mapping) and "error_message" in decoded:
            kind = decoded.get("error_type")
            return f"{kind}: {decoded['error_message']}" if kind else str(decoded["error_message"])
        return error
    if error is None:
        return ""
    return json.dumps(error, default=str)
