"""A client for RunPod's management APIs: REST v2 (`https://api.runpod.io/v2`) and, for the account
balance only, GraphQL (`https://api.runpod.io/graphql`).

Not the serverless job API (`api.runpod.ai/v2`, `jobs.runpod.client`): one letter apart, different
hosts, different error shapes. The team's fact sheet (RunPod fidelity, §3) cites the sources for what
follows.

* Auth is `Authorization: Bearer <key>` for both APIs. GraphQL's docs show `?api_key=`, which would put
  the key into URLs, proxies and logs; RunPod's own SDK sends the header, and so does this client.
* v2 errors are RFC 9457 problem bodies (`{title, status, detail, errors[]}`), translated into
  `jobs.errors`' tree. A 403 means the key is valid but lacks access: a Restricted key that runs jobs
  on one endpoint may have no management scope at all.
* Retries (as RunPod's own CLI does): a 429 for any method, since RunPod acted on nothing; a 5xx or a
  lost connection only for reads. A PATCH whose answer was lost raises `ChangeOutcomeUnknown`: read the
  endpoint back before sending it again, because RunPod also changes scaling on its own (idle endpoints
  lose workers after 3 and 7 days; unhealthy ones are scaled down) and a blind repeat could undo that.
* GraphQL is deprecated ("retired early 2027") and lives in its own section at the end
  (`RunPodGraphQL`, `Account`) so it can be deleted whole. v2 has no balance or spend-rate endpoint yet.

Every parsed object keeps RunPod's JSON in `raw` (out of its repr) and ignores fields it does not
know; a missing field it needs is a `RunPodProtocolError` naming the field.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, Self
from urllib.parse import quote

import httpx

from jobs.errors import (
    ChangeOutcomeUnknown,
    Problem,
    RunPodAuthError,
    RunPodError,
    RunPodNotFound,
    RunPodProtocolError,
    RunPodRateLimited,
    RunPodRejected,
    RunPodTransient,
)
from jobs.flow.backoff import RetryPolicy, parse_retry_after, retry_delay
from jobs.runpod.client import RequestInvalid
from jobs.settings import Secret

log = logging.getLogger("rpq.runpod.management")

DEFAULT_REST_URL = "https://api.runpod.io/v2"
DEFAULT_GRAPHQL_URL = "https://api.runpod.io/graphql"

#: `workers.idleTimeout` bounds, in seconds (v2 schema `EndpointWorkers`).
IDLE_TIMEOUT_BOUNDS = (1, 3600)
#: `bucketSize` values of `GET /billing/serverless`.
BILLING_BUCKETS = ("hour", "day", "week", "month", "year")
#: A guard on list pagination: v2 documents none, so a body that keeps naming a next page is a loop.
MAX_PAGES = 100

#: Worker statuses v2 documents; `WorkerState.status` keeps any other value RunPod adds as it is.
WORKER_STATUSES = frozenset({"RUNNING", "IDLE", "INITIALIZING", "THROTTLED", "UNHEALTHY"})
#: Pod statuses v2 documents (kept as strings for the same reason).
POD_STATUSES = frozenset({"PROVISIONING", "STARTING", "RUNNING", "EXITED", "ERROR", "TERMINATED"})


# -- what callers get back -------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointConfig:
    """A serverless endpoint's configuration (`GET /serverless/{id}`).

    `idle_timeout` is None for queue-based endpoints that scale on REQUEST_COUNT (RunPod omits it).
    `scaling_value` is the queue delay in seconds (QUEUE_DELAY) or the requests per worker
    (REQUEST_COUNT). `gpu_pools` are pool ids ("ADA_24"), not GPU type ids; empty for a CPU endpoint.
    """

    id: str
    name: str
    type: str | None
    workers_min: int
    workers_max: int
    idle_timeout: int | None
    scaling_type: str | None
    scaling_value: float | None
    gpu_pools: tuple[str, ...]
    gpu_count: int | None
    timeout_ms: int | None
    flashboot: bool | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: object, *, operation: str) -> EndpointConfig:
        return cls.from_reader(_Reader(body, "endpoint", operation))

    @classmethod
    def from_reader(cls, r: _Reader) -> EndpointConfig:
        workers = r.obj("workers")
        scaling = r.obj("scaling", required=False)
        gpu = r.obj("gpu", required=False)
        scaling_type = scaling.text("type", required=False) if scaling else None
        value_key = {"QUEUE_DELAY": "queueDelay", "REQUEST_COUNT": "requestCount"}.get(scaling_type or "")
        return cls(
            id=r.text("id"),
            name=r.text("name"),
            type=r.text("type", required=False),
            workers_min=workers.whole("min"),
            workers_max=workers.whole("max"),
            idle_timeout=workers.whole("idleTimeout", required=False),
            scaling_type=scaling_type,
            scaling_value=scaling.number(value_key, required=False) if scaling and value_key else None,
            gpu_pools=gpu.texts("pools") if gpu else (),
            gpu_count=gpu.whole("count", required=False) if gpu else None,
            timeout_ms=r.whole("timeout", required=False),
            flashboot=r.flag("flashboot", required=False),
            raw=r.raw,
        )


@dataclass(frozen=True)
class WorkerState:
    """One worker of an endpoint. `status` is one of `WORKER_STATUSES` (or a value RunPod added since)."""

    id: str
    status: str
    is_stale: bool | None
    version: int | None
    gpu_count: int | None
    gpu_type_id: str | None
    data_center_id: str | None
    uptime_seconds: int | None
    started_at: datetime | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_reader(cls, r: _Reader) -> WorkerState:
        return cls(
            id=r.text("id"),
            status=r.text("status"),
            is_stale=r.flag("isStale", required=False),
            version=r.whole("version", required=False),
            gpu_count=r.whole("gpuCount", required=False),
            gpu_type_id=r.text("gpuTypeId", required=False),
            data_center_id=r.text("dataCenterId", required=False),
            uptime_seconds=r.whole("uptimeSeconds", required=False),
            started_at=r.time("startedAt", required=False),
            raw=r.raw,
        )


@dataclass(frozen=True)
class WorkerSummary:
    """RunPod's own count of an endpoint's workers by status: the exact view `/health` approximates."""

    running: int
    idle: int
    initializing: int
    throttled: int
    unhealthy: int
    total: int


@dataclass(frozen=True)
class WorkersView:
    """`GET /serverless/{id}/workers`: every worker, RunPod's summary, and the endpoint's current version."""

    workers: tuple[WorkerState, ...]
    summary: WorkerSummary
    endpoint_version: int | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: object, *, operation: str) -> WorkersView:
        r = _Reader(body, "workers view", operation)
        s = r.obj("summary")
        return cls(
            workers=tuple(WorkerState.from_reader(w) for w in r.objs("workers")),
            summary=WorkerSummary(**{name: s.whole(name) for name in
                                     ("running", "idle", "initializing", "throttled", "unhealthy", "total")}),
            endpoint_version=r.whole("endpointVersion", required=False),
            raw=r.raw,
        )


@dataclass(frozen=True)
class GpuType:
    """A GPU type from the catalog. Prices are RunPod's list prices in USD per GPU-hour (negotiated
    discounts are not reflected); `pool` is the serverless pool id that endpoints name in `gpu.pools`."""

    id: str
    name: str | None
    pool: str | None
    memory_gb: int | None
    serverless_price: float | None
    secure_price: float | None
    community_price: float | None
    availability: str | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_reader(cls, r: _Reader) -> GpuType:
        price = r.obj("price", required=False)
        return cls(
            id=r.text("id"),
            name=r.text("name", required=False),
            pool=r.text("pool", required=False),
            memory_gb=r.whole("memory", required=False),
            serverless_price=price.number("serverless", required=False) if price else None,
            secure_price=price.number("secure", required=False) if price else None,
            community_price=price.number("community", required=False) if price else None,
            availability=r.text("availability", required=False),
            raw=r.raw,
        )


@dataclass(frozen=True)
class BillingRecord:
    """One bucket of serverless spend, in USD. `end` is exclusive. `endpoint_id` is None when RunPod
    aggregates across endpoints."""

    start: datetime
    end: datetime
    endpoint_id: str | None
    total_amount: float
    gpu_amount: float | None
    cpu_amount: float | None
    disk_amount: float | None
    fee_amount: float | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_reader(cls, r: _Reader) -> BillingRecord:
        return cls(
            start=r.time("startTime"),
            end=r.time("endTime"),
            endpoint_id=r.text("serverlessId", required=False),
            total_amount=r.number("totalAmount"),
            gpu_amount=r.number("gpuAmount", required=False),
            cpu_amount=r.number("cpuAmount", required=False),
            disk_amount=r.number("diskAmount", required=False),
            fee_amount=r.number("feeAmount", required=False),
            raw=r.raw,
        )


@dataclass(frozen=True)
class Pod:
    """A pod. `cost_per_hour` is USD/h, 0 once it is EXITED or TERMINATED."""

    id: str
    name: str | None
    status: str
    cost_per_hour: float
    gpu_count: int | None
    data_center_id: str | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_reader(cls, r: _Reader) -> Pod:
        gpu = r.obj("gpu", required=False)
        return cls(
            id=r.text("id"),
            name=r.text("name", required=False),
            status=r.text("status"),
            cost_per_hour=r.number("cost"),
            gpu_count=gpu.whole("count", required=False) if gpu else None,
            data_center_id=r.text("dataCenterId", required=False),
            raw=r.raw,
        )


# -- reading RunPod's JSON -------------------------------------------------------------------------


class _Reader:
    """Typed access to one JSON object; a missing or mistyped field is an error that names its path."""

    def __init__(self, body: object, where: str, operation: str) -> None:
        if not isinstance(body, Mapping):
            raise RunPodProtocolError(f"{operation}: {where} is not a JSON object", operation=operation)
        self.raw: Mapping[str, Any] = body
        self.where = where
        self.operation = operation

    def _get(self, key: str, required: bool, kinds: tuple[type, ...], what: str) -> Any:
        value = self.raw.get(key)
        if value is None:
            if required:
                self._fail(key, "is missing")
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self._fail(key, f"must be {what}")
        return value

    def _fail(self, key: str, problem: str) -> NoReturn:
        raise RunPodProtocolError(f"{self.operation}: {self.where}.{key} {problem}", operation=self.operation)

    def text(self, key: str, *, required: bool = True) -> Any:
        return self._get(key, required, (str,), "a string")

    def whole(self, key: str, *, required: bool = True) -> Any:
        value = self._get(key, required, (int, float), "a whole number")
        if isinstance(value, float):
            if not value.is_integer():
                self._fail(key, "must be a whole number")
            return int(value)
        return value

    def number(self, key: str, *, required: bool = True) -> Any:
        value = self._get(key, required, (int, float), "a number")
        return None if value is None else float(value)

    def flag(self, key: str, *, required: bool = True) -> Any:
        return self._get(key, required, (bool,), "true or false")

    def time(self, key: str, *, required: bool = True) -> Any:
        value = self.text(key, required=required)
        if value is None:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            self._fail(key, "must be an RFC 3339 time")
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

    def obj(self, key: str, *, required: bool = True) -> Any:
        value = self._get(key, required, (Mapping,), "an object")
        return None if value is None else _Reader(value, f"{self.where}.{key}", self.operation)

    def texts(self, key: str) -> tuple[str, ...]:
        values = self._get(key, False, (list,), "a list") or []
        if not all(isinstance(v, str) for v in values):
            self._fail(key, "must be a list of strings")
        return tuple(values)

    def objs(self, key: str) -> Iterator[_Reader]:
        values = self._get(key, True, (list,), "a list")
        for i, value in enumerate(values):
            yield _Reader(value, f"{self.where}.{key}[{i}]", self.operation)


# -- the shared HTTP machinery: auth, retries, error translation -------------------------------------


_READ = "read"
_CHANGE = "change"

# Transport errors raised before a single byte of the request could have been processed.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


class _NotSent(RunPodTransient):
    """Marker: the request provably never reached RunPod, so even a change may be sent again."""


class _Api:
    """One authenticated httpx client with the retry loop both APIs share.

    `transport`, `sleep` and `rand` are injectable, so unit tests run against an `httpx.MockTransport`
    and check retry timing without waiting."""

    _name = "RunPod management"
    _default_url = DEFAULT_REST_URL

    def __init__(
        self,
        *,
        api_key: Secret | str,
        base_url: str | None = None,
        timeout: httpx.Timeout | float = httpx.Timeout(30.0, connect=5.0),
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        base_url = base_url or self._default_url
        key = api_key if isinstance(api_key, Secret) else Secret(api_key)
        if not key.reveal():
            raise ValueError("api_key is empty")
        self._key = key
        self.base_url = base_url.rstrip("/")
        self.retry_policy = retry
        self._sleep = sleep
        self._rand = rand
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {key.reveal()}", "Accept": "application/json"},
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key=Secret('**********'))"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        kind: str,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        """The response to a request whose status is 2xx, after the retries `kind` allows."""
        content = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"} if content is not None else None
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, params=params, content=content, headers=headers)
                _raise_for_status(operation, path, response, kind=kind, scrub=self._scrub)
                return response
            except RunPodTransient as exc:
                error: RunPodError = exc
            except httpx.TransportError as exc:
                error = _translate_transport_error(operation, path, exc, kind=kind)
            if not isinstance(error, RunPodTransient) or not _may_retry(error, kind):
                raise error
            delay = retry_delay(attempt, self.retry_policy, retry_after=error.retry_after, rand=self._rand)
            if delay is None:
                raise error
            log.info("%s %s %s failed (%s); retry %d in %.2fs", self._name, operation, path, error, attempt + 1,
                     delay)
            self._sleep(delay)
            attempt += 1

    def _json(self, operation: str, path: str, response: httpx.Response) -> Any:
        try:
            return response.json()
        except (ValueError, RecursionError) as exc:
            raise RunPodProtocolError(f"{operation} {path}: HTTP {response.status_code} with a body that is not JSON",
                                      status_code=response.status_code, operation=operation) from exc

    def _scrub(self, text: str) -> str:
        """RunPod's own words, minus the key should an error ever echo it back."""
        return text.replace(self._key.reveal(), "**********")


