"""The HTTP layer: RunPod's serverless job API under ``/v2``, the simulator's control API under ``/_sim``, and
RunPod's management API under ``/mgmt`` (:mod:`jobs.simulator.management`).

Every ``/v2`` request goes through the same steps, in this order: authentication (401), the endpoint id
(404 unless the endpoint was created), the rate limiter (429), a "before" fault, the operation itself
(400/404/413/429 from :mod:`jobs.simulator.engine`), then an "after" fault. The control API needs no key:
it is a loopback tool for tests and operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from jobs.simulator.clock import Clock
from jobs.simulator.config import SimulatorConfig
from jobs.simulator.engine import (
    TERMINAL,
    BadRequest,
    Endpoint,
    EndpointNotFound,
    Engine,
    Job,
    JobNotFound,
    QueueFull,
    SimulatorError,
    parse_job_request,
)
from jobs.simulator.faults import FaultInjector, FaultRule, RateLimited, RateLimiter
from jobs.simulator.handlers import load_handler
from jobs.simulator.management import Management, management_routes
from jobs.simulator.stats import RequestStats
from jobs.simulator.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)

WAIT_MIN_MS = 1000
WAIT_MAX_MS = 300_000
RUNSYNC_DEFAULT_WAIT_MS = 90_000
#: /status-sync's ``wait`` bounds and default are UNCONFIRMED (RunPod lists the route, not its parameters).
#: RunPod's JS SDK (runpod-sdk 1.1.2, ``statusSync``) always sends ``clamp(1000, 90000, timeout)``, so that
#: is the range we accept; its default timeout, 90 s, is our default.
STATUS_SYNC_WAIT_MAX_MS = 90_000
STATUS_SYNC_DEFAULT_WAIT_MS = 90_000


class SimulatedDrop(Exception):
    """Raised after a partial response on purpose, so the server closes the connection."""


class _HideSimulatedDrops(logging.Filter):
    """Keep uvicorn from logging a traceback for every connection we drop on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SimulatedDrop)


