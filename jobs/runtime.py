"""What a process needs to run jobs: settings, a database engine, a RunPod client and a way to
publish Celery messages. Built once per process from the environment, or given explicitly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from celery import Celery
from sqlalchemy import Engine

from jobs.bucket.store import ObjectStore
from jobs.flow.backoff import PollSchedule
from jobs.flow.endpoint_times import EndpointTimesCache
from jobs.flow.wakeups import Wakeups
from jobs.observability.metrics_recorder import BufferedRecorder, NullRecorder, Recorder
from jobs.runpod.budget import RedisBudget
from jobs.runpod.client import RunPodClient
from jobs.runpod.cost import PriceCache
from jobs.runpod.management import RunPodGraphQL, RunPodManagement
from jobs.settings import Settings
from jobs.storage.db import make_engine
from jobs.tenants import SubmitRate

log = logging.getLogger("rpq")

# Task names and their queues. Tasks are published by name so `jobs` never imports `tasks`.
DISPATCH_TASK = "rpq.dispatch"  # argument: an endpoint id; sends that endpoint's PENDING jobs
POLL_DUE_TASK = "rpq.poll_due"  # argument: an endpoint id; polls that endpoint's jobs that are due
SUBMIT_TASK = "rpq.submit"  # argument: a job id (still served, for messages published before 0.5)
POLL_TASK = "rpq.poll"  # argument: a job id; polls that one job now (a webhook's wake-up)
CANCEL_TASK = "rpq.cancel"
RECONCILE_TASK = "rpq.reconcile"
HEALTH_TASK = "rpq.health"
AUTOSCALE_TASK = "rpq.autoscale"  # no argument: one autoscaler round (jobs.runpod.autoscale), when RPQ_AUTOSCALE is set
COLLECT_TASK = "rpq.collect"  # no argument: every management collector once (jobs.runpod.collect)
PURGE_TASK = "rpq.purge"

# Queues split by role so a flood of polls never starves submissions or maintenance.
SUBMIT_QUEUE = "rpq.submit"
POLL_QUEUE = "rpq.poll"
MAINTENANCE_QUEUE = "rpq.maintenance"
QUEUES = (SUBMIT_QUEUE, POLL_QUEUE, MAINTENANCE_QUEUE)
ROUTES = {
    DISPATCH_TASK: SUBMIT_QUEUE,
    SUBMIT_TASK: SUBMIT_QUEUE,
    CANCEL_TASK: SUBMIT_QUEUE,  # user-facing, like submits
    POLL_DUE_TASK: POLL_QUEUE,
    POLL_TASK: POLL_QUEUE,
    RECONCILE_TASK: MAINTENANCE_QUEUE,
    HEALTH_TASK: MAINTENANCE_QUEUE,
    COLLECT_TASK: MAINTENANCE_QUEUE,
    AUTOSCALE_TASK: MAINTENANCE_QUEUE,
    PURGE_TASK: MAINTENANCE_QUEUE,
}
#: Every countdown and task runtime stays far below this, or Redis re-delivers held messages.
VISIBILITY_TIMEOUT_SECONDS = 1800


def broker_transport_options() -> dict[str, Any]:
    """How every process talks to the broker, the workers and the processes that only publish alike."""
    return {
        "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,  # > longest countdown + task runtime
        "socket_timeout": 30,  # a broker that vanishes without closing TCP must not hang a worker
        "socket_connect_timeout": 10,
        "socket_keepalive": True,
        "health_check_interval": 25,  # detects a dead connection instead of silently not consuming
    }

Publisher = Callable[[str, str, float | None], None]


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    publish: Publisher
    make_client: Callable[[], RunPodClient]
    schedule: PollSchedule = field(default_factory=PollSchedule)
    # With a webhook to wake it, polling is only the safety net against a lost webhook: start later and
    # settle at five minutes, well inside RunPod's 30-minute result retention. At 10,000 jobs a one-minute
    # net alone would ask for more /status calls than the budget holds.
    webhook_schedule: PollSchedule = field(default_factory=lambda: PollSchedule(first=5.0, base=10.0, cap=300.0))
    metrics: Recorder = field(default_factory=NullRecorder)
    # None: every wake-up is published, undeduplicated (tests that record messages).
    wakeups: Wakeups | None = None
    # What each endpoint's recent jobs say about the next one (jobs.flow.pollplan), kept ~30 s per endpoint.
    endpoint_times: EndpointTimesCache = field(default_factory=EndpointTimesCache)
    # Each endpoint's GPU list price, from what the collectors stored, kept ~60 s (jobs.runpod.cost).
    prices: PriceCache = field(default_factory=PriceCache)
    # Tenants' submits per minute, counted in Redis (jobs.tenants); None: built on first use, on the broker.
    submit_rate_counter: SubmitRate | None = field(default=None, repr=False)
    _client: RunPodClient | None = field(default=None, init=False, repr=False)
    _objects: ObjectStore | None = field(default=None, init=False, repr=False)
    _management: RunPodManagement | None = field(default=None, init=False, repr=False)
    _graphql: RunPodGraphQL | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.wakeups is None:
            self.wakeups = Wakeups(self.publish)

    def schedule_for(self, *, webhooks: bool) -> PollSchedule:
        return self.webhook_schedule if webhooks else self.schedule

    def wake(self, task: str, endpoint_id: str, in_seconds: float = 0.0) -> None:
        """Ask for `task` (DISPATCH_TASK or POLL_DUE_TASK) to run for the endpoint within `in_seconds`."""
        assert self.wakeups is not None
        self.wakeups.wake(task, endpoint_id, in_seconds)

    @property
    def runpod(self) -> RunPodClient:
        """One client per process: httpx clients are thread-safe and keep connections warm."""
        with self._lock:
            if self._client is None:
                self._client = self.make_client()
            return self._client

    @property
    def objects(self) -> ObjectStore:
        """The bucket files live in, built on first use; FilesNotConfigured (naming RPQ_S3_BUCKET) when none is set."""
        with self._lock:
            if self._objects is None:
                self._objects = ObjectStore.from_settings(self.settings)
            return self._objects

    @property
    def management(self) -> RunPodManagement:
        """RunPod's management API (REST v2: endpoints, workers, catalog, billing, pods), built on first use."""
        with self._lock:
            if self._management is None:
                self._management = RunPodManagement(api_key=self.settings.require_api_key(),
                                                    base_url=self.settings.runpod_rest_url)
            return self._management

    @property
    def graphql(self) -> RunPodGraphQL:
        """RunPod's GraphQL API, for the account's balance and spend rate alone (v2 has neither)."""
        with self._lock:
            if self._graphql is None:
                self._graphql = RunPodGraphQL(api_key=self.settings.require_api_key(),
                                              url=self.settings.runpod_graphql_url)
            return self._graphql

    @property
    def submit_rate(self) -> SubmitRate:
        """The counter of tenants' submits per minute, shared through Redis by every API process."""
        with self._lock:
            if self.submit_rate_counter is None:
                self.submit_rate_counter = SubmitRate(self.settings.celery_broker_url)
            return self.submit_rate_counter

    @property
    def has_files(self) -> bool:
        return self.settings.s3_bucket is not None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.submit_rate_counter is not None:
            self.submit_rate_counter.close()
        for api in (self._management, self._graphql):
            if api is not None:
                api.close()
        self.engine.dispose()

    @classmethod
    def from_settings(cls, settings: Settings, *, publish: Publisher | None = None) -> Runtime:
        """The runtime of a process. `publish` sends Celery messages (default: a publish-only Celery
        app on the broker; a worker passes its own app's, so it keeps one connection pool)."""
        def make_client() -> RunPodClient:
            return RunPodClient(
                api_key=settings.require_api_key(),
                base_url=settings.runpod_serverless_url,
                timeout=httpx.Timeout(settings.runpod_timeout_seconds,
                                      connect=settings.runpod_connect_timeout_seconds),
                # One budget of RunPod requests for every process on this broker: rpq never draws a 429.
                budget=RedisBudget(settings.celery_broker_url, settings.runpod_limits),
            )

        publish = publish or celery_publisher(settings)
        return cls(
            settings=settings,
            engine=make_engine(settings.database_url),
            publish=publish,
            make_client=make_client,
            metrics=BufferedRecorder(settings.celery_broker_url),
            wakeups=Wakeups(publish, settings.celery_broker_url),
            schedule=PollSchedule(first=settings.poll_first_seconds, base=min(1.0, settings.poll_max_seconds),
                                  cap=settings.poll_max_seconds),
        )