def _may_retry(error: RunPodTransient, kind: str) -> bool:
    if kind == _READ:
        return True
    # A change is repeated only when RunPod provably did not act on it: a 429, or nothing sent.
    return isinstance(error, RunPodRateLimited | _NotSent)


def _translate_transport_error(operation: str, path: str, exc: httpx.TransportError, *, kind: str) -> RunPodError:
    what = type(exc).__name__
    error: RunPodError
    if isinstance(exc, _NOT_SENT):
        error = _NotSent(f"{operation} {path}: could not reach RunPod ({what})", operation=operation)
    elif kind == _CHANGE:
        error = ChangeOutcomeUnknown(
            f"{operation} {path}: the change may have reached RunPod but no answer came back ({what}); "
            "read the resource back before sending it again", operation=operation)
    else:
        error = RunPodTransient(f"{operation} {path}: no answer from RunPod ({what})", operation=operation)
    error.__cause__ = exc
    return error


def _raise_for_status(operation: str, path: str, response: httpx.Response, *, kind: str,
                      scrub: Callable[[str], str]) -> None:
    code = response.status_code
    if 200 <= code < 300:
        return
    detail = scrub(problem_detail(response))
    message = f"{operation} {path}: HTTP {code}" + (f": {detail}" if detail else "")
    if code == 401:
        raise RunPodAuthError(message + " (the API key was refused)", status_code=code, operation=operation)
    if code == 403:
        raise RunPodAuthError(
            message + " (the API key is valid but has no access to this; a Restricted key that runs jobs may "
            "lack management scope)", status_code=code, operation=operation)
    if code == 404:
        raise RunPodNotFound(message, status_code=code, operation=operation)
    if code == 402:
        raise RunPodRejected(message + " (insufficient balance)", status_code=code, operation=operation)
    if code == 429:
        raise RunPodRateLimited(message, status_code=code, operation=operation,
                                retry_after=rate_limit_wait(response.headers))
    if 400 <= code < 500:
        raise RunPodRejected(message, status_code=code, operation=operation)
    if code >= 500 and kind == _CHANGE:
        raise ChangeOutcomeUnknown(
            message + "; the change may or may not have been applied: read the resource back before sending "
            "it again", status_code=code, operation=operation)
    if code >= 500:
        raise RunPodTransient(message, status_code=code, operation=operation,
                              retry_after=parse_retry_after(response.headers.get("Retry-After")))
    raise RunPodProtocolError(message, status_code=code, operation=operation)


