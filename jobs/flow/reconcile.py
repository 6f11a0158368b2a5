"""The reconciler: rebuild every lost wake-up from the job table alone.

Redis may lose any message (a worker killed with SIGKILL holding countdown polls, a FLUSHALL, a
publish that failed after the row was committed). Run periodically by beat, this finds:

* endpoints with PENDING rows overdue for submission: wake their dispatcher;
* SUBMITTING rows older than any live submit could be (past the client's own bound on a /run, so
  never while its answer can still come): the worker died mid-call, so whether RunPod got the job
  is unknown. Mark them SUBMIT_UNKNOWN; never resubmit (a late answer or webhook still adopts it);
* endpoints with IN_QUEUE / IN_PROGRESS rows whose poll is overdue: wake their poller;
* open rows of the cancel outbox whose task is overdue: publish the cancel again.

Every action is idempotent (the tasks compare-and-set), and a lease in the database lets only one
reconciler act at a time, so a run that overlaps the last never acts twice; beat's rounds keep the lease for
most of their interval, so two beats act once per interval between them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, update
from sqlmodel import col, or_, select

from jobs.flow.lifecycle import adopt_named
from jobs.runtime import CANCEL_TASK, DISPATCH_TASK, POLL_DUE_TASK, Runtime
from jobs.states import AT_RUNPOD, JobStatus
from jobs.storage.db import session_scope
from jobs.storage.locks import Lease, held
from jobs.storage.models import JobRow, RunPodCancel, utcnow
from jobs.storage.store import Source, transition

log = logging.getLogger("rpq.reconcile")


LOCK = "reconciler"
#: The reconciler's lease: short, so a worker killed mid-run (holding it) delays the next run by
#: at most this, and renewed every RENEW_EVERY rows, so a long run keeps it.
MIN_LEASE = timedelta(seconds=10)
RENEW_EVERY = 100


def lease_for(rt: Runtime) -> timedelta:
    return max(MIN_LEASE, timedelta(seconds=2 * rt.settings.reconcile_interval_seconds))


@dataclass
class Report:
    skipped: bool = False  # another reconciler held the lease
    woke_dispatch: list[str] = field(default_factory=list)  # endpoint ids
    woke_poller: list[str] = field(default_factory=list)  # endpoint ids
    marked_unknown: list[str] = field(default_factory=list)  # job ids
    recancelled: list[str] = field(default_factory=list)  # job ids
    publish_failures: int = 0

    @property
    def acted(self) -> bool:
        return bool(self.woke_dispatch or self.woke_poller or self.marked_unknown or self.recancelled)


def reconcile(rt: Runtime, *, now: datetime | None = None, limit: int = 1000,
              keep_for: timedelta = timedelta(0)) -> Report:
    """One run, unless another holds the lease. `keep_for`: see `reconcile_on_schedule`."""
    with held(rt.engine, LOCK, lease=lease_for(rt), keep_for=keep_for) as lease:
        if not lease:
            return Report(skipped=True)
        return _reconcile(rt, lease, now=now or utcnow(), limit=limit)


def reconcile_on_schedule(rt: Runtime) -> Report:
    """Beat's round. Every beat sends one per interval, so the lease is kept for most of the interval after the
    round began: with two beats, the second one's round of the same interval skips instead of running again."""
    return reconcile(rt, keep_for=timedelta(seconds=0.8 * rt.settings.reconcile_interval_seconds))


def _reconcile(rt: Runtime, lease: Lease, *, now: datetime, limit: int) -> Report:
    grace = timedelta(seconds=rt.settings.poll_grace_seconds)
    stuck = timedelta(seconds=rt.settings.submit_stuck_after_seconds)
    report = Report()
    due = func.coalesce(col(JobRow.next_poll_at), col(JobRow.updated_at))

    with session_scope(rt.engine, read_only=True) as session:
        pending = session.exec(
            select(JobRow.endpoint_id).where(JobRow.status == JobStatus.PENDING, due < now - grace).distinct()
        ).all()
        submitting = session.exec(
            select(JobRow.id).where(JobRow.status == JobStatus.SUBMITTING, col(JobRow.updated_at) < now - stuck)
            .limit(limit)
        ).all()
        polling = session.exec(
            select(JobRow.endpoint_id).where(
                col(JobRow.status).in_(sorted(AT_RUNPOD)),
                or_(col(JobRow.next_poll_at).is_(None), col(JobRow.next_poll_at) < now - grace),
            ).distinct()
        ).all()
        cancels = session.exec(
            select(RunPodCancel.job_id).where(col(RunPodCancel.done_at).is_(None),
                                              col(RunPodCancel.next_try_at) < now - grace).distinct().limit(limit)
        ).all()

    def still_mine(done: int) -> bool:
        """Renew the lease every RENEW_EVERY rows; False once another reconciler has it."""
        return done % RENEW_EVERY != RENEW_EVERY - 1 or lease.renew()

    for done, job_id in enumerate(submitting):
        if not still_mine(done):
            return report
        with session_scope(rt.engine) as session:
            moved = transition(
                session, job_id, to=JobStatus.SUBMIT_UNKNOWN, source=Source.RECONCILER,
                expected={JobStatus.SUBMITTING},
                detail=f"submit in flight for over {stuck.total_seconds():.0f}s, longer than any /run can take: "
                       "its worker died mid-call, so RunPod may or may not have the job; not resubmitted: "
                       "adopted if RunPod's answer or webhook still comes, else an operator decides",
            )
        if moved is not None:
            report.marked_unknown.append(job_id)
            adopt_named(rt, job_id)  # its webhook may already have named the RunPod job

    # A wake-up per endpoint, not a message per job: the dispatcher and the poller read the table.
    for task, endpoint_ids, woken in ((DISPATCH_TASK, pending, report.woke_dispatch),
                                      (POLL_DUE_TASK, polling, report.woke_poller)):
        for endpoint_id in endpoint_ids:
            try:
                rt.wake(task, endpoint_id)
            except Exception:
                report.publish_failures += 1
                log.warning("reconciler could not publish %s for endpoint %s", task, endpoint_id, exc_info=True)
                continue
            woken.append(endpoint_id)

    if not lease.renew():
        return report
    for done, job_id in enumerate(cancels):
        if not still_mine(done):
            return report
        if not _publish(rt, report, CANCEL_TASK, job_id):
            continue
        report.recancelled.append(job_id)
        with session_scope(rt.engine) as session:
            # Not again for a while: the task may just be waiting its turn, or RunPod its recovery.
            session.execute(update(RunPodCancel).where(col(RunPodCancel.job_id) == job_id,
                                                       col(RunPodCancel.done_at).is_(None))
                            .values(next_try_at=now + 5 * grace))

    if report.acted:
        log.info("reconciler: woke the dispatcher of %s and the poller of %s (their work was overdue: a wake-up "
                 "was lost), marked %d SUBMIT_UNKNOWN, re-sent %d cancels", report.woke_dispatch or "none",
                 report.woke_poller or "none", len(report.marked_unknown), len(report.recancelled))
    return report


def _publish(rt: Runtime, report: Report, task: str, job_id: str) -> bool:
    """Send a wake-up again; a failure is counted and logged, and the next run tries again."""
    try:
        rt.publish(task, job_id, None)
    except Exception:
        report.publish_failures += 1
        log.warning("reconciler could not publish %s for %s", task, job_id, exc_info=True)
        return False
    return True