class DropResponse(Response):
    """Announce a body, send part of it, then fail: the client sees the connection die mid-response."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"id": "', "more_body": True})
        raise SimulatedDrop("connection dropped by fault injection")


def error(status: int, message: str, *, retry_after: int | None = None) -> JSONResponse:
    # RunPod's error bodies are {"error": "..."} where confirmed (400 on a bad wait); for 401/404/413/429
    # the exact bodies are UNCONFIRMED and use the same shape.
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class PayloadTooLarge(SimulatorError):
    # RunPod documents the 10 MB / 20 MB limits but not the status code it answers with; 413 is our
    # reading (UNCONFIRMED).
    """request body is too large"""

    status = 413


class Simulator:
    """One simulator instance: the engine plus everything around it that the HTTP layer needs."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.clock = Clock()
        self.webhooks = WebhookDispatcher(
            clock=self.clock,
            attempts=config.webhook_attempts,
            interval_seconds=config.webhook_interval_seconds,
            timeout_seconds=config.webhook_timeout_seconds,
        )
        self.management = Management(config.account_balance, config.rate_limit_scale)
        self.engine = Engine(
            config,
            self.clock,
            load_handler(config.handler),
            on_webhook=lambda job, payload: self.webhooks.deliver(job.request.webhook or "", job.id, payload),
            on_run_ended=self._bill,
        )
        self.faults = FaultInjector.from_config(
            seed=config.seed,
            rate_5xx=config.fault_5xx_rate,
            rate_429=config.fault_429_rate,
            rate_slow=config.fault_slow_rate,
            slow_seconds=config.fault_slow_seconds,
            rate_drop=config.fault_drop_rate,
        )
        self.limiter = RateLimiter(scale=config.rate_limit_scale)
        self.stats = RequestStats()
        self.stats.reset(self.clock.wall())
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Requests held open right now (runsync, stream, status-sync) per job id, shown by /_sim/jobs so that
        #: a test can tell a long poll is in place before it changes what the poll waits for.
        self.held: Counter[str] = Counter()

    def _bill(self, ep: Endpoint, started: float, ended: float) -> None:
        s = ep.settings
        self.management.account.bill(ep.id, s.gpu_pool, s.gpu_count, self.clock.wall_at(started),
                                     self.clock.wall_at(ended))

    async def reset(self) -> None:
        await self.engine.reset()
        self.management.reset()
        await self.webhooks.reset()
        self.faults.reset()
        self.limiter.reset()
        self.stats.reset(self.clock.wall())

    async def close(self) -> None:
        await self.engine.stop()
        await self.webhooks.close()

    def begin_shutdown(self) -> None:
        """Answer held requests (runsync waits, stream holds) now, so the server can stop promptly."""
        self.engine.closing = True
        self.engine.changed.fire()

    def begin_shutdown_threadsafe(self) -> None:
        """:meth:`begin_shutdown` from a signal handler or another thread."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.begin_shutdown)

    # -- the request pipeline ---------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        """Accept ``Authorization: Bearer <key>`` and the bare ``Authorization: <key>`` RunPod's docs show."""
        header = request.headers.get("authorization", "").strip()
        scheme, _, rest = header.partition(" ")
        token = rest.strip() if scheme.lower() == "bearer" else header
        if not token:
            return False
        if self.config.api_key is None:
            return True
        return hmac.compare_digest(token.encode(), self.config.api_key.encode())

    async def handle(
        self,
        request: Request,
        op: str,
        action: Callable[[], Awaitable[Response]],
        *,
        limit_as: str | None = None,
    ) -> Response:
        """Run one ``/v2`` operation through the pipeline; ``limit_as`` names the rate limit it shares.
        Requests to an endpoint that exists are counted for ``/_sim/stats`` (ids that do not exist are
        not, so a stream of made-up ids cannot grow the counters)."""
        endpoint_id: str = request.path_params["endpoint_id"]
        if endpoint_id not in self.engine.endpoints:
            return await self._pipeline(request, op, action, limit_as=limit_as)
        self.stats.arrived(endpoint_id, op, self.clock.wall())
        try:
            response = await self._pipeline(request, op, action, limit_as=limit_as)
        except BaseException:
            self.stats.answered(endpoint_id, op, "error")
            raise
        self.stats.answered(endpoint_id, op, "dropped" if isinstance(response, DropResponse) else response.status_code)
        return response

    async def _pipeline(
        self,
        request: Request,
        op: str,
        action: Callable[[], Awaitable[Response]],
        *,
        limit_as: str | None,
    ) -> Response:
        endpoint_id: str = request.path_params["endpoint_id"]
        if not self.authorized(request):
            return error(401, "Unauthorized")
        if endpoint_id not in self.engine.endpoints:
            # Before the rate limiter, so that requests to ids that do not exist use up no endpoint's budget.
            return error(EndpointNotFound.status, EndpointNotFound().message)
        holds_slot = False
        limit_op = limit_as or op
        if self.config.rate_limits:
            try:
                holds_slot = self.limiter.acquire(
                    endpoint_id,
                    limit_op,
                    now=self.clock.now(),
                    running_workers=self.engine.running_workers(endpoint_id) if self.config.dynamic_rate_limits else 0,
                )
            except RateLimited as exc:
                # RunPod's 429 headers are UNCONFIRMED; Retry-After (whole seconds) is what clients honour.
                return error(429, exc.message, retry_after=exc.retry_after)
        try:
            fault = self.faults.pick(op, endpoint_id)
            if fault is not None and fault.when == "before":
                early = await self._fault_response(fault)
                if early is not None:
                    return early
            try:
                response = await action()
            except QueueFull as exc:
                response = error(exc.status, exc.message, retry_after=1)
            except SimulatorError as exc:
                response = error(exc.status, exc.message)
            if fault is not None and fault.when == "after":
                return await self._fault_response(fault) or response
            return response
        finally:
            if holds_slot:
                self.limiter.release(endpoint_id, limit_op)

    async def _fault_response(self, fault: FaultRule) -> Response | None:
        """The response a fault replaces the real one with; None to carry on (slow, once delayed)."""
        if fault.kind == "5xx":
            return error(fault.status, "simulated server error")
        if fault.kind == "429":
            return error(429, "simulated rate limit", retry_after=fault.retry_after)
        if fault.kind == "slow":
            # Held like a long poll: clock advances shorten it and shutdown ends it.
            await self.engine.wait_until(lambda: False, self.clock.now() + fault.delay)
            return None
        return DropResponse()

    async def read_request(self, request: Request, limit: int) -> Any:
        """The JSON body, refusing (after draining, so the client reads our answer) anything over ``limit``."""
        total = 0
        parts: list[bytes] = []
        async for chunk in request.stream():
            total += len(chunk)
            if total <= limit:
                parts.append(chunk)
            elif total > 4 * limit:
                break
        if total > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit} byte limit")
        try:
            return json.loads(b"".join(parts))
        except ValueError as exc:
            raise BadRequest("request body is not valid JSON") from exc

    def job(self, request: Request) -> Job:
        return self.engine.get(request.path_params["endpoint_id"], request.path_params["job_id"])

    async def hold(self, job: Job, until: Callable[[], bool], wait_ms: int) -> None:
        """Hold a request open until ``until()`` holds or ``wait_ms`` pass on the simulator clock."""
        self.held[job.id] += 1
        try:
            await self.engine.wait_until(until, self.clock.now() + wait_ms / 1000)
        finally:
            self.held[job.id] -= 1
            if not self.held[job.id]:
                del self.held[job.id]


