"""The Celery tasks: thin adapters over `jobs.flow.dispatch`, `jobs.flow.poller`,
`jobs.flow.lifecycle` and `jobs.flow.reconcile`.

Each takes one id (a job's or an endpoint's; never an input or a key: Flower shows arguments), calls
one function, and schedules what that function asks for. Nothing here decides anything about a job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from jobs.flow import dispatch as dispatching
from jobs.flow import lifecycle, poller
from jobs.flow.reconcile import reconcile_on_schedule
from jobs.observability import logcontext
from jobs.runpod import autoscale as autoscaler
from jobs.runpod import collect as collectors
from jobs.runpod import health as endpoint_health
from jobs.runtime import (
    AUTOSCALE_TASK,
    CANCEL_TASK,
    COLLECT_TASK,
    DISPATCH_TASK,
    HEALTH_TASK,
    POLL_DUE_TASK,
    POLL_TASK,
    PURGE_TASK,
    RECONCILE_TASK,
    SUBMIT_TASK,
    Runtime,
)
from jobs.runtime import get_runtime as _get_runtime
from jobs.settings import Settings
from jobs.storage import retention
from tasks.app import app

log = logging.getLogger("rpq.tasks")


def _publish(task: str, ident: str, countdown: float | None) -> None:
    app.send_task(task, args=[ident], countdown=countdown)


def get_runtime() -> Runtime:
    """The worker process's runtime; it publishes through this Celery app rather than a second one."""
    return _get_runtime(lambda: Runtime.from_settings(Settings.from_env(), publish=_publish))


@app.task(name=DISPATCH_TASK)  # type: ignore[untyped-decorator]
def dispatch(endpoint_id: str) -> None:
    _endpoint_chain(DISPATCH_TASK, endpoint_id, dispatching.dispatch)


@app.task(name=POLL_DUE_TASK)  # type: ignore[untyped-decorator]
def poll_due(endpoint_id: str) -> None:
    _endpoint_chain(POLL_DUE_TASK, endpoint_id, poller.poll_due)


def _endpoint_chain(task: str, endpoint_id: str, run: Callable[[Runtime, str], Any]) -> None:
    """One run of an endpoint's dispatcher or poller, then its next wake-up if it asks for one."""
    rt = get_runtime()
    assert rt.wakeups is not None
    rt.wakeups.started(task, endpoint_id)  # before the table is read: a row added after gets a new wake-up
    with logcontext.scope():
        outcome = run(rt, endpoint_id)
    log.debug("%s %s: %s", task, endpoint_id, outcome.reason)
    if outcome.again_in is not None:
        # Published before this message is acked (acks_late): a crash in between duplicates the
        # wake-up, which finds nothing claimable, and never loses it.
        rt.wake(task, endpoint_id, outcome.again_in)


@app.task(name=SUBMIT_TASK)  # type: ignore[untyped-decorator]
def submit(job_id: str) -> None:
    """One job's submit: the message of rpq before the dispatcher, still served during an upgrade."""
    rt = get_runtime()
    with logcontext.scope():
        step = lifecycle.submit_job(rt, job_id)
    _follow_by_table(rt, job_id, step)


@app.task(name=POLL_TASK)  # type: ignore[untyped-decorator]
def poll(job_id: str) -> None:
    """Poll one job now: a webhook's wake-up. Its later polls are the poller's."""
    rt = get_runtime()
    with logcontext.scope():
        step = lifecycle.poll_job(rt, job_id)
    _follow_by_table(rt, job_id, step)


def _follow_by_table(rt: Runtime, job_id: str, step: lifecycle.Next) -> None:
    """After one job's step, its schedule is in the table: wake whichever role it is due with."""
    log.debug("%s: %s", job_id, step.reason)
    if step.poll_in is None and step.again_in is None:
        return
    endpoint_id = lifecycle.endpoint_of(rt, job_id)
    if endpoint_id is None:
        return
    if step.poll_in is not None:
        rt.wake(POLL_DUE_TASK, endpoint_id, step.poll_in)
    if step.again_in is not None:
        rt.wake(DISPATCH_TASK, endpoint_id, step.again_in)


@app.task(name=CANCEL_TASK, bind=True, max_retries=20)  # type: ignore[untyped-decorator]
def cancel(self: Any, job_id: str) -> None:
    with logcontext.scope():
        step = lifecycle.cancel_on_runpod(get_runtime(), job_id)
    log.debug("%s %s: %s", self.name, job_id, step.reason)
    if step.again_in is not None:
        raise self.retry(countdown=step.again_in, max_retries=None)


@app.task(name=RECONCILE_TASK)  # type: ignore[untyped-decorator]
def reconcile() -> dict[str, int] | None:
    """One reconciler round; what Flower (and the worker's log) shows is what it rebuilt (None: another round holds
    the lease)."""
    report = reconcile_on_schedule(get_runtime())
    if report.skipped:
        return None
    return {"woke_dispatch": len(report.woke_dispatch), "woke_poller": len(report.woke_poller),
            "marked_unknown": len(report.marked_unknown), "recancelled": len(report.recancelled)}


@app.task(name=HEALTH_TASK)  # type: ignore[untyped-decorator]
def health() -> None:
    endpoint_health.collect_on_schedule(get_runtime())


@app.task(name=COLLECT_TASK)  # type: ignore[untyped-decorator]
def collect() -> list[dict[str, Any]] | None:
    """One round of the management collectors; what Flower shows is each one's outcome (None: another round
    holds the lease). No arguments: the key is the worker's own, from its environment."""
    done = collectors.collect_on_schedule(get_runtime())
    return None if done is None else [asdict(run) for run in done]


@app.task(name=AUTOSCALE_TASK)  # type: ignore[untyped-decorator]
def autoscale() -> dict[str, str] | None:
    """One autoscaler round; what Flower shows is each endpoint's decision or outcome (None: off, or another
    round holds the lease)."""
    done = autoscaler.autoscale_on_schedule(get_runtime())
    return None if done is None else {name: str(getattr(what, "message", what)) for name, what in done.items()}


@app.task(name=PURGE_TASK)  # type: ignore[untyped-decorator]
def purge() -> dict[str, Any]:
    """One retention run. Its result (counts, and why objects could not be deleted) is what Flower shows; a run
    that kept rows for want of a bucket has also logged a warning."""
    purged = retention.purge(get_runtime(), keep_for=timedelta(seconds=0.8 * retention.INTERVAL_SECONDS))
    if purged.jobs or purged.health_rows or purged.uploads or purged.snapshot_rows:
        log.info("retention: deleted %d jobs, %d unused uploads, %d health rows and %d collector rows, and %d "
                 "objects in the bucket", purged.jobs, purged.uploads, purged.health_rows, purged.snapshot_rows,
                 purged.objects)
    return asdict(purged)