def problem_detail(response: httpx.Response) -> str:
    """RunPod's words about an error: an RFC 9457 problem's detail (else title) and its `errors[]`,
    v1's `{"message"}`, or the start of a body that is not JSON."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300]
    if not isinstance(body, Mapping):
        return json.dumps(body)[:300]
    parts = [str(body[key]) for key in ("detail", "title", "message", "error") if isinstance(body.get(key), str)]
    text = parts[0] if parts else ""
    errors = body.get("errors")
    if isinstance(errors, list) and errors:
        text += (": " if text else "") + "; ".join(_problem_item(item) for item in errors[:10])
    return text[:500]


def _problem_item(item: object) -> str:
    if isinstance(item, Mapping):
        where = next((str(item[k]) for k in ("field", "pointer", "location", "path") if item.get(k)), "")
        said = next((str(item[k]) for k in ("message", "detail", "title") if item.get(k)), "")
        return f"{where}: {said}" if where and said else where or said or json.dumps(item)
    return str(item)


# The IETF draft's structured form: `RateLimit: "minute";r=0;t=42` (remaining, seconds to reset), one
# window per comma-separated item. Older drafts: `RateLimit: limit=60, remaining=0, reset=42`, or
# separate `RateLimit-Remaining` and `RateLimit-Reset` headers.
_PARAM = re.compile(r"\b(r|t|remaining|reset)\s*=\s*(\d+(?:\.\d+)?)")


def rate_limit_wait(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait after a 429: the longest of `Retry-After` and the reset of every exhausted
    `RateLimit` window (RunPod sends both; its own MCP server waits for the longer). None when none says."""
    waits = [parse_retry_after(headers.get("Retry-After"))]
    header = headers.get("RateLimit") or ""
    for item in header.split(","):
        window = dict(_PARAM.findall(item))
        if "t" in window and float(window.get("r", "0")) == 0:
            waits.append(float(window["t"]))
    older = dict(_PARAM.findall(header))
    for name in ("remaining", "reset"):
        value = _PARAM.fullmatch(f"{name}={(headers.get(f'RateLimit-{name.title()}') or '').strip()}")
        if value:
            older[name] = value.group(2)
    if "reset" in older and float(older.get("remaining", "0")) == 0:
        waits.append(float(older["reset"]))
    known = [wait for wait in waits if wait is not None]
    return max(known) if known else None