def parse_wait(raw: str | None, default: int, *, maximum: int = WAIT_MAX_MS) -> int:
    """RunPod's ``?wait=`` in milliseconds, 1000 to ``maximum`` (300000 unless the operation says less)."""
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not WAIT_MIN_MS <= value <= maximum:
        raise BadRequest(f"wait is invalid; must be between {WAIT_MIN_MS} and {maximum}")
    return value


def _ok(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body)


# -- /v2 routes -----------------------------------------------------------------------------------------


def _api_routes(sim: Simulator) -> list[Route]:
    engine = sim.engine

    async def run(request: Request) -> Response:
        async def action() -> Response:
            job_request = parse_job_request(
                await sim.read_request(request, sim.config.max_run_payload_bytes),
                enforce_policy_max=sim.config.enforce_policy_max,
            )
            endpoint_id = request.path_params["endpoint_id"]
            if sim.config.queue_full_limit and engine.queue_full(endpoint_id):
                raise QueueFull()
            job = engine.submit(endpoint_id, job_request)
            return _ok({"id": job.id, "status": "IN_QUEUE"})

        return await sim.handle(request, "run", action)

    async def runsync(request: Request) -> Response:
        async def action() -> Response:
            wait_ms = parse_wait(request.query_params.get("wait"), RUNSYNC_DEFAULT_WAIT_MS)
            job_request = parse_job_request(
                await sim.read_request(request, sim.config.max_runsync_payload_bytes),
                enforce_policy_max=sim.config.enforce_policy_max,
            )
            job = engine.submit(request.path_params["endpoint_id"], job_request, sync=True)
            await sim.hold(job, lambda: job.status in TERMINAL or job.deleted, wait_ms)
            if job.deleted:
                raise JobNotFound()
            if job.status in TERMINAL:
                return _ok(job.view())
            # Not finished within the wait: RunPod answers the id and a non-final status; poll /status.
            return _ok({"id": job.id, "status": job.status.value})

        return await sim.handle(request, "runsync", action)

    async def status(request: Request) -> Response:
        async def action() -> Response:
            job = sim.job(request)
            engine.count_status_call(job)
            return _ok(job.view())

        return await sim.handle(request, "status", action)

    async def status_sync(request: Request) -> Response:
        async def action() -> Response:
            wait_ms = parse_wait(
                request.query_params.get("wait"), STATUS_SYNC_DEFAULT_WAIT_MS, maximum=STATUS_SYNC_WAIT_MAX_MS
            )
            job = sim.job(request)
            engine.count_status_call(job)
            arrived = job.status
            # How long RunPod holds /status-sync is UNCONFIRMED; --status-sync-mode picks a reading. Either
            # way a final job answers at once: a COMPLETED or CANCELLED job never changes again.
            on_change = sim.config.status_sync_mode == "change"

            def answered() -> bool:
                return job.deleted or job.status in TERMINAL or (on_change and job.status is not arrived)

            await sim.hold(job, answered, wait_ms)
            if job.deleted:
                raise JobNotFound()
            return _ok(job.view())

        # Older RunPod docs: status, status-sync and stream share one 2000 / 10 s, 400-concurrent budget. The
        # status budget is shared here; a held call keeps its concurrency slot for as long as it is held.
        return await sim.handle(request, "status-sync", action, limit_as="status")

    async def stream(request: Request) -> Response:
        async def action() -> Response:
            hold_ms = parse_wait(request.query_params.get("wait"), round(sim.config.stream_hold_seconds * 1000))
            job = sim.job(request)
            await sim.hold(job, lambda: job.drained < len(job.chunks) or job.status in TERMINAL or job.deleted, hold_ms)
            if job.deleted:
                raise JobNotFound()
            chunks = engine.drain_stream(job)
            return _ok({"status": job.status.value, "stream": [{"output": chunk} for chunk in chunks]})

        return await sim.handle(request, "stream", action)

    async def cancel(request: Request) -> Response:
        async def action() -> Response:
            job = engine.cancel(request.path_params["endpoint_id"], request.path_params["job_id"])
            return _ok({"id": job.id, "status": job.status.value})

        return await sim.handle(request, "cancel", action)

    async def retry(request: Request) -> Response:
        async def action() -> Response:
            job = engine.retry(request.path_params["endpoint_id"], request.path_params["job_id"])
            # Like /run, RunPod answers IN_QUEUE even if a warm worker took the job in the meantime.
            return _ok({"id": job.id, "status": "IN_QUEUE"})

        return await sim.handle(request, "retry", action)

    async def purge_queue(request: Request) -> Response:
        async def action() -> Response:
            removed = engine.purge(request.path_params["endpoint_id"])
            return _ok({"removed": removed, "status": "completed"})

        return await sim.handle(request, "purge-queue", action)

    async def health(request: Request) -> Response:
        async def action() -> Response:
            return _ok(engine.health(request.path_params["endpoint_id"]))

        return await sim.handle(request, "health", action)

    prefix = "/v2/{endpoint_id}"
    return [
        Route(f"{prefix}/run", run, methods=["POST"]),
        Route(f"{prefix}/runsync", runsync, methods=["POST"]),
        # Current docs say GET for status and stream; older ones say GET or POST. Both are served.
        Route(f"{prefix}/status/{{job_id}}", status, methods=["GET", "POST"]),
        # Listed (GET|POST) in RunPod's older operations page; RunPod's JS SDK runSync polls it with GET.
        Route(f"{prefix}/status-sync/{{job_id}}", status_sync, methods=["GET", "POST"]),
        Route(f"{prefix}/stream/{{job_id}}", stream, methods=["GET", "POST"]),
        Route(f"{prefix}/cancel/{{job_id}}", cancel, methods=["POST"]),
        Route(f"{prefix}/retry/{{job_id}}", retry, methods=["POST"]),
        Route(f"{prefix}/purge-queue", purge_queue, methods=["POST"]),
        Route(f"{prefix}/health", health, methods=["GET"]),
    ]


