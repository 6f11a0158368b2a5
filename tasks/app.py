"""Celery configuration. Every setting that guards against loss says why in one line.

Background: Redis holds only wake-ups; the SQL job table is the record of truth, so every
message may be lost or delivered twice and the tasks are written to survive both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

from celery import Celery
from celery.apps import worker as celery_worker
from celery.apps.beat import Beat
from celery.apps.worker import Worker
from celery.signals import after_setup_logger, after_setup_task_logger
from kombu import Queue
from kombu.utils.objects import cached_property

from jobs.observability import logcontext, logs
from jobs.runtime import (
    AUTOSCALE_TASK,
    COLLECT_TASK,
    HEALTH_TASK,
    PURGE_TASK,
    QUEUES,
    RECONCILE_TASK,
    ROUTES,
    SUBMIT_QUEUE,
    VISIBILITY_TIMEOUT_SECONDS,
    broker_transport_options,
)
from jobs.settings import Settings
from jobs.storage import retention


def _every(task: str, seconds: int) -> dict[str, Any]:
    return {"task": task, "schedule": float(seconds), "options": {"expires": float(seconds)}}


def task_time_limits(settings: Settings) -> tuple[float, float]:
    """Every task's soft and hard limits. RunPod calls are short; a stuck one is cut long before the VT, but never
    a /run that is still within its own bound (cutting it would make its outcome unknown for nothing)."""
    return max(120.0, settings.submit_bound_seconds + 15), max(180.0, settings.submit_bound_seconds + 75)


def collect_time_limits(settings: Settings) -> dict[str, float]:
    """The collectors' round may take most of its interval (its lease is 0.8 of it), never less than other tasks."""
    soft, hard = task_time_limits(settings)
    longer = max(soft, settings.runpod_collection_interval_seconds * 0.8)
    return {"soft_time_limit": longer, "time_limit": hard + (longer - soft)}


class _Worker(Worker):  # type: ignore[misc]
    def on_before_init(self, quiet: bool = False, **kwargs: Any) -> None:
        # Celery warns (running as root, say) before it sets up logging: those lines are formatted too.
        logging.captureWarnings(True)
        logs.install_handler(logging.getLogger())  # until Celery replaces it with its own
        json = logs.log_settings()[0] == "json"
        if json:
            celery_worker.safe_say = _say_in_json
        super().on_before_init(quiet=quiet or json, **kwargs)


def _say_in_json(msg: str, f: Any = sys.__stderr__) -> None:
    """Celery's worker prints what its signal handlers have to say ("worker: Warm shutdown") past logging, which a
    signal handler must not take a lock of: as a JSON line, written as Celery's own is, it is one a pipeline reads."""
    line = logs.JsonFormatter().format(logging.makeLogRecord(
        {"name": "celery.apps.worker", "levelname": "INFO", "levelno": logging.INFO, "msg": msg}))
    with contextlib.suppress(OSError, AttributeError, ValueError):
        os.write(f.fileno(), f"{line}\n".encode())


class _Beat(Beat):  # type: ignore[misc]
    def __init__(self, *args: Any, quiet: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, quiet=quiet or logs.log_settings()[0] == "json", **kwargs)


class _Celery(Celery):  # type: ignore[misc]
    """Celery, but with RPQ_LOG_FORMAT=json every line its worker and beat write is a JSON object: no start-up
    banner (as `celery -q` would; Celery logs that it is ready all the same), and what the worker's signal handlers
    print is a JSON line too."""

    @cached_property  # type: ignore[untyped-decorator]
    def Worker(self) -> Any:
        return self.subclass_with_self(_Worker)

    @cached_property  # type: ignore[untyped-decorator]
    def Beat(self) -> Any:
        return self.subclass_with_self(_Beat)


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    celery = _Celery("rpq", broker=settings.celery_broker_url, include=["tasks.jobs"])
    celery.conf.update(
        broker_transport_options=broker_transport_options(),
        result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
        visibility_timeout=VISIBILITY_TIMEOUT_SECONDS,  # Celery reads it in all three places
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # the SQL table holds results; no result backend to fill
        task_serializer="json",
        accept_content=["json"],  # never unpickle a message
        task_acks_late=True,  # a task killed mid-run is re-delivered, not dropped
        task_retry_on_worker_lost=True,  # a pool child killed by SIGKILL/OOM is retried, bounded
        task_reject_on_worker_lost=False,  # no unbounded requeue loop on Redis
        worker_prefetch_multiplier=1,  # a busy worker does not sit on messages others could run
        # Countdown messages are few (one wake-up per endpoint and role: waits live in the table), so
        # this bound is a backstop, not a working limit.
        worker_eta_task_limit=1000,
        worker_enable_soft_shutdown_on_idle=True,  # held countdown messages go back to Redis on shutdown
        worker_soft_shutdown_timeout=10,
        worker_cancel_long_running_tasks_on_connection_loss=True,  # no double run after a reconnect
        worker_consumer="tasks.consumer:Consumer",  # reconnects when Redis goes away while it holds countdowns
        task_soft_time_limit=task_time_limits(settings)[0],
        task_time_limit=task_time_limits(settings)[1],
        # A collectors' round calls RunPod's management API a few times per endpoint, within its rate limit (60
        # a minute by default): with many endpoints that is minutes. Cut at the general limit, a round would
        # stop at the same endpoint every time, and the later ones would never be collected.
        task_annotations={COLLECT_TASK: collect_time_limits(settings)},
        task_default_queue=SUBMIT_QUEUE,
        task_queues=[Queue(name) for name in QUEUES],
        task_routes={task: {"queue": queue} for task, queue in ROUTES.items()},
        # Each periodic task expires after its own interval: a backlog of them is pointless, the
        # next run sees everything. Each also holds a lease in the database, so two beats are safe.
        beat_schedule={
            "reconcile": _every(RECONCILE_TASK, settings.reconcile_interval_seconds),
            "endpoint-health": _every(HEALTH_TASK, settings.runpod_health_poll_seconds),
            "runpod-collectors": _every(COLLECT_TASK, settings.runpod_collection_interval_seconds),
            # Beside the health round: the autoscaler decides on live workers and rpq's queue (a no-op when
            # RPQ_AUTOSCALE names no endpoint).
            "autoscaler": _every(AUTOSCALE_TASK, settings.runpod_health_poll_seconds),
            "retention": _every(PURGE_TASK, retention.INTERVAL_SECONDS),
        },
        worker_send_task_events=True,  # Flower's live view
        task_send_sent_event=True,
    )
    return celery


def _tag_log_lines_with_the_job(logger: Any, **_: Any) -> None:
    """Celery has set up the worker's (or beat's) handlers, at its --loglevel: they write in RPQ_LOG_FORMAT, with the
    job's tags. Celery keeps sending what is printed to stdout to its logger, so that is formatted alike."""
    logcontext.install(logger)


after_setup_logger.connect(_tag_log_lines_with_the_job, weak=False)
after_setup_task_logger.connect(_tag_log_lines_with_the_job, weak=False)


app = make_app()