def _id(value: object, label: str, operation: str) -> str:
    """An id RunPod gave out, checked before it goes into a path or a query."""
    if not isinstance(value, str) or not value or "/" in value or not value.isprintable():
        raise RequestInvalid([Problem(label, "format", "is not a valid id")], operation=operation)
    return value


def _segment(value: object, label: str, operation: str) -> str:
    return quote(_id(value, label, operation), safe="")


def rfc3339(when: datetime, *, label: str, operation: str) -> str:
    """`when` as RunPod's billing API reads it (UTC, `Z`). A naive datetime is refused, not guessed."""
    if when.tzinfo is None:
        raise RequestInvalid([Problem(label, "format", "must be timezone-aware")], operation=operation)
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- REST v2 ---------------------------------------------------------------------------------------


class RunPodManagement(_Api):
    """Synchronous REST v2 client for one RunPod account's endpoints, workers, pods, catalog and billing."""

    def list_endpoints(self) -> list[EndpointConfig]:
        """Every serverless endpoint of the account (`GET /serverless`), following pages if RunPod sends any."""
        return [EndpointConfig.from_reader(item) for item in self._list("list_endpoints", "serverless", "endpoints")]

    def get_endpoint(self, endpoint_id: str) -> EndpointConfig:
        """One endpoint's current configuration (`GET /serverless/{id}`)."""
        path = "serverless/" + _segment(endpoint_id, "endpoint_id", "get_endpoint")
        return EndpointConfig.from_json(self._get("get_endpoint", path), operation="get_endpoint")

    def update_workers(self, endpoint_id: str, *, min: int, max: int, idle_timeout: int | None = None,
                       ) -> EndpointConfig:
        """Set an endpoint's worker bounds (`PATCH /serverless/{id}`); returns the endpoint as RunPod now has it.

        Both `min` and `max` are always sent: whether RunPod keeps `min` when a PATCH names only `max` is
        unconfirmed. A caller that means to change one of them reads the other from a fresh
        `get_endpoint()` first, never from memory, since RunPod itself lowers `max` on idle or unhealthy
        endpoints. `idle_timeout` (1-3600 s) is left alone when None; RunPod refuses it for endpoints that
        scale on REQUEST_COUNT.

        A 429 is retried. A 5xx or a lost answer raises `ChangeOutcomeUnknown` without a retry: read the
        endpoint back to learn whether the change was applied.
        """
        operation = "update_workers"
        path = "serverless/" + _segment(endpoint_id, "endpoint_id", operation)
        problems = [Problem(label, "range", "must be a whole number >= 0") for label, value in
                    (("min", min), ("max", max)) if isinstance(value, bool) or not isinstance(value, int) or value < 0]
        if not problems and min > max:
            problems.append(Problem("min", "range", "must not be more than max"))
        workers: dict[str, int] = {"min": min, "max": max}
        if idle_timeout is not None:
            low, high = IDLE_TIMEOUT_BOUNDS
            if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, int) or not low <= idle_timeout <= high:
                problems.append(Problem("idle_timeout", "range", f"must be whole seconds from {low} to {high}"))
            workers["idleTimeout"] = idle_timeout
        if problems:
            raise RequestInvalid(problems, operation=operation)
        response = self._send(operation, "PATCH", path, kind=_CHANGE, body={"workers": workers})
        return EndpointConfig.from_json(self._json(operation, path, response), operation=operation)

    def list_workers(self, endpoint_id: str) -> WorkersView:
        """An endpoint's workers and RunPod's summary of them (`GET /serverless/{id}/workers`)."""
        path = "serverless/" + _segment(endpoint_id, "endpoint_id", "list_workers") + "/workers"
        return WorkersView.from_json(self._get("list_workers", path), operation="list_workers")

    def gpu_catalog(self) -> list[GpuType]:
        """Every GPU type with its list prices and serverless pool (`GET /catalog/gpus`)."""
        body = _Reader(self._get("gpu_catalog", "catalog/gpus"), "catalog", "gpu_catalog")
        return [GpuType.from_reader(item) for item in body.objs("gpus")]

    def serverless_billing(self, endpoint_id: str | None = None, start: datetime | None = None,
                           end: datetime | None = None, bucket: str = "hour") -> list[BillingRecord]:
        """Serverless spend per bucket (`GET /billing/serverless`), oldest first as RunPod sends it.

        RunPod snaps `start` down and `end` (exclusive) up to bucket boundaries, and starts 30 days back
        when `start` is None. Billing runs every 5 minutes and may lag by about an hour, so the newest
        bucket can still grow. `endpoint_id` None covers every serverless endpoint.
        """
        operation = "serverless_billing"
        if bucket not in BILLING_BUCKETS:
            raise RequestInvalid([Problem("bucket", "known", f"must be one of {', '.join(BILLING_BUCKETS)}")],
                                 operation=operation)
        params = {"bucketSize": bucket}
        if endpoint_id is not None:
            params["serverlessId"] = _id(endpoint_id, "endpoint_id", operation)
        if start is not None:
            params["startTime"] = rfc3339(start, label="start", operation=operation)
        if end is not None:
            params["endTime"] = rfc3339(end, label="end", operation=operation)
        if start is not None and end is not None and end <= start:
            raise RequestInvalid([Problem("end", "range", "must be after start")], operation=operation)
        body = _Reader(self._get(operation, "billing/serverless", params), "billing", operation)
        return [BillingRecord.from_reader(item) for item in body.objs("records")]

    def list_pods(self) -> list[Pod]:
        """Every pod of the account (`GET /pods`), following pages if RunPod sends any."""
        return [Pod.from_reader(item) for item in self._list("list_pods", "pods", "pods")]

    # -- plumbing ----------------------------------------------------------------------------------

    def _get(self, operation: str, path: str, params: Mapping[str, str] | None = None) -> Any:
        return self._json(operation, path, self._send(operation, "GET", path, kind=_READ, params=params))

    def _list(self, operation: str, path: str, key: str) -> list[_Reader]:
        """Every item of a wrapped list (`{key: [...]}`), across pages.

        v2 documents no pagination and answers with one page; RunPod's CLI walks pages all the same. So
        a body that names a next page (a cursor, or page numbers) is followed, and one that does not is
        the whole list. Both readings are tested."""
        items: list[_Reader] = []
        params: dict[str, str] = {}
        seen: set[tuple[tuple[str, str], ...]] = set()
        for _ in range(MAX_PAGES):
            body = _Reader(self._get(operation, path, params or None), key, operation)
            items.extend(body.objs(key))
            following = next_page(body.raw)
            if following is None:
                return items
            marker = tuple(sorted(following.items()))
            if marker in seen:
                raise RunPodProtocolError(f"{operation}: RunPod named the same next page twice", operation=operation)
            seen.add(marker)
            params = following
        raise RunPodProtocolError(f"{operation}: more than {MAX_PAGES} pages", operation=operation)