def celery_publisher(settings: Settings) -> Publisher:
    """Publish a task by name, routed to its queue, with one id (a job's or an endpoint's) as its only
    argument (Flower shows arguments). The Celery app is publish-only and built on first use: `jobs`
    never imports `tasks`, where the tasks themselves live."""
    state: dict[str, Celery] = {}
    lock = threading.Lock()

    def app() -> Celery:
        with lock:
            if "app" not in state:
                celery = Celery("rpq-publisher", broker=settings.celery_broker_url, set_as_current=False)
                celery.conf.update(
                    broker_transport_options=broker_transport_options(),
                    broker_connection_retry_on_startup=True,
                    task_serializer="json",
                    task_routes={task: {"queue": queue} for task, queue in ROUTES.items()},
                    task_send_sent_event=True,  # Flower's live view
                )
                state["app"] = celery
            return state["app"]

    def publish(task: str, ident: str, countdown: float | None) -> None:
        app().send_task(task, args=[ident], countdown=countdown)

    return publish


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime(factory: Callable[[], Runtime] | None = None) -> Runtime:
    """This process's runtime, built on first use by `factory` (default: from the environment)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = factory() if factory else Runtime.from_settings(Settings.from_env())
        return _runtime


def set_runtime(runtime: Runtime | None) -> Runtime | None:
    """Install `runtime` for this process (tests, embedding apps); returns the previous one."""
    global _runtime
    with _runtime_lock:
        previous, _runtime = _runtime, runtime
        return previous
