"""The in-memory model of RunPod serverless: endpoints, their FIFO queues, worker pools and jobs.

Job lifecycle (RunPod's status names; ``ALLOWED`` below is the single source of the edges)::

    IN_QUEUE ──a──▶ IN_PROGRESS ──b──▶ COMPLETED | FAILED | TIMED_OUT | CANCELLED
        └──c──▶ CANCELLED            FAILED | TIMED_OUT ──d──▶ IN_QUEUE
    a: a warm worker takes it   b: handler ends, execution timeout, /cancel   c: /cancel, /purge-queue
    d: /retry (same id, original input)
    any state ──ttl──▶ deleted (404)        terminal ──retention──▶ deleted (404)

Worker lifecycle: INITIALIZING ──cold start──▶ READY ──job──▶ RUNNING ──▶ READY ──idle timeout──▶ stopped.
Active (``workers_min``) workers never stop. ``/health`` reports every warm waiting worker, active or flex,
as ``ready``, and as ``idle`` the worker slots that are scaled down: RunPod's "Idle" means "Scaled down,
waiting for requests", not billed (docs: serverless/workers/overview). How RunPod counts those slots is
UNCONFIRMED; we read it as ``max(workers_max, workers_min)`` minus the workers that exist. The endpoint
switches ``unhealthy`` and ``throttled`` turn every worker that is not running into a crash-looping
(UNHEALTHY) or unstartable (THROTTLED) one, so jobs stay IN_QUEUE.

Endpoints exist only once created (``--endpoint`` at startup, or ``POST /_sim/endpoints/{id}``); any other
id is :class:`EndpointNotFound` (404), as RunPod answers an unknown or deleted endpoint id.

Concurrency: everything here runs on one asyncio loop, and every mutation is a plain synchronous method
with no ``await`` inside, so requests, job tasks and the ticker can never interleave half-way through a
change. Handler threads talk to the loop only through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
import itertools
import json
import logging
import math
import secrets
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from jobs.simulator.catalog import POOLS
from jobs.simulator.clock import Clock, Signal
from jobs.simulator.config import SimulatorConfig
from jobs.simulator.handlers import Handler, Outcome, exception_error

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    IN_QUEUE = "IN_QUEUE"  #: Waiting in the endpoint's queue for a worker.
    IN_PROGRESS = "IN_PROGRESS"  #: A worker is running the handler.
    COMPLETED = "COMPLETED"  #: The handler returned without an error.
    FAILED = "FAILED"  #: The handler failed, or (by default) ran past its execution timeout.
    CANCELLED = "CANCELLED"  #: Cancelled, or purged from the queue.
    TIMED_OUT = "TIMED_OUT"  #: Ran past its execution timeout, when so configured.


ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.IN_QUEUE: frozenset({JobStatus.IN_PROGRESS, JobStatus.CANCELLED}),
    JobStatus.IN_PROGRESS: frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED}),
    JobStatus.FAILED: frozenset({JobStatus.IN_QUEUE}),
    JobStatus.TIMED_OUT: frozenset({JobStatus.IN_QUEUE}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

#: What clients treat as finished. Not derived from ALLOWED: /retry gives FAILED and TIMED_OUT an edge back
#: to IN_QUEUE, yet RunPod (and its SDK's ``is_completed``) report them as final.
TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT}
)

#: The statuses that fire a webhook (RunPod calls it for COMPLETED and, per users, for FAILED).
WEBHOOK_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.TIMED_OUT})


class WorkerState(StrEnum):
    INITIALIZING = "initializing"  #: Cold-starting; takes no jobs yet.
    READY = "ready"  #: Warm and waiting for a job (RunPod's "idle" is a scaled-down slot, not this).
    RUNNING = "running"  #: Running one job.
    THROTTLED = "throttled"  #: Cannot start: no host capacity (endpoint switch ``throttled``).
    UNHEALTHY = "unhealthy"  #: Crashes during init, over and over (endpoint switch ``unhealthy``).


# -- errors ---------------------------------------------------------------------------------------------


class SimulatorError(Exception):
    """A request the simulator refuses; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__ or type(self).__name__)
        self.message = message or self.__doc__ or type(self).__name__


class BadRequest(SimulatorError):
    """Bad request."""


class JobNotFound(SimulatorError):
    # RunPod's 404 body for an unknown or expired job is UNCONFIRMED; this wording is ours.
    """request does not exist"""

    status = 404


class EndpointNotFound(SimulatorError):
    # RunPod documents 404 "Check your endpoint ID" for an unknown endpoint; the body is UNCONFIRMED, so it
    # takes the {"error": ...} shape of the bodies that are known.
    """endpoint not found: check your endpoint ID"""

    status = 404


class InvalidTransition(SimulatorError):
    """The job is not in a state that allows this operation."""


class QueueFull(SimulatorError):
    """The endpoint's queue is full; retry later."""

    status = 429


# -- request parsing ------------------------------------------------------------------------------------

MIN_TTL_MS = 10_000
MIN_EXECUTION_TIMEOUT_MS = 5_000
MAX_POLICY_MS = 7 * 24 * 3600 * 1000
DEFAULT_TTL_MS = 24 * 3600 * 1000
DEFAULT_EXECUTION_TIMEOUT_MS = 600_000