def next_page(body: Mapping[str, Any]) -> dict[str, str] | None:
    """The query parameters of the page after `body`, or None when it is the last (or only) one.

    Read from a `nextCursor` (top level, or inside `pagination`/`meta`), sent back as `cursor`; or from
    `page` with `totalPages` or `hasMore`, sent back as `page`."""
    holders: Sequence[Mapping[str, Any]] = [body, *(body[k] for k in ("pagination", "meta")
                                                    if isinstance(body.get(k), Mapping))]
    for holder in holders:
        cursor = holder.get("nextCursor")
        if isinstance(cursor, str) and cursor:
            return {"cursor": cursor}
        page = holder.get("page")
        if isinstance(page, int) and not isinstance(page, bool):
            total, more = holder.get("totalPages"), holder.get("hasMore")
            if more is True or (isinstance(total, int) and page < total):
                return {"page": str(page + 1)}
    return None


# -- GraphQL (deprecated by RunPod, retired early 2027): delete this section with it ----------------

_ACCOUNT_QUERY = "query { myself { clientBalance currentSpendPerHr spendLimit } }"

# `extensions.code` values GraphQL servers use, by what the caller does next.
_GRAPHQL_CODES: Mapping[str, type[RunPodError]] = {
    "UNAUTHENTICATED": RunPodAuthError, "UNAUTHORIZED": RunPodAuthError, "FORBIDDEN": RunPodAuthError,
    "NOT_FOUND": RunPodNotFound, "RATE_LIMITED": RunPodRateLimited, "TOO_MANY_REQUESTS": RunPodRateLimited,
    "INTERNAL_SERVER_ERROR": RunPodTransient,
}