# -- /_sim control routes -------------------------------------------------------------------------------


def _job_record(sim: Simulator, job: Job) -> dict[str, Any]:
    iso = sim.clock.iso_at
    return {
        "id": job.id,
        "endpoint_id": job.endpoint_id,
        "status": job.status.value,
        "input": job.request.input,
        "policy": job.request.policy,
        "webhook": job.request.webhook,
        # What s3Config named, without its secret: the control API is for tests, and they need no more.
        "s3_config": None if job.request.s3_config is None else {
            k: v for k, v in job.request.s3_config.items() if k != "accessSecret"},
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "deleted": job.deleted,
        "deleted_reason": job.deleted_reason,
        "attempts": job.attempts,
        "sync": job.sync,
        "worker_id": job.worker_id,
        "dropped_result_bytes": job.dropped_result_bytes,
        "held_requests": sim.held[job.id],
        # /status and /status-sync calls that found the job: how often, and how soon, a client looked.
        "status_calls": job.status_calls,
        "first_status_at": iso(job.first_status_at),
        "last_status_at": iso(job.last_status_at),
    }


def _endpoint_record(ep: Endpoint) -> dict[str, Any]:
    return {"id": ep.id, **vars(ep.settings)}


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise BadRequest("request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _control_routes(sim: Simulator) -> list[Route]:
    engine = sim.engine

    def guarded(
        fn: Callable[[Request], Awaitable[dict[str, Any]]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return _ok(await fn(request))
            except SimulatorError as exc:
                return error(exc.status, exc.message)

        return endpoint

    async def health(request: Request) -> dict[str, Any]:
        return {"ok": True}

    async def jobs(request: Request) -> dict[str, Any]:
        engine.reconcile()
        wanted = request.query_params.get("endpoint")
        return {"jobs": [_job_record(sim, job) for job in engine.history if wanted in (None, job.endpoint_id)]}

    async def set_faults(request: Request) -> dict[str, Any]:
        body = await _json_object(request)
        raw = body.get("faults")
        if not isinstance(raw, list):
            raise BadRequest("faults must be a list of rules")
        try:
            rules = [FaultRule.parse(item) for item in raw]
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        sim.faults.replace(rules)
        return {"faults": [rule.as_dict() for rule in sim.faults.rules]}

    async def get_faults(request: Request) -> dict[str, Any]:
        return {"faults": [rule.as_dict() for rule in sim.faults.rules]}

    async def clear_faults(request: Request) -> dict[str, Any]:
        sim.faults.replace([])
        return {"faults": []}

    async def endpoint_settings(request: Request) -> dict[str, Any]:
        endpoint_id = request.path_params["endpoint_id"]
        if request.method == "POST":
            # Creates the endpoint (defaults plus these settings) if it does not exist yet.
            return _endpoint_record(engine.create_endpoint(endpoint_id, await _json_object(request)))
        return _endpoint_record(engine.endpoint(endpoint_id))

    async def list_endpoints(request: Request) -> dict[str, Any]:
        return {"endpoints": [_endpoint_record(ep) for ep in engine.endpoints.values()]}

    async def advance(request: Request) -> dict[str, Any]:
        seconds = (await _json_object(request)).get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise BadRequest("seconds must be a non-negative number")
        await engine.advance(float(seconds))
        return {"offset": sim.clock.offset, "now": sim.clock.iso_at(sim.clock.now())}

    async def reset(request: Request) -> dict[str, Any]:
        await sim.reset()
        return {"ok": True}

    async def account(request: Request) -> dict[str, Any]:
        """The simulated account; POST {"balance": X} sets what is left now (as a top-up or a spent card
        would), keeping the charges behind it, so tests can cross a spend guard's floor and clear it."""
        held = sim.management.account
        if request.method == "POST":
            balance = (await _json_object(request)).get("balance")
            if isinstance(balance, bool) or not isinstance(balance, int | float) or not math.isfinite(balance):
                raise BadRequest("balance must be a number")
            held.starting_balance = float(balance) + held.spent
        return {"balance": round(held.balance, 6), "spent": round(held.spent, 6)}

    async def webhooks(request: Request) -> dict[str, Any]:
        return {"webhooks": [attempt.as_dict() for attempt in sim.webhooks.log]}

    async def stats(request: Request) -> dict[str, Any]:
        return sim.stats.report(request.query_params.get("endpoint"))

    return [
        Route("/_sim/health", guarded(health), methods=["GET"]),
        Route("/_sim/jobs", guarded(jobs), methods=["GET"]),
        Route("/_sim/faults", guarded(set_faults), methods=["POST"]),
        Route("/_sim/faults", guarded(get_faults), methods=["GET"]),
        Route("/_sim/faults", guarded(clear_faults), methods=["DELETE"]),
        Route("/_sim/endpoints", guarded(list_endpoints), methods=["GET"]),
        Route("/_sim/endpoints/{endpoint_id}", guarded(endpoint_settings), methods=["GET", "POST"]),
        Route("/_sim/clock/advance", guarded(advance), methods=["POST"]),
        Route("/_sim/reset", guarded(reset), methods=["POST"]),
        Route("/_sim/account", guarded(account), methods=["GET", "POST"]),
        Route("/_sim/webhooks", guarded(webhooks), methods=["GET"]),
        Route("/_sim/stats", guarded(stats), methods=["GET"]),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette still re-raises, so the traceback is logged; the client gets RunPod's error shape.
    return error(500, "internal error")


def create_app(config: SimulatorConfig) -> Starlette:
    """The simulator as an ASGI app. ``app.state.simulator`` is the :class:`Simulator` behind it."""
    sim = Simulator(config)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideSimulatedDrops) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_HideSimulatedDrops())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sim.loop = asyncio.get_running_loop()
        sim.engine.start()
        try:
            yield
        finally:
            await sim.close()

    app = Starlette(
        routes=[*_api_routes(sim), *_control_routes(sim), *management_routes(sim)],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.simulator = sim
    return app
