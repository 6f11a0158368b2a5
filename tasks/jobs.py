"""The Celery tasks: thin adapters over `jobs.lifecycle` and `jobs.reconcile`.

Each takes a job id (never an input or a key: Flower shows arguments), calls one function, and
schedules what that function asks for. Nothing here decides anything about a job.
"""

from __future__ import annotations

import logging
from typing import Any

from jobs import health as endpoint_health
from jobs import lifecycle, logcontext, retention
from jobs.reconcile import reconcile as reconcile_jobs
from jobs.runtime import CANCEL_TASK, HEALTH_TASK, POLL_TASK, PURGE_TASK, RECONCILE_TASK, SUBMIT_TASK, Runtime
from jobs.runtime import get_runtime as _get_runtime
from jobs.settings import Settings
from tasks.app import app

log = logging.getLogger("rpq.tasks")


def get_runtime() -> Runtime:
    """The worker process's runtime; it publishes through this Celery app rather than a second one."""
    return _get_runtime(lambda: Runtime.from_settings(Settings.from_env(), celery_app=app))


def _follow(task: Any, job_id: str, step: lifecycle.Next) -> None:
    log.debug("%s %s: %s", task.name, job_id, step.reason)
    if step.poll_in is not None:
        # Published before this message is acked (acks_late): a crash in between duplicates the
        # poll, which its claim makes harmless, and never loses it.
        poll.apply_async((job_id,), countdown=step.poll_in)
    if step.again_in is not None:
        raise task.retry(countdown=step.again_in, max_retries=None)


@app.task(name=SUBMIT_TASK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def submit(self: Any, job_id: str) -> None:
    with logcontext.scope():
        _follow(self, job_id, lifecycle.submit_job(get_runtime(), job_id))


@app.task(name=POLL_TASK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def poll(self: Any, job_id: str) -> None:
    with logcontext.scope():
        step = lifecycle.poll_job(get_runtime(), job_id)
    log.debug("%s %s: %s", self.name, job_id, step.reason)
    if step.poll_in is not None:
        # Re-enqueue itself: same task id, so one chain per job shows in Flower.
        raise self.retry(countdown=step.poll_in, max_retries=None)


@app.task(name=CANCEL_TASK, bind=True, max_retries=20)  # type: ignore[untyped-decorator]
def cancel(self: Any, job_id: str) -> None:
    with logcontext.scope():
        _follow(self, job_id, lifecycle.cancel_on_runpod(get_runtime(), job_id))


@app.task(name=RECONCILE_TASK)  # type: ignore[untyped-decorator]
def reconcile() -> None:
    reconcile_jobs(get_runtime())


@app.task(name=HEALTH_TASK)  # type: ignore[untyped-decorator]
def health() -> None:
    endpoint_health.collect_on_schedule(get_runtime())


@app.task(name=PURGE_TASK)  # type: ignore[untyped-decorator]
def purge() -> None:
    purged = retention.purge(get_runtime())
    if purged.jobs or purged.health_rows:
        log.info("retention: deleted %d jobs and %d health rows", purged.jobs, purged.health_rows)