@dataclass(frozen=True)
class Account:
    """The account's live balance and spend rate in USD (RunPod bills every 5 minutes, so readings
    taken more often repeat). `spend_limit` is None when none is set."""

    balance: float
    spend_per_hour: float
    spend_limit: float | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


class RunPodGraphQL(_Api):
    """The one thing only GraphQL still answers: the balance. v2 (v2.9.0) has no balance or spend-rate
    endpoint; re-check before GraphQL's retirement, and fall back to summing billing records."""

    _name = "RunPod GraphQL"
    _default_url = DEFAULT_GRAPHQL_URL

    def __init__(self, *, api_key: Secret | str, url: str | None = None, **options: Any) -> None:
        super().__init__(api_key=api_key, base_url=url, **options)  # one URL, not a base: its name says so

    def account(self) -> Account:
        """Balance, current spend per hour and spend limit (`myself`)."""
        myself = _Reader(self._query("account", _ACCOUNT_QUERY, "myself"), "myself", "account")
        return Account(
            balance=myself.number("clientBalance"),
            spend_per_hour=myself.number("currentSpendPerHr"),
            spend_limit=myself.number("spendLimit", required=False),
            raw=myself.raw,
        )

    def _query(self, operation: str, query: str, root: str) -> Any:
        """`data[root]` of a query. GraphQL answers most failures with HTTP 200 and `errors`, and a
        missing resource with a null; both become the same errors as REST's status codes. A query
        reads, so it is retried like a GET."""
        attempt = 0
        while True:
            # The URL itself, not base_url + "/": RunPod's GraphQL path has no trailing slash.
            response = self._send(operation, "POST", self.base_url, kind=_READ, body={"query": query})
            try:
                return _graphql_data(operation, self._json(operation, "graphql", response), root, self._scrub)
            except RunPodTransient as exc:
                delay = retry_delay(attempt, self.retry_policy, retry_after=exc.retry_after, rand=self._rand)
                if delay is None:
                    raise
                log.info("%s %s failed (%s); retry %d in %.2fs", self._name, operation, exc, attempt + 1, delay)
                self._sleep(delay)
                attempt += 1


def _graphql_data(operation: str, body: object, root: str, scrub: Callable[[str], str]) -> Any:
    if not isinstance(body, Mapping):
        raise RunPodProtocolError(f"{operation} graphql: the answer is not a JSON object", operation=operation)
    errors = body.get("errors")
    if errors:
        items = errors if isinstance(errors, list) else [errors]
        said = scrub("; ".join(_problem_item(item) for item in items[:5]))[:500]
        first = items[0] if isinstance(items[0], Mapping) else {}
        extensions = first.get("extensions")
        code = str(extensions.get("code", "")).upper() if isinstance(extensions, Mapping) else ""
        if not code and "unauthorized" in said.lower():
            code = "UNAUTHENTICATED"
        error_type = _GRAPHQL_CODES.get(code, RunPodRejected)
        raise error_type(f"{operation} graphql: {said}", operation=operation)
    data = body.get("data")
    if not isinstance(data, Mapping) or data.get(root) is None:
        raise RunPodNotFound(f"{operation} graphql: RunPod answered no {root}", operation=operation)
    return data[root]