@dataclass(frozen=True)
class JobRequest:
    """A validated ``/run`` or ``/runsync`` body."""

    input: Any
    webhook: str | None = None
    policy: dict[str, Any] | None = None
    s3_config: dict[str, Any] | None = None
    execution_timeout_ms: int = DEFAULT_EXECUTION_TIMEOUT_MS
    ttl_ms: int = DEFAULT_TTL_MS
    low_priority: bool = False
    #: False: the job named no ``policy.executionTimeout``, so its endpoint's ``timeout`` applies.
    own_execution_timeout: bool = False


def _policy_ms(policy: dict[str, Any], name: str, default: int, minimum: int, enforce_max: bool) -> int:
    value = policy.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise BadRequest(f"policy.{name} must be an integer number of milliseconds")
    if value < minimum:
        raise BadRequest(f"policy.{name} must be at least {minimum} ms")
    if enforce_max and value > MAX_POLICY_MS:
        raise BadRequest(f"policy.{name} must be at most {MAX_POLICY_MS} ms (7 days)")
    return int(value)


def parse_job_request(body: Any, *, enforce_policy_max: bool = True) -> JobRequest:
    """Validate a request body as RunPod documents it; raises :class:`BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if body.get("input") is None:
        raise BadRequest("input is required")
    webhook = body.get("webhook")
    if webhook is not None and not isinstance(webhook, str):
        raise BadRequest("webhook must be a URL string")
    s3_config = body.get("s3Config")
    if s3_config is not None and not isinstance(s3_config, dict):
        raise BadRequest("s3Config must be an object")
    policy = body.get("policy")
    if policy is None:
        return JobRequest(input=body["input"], webhook=webhook, s3_config=s3_config)
    if not isinstance(policy, dict):
        raise BadRequest("policy must be an object")
    low_priority = policy.get("lowPriority", False)
    if not isinstance(low_priority, bool):
        raise BadRequest("policy.lowPriority must be a boolean")
    return JobRequest(
        input=body["input"],
        webhook=webhook,
        policy=policy,
        s3_config=s3_config,
        execution_timeout_ms=_policy_ms(
            policy,
            "executionTimeout",
            DEFAULT_EXECUTION_TIMEOUT_MS,
            MIN_EXECUTION_TIMEOUT_MS,
            enforce_policy_max,
        ),
        ttl_ms=_policy_ms(policy, "ttl", DEFAULT_TTL_MS, MIN_TTL_MS, enforce_policy_max),
        low_priority=low_priority,
        own_execution_timeout="executionTimeout" in policy,
    )


# -- model ----------------------------------------------------------------------------------------------

_NO_OUTPUT: Any = object()


#: RunPod's autoscaling types (REST v2 ``scaling.type``).
SCALING_TYPES = frozenset({"QUEUE_DELAY", "REQUEST_COUNT"})

#: RunPod's own scale-down of idle endpoints (docs: endpoint-configurations): after this much time with
#: nothing queued or running, max workers drops to this many, and stays there.
IDLE_CUTS: tuple[tuple[float, int], ...] = ((3 * 86400.0, 2), (7 * 86400.0, 0))


@dataclass
class EndpointSettings:
    """The per-endpoint knobs an operator can change at runtime (``POST /_sim/endpoints/{id}``)."""

    workers_max: int
    workers_min: int
    cold_start_seconds: float
    idle_timeout_seconds: float
    #: The default handler's stand-in for the worker's ``return_aggregate_stream`` start() flag.
    return_aggregate_stream: bool = False
    unhealthy: bool = False
    throttled: bool = False
    #: The serverless GPU pool (a catalog pool id) and GPUs per worker: what execution is billed at.
    gpu_pool: str = "ADA_24"
    gpu_count: int = 1
    #: The management API's view of the endpoint (``PATCH /mgmt/v2/serverless/{id}``). ``timeout`` is the
    #: execution timeout of a job whose policy names none; scaling and flashboot are shown, not modelled.
    execution_timeout_ms: int = DEFAULT_EXECUTION_TIMEOUT_MS
    flashboot: bool = False
    scaling_type: str = "QUEUE_DELAY"
    scaling_value: float = 4.0

    def updated(self, changes: dict[str, Any]) -> EndpointSettings:
        """A copy with ``changes`` applied; raises :class:`BadRequest` on unknown or ill-typed fields."""
        types = {f.name: f.type for f in fields(self)}
        for name, value in changes.items():
            kind = types.get(name)
            if kind is None:
                raise BadRequest(f"unknown endpoint setting {name!r}")
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "str":
                ok = isinstance(value, str)
            elif kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
            if not ok:
                raise BadRequest(f"{name} must be a non-negative {kind}")
        if changes.get("gpu_pool", self.gpu_pool) not in POOLS:
            raise BadRequest(f"gpu_pool must be one of {', '.join(POOLS)}")
        if changes.get("gpu_count", self.gpu_count) < 1:
            raise BadRequest("gpu_count must be >= 1")
        if changes.get("scaling_type", self.scaling_type) not in SCALING_TYPES:
            raise BadRequest(f"scaling_type must be one of {', '.join(sorted(SCALING_TYPES))}")
        return replace(self, **changes)


@dataclass
class Worker:
    id: str
    state: WorkerState
    active: bool  #: One of the endpoint's ``workers_min`` always-on workers.
    ready_at: float = 0.0  #: When an INITIALIZING worker becomes warm.
    idle_since: float = 0.0
    job_id: str | None = None
    created_at: float = 0.0

    @property
    def reported_state(self) -> str:
        return self.state.value


@dataclass
class Endpoint:
    id: str
    settings: EndpointSettings
    queue: deque[str] = field(default_factory=deque)
    #: Every worker, oldest first. Change it only through the methods below, which keep the two
    #: indexes in step.
    workers: dict[str, Worker] = field(default_factory=dict)
    #: The workers that are not RUNNING: all a scaling pass has to look at. With thousands of jobs
    #: running, a pass over every worker on each request would make the simulator the bottleneck.
    spare: dict[str, Worker] = field(default_factory=dict)
    #: The ``workers_min`` always-on workers.
    active: dict[str, Worker] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    retried: int = 0
    created_at: float = 0.0
    #: Last time a job arrived or ended, or the management API changed the endpoint: idle cuts count from it.
    last_active: float = 0.0
    #: How many of :data:`IDLE_CUTS` have been applied since ``last_active``.
    idle_cuts: int = 0

    def touch(self, now: float) -> None:
        self.last_active = now
        self.idle_cuts = 0

    @property
    def running(self) -> int:
        return len(self.workers) - len(self.spare)

    def add(self, worker: Worker) -> None:
        self.workers[worker.id] = worker
        if worker.state is not WorkerState.RUNNING:
            self.spare[worker.id] = worker
        if worker.active:
            self.active[worker.id] = worker

    def remove(self, worker: Worker) -> None:
        del self.workers[worker.id]
        self.spare.pop(worker.id, None)
        self.active.pop(worker.id, None)

    def set_running(self, worker: Worker, job_id: str) -> None:
        worker.state = WorkerState.RUNNING
        worker.job_id = job_id
        self.spare.pop(worker.id, None)

    def set_ready(self, worker: Worker, now: float) -> None:
        worker.state = WorkerState.READY
        worker.job_id = None
        worker.idle_since = now
        self.spare[worker.id] = worker

    def set_active(self, worker: Worker, active: bool) -> None:
        worker.active = active
        if active:
            self.active[worker.id] = worker
        else:
            self.active.pop(worker.id, None)


@dataclass
class Job:
    id: str
    endpoint_id: str
    request: JobRequest
    sync: bool
    created_at: float
    queued_at: float
    status: JobStatus = JobStatus.IN_QUEUE
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    output: Any = _NO_OUTPUT
    error: Any = None
    progress: Any = _NO_OUTPUT
    chunks: list[Any] = field(default_factory=list)
    drained: int = 0
    #: Size of the last result the worker could not deliver (over ``max_result_bytes``), for /_sim/jobs.
    dropped_result_bytes: int | None = None
    attempts: int = 0
    run: int = 0  #: Bumped on every start and stop, so a stale handler task cannot touch a newer run.
    deleted_reason: str | None = None
    task: asyncio.Task[None] | None = None
    status_calls: int = 0  #: /status and /status-sync calls that found the job, for /_sim/jobs.
    first_status_at: float | None = None
    last_status_at: float | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_reason is not None

    @property
    def ttl_at(self) -> float:
        return self.created_at + self.request.ttl_ms / 1000

    def view(self) -> dict[str, Any]:
        """The job object as ``/status`` shows it, omitting what is not known yet."""
        body: dict[str, Any] = {"id": self.id, "status": self.status.value}
        if self.started_at is not None:
            body["delayTime"] = round((self.started_at - self.queued_at) * 1000)
            if self.finished_at is not None:
                body["executionTime"] = round((self.finished_at - self.started_at) * 1000)
        if self.status is JobStatus.IN_PROGRESS:
            if self.progress is not _NO_OUTPUT:
                # RunPod shows the latest progress_update as `output` while the job runs.
                body["output"] = self.progress
        elif self.output is not _NO_OUTPUT:
            body["output"] = self.output
        if self.error is not None and self.status in TERMINAL:
            body["error"] = self.error
        if self.worker_id is not None:
            body["workerId"] = self.worker_id
        return body


def _new_job_id(sync: bool) -> str:
    # RunPod's shapes: `<uuid>-u1` for /run and `sync-<uuid>-u1` for /runsync (suffix meaning UNCONFIRMED).
    return f"{'sync-' if sync else ''}{uuid.uuid4()}-u1"


def _new_worker_id() -> str:
    return secrets.token_hex(7)


def json_size(value: Any) -> int:
    """Bytes of ``value`` as the SDK sends it to RunPod (``json.dumps(..., ensure_ascii=False)``, UTF-8)."""
    text = json.dumps(value, ensure_ascii=False, default=repr)  # repr: a size must never crash the engine
    return len(text.encode("utf-8", "surrogatepass"))


def result_size(outcome: Outcome) -> int:
    """Bytes of the job-done body a worker POSTs for this outcome (SDK ``rp_job.run_job``/``handle_job``)."""
    body: dict[str, Any] = {}
    if outcome.has_output:
        body["output"] = outcome.output
    if outcome.failed:
        body["error"] = outcome.error
    return json_size(body)


def split_stream_chunk(chunk: Any, limit: int) -> list[Any]:
    """The pieces RunPod's ``/stream`` shows for one yielded chunk: the chunk itself when its JSON fits
    ``limit`` bytes, else consecutive string pieces of at most ``limit`` UTF-8 bytes each.

    RunPod: "Maximum size for a single streamed payload chunk is 1 MB. Larger outputs are split across
    multiple chunks" (docs: operation-reference). How it splits is UNCONFIRMED. Our reading: a string is cut
    into consecutive substrings, never inside a character, so joining the pieces gives the string back; any
    other value is cut the same way from its JSON text, so joining and parsing gives it back. A string whose
    JSON (quotes, escapes) is over the limit but whose text is not stays one piece.
    """
    if json_size(chunk) <= limit:
        return [chunk]
    text = chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=False, default=repr)
    data = text.encode("utf-8", "surrogatepass")
    pieces: list[Any] = []
    start = 0
    while start < len(data):
        end = min(start + limit, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte: back off to a char start
            end -= 1
        pieces.append(data[start:end].decode("utf-8", "surrogatepass"))
        start = end
    return pieces


class _Runtime:
    """The :class:`~jobs.simulator.handlers.JobRuntime` handed to one run of one job."""

    def __init__(self, engine: Engine, job: Job, run: int, worker_id: str, *, return_aggregate_stream: bool) -> None:
        self._engine = engine
        self._job = job
        self._run = run
        self.worker_id = worker_id
        self.return_aggregate_stream = return_aggregate_stream

    def _live(self) -> bool:
        job = self._job
        return job.run == self._run and job.status is JobStatus.IN_PROGRESS and not job.deleted

    def progress(self, update: Any) -> None:
        if self._live():
            self._job.progress = update
            self._engine.changed.fire()

    def emit(self, chunk: Any) -> None:
        if self._live():
            self._job.chunks.extend(split_stream_chunk(chunk, self._engine.config.max_stream_chunk_bytes))
            self._engine.changed.fire()

    async def sleep(self, seconds: float) -> None:
        await self._engine.clock.sleep(seconds)


# -- the engine -----------------------------------------------------------------------------------------

WebhookCallback = Callable[[Job, dict[str, Any]], None]
#: Told of every stretch a job ran on a worker (``now()`` readings), for billing.
RunCallback = Callable[[Endpoint, float, float], None]


class Engine:
    """All simulated state, and the only code that changes it."""

    def __init__(
        self,
        config: SimulatorConfig,
        clock: Clock,
        handler: Handler,
        *,
        on_webhook: WebhookCallback | None = None,
        on_run_ended: RunCallback | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.handler = handler
        self.on_webhook = on_webhook
        self.on_run_ended = on_run_ended
        #: Fired on every observable change, and when the clock moves: long polls re-check on it.
        self.changed = Signal()
        #: Set when the server is shutting down: long polls answer at once instead of holding on.
        self.closing = False
        self._ticker: asyncio.Task[None] | None = None
        self._clear()

    def _clear(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.jobs: dict[str, Job] = {}  #: Live (not deleted) jobs by id.
        #: Every job seen since the last reset, deleted ones included (kept for /_sim/jobs; grows until reset).
        self.history: list[Job] = []
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        for endpoint_id in self.config.endpoints:  # the startup endpoints, with their startup settings
            self.create_endpoint(endpoint_id)

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background ticker that fires deadlines (needs a running loop)."""
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever(), name="sim-ticker")

    async def stop(self) -> None:
        ticker, self._ticker = self._ticker, None
        tasks = [job.task for job in self.jobs.values() if job.task is not None]
        if ticker is not None:
            tasks.append(ticker)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def reset(self) -> None:
        """Forget every job, counter and endpoint (but the ``--endpoint`` ones, which start afresh), stop all
        running work, and reset the clock offset."""
        tasks = [job.task for job in self.jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        for job in self.jobs.values():
            job.run += 1
            job.deleted_reason = "reset"  # wakes long polls on the old jobs with a 404
        self.clock.reset()
        self._clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.changed.fire()

    async def _tick_forever(self) -> None:
        while True:
            try:
                timeout = self.tick()
            except Exception:  # a bug must not stop time (nothing would start by itself): log, keep ticking
                log.exception("simulator tick failed")
                timeout = 0.1
            await self.changed.wait(timeout)

    def tick(self) -> float | None:
        """Bring the world up to now; return the real seconds until something next changes by itself
        (None: nothing will until a request or the clock moves)."""
        # One reading of the clock for both: with two, a worker whose cold start ends between them is
        # neither promoted (not due at the first) nor waited for (past at the second), and the ticker
        # sleeps until some far deadline with a job queued behind that worker.
        now = self.clock.now()
        self.reconcile(now)
        upcoming = self._next_deadline(now)
        return None if upcoming is None else max(upcoming - now, 0.001)

    async def advance(self, seconds: float) -> None:
        """Move the clock forward, stepping through every deadline on the way so events keep their order.

        Between steps the loop is yielded to a few times, so that handlers whose sleep ended can finish
        (and free their worker) before the next deadline is looked at.
        """
        if seconds < 0:
            raise BadRequest("seconds must be >= 0")
        await self._settle()  # let freshly started handlers register their sleeps first
        target = self.clock.now() + seconds
        for _ in range(10_000):
            now = self.clock.now()
            candidates = [d for d in (self._next_deadline(now), self.clock.next_sleeper(now)) if d is not None]
            step_to = min(candidates, default=math.inf)
            if step_to >= target:
                break
            self.clock.advance(max(step_to - now, 0.0))
            await self._settle()
        self.clock.advance(max(target - self.clock.now(), 0.0))
        await self._settle()

    async def _settle(self) -> None:
        self.reconcile()
        self.changed.fire()
        for _ in range(10):
            await asyncio.sleep(0)
        self.reconcile()

    # -- endpoints --------------------------------------------------------------------------------------

    def endpoint(self, endpoint_id: str) -> Endpoint:
        """The endpoint; :class:`EndpointNotFound` unless it was created (RunPod: 404 for an unknown id)."""
        ep = self.endpoints.get(endpoint_id)
        if ep is None:
            raise EndpointNotFound()
        return ep

    def create_endpoint(self, endpoint_id: str, changes: dict[str, Any] | None = None) -> Endpoint:
        """Create an endpoint with the configured defaults plus ``changes`` (validated before anything is
        created); an existing endpoint is only reconfigured."""
        ep = self.endpoints.get(endpoint_id)
        if ep is not None:
            self.configure_endpoint(endpoint_id, changes or {})
            return ep
        cfg = self.config
        defaults = EndpointSettings(
            workers_max=cfg.workers_max,
            workers_min=cfg.workers_min,
            cold_start_seconds=cfg.cold_start_seconds,
            idle_timeout_seconds=cfg.idle_timeout_seconds,
            return_aggregate_stream=cfg.return_aggregate_stream,
            gpu_pool=cfg.gpu_pool,
            gpu_count=cfg.gpu_count,
        )
        now = self.clock.now()
        ep = Endpoint(id=endpoint_id, settings=defaults.updated(changes or {}), created_at=now, last_active=now)
        self.endpoints[endpoint_id] = ep
        self.reconcile()
        self.changed.fire()
        return ep

    def configure_endpoint(self, endpoint_id: str, changes: dict[str, Any]) -> EndpointSettings:
        ep = self.endpoint(endpoint_id)
        ep.settings = ep.settings.updated(changes)
        self.reconcile()
        self.changed.fire()
        return ep.settings

    def manage_endpoint(self, endpoint_id: str, changes: dict[str, Any]) -> Endpoint:
        """Apply a management-API change. It counts as activity: RunPod's idle cuts start over from it."""
        ep = self.endpoint(endpoint_id)
        ep.settings = ep.settings.updated(changes)
        ep.touch(self.clock.now())
        self.reconcile()
        self.changed.fire()
        return ep

    def running_workers(self, endpoint_id: str) -> int:
        ep = self.endpoints.get(endpoint_id)
        return 0 if ep is None else ep.running

    # -- operations -------------------------------------------------------------------------------------

    def queue_full(self, endpoint_id: str) -> bool:
        """RunPod's queue-full rule: more than 50 queued and more than workers_max x 500 (UNCONFIRMED)."""
        ep = self.endpoint(endpoint_id)
        depth = len(ep.queue)
        return depth > 50 and depth > ep.settings.workers_max * 500

    def submit(self, endpoint_id: str, request: JobRequest, *, sync: bool = False) -> Job:
        self.reconcile()
        ep = self.endpoint(endpoint_id)
        now = self.clock.now()
        if not request.own_execution_timeout:
            # RunPod: the endpoint's execution timeout applies unless the job's policy sets its own.
            request = replace(request, execution_timeout_ms=ep.settings.execution_timeout_ms)
        job = Job(
            id=_new_job_id(sync),
            endpoint_id=endpoint_id,
            request=request,
            sync=sync,
            created_at=now,
            queued_at=now,
        )
        self.jobs[job.id] = job
        self.history.append(job)
        ep.queue.append(job.id)
        ep.touch(now)
        self._schedule(job.ttl_at, job)
        self.reconcile()
        self.changed.fire()
        return job

    def get(self, endpoint_id: str, job_id: str) -> Job:
        self.reconcile()
        self.endpoint(endpoint_id)
        job = self.jobs.get(job_id)
        if job is None or job.endpoint_id != endpoint_id:
            raise JobNotFound()
        return job

    def count_status_call(self, job: Job) -> None:
        now = self.clock.now()
        job.status_calls += 1
        job.last_status_at = now
        if job.first_status_at is None:
            job.first_status_at = now

    def cancel(self, endpoint_id: str, job_id: str) -> Job:
        """Cancel a queued or running job; a finished job is returned unchanged."""
        job = self.get(endpoint_id, job_id)
        if job.status is JobStatus.IN_QUEUE:
            self.endpoints[endpoint_id].queue.remove(job.id)
            self._finish(job, JobStatus.CANCELLED)
        elif job.status is JobStatus.IN_PROGRESS:
            self._finish(job, JobStatus.CANCELLED)
        self.reconcile()
        return job

    def retry(self, endpoint_id: str, job_id: str) -> Job:
        """Requeue a FAILED or TIMED_OUT job under the same id with its original input."""
        job = self.get(endpoint_id, job_id)
        if JobStatus.IN_QUEUE not in ALLOWED[job.status]:
            raise InvalidTransition(f"job {job.id} is {job.status.value}; only FAILED or TIMED_OUT can be retried")
        ep = self.endpoints[endpoint_id]
        self._set_status(job, JobStatus.IN_QUEUE)
        job.run += 1
        job.queued_at = self.clock.now()
        job.started_at = job.finished_at = None
        job.worker_id = None
        job.output = job.progress = _NO_OUTPUT
        job.error = None
        job.chunks = []
        job.drained = 0
        job.dropped_result_bytes = None
        ep.queue.append(job.id)
        ep.retried += 1
        self.reconcile()
        self.changed.fire()
        return job

    def purge(self, endpoint_id: str) -> int:
        """Remove every queued job. They become CANCELLED (RunPod's state for purged jobs is UNCONFIRMED)."""
        self.reconcile()
        ep = self.endpoint(endpoint_id)
        removed = 0
        while ep.queue:
            job = self.jobs[ep.queue.popleft()]
            self._finish(job, JobStatus.CANCELLED)
            removed += 1
        self.reconcile()
        return removed

    def drain_stream(self, job: Job) -> list[Any]:
        chunks = job.chunks[job.drained :]
        job.drained = len(job.chunks)
        return chunks

    def health(self, endpoint_id: str) -> dict[str, Any]:
        self.reconcile()
        ep = self.endpoint(endpoint_id)
        workers = dict.fromkeys(("idle", "initializing", "ready", "running", "throttled", "unhealthy"), 0)
        for worker in ep.spare.values():
            workers[worker.reported_state] += 1
        workers["running"] = ep.running
        # RunPod's "idle": scaled down, waiting for requests, not billed. Read as the slots up to the
        # endpoint's max that hold no worker (UNCONFIRMED; see the module docstring).
        workers["idle"] = max(max(ep.settings.workers_max, ep.settings.workers_min) - len(ep.workers), 0)
        in_progress = sum(
            1 for j in self.jobs.values() if j.endpoint_id == endpoint_id and j.status is JobStatus.IN_PROGRESS
        )
        return {
            "jobs": {
                # completed/failed/retried count since the simulator started (RunPod's window is
                # UNCONFIRMED); TIMED_OUT counts as failed.
                "completed": ep.completed,
                "failed": ep.failed,
                "inProgress": in_progress,
                "inQueue": len(ep.queue),
                "retried": ep.retried,
            },
            "workers": workers,
        }

    async def wait_until(self, predicate: Callable[[], bool], deadline: float) -> bool:
        """Wait (on the simulator clock) until ``predicate()`` holds; False if ``deadline`` passes first."""
        while not predicate():
            remaining = deadline - self.clock.now()
            if remaining <= 0 or self.closing:
                return False
            await self.changed.wait(remaining)
        return True

    # -- transitions ------------------------------------------------------------------------------------

    def _set_status(self, job: Job, to: JobStatus) -> None:
        if to not in ALLOWED[job.status]:
            raise InvalidTransition(f"job {job.id}: {job.status.value} -> {to.value} is not allowed")
        job.status = to

    def _run_ended(self, job: Job, ended: float) -> None:
        """A job's stretch on a worker is over: bill it, and count it as the endpoint's last activity."""
        ep = self.endpoints.get(job.endpoint_id)
        if ep is None or job.started_at is None:
            return
        ep.touch(ended)
        if self.on_run_ended is not None:
            self.on_run_ended(ep, job.started_at, ended)

    def _stop_task(self, job: Job) -> None:
        if job.task is not None:
            job.task.cancel()
            job.task = None

    def _release_worker(self, job: Job, *, stop_worker: bool = False) -> None:
        ep = self.endpoints.get(job.endpoint_id)
        worker = ep.workers.get(job.worker_id) if ep and job.worker_id else None
        if ep is None or worker is None or worker.job_id != job.id:
            return
        if stop_worker:
            ep.remove(worker)
        else:
            ep.set_ready(worker, self.clock.now())

    def _finish(self, job: Job, to: JobStatus, outcome: Outcome | None = None, *, stop_worker: bool = False) -> None:
        """Move a queued or running job to a terminal status and release what it held."""
        was_running = job.status is JobStatus.IN_PROGRESS
        self._set_status(job, to)
        job.run += 1
        job.finished_at = self.clock.now()
        if was_running:
            self._run_ended(job, job.finished_at)
        self._stop_task(job)
        if was_running:
            self._release_worker(job, stop_worker=stop_worker)
        if outcome is not None:
            job.output = outcome.output if outcome.has_output else _NO_OUTPUT
            job.error = outcome.error if outcome.failed else None
        ep = self.endpoints[job.endpoint_id]
        if to is JobStatus.COMPLETED:
            ep.completed += 1
        elif to in (JobStatus.FAILED, JobStatus.TIMED_OUT):
            ep.failed += 1
        retention = self.config.sync_retention_seconds if job.sync else self.config.retention_seconds
        self._schedule(job.finished_at + retention, job)
        if to in WEBHOOK_STATUSES and job.request.webhook and self.on_webhook is not None:
            payload = job.view()
            payload["input"] = job.request.input
            payload["webhook"] = job.request.webhook
            self.on_webhook(job, payload)
        self.changed.fire()

    def _delete(self, job: Job, reason: str) -> None:
        """Drop a job for good: later calls for it get 404. Running work is stopped."""
        ep = self.endpoints.get(job.endpoint_id)
        if job.status is JobStatus.IN_QUEUE and ep is not None:
            with contextlib.suppress(ValueError):
                ep.queue.remove(job.id)
        elif job.status is JobStatus.IN_PROGRESS:
            self._stop_task(job)
            self._release_worker(job)
            self._run_ended(job, self.clock.now())
        job.run += 1
        job.deleted_reason = reason
        del self.jobs[job.id]
        self.changed.fire()

    def _start(self, job: Job, worker: Worker) -> None:
        self._set_status(job, JobStatus.IN_PROGRESS)
        now = self.clock.now()
        job.run += 1
        job.attempts += 1
        job.started_at = now
        job.worker_id = worker.id
        self.endpoints[job.endpoint_id].set_running(worker, job.id)
        self._schedule(now + job.request.execution_timeout_ms / 1000, job)
        job.task = asyncio.get_running_loop().create_task(self._execute(job, job.run, worker.id))
        self.changed.fire()

    async def _execute(self, job: Job, run: int, worker_id: str) -> None:
        payload: dict[str, Any] = {"id": job.id, "input": copy.deepcopy(job.request.input)}
        if job.request.s3_config is not None:
            payload["s3Config"] = copy.deepcopy(job.request.s3_config)
        ep = self.endpoints.get(job.endpoint_id)
        runtime = _Runtime(
            self, job, run, worker_id, return_aggregate_stream=ep is not None and ep.settings.return_aggregate_stream
        )
        try:
            outcome = await self.handler(payload, runtime)
        except Exception as exc:  # a bug in a handler adapter still ends the job, as a worker crash would
            outcome = Outcome(error=exception_error(exc, worker_id))
        if job.run != run or job.status is not JobStatus.IN_PROGRESS or job.deleted:
            return
        job.task = None  # finishing must not cancel the task it runs in
        size = result_size(outcome)
        if size > self.config.max_result_bytes:
            # RunPod rejects a worker's job-done POST over about 20 MB (400, runpod-workers/worker-comfyui#129)
            # and the job then shows COMPLETED with no output (runpod-python#309). A failed job's oversized
            # result (error plus output) hits the same upload, so it ends the same way (UNCONFIRMED).
            log.warning("job %s: result of %d bytes is over %d; dropped", job.id, size, self.config.max_result_bytes)
            job.dropped_result_bytes = size
            outcome = Outcome()
        self._finish(job, JobStatus.FAILED if outcome.failed else JobStatus.COMPLETED, outcome)
        self.reconcile()

    # -- deadlines and scaling --------------------------------------------------------------------------

    def _schedule(self, when: float, job: Job) -> None:
        heapq.heappush(self._deadlines, (when, next(self._seq), job.id))

    def _check_job(self, job: Job, now: float) -> None:
        """Apply whichever of ttl, execution timeout and retention is due for this job."""
        if now >= job.ttl_at:
            # TTL covers queue plus run time and deletes the job whatever its state (RunPod docs). We do
            # not first show TIMED_OUT for a job that expired in the queue: deletion is what the docs
            # promise, and TIMED_OUT stays reachable through execution_timeout_status.
            self._delete(job, "ttl")
        elif job.status is JobStatus.IN_PROGRESS and job.started_at is not None:
            limit_ms = job.request.execution_timeout_ms
            if now >= job.started_at + limit_ms / 1000:
                status = JobStatus(self.config.execution_timeout_status)
                outcome = Outcome(error=f"job exceeded its execution timeout of {limit_ms} ms")
                self._finish(job, status, outcome, stop_worker=True)
        elif job.status in TERMINAL and job.finished_at is not None:
            retention = self.config.sync_retention_seconds if job.sync else self.config.retention_seconds
            if now >= job.finished_at + retention:
                self._delete(job, "retention")

    def _next_deadline(self, now: float) -> float | None:
        """The earliest known future moment at which something changes by itself."""
        upcoming = [self._deadlines[0][0]] if self._deadlines else []
        for ep in self.endpoints.values():
            idle_timeout = ep.settings.idle_timeout_seconds
            for w in ep.spare.values():
                if w.state is WorkerState.INITIALIZING:
                    upcoming.append(w.ready_at)
                elif w.state is WorkerState.READY and not w.active:
                    upcoming.append(w.idle_since + idle_timeout)
        future = [t for t in upcoming if t > now]
        return min(future) if future else None

    def reconcile(self, now: float | None = None) -> None:
        """Bring the world up to `now` (default: the clock's): fire due deadlines, warm and stop workers,
        assign jobs."""
        now = self.clock.now() if now is None else now
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job_id = heapq.heappop(self._deadlines)
            job = self.jobs.get(job_id)
            if job is not None:
                self._check_job(job, now)
        for ep in list(self.endpoints.values()):
            for _ in range(4):  # zero cold start: a new worker can be warm within the same pass
                if not self._reconcile_endpoint(ep, now):
                    break

    def _reconcile_endpoint(self, ep: Endpoint, now: float) -> bool:
        """One scaling pass over an endpoint; True if it started a worker that is already warm."""
        self._apply_idle_cuts(ep, now)
        s = ep.settings
        blocked = WorkerState.UNHEALTHY if s.unhealthy else WorkerState.THROTTLED if s.throttled else None
        changed = False
        for w in ep.spare.values():  # a RUNNING worker is left alone by every rule of this loop
            if blocked is not None:
                if (
                    w.state
                    in (WorkerState.READY, WorkerState.INITIALIZING, WorkerState.THROTTLED, WorkerState.UNHEALTHY)
                    and w.state is not blocked
                ):
                    w.state = blocked
                    changed = True
            elif w.state in (WorkerState.THROTTLED, WorkerState.UNHEALTHY):
                w.state = WorkerState.INITIALIZING
                w.ready_at = now + s.cold_start_seconds
                changed = True
            if w.state is WorkerState.INITIALIZING and w.ready_at <= now:
                w.state = WorkerState.READY
                w.idle_since = w.ready_at
                changed = True

        # Hand queued jobs, oldest first, to warm workers (active ones first, as RunPod prefers them).
        idle = sorted(
            (w for w in ep.spare.values() if w.state is WorkerState.READY), key=lambda w: (not w.active, w.ready_at)
        )
        while ep.queue and idle:
            self._start(self.jobs[ep.queue.popleft()], idle.pop(0))
            changed = True

        for w in list(ep.spare.values()):
            if w.state is WorkerState.READY and not w.active and now - w.idle_since >= s.idle_timeout_seconds:
                ep.remove(w)
                changed = True

        # Keep exactly workers_min active workers, promoting or demoting flex ones before starting new ones.
        # The passes over every worker run only when the count is off (workers_min changed, or an
        # active worker was stopped), and go oldest first.
        cap = max(s.workers_max, s.workers_min)
        if len(ep.active) > s.workers_min:
            for w in [w for w in ep.workers.values() if w.active][s.workers_min :]:
                ep.set_active(w, False)
                w.idle_since = now
        elif len(ep.active) < s.workers_min:
            for w in [w for w in ep.workers.values() if not w.active][: s.workers_min - len(ep.active)]:
                ep.set_active(w, True)
        warm_now = False
        while len(ep.active) < s.workers_min:
            warm_now |= self._add_worker(ep, now, active=True, blocked=blocked)

        # Scale up for queued jobs that no starting worker will cover; lowPriority jobs never scale up.
        demand = sum(not self.jobs[job_id].request.low_priority for job_id in ep.queue)
        coming = sum(
            w.state in (WorkerState.INITIALIZING, WorkerState.THROTTLED, WorkerState.UNHEALTHY)
            for w in ep.spare.values()
        )
        for _ in range(min(demand - coming, cap - len(ep.workers))):
            warm_now |= self._add_worker(ep, now, active=False, blocked=blocked)
        # Crash-looping or throttled flex workers with nothing to do are given up on.
        surplus = coming - demand
        for w in list(ep.spare.values()):
            if surplus <= 0:
                break
            if not w.active and w.state in (WorkerState.THROTTLED, WorkerState.UNHEALTHY):
                ep.remove(w)
                surplus -= 1
        if changed:
            self.changed.fire()
        return warm_now

    def _apply_idle_cuts(self, ep: Endpoint, now: float) -> None:
        """RunPod lowers an idle endpoint's max workers by itself (to 2 after 3 days, 0 after 7), and the
        lower value stays: a client must read the endpoint back rather than trust its last write."""
        if ep.queue or ep.running or ep.idle_cuts >= len(IDLE_CUTS):
            return
        for after, limit in IDLE_CUTS[ep.idle_cuts :]:
            if now - ep.last_active < after:
                break
            ep.idle_cuts += 1
            if ep.settings.workers_max > limit:
                log.info("endpoint %s idle for %.0f days: max workers %d -> %d",
                         ep.id, after / 86400, ep.settings.workers_max, limit)
                ep.settings = replace(ep.settings, workers_max=limit)
                self.changed.fire()

    def _add_worker(self, ep: Endpoint, now: float, *, active: bool, blocked: WorkerState | None) -> bool:
        worker = Worker(
            id=_new_worker_id(),
            state=blocked or WorkerState.INITIALIZING,
            active=active,
            ready_at=now + ep.settings.cold_start_seconds,
            created_at=now,
        )
        ep.add(worker)
        self.changed.fire()
        return worker.state is WorkerState.INITIALIZING and worker.ready_at <= now
