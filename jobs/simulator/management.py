"""RunPod's management API, served from the simulator's own state: a REST v2 subset and GraphQL ``myself``.

RunPod serves management at ``https://api.runpod.io/v2`` and ``https://api.runpod.io/graphql``, a different
host from the serverless ``https://api.runpod.ai/v2``. The simulator has one port, and ``/v2/serverless/...``
would be ambiguous with an endpoint named "serverless", so management lives under ``/mgmt``: a client is
pointed at ``RUNPOD_REST_URL=http://HOST:PORT/mgmt/v2`` and ``RUNPOD_GRAPHQL_URL=http://HOST:PORT/mgmt/graphql``.

What is modelled: endpoint inventory and PATCH (workers, scaling, timeout, flashboot) that really changes the
engine's capacity; the worker list; the GPU catalog; serverless billing per hour bucket from simulated
execution time x the catalog's serverless price x GPUs; the account balance that billing lowers; RunPod's
balance-tier cap on the account's max workers; ``RateLimit`` headers. RunPod's idle cuts (max workers to 2
after 3 idle days, 0 after 7) live in the engine, since they change capacity without any request.

Our readings where RunPod's answer is UNCONFIRMED:

* A PATCH that raises ``workers.max`` and so takes the account's total max workers over its balance tier is refused
  with 400 (it names the cap); nothing is clamped, so a client never believes a value that is not in force.
* ``{"workers": {"max": 5}}`` keeps ``min`` (the docs say only fields present change).
* Billing records exist only for buckets with usage, and a job is billed when its run ends (RunPod bills
  every 5 minutes and its records may lag); ``currentSpendPerHr`` is what the last hour's runs cost.
"""

from __future__ import annotations

import hmac
import math
import re
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jobs.simulator.catalog import GPUS, POOLS, price_per_gpu_second
from jobs.simulator.engine import SCALING_TYPES, Endpoint, Worker, WorkerState

if TYPE_CHECKING:
    from jobs.simulator.app import Simulator

HOUR = 3600.0

#: RunPod's per-account max workers by balance (docs: serverless/workers/overview), highest tier first.
BALANCE_TIERS: tuple[tuple[float, int], ...] = ((900, 60), (700, 50), (500, 40), (300, 30), (200, 20), (100, 10))
DEFAULT_WORKER_CAP = 5

#: The v2 OpenAPI's example quotas (the real ones are UNCONFIRMED): name, requests, window seconds.
RATE_POLICIES: tuple[tuple[str, int, int], ...] = (("minute", 60, 60), ("hour", 3000, 3600), ("day", 50000, 86400))

BUCKET_SIZES = ("hour", "day", "week", "month", "year")

#: Where a worker runs, for the worker list; the simulator has one data center.
DATA_CENTER = "SIM-LOCAL-1"
IMAGE = "rpq/simulated-worker:latest"


def worker_cap(balance: float) -> int:
    """The account's max workers at this balance (RunPod's tiers)."""
    return next((cap for floor, cap in BALANCE_TIERS if balance >= floor), DEFAULT_WORKER_CAP)


