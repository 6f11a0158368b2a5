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
from sqlalchemy import Engine

from jobs.backoff import PollSchedule
from jobs.db import make_engine
from jobs.endpoint_times import EndpointTimesCache
from jobs.metrics_recorder import NullRecorder, Recorder, RedisRecorder
from jobs.runpod import RunPodClient
from jobs.settings import Settings

log = logging.getLogger("rpq")

# Task names and their queues. Tasks are published by name so `jobs` never imports `tasks`.
SUBMIT_TASK = "rpq.submit"
POLL_TASK = "rpq.poll"
CANCEL_TASK = "rpq.cancel"
RECONCILE_TASK = "rpq.reconcile"
HEALTH_TASK = "rpq.health"
PURGE_TASK = "rpq.purge"

# Queues split by role so a flood of polls never starves submissions or maintenance.
SUBMIT_QUEUE = "rpq.submit"
POLL_QUEUE = "rpq.poll"
MAINTENANCE_QUEUE = "rpq.maintenance"
QUEUES = (SUBMIT_QUEUE, POLL_QUEUE, MAINTENANCE_QUEUE)

Publisher = Callable[[str, str, float | None], None]


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    publish: Publisher
    make_client: Callable[[], RunPodClient]
    schedule: PollSchedule = field(default_factory=PollSchedule)
    # With a webhook to wake it, polling is only the safety net: start later, settle at a minute.
    webhook_schedule: PollSchedule = field(default_factory=lambda: PollSchedule(first=5.0, base=5.0, cap=60.0))
    metrics: Recorder = field(default_factory=NullRecorder)
    # What each endpoint's recent jobs say about the next one (jobs.pollplan), kept ~30 s per endpoint.
    endpoint_times: EndpointTimesCache = field(default_factory=EndpointTimesCache)
    _client: RunPodClient | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def schedule_for(self, *, webhooks: bool) -> PollSchedule:
        return self.webhook_schedule if webhooks else self.schedule

    @property
    def runpod(self) -> RunPodClient:
        """One client per process: httpx clients are thread-safe and keep connections warm."""
        with self._lock:
            if self._client is None:
                self._client = self.make_client()
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self.engine.dispose()

    @classmethod
    def from_settings(cls, settings: Settings, *, celery_app: Any = None) -> Runtime:
        def make_client() -> RunPodClient:
            return RunPodClient(
                api_key=settings.require_api_key(),
                base_url=settings.runpod_serverless_url,
                timeout=httpx.Timeout(settings.runpod_timeout_seconds,
                                      connect=settings.runpod_connect_timeout_seconds),
            )

        return cls(
            settings=settings,
            engine=make_engine(settings.database_url),
            publish=celery_publisher(settings, celery_app),
            make_client=make_client,
            metrics=RedisRecorder(settings.celery_broker_url),
            schedule=PollSchedule(first=settings.poll_first_seconds, base=min(1.0, settings.poll_max_seconds),
                                  cap=settings.poll_max_seconds),
        )


def celery_publisher(settings: Settings, celery_app: Any = None) -> Publisher:
    """Publish a task by name with the job id as its only argument (Flower shows arguments)."""
    state: dict[str, Any] = {"app": celery_app}

    def publish(task: str, job_id: str, countdown: float | None) -> None:
        if state["app"] is None:
            from tasks.app import make_app

            state["app"] = make_app(settings)
        state["app"].send_task(task, args=[job_id], countdown=countdown)

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
