"""Deleting what is older than RUNPOD_JOB_RETENTION_DAYS: finished jobs with their events, and health
rows. In small batches, each its own short transaction, so no lock is held for long."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlmodel import col, select

from jobs.runpod import health
from jobs.runtime import Runtime
from jobs.states import TERMINAL
from jobs.storage.db import session_scope
from jobs.storage.locks import held
from jobs.storage.models import JobEvent, JobRow, utcnow

LOCK = "retention"


@dataclass
class Purged:
    jobs: int = 0
    health_rows: int = 0
    skipped: bool = False


def purge(rt: Runtime, *, now: datetime | None = None, batch: int = 500) -> Purged:
    cutoff = (now or utcnow()) - timedelta(days=rt.settings.runpod_job_retention_days)
    result = Purged()
    # Renewed every batch: a holder killed mid-run delays the next one by minutes, not an hour.
    with held(rt.engine, LOCK, lease=timedelta(minutes=5)) as mine:
        if not mine:
            return Purged(skipped=True)
        while mine.renew():
            with session_scope(rt.engine) as session:
                ids = session.exec(
                    select(JobRow.id).where(col(JobRow.status).in_(sorted(TERMINAL)),
                                            col(JobRow.finished_at) < cutoff).limit(batch)
                ).all()
                if ids:
                    session.execute(delete(JobEvent).where(col(JobEvent.job_id).in_(ids)))
                    session.execute(delete(JobRow).where(col(JobRow.id).in_(ids),
                                                         col(JobRow.status).in_(sorted(TERMINAL))))
            result.jobs += len(ids)
            if len(ids) < batch:
                break
        while mine.renew():
            with session_scope(rt.engine) as session:
                deleted = health.purge_before(session, cutoff, batch=batch)
            result.health_rows += deleted
            if deleted < batch:
                break
    return result