class Problem(Exception):
    """An RFC 9457 problem answer: ``errors`` lists every field at fault."""

    def __init__(self, status: int, title: str, detail: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.errors = status, title, detail, errors

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body: dict[str, Any] = {"type": "about:blank", "title": self.title, "status": self.status,
                                "detail": self.detail}
        if self.errors:
            body["errors"] = self.errors
        return JSONResponse(body, status_code=self.status, headers=headers, media_type="application/problem+json")


# -- billing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Charge:
    """Execution on one endpoint within one clock hour (wall epoch seconds), and what it cost."""

    serverless_id: str
    start: float
    end: float
    amount: float


def split_by_hour(start: float, end: float) -> list[tuple[float, float]]:
    """``[start, end)`` cut at every hour boundary (wall epoch seconds)."""
    pieces = []
    while start < end:
        boundary = (math.floor(start / HOUR) + 1) * HOUR
        pieces.append((start, min(end, boundary)))
        start = boundary
    return pieces


def bucket_start(moment: datetime, size: str) -> datetime:
    """The start of the bucket holding ``moment`` (weeks start on Monday: RunPod's choice is UNCONFIRMED)."""
    moment = moment.replace(minute=0, second=0, microsecond=0)
    if size == "hour":
        return moment
    moment = moment.replace(hour=0)
    if size == "day":
        return moment
    if size == "week":
        return moment - timedelta(days=moment.weekday())
    moment = moment.replace(day=1)
    return moment if size == "month" else moment.replace(month=1)


def next_bucket(start: datetime, size: str) -> datetime:
    if size in ("hour", "day", "week"):
        return start + {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}[size]
    if size == "month":
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start.replace(year=start.year + 1)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class Account:
    """The simulated RunPod account: balance, and every charge since the last reset."""

    def __init__(self, starting_balance: float) -> None:
        self.starting_balance = starting_balance
        self.charges: list[Charge] = []

    def reset(self) -> None:
        self.charges = []

    def bill(self, serverless_id: str, pool: str, gpu_count: int, start: float, end: float) -> None:
        """Charge ``[start, end)`` wall seconds of execution at the pool's serverless price."""
        rate = price_per_gpu_second(pool) * gpu_count
        for a, b in split_by_hour(start, end):
            self.charges.append(Charge(serverless_id, a, b, (b - a) * rate))

    @property
    def spent(self) -> float:
        return sum(c.amount for c in self.charges)

    @property
    def balance(self) -> float:
        return self.starting_balance - self.spent

    def spend_in_last_hour(self, now: float) -> float:
        since = now - HOUR
        return sum(c.amount * (min(c.end, now) - max(c.start, since)) / (c.end - c.start)
                   for c in self.charges if c.end > since and c.start < now and c.end > c.start)

    def records(self, start: datetime, end: datetime, size: str, serverless_id: str | None) -> list[dict[str, Any]]:
        """Per-endpoint records for each bucket in ``[start, end)`` that has usage, oldest first."""
        sums: dict[tuple[datetime, str], float] = defaultdict(float)
        for c in self.charges:
            if serverless_id not in (None, c.serverless_id):
                continue
            moment = datetime.fromtimestamp(c.start, UTC)
            if start <= moment < end:
                sums[(bucket_start(moment, size), c.serverless_id)] += c.amount
        return [
            {"startTime": iso(b), "endTime": iso(next_bucket(b, size)), "serverlessId": sid,
             "totalAmount": round(amount, 6), "gpuAmount": round(amount, 6), "cpuAmount": 0.0,
             "diskAmount": 0.0, "feeAmount": 0.0}
            for (b, sid), amount in sorted(sums.items())
        ]


# -- rate limits ----------------------------------------------------------------------------------------


class RateWindows:
    """Fixed windows per policy on the simulator's wall clock, shared by the whole account."""

    def __init__(self, scale: float) -> None:
        self.policies = [(name, max(1, int(q * scale)), w) for name, q, w in RATE_POLICIES]
        self.counts: dict[tuple[str, int], int] = {}

    def reset(self) -> None:
        self.counts = {}

    def take(self, now: float) -> tuple[dict[str, str], int | None]:
        """Count one request; the headers to send, and Retry-After seconds if a window is exhausted."""
        policy = ", ".join(f'"{name}";q={q};w={w}' for name, q, w in self.policies)
        tightest: tuple[int, str, int] | None = None
        retry_after = None
        for name, q, w in self.policies:
            window = int(now // w)
            used = self.counts.get((name, window), 0)
            reset_in = max(1, math.ceil((window + 1) * w - now))
            if used >= q:
                retry_after = max(retry_after or 0, reset_in)
                tightest = (0, name, reset_in)
                continue
            self.counts[(name, window)] = used + 1
            left = q - used - 1
            if tightest is None or left < tightest[0]:
                tightest = (left, name, reset_in)
        assert tightest is not None
        left, name, reset_in = tightest
        current = {(n, int(now // w)) for n, _, w in self.policies}
        self.counts = {key: used for key, used in self.counts.items() if key in current}
        return {"RateLimit-Policy": policy, "RateLimit": f'"{name}";r={left};t={reset_in}'}, retry_after


# -- views ----------------------------------------------------------------------------------------------

_WORKER_STATUS = {
    WorkerState.RUNNING: "RUNNING",
    WorkerState.READY: "IDLE",
    WorkerState.INITIALIZING: "INITIALIZING",
    WorkerState.THROTTLED: "THROTTLED",
    WorkerState.UNHEALTHY: "UNHEALTHY",
}


def endpoint_view(sim: Simulator, ep: Endpoint, serverless_base: str) -> dict[str, Any]:
    """An endpoint as ``GET /v2/serverless/{id}`` shows it."""
    s = ep.settings
    workers: dict[str, Any] = {"min": s.workers_min, "max": s.workers_max}
    if s.scaling_type == "REQUEST_COUNT":
        scaling: dict[str, Any] = {"type": "REQUEST_COUNT", "requestCount": int(s.scaling_value)}
    else:
        # idleTimeout is omitted for queue-based endpoints that scale on REQUEST_COUNT (v2 schema).
        workers["idleTimeout"] = max(1, round(s.idle_timeout_seconds))
        scaling = {"type": "QUEUE_DELAY", "queueDelay": s.scaling_value}
    base = f"{serverless_base}/{ep.id}"
    return {
        "id": ep.id,
        "name": ep.id,
        "type": "QUEUE",
        "requestUrls": {
            "run": f"{base}/run", "runSync": f"{base}/runsync", "status": f"{base}/status/{{jobId}}",
            "stream": f"{base}/stream/{{jobId}}", "cancel": f"{base}/cancel/{{jobId}}",
            "retry": f"{base}/retry/{{jobId}}", "purgeQueue": f"{base}/purge-queue", "health": f"{base}/health",
        },
        "image": IMAGE,
        "args": None,
        "disk": 10,
        "ports": [],
        "env": {},
        "registry": None,
        "gpu": {"pools": [s.gpu_pool], "count": s.gpu_count, "allowedCudaVersions": [], "minCudaVersion": None,
                "excludedTypes": []},
        "workers": workers,
        "scaling": scaling,
        "dataCenterIds": [DATA_CENTER],
        "networkVolumes": [],
        "timeout": s.execution_timeout_ms,
        "flashboot": s.flashboot,
        "createdAt": sim.clock.iso_at(ep.created_at),
    }


def worker_view(sim: Simulator, ep: Endpoint, worker: Worker) -> dict[str, Any]:
    now = sim.clock.now()
    return {
        "id": worker.id,
        "status": _WORKER_STATUS[worker.state],
        "isStale": False,
        "version": 1,
        "gpuCount": ep.settings.gpu_count,
        "image": IMAGE,
        "uptimeSeconds": max(0, int(now - worker.created_at)),
        "gpuTypeId": POOLS[ep.settings.gpu_pool].id,
        "dataCenterId": DATA_CENTER,
        "startedAt": sim.clock.iso_at(worker.created_at),
    }


# -- PATCH ----------------------------------------------------------------------------------------------

_PATCHABLE = ("workers", "scaling", "timeout", "flashboot")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_patch(body: Any, ep: Endpoint) -> dict[str, Any]:
    """The engine settings a ``PATCH /v2/serverless/{id}`` body changes; :class:`Problem` (400) listing every
    fault otherwise. Only fields present change."""
    if not isinstance(body, dict):
        raise Problem(400, "Bad Request", "request body must be a JSON object")
    errors: list[dict[str, str]] = []
    changes: dict[str, Any] = {}

    def bad(field: str, message: str) -> None:
        errors.append({"field": field, "message": message})

    for name in body:
        if name not in _PATCHABLE:
            bad(name, f"unknown or unsupported field (the simulator changes {', '.join(_PATCHABLE)})")
    scaling_type = ep.settings.scaling_type
    if "scaling" in body:
        scaling = body["scaling"]
        if not isinstance(scaling, dict):
            bad("scaling", "must be an object")
        elif scaling.get("type") not in SCALING_TYPES:
            bad("scaling.type", "must be QUEUE_DELAY or REQUEST_COUNT")
        else:
            scaling_type = scaling["type"]
            key = "queueDelay" if scaling_type == "QUEUE_DELAY" else "requestCount"
            value: Any = scaling.get(key)
            extra = set(scaling) - {"type", key}
            if extra:
                bad("scaling", f"unknown properties: {', '.join(sorted(extra))}")
            if scaling_type == "QUEUE_DELAY" and not (_is_number(value) and value >= 0.5):
                bad("scaling.queueDelay", "is required with QUEUE_DELAY and must be a number >= 0.5")
            elif scaling_type == "REQUEST_COUNT" and not (_is_int(value) and value >= 1):
                bad("scaling.requestCount", "is required with REQUEST_COUNT and must be an integer >= 1")
            else:
                changes["scaling_type"], changes["scaling_value"] = scaling_type, float(value)
    if "workers" in body:
        workers = body["workers"]
        if not isinstance(workers, dict):
            bad("workers", "must be an object")
        else:
            for name in sorted(set(workers) - {"min", "max", "idleTimeout"}):
                bad(f"workers.{name}", "additional properties are not allowed")
            for name, setting in (("min", "workers_min"), ("max", "workers_max")):
                if name in workers:
                    if _is_int(workers[name]) and workers[name] >= 0:
                        changes[setting] = workers[name]
                    else:
                        bad(f"workers.{name}", "must be an integer >= 0")
            if "idleTimeout" in workers:
                value = workers["idleTimeout"]
                if scaling_type == "REQUEST_COUNT":
                    bad("workers.idleTimeout", "is not allowed for an endpoint that scales on REQUEST_COUNT")
                elif _is_int(value) and 1 <= value <= 3600:
                    changes["idle_timeout_seconds"] = float(value)
                else:
                    bad("workers.idleTimeout", "must be an integer from 1 to 3600 (seconds)")
            low = changes.get("workers_min", ep.settings.workers_min)
            high = changes.get("workers_max", ep.settings.workers_max)
            if low > high and not any(e["field"].startswith("workers.m") for e in errors):
                bad("workers", f"min ({low}) must not exceed max ({high})")
    if "timeout" in body:
        if _is_int(body["timeout"]) and body["timeout"] >= 1:
            changes["execution_timeout_ms"] = body["timeout"]
        else:
            bad("timeout", "must be an integer number of milliseconds >= 1")
    if "flashboot" in body:
        if isinstance(body["flashboot"], bool):
            changes["flashboot"] = body["flashboot"]
        else:
            bad("flashboot", "must be a boolean")
    if errors:
        raise Problem(400, "Bad Request", "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors)
    return changes


# -- GraphQL --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<name>[_A-Za-z][_0-9A-Za-z]*)|(?P<punct>[{}])|(?P<other>\S))")

#: The fields served on ``myself`` (type User); anything else is an error, as GraphQL validation makes it.
_USER_FIELDS = ("clientBalance", "currentSpendPerHr", "spendLimit")


class _GraphQLError(Exception):
    pass


def parse_selection(query: str) -> dict[str, Any]:
    """A query's selection set as nested dicts (leaf: None). Only names and braces: no arguments,
    variables, aliases or fragments, which the served fields never need."""
    tokens: list[str] = []
    for match in _TOKEN.finditer(query):
        if match.group("other"):
            raise _GraphQLError(f"Syntax Error: Unexpected \"{match.group('other')}\".")
        tokens.append(match.group("name") or match.group("punct"))
    if tokens and tokens[0] == "query":
        tokens.pop(0)
        if tokens and tokens[0] not in "{}":
            tokens.pop(0)  # the operation's name
    pos = 0

    def selection_set() -> dict[str, Any]:
        nonlocal pos
        if pos >= len(tokens) or tokens[pos] != "{":
            raise _GraphQLError('Syntax Error: Expected "{".')
        pos += 1
        fields: dict[str, Any] = {}
        while pos < len(tokens) and tokens[pos] != "}":
            name = tokens[pos]
            if name == "{":
                raise _GraphQLError('Syntax Error: Expected Name, found "{".')
            pos += 1
            fields[name] = selection_set() if pos < len(tokens) and tokens[pos] == "{" else None
        if pos >= len(tokens):
            raise _GraphQLError("Syntax Error: Expected Name, found <EOF>.")
        pos += 1
        return fields

    root = selection_set()
    if pos != len(tokens):
        raise _GraphQLError(f'Syntax Error: Unexpected "{tokens[pos]}".')
    return root


def graphql_answer(query: Any, account: Account, spend_limit: float, now: float) -> dict[str, Any]:
    """The body of a GraphQL answer (always HTTP 200): ``data``, or ``errors`` listing every unknown field."""
    if not isinstance(query, str):
        return {"errors": [{"message": "Must provide query string."}]}
    try:
        root = parse_selection(query)
    except _GraphQLError as exc:
        return {"errors": [{"message": str(exc)}]}
    errors = [{"message": f'Cannot query field "{name}" on type "Query".'} for name in root if name != "myself"]
    myself = root.get("myself")
    if "myself" in root and myself is None:
        errors.append({"message": 'Field "myself" of type "User" must have a selection of subfields.'})
    for name, sub in (myself or {}).items():
        if name not in _USER_FIELDS:
            errors.append({"message": f'Cannot query field "{name}" on type "User".'})
        elif sub is not None:
            errors.append({"message": f'Field "{name}" must not have a selection since type "Float" has no '
                                      "subfields."})
    if errors:
        return {"errors": errors}
    values = {
        "clientBalance": round(account.balance, 6),
        "currentSpendPerHr": round(account.spend_in_last_hour(now), 6),
        "spendLimit": spend_limit,
    }
    return {"data": {"myself": {name: values[name] for name in myself or {}}}}


# -- routes ---------------------------------------------------------------------------------------------


def _parse_time(raw: str | None, name: str) -> datetime | None:
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise Problem(400, "Bad Request", f"{name} must be an RFC 3339 date-time",
                      [{"field": name, "message": "must be an RFC 3339 date-time"}]) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def management_routes(sim: Simulator) -> list[Route]:
    engine = sim.engine
    mgmt = sim.management

    def authorized(request: Request) -> bool:
        # Management takes only `Authorization: Bearer <key>` (the v2 OpenAPI's bearerAuth).
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and bool(token.strip()) and sim.authorized(request)

    def rest(fn: Callable[[Request], Awaitable[dict[str, Any]]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not authorized(request):
                return Problem(401, "Unauthorized", "a valid API key is required: Authorization: Bearer <key>") \
                    .response()
            headers, retry_after = mgmt.rate.take(sim.clock.wall())
            if retry_after is not None and sim.config.rate_limits:
                exceeded = headers["RateLimit"].split(";")[0].strip('"')
                return Problem(429, "Too Many Requests", f"rate limit exceeded: the {exceeded} window is used up") \
                    .response({**headers, "Retry-After": str(retry_after)})
            try:
                engine.reconcile()
                return JSONResponse(await fn(request), headers=headers)
            except Problem as exc:
                return exc.response(headers)

        return endpoint

    def serverless_base(request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/v2"

    def found(request: Request) -> Endpoint:
        ep = engine.endpoints.get(request.path_params["endpoint_id"])
        if ep is None:
            raise Problem(404, "Not Found", f"endpoint {request.path_params['endpoint_id']!r} not found")
        return ep

    async def list_endpoints(request: Request) -> dict[str, Any]:
        base = serverless_base(request)
        return {"endpoints": [endpoint_view(sim, ep, base) for ep in engine.endpoints.values()]}

    async def get_endpoint(request: Request) -> dict[str, Any]:
        return endpoint_view(sim, found(request), serverless_base(request))

    async def patch_endpoint(request: Request) -> dict[str, Any]:
        ep = found(request)
        try:
            body = await request.json()
        except ValueError:
            raise Problem(400, "Bad Request", "request body is not valid JSON") from None
        changes = parse_patch(body, ep)
        if changes.get("workers_max", 0) > ep.settings.workers_max:
            # Only a raise is checked: lowering must always work, even on an account already over its cap
            # (its balance fell, or its endpoints were made with the /_sim control API).
            cap = worker_cap(mgmt.account.balance)
            others = sum(other.settings.workers_max for other in engine.endpoints.values() if other is not ep)
            if others + changes["workers_max"] > cap:
                # RunPod's answer above the cap is UNCONFIRMED; refusing (rather than clamping) keeps every
                # value a client reads back one it asked for.
                detail = (f"workers.max {changes['workers_max']} would make the account's max workers "
                          f"{others + changes['workers_max']}, over its cap of {cap} at a balance of "
                          f"${mgmt.account.balance:.2f} (other endpoints hold {others})")
                raise Problem(400, "Worker quota exceeded", detail, [{"field": "workers.max", "message": detail}])
        ep = engine.manage_endpoint(ep.id, changes)
        return endpoint_view(sim, ep, serverless_base(request))

    async def endpoint_workers(request: Request) -> dict[str, Any]:
        ep = found(request)
        workers = [worker_view(sim, ep, w) for w in ep.workers.values()]
        summary = dict.fromkeys(("running", "idle", "initializing", "throttled", "unhealthy"), 0)
        for w in workers:
            summary[w["status"].lower()] += 1
        return {"workers": workers, "summary": {**summary, "total": len(workers)}, "endpointVersion": 1}

    async def catalog_gpus(request: Request) -> dict[str, Any]:
        params = request.query_params
        if params.get("include") == "AVAILABILITY" and params.get("product") not in ("POD", "CLUSTER", "SERVERLESS"):
            raise Problem(400, "Bad Request", "include=AVAILABILITY requires product=POD|CLUSTER|SERVERLESS",
                          [{"field": "product", "message": "required with include=AVAILABILITY"}])
        if "cudaVersions" in params and "minCudaVersion" in params:
            raise Problem(400, "Bad Request", "cudaVersions and minCudaVersion cannot be combined")
        gpus = [gpu.as_dict() for gpu in GPUS]
        if params.get("include") == "AVAILABILITY":
            for gpu in gpus:
                gpu["availability"] = "HIGH"
        return {"gpus": gpus}

    async def billing_serverless(request: Request) -> dict[str, Any]:
        params = request.query_params
        size = params.get("bucketSize", "day")
        if size not in BUCKET_SIZES:
            raise Problem(400, "Bad Request", f"bucketSize must be one of {', '.join(BUCKET_SIZES)}",
                          [{"field": "bucketSize", "message": f"must be one of {', '.join(BUCKET_SIZES)}"}])
        now = datetime.fromtimestamp(sim.clock.wall(), UTC)
        start_raw, end_raw, last_raw = params.get("startTime"), params.get("endTime"), params.get("lastN")
        if last_raw is not None:
            if start_raw is not None or end_raw is not None:
                raise Problem(400, "Bad Request", "lastN cannot be combined with startTime or endTime")
            if not last_raw.isdigit() or int(last_raw) < 1:
                raise Problem(400, "Bad Request", "lastN must be a positive integer")
            end = next_bucket(bucket_start(now, size), size)
            start = end
            for _ in range(int(last_raw)):
                start = bucket_start(start - timedelta(seconds=1), size)
        else:
            start_at = _parse_time(start_raw, "startTime") or now - timedelta(days=30)
            end_at = _parse_time(end_raw, "endTime") or now
            start = bucket_start(start_at, size)  # snapped down to a bucket boundary
            end = bucket_start(end_at, size)
            if end < end_at:
                end = next_bucket(end, size)  # exclusive, snapped up
        serverless_id = params.get("serverlessId")
        records = mgmt.account.records(start, end, size, serverless_id)
        totals = {name: round(sum(r[name] for r in records), 6)
                  for name in ("totalAmount", "gpuAmount", "cpuAmount", "diskAmount", "feeAmount")}
        return {
            "records": records,
            "metadata": {
                "query": {"startTime": iso(start), "endTime": iso(end), "bucketSize": size,
                          "serverlessId": serverless_id},
                "recordCount": len(records),
                "uniqueServerlessCount": len({r["serverlessId"] for r in records}),
                "totals": totals,
            },
        }

    started = sim.clock.iso_at(sim.clock.now())

    async def pods(request: Request) -> dict[str, Any]:
        gpu = POOLS[sim.config.gpu_pool]
        return {"pods": [
            {"id": pod_id, "name": pod_id, "status": "RUNNING", "cost": gpu.secure, "cloud": "SECURE",
             "gpu": {"id": gpu.id, "count": 1, "displayName": gpu.name}, "dataCenterId": DATA_CENTER,
             "image": IMAGE, "template": None, "createdAt": started, "startedAt": started, "locked": False}
            for pod_id in sim.config.pods
        ]}

    def graphql_authorized(request: Request) -> bool:
        # RunPod's GraphQL docs show the key as ?api_key=KEY (SDKs send the Bearer header instead); a client
        # written to those docs must work too.
        key = request.query_params.get("api_key")
        if key is None:
            return authorized(request)
        return bool(key) and (sim.config.api_key is None or hmac.compare_digest(key.encode(),
                                                                                sim.config.api_key.encode()))

    async def graphql(request: Request) -> Response:
        if not graphql_authorized(request):
            return JSONResponse({"errors": [{"message": "Unauthorized"}]}, status_code=401)
        engine.reconcile()
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"errors": [{"message": "POST body must be JSON: {\"query\": \"...\"}"}]},
                                status_code=400)
        query = body.get("query") if isinstance(body, dict) else None
        return JSONResponse(graphql_answer(query, mgmt.account, sim.config.spend_limit, sim.clock.wall()))

    prefix = "/mgmt/v2"
    return [
        Route(f"{prefix}/serverless", rest(list_endpoints), methods=["GET"]),
        Route(f"{prefix}/serverless/{{endpoint_id}}", rest(get_endpoint), methods=["GET"]),
        Route(f"{prefix}/serverless/{{endpoint_id}}", rest(patch_endpoint), methods=["PATCH"]),
        Route(f"{prefix}/serverless/{{endpoint_id}}/workers", rest(endpoint_workers), methods=["GET"]),
        Route(f"{prefix}/catalog/gpus", rest(catalog_gpus), methods=["GET"]),
        Route(f"{prefix}/billing/serverless", rest(billing_serverless), methods=["GET"]),
        Route(f"{prefix}/pods", rest(pods), methods=["GET"]),
        Route("/mgmt/graphql", graphql, methods=["POST"]),
    ]


class Management:
    """The management API's own state: the account and its rate windows."""

    def __init__(self, starting_balance: float, rate_scale: float) -> None:
        self.account = Account(starting_balance)
        self.rate = RateWindows(rate_scale)

    def reset(self) -> None:
        self.account.reset()
        self.rate.reset()
