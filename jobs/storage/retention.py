"""Deleting what is older than RUNPOD_JOB_RETENTION_DAYS: finished jobs with their events and their objects in
the bucket, direct-upload reservations no job used with their objects, health rows, and what the management
collectors stored (snapshots, GPU prices, billed hours, collector runs). In small batches, each its own short
transaction, so no lock is held for long (and none while the bucket is asked anything).

A job's objects go before its rows, never after: the rows are the only record of which objects rpq made
(`jobfiles.object_keys` derives every key from them), so rows deleted first would leave objects nobody could
name again. When the objects cannot be deleted, the rows stay, the run says so once (a warning, the
`rpq_retention_blocked_total` counter, and its result), and the next run tries again. Jobs that never had an
object are told apart by the batch's own query and cost no other query and no call to the bucket.

One race is left open on purpose: an operator retrying a job past retention in the moment between its objects
being deleted and its row (the row then stays, as it is no longer finished, but its inputs are gone: its next
/run fails saying which). Closing it would mean holding a write transaction across calls to the bucket, which
on SQLite stops every other writer for as long as the bucket takes to answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy import ColumnElement, and_, delete, func, or_
from sqlmodel import Session, SQLModel, col, select

from jobs.bucket import jobfiles
from jobs.bucket.store import ObjectStore
from jobs.errors import RpqError
from jobs.runpod import health
from jobs.runtime import Runtime
from jobs.states import TERMINAL
from jobs.storage import filerows
from jobs.storage.db import session_scope
from jobs.storage.locks import Lease, held
from jobs.storage.models import (
    AccountSnapshot,
    BillingRecordRow,
    CollectorRun,
    EndpointSnapshot,
    GpuPrice,
    JobRow,
    PodSnapshot,
    SpendHoldRow,
    Upload,
    utcnow,
)

log = logging.getLogger("rpq.retention")

LOCK = "retention"
#: How often beat sends a retention run.
INTERVAL_SECONDS = 3600
#: An unused upload's reservation outlives its URL by this much before it and its object go: a PUT or POST that
#: began just before the URL expired may still be arriving, and its client may still be about to submit.
UPLOAD_GRACE = timedelta(days=1)
#: The collectors' tables, each with the time its rows age by: a billed hour by its start, the rest by when seen.
#: The spend guard's spells go by when they ended (one still holding has no end, and stays).
SNAPSHOT_TABLES: tuple[tuple[type[SQLModel], str], ...] = (
    (EndpointSnapshot, "observed_at"), (AccountSnapshot, "observed_at"), (GpuPrice, "observed_at"),
    (PodSnapshot, "observed_at"), (BillingRecordRow, "start"), (CollectorRun, "at"), (SpendHoldRow, "ended_at"),
)
NO_BUCKET = "RPQ_S3_BUCKET is not set: set it to the bucket their files are in, and the next run deletes them"


@dataclass
class Purged:
    jobs: int = 0
    health_rows: int = 0
    snapshot_rows: int = 0  # the management collectors' rows, every table together
    uploads: int = 0  # reservations no job used, purged with their objects
    objects: int = 0  # objects deleted from the bucket, for jobs and uploads (absent ones included)
    # Past retention but kept, rows and all, because their objects could not be deleted (see objects_error).
    jobs_kept: int = 0
    uploads_kept: int = 0
    objects_error: str | None = None  # why: the store's error (operation, key, code; never a URL) or NO_BUCKET
    skipped: bool = False


def purge(rt: Runtime, *, now: datetime | None = None, batch: int = 500, keep_for: timedelta = timedelta(0)) -> Purged:
    """One retention run, unless another holds the lease. Beat's runs pass `keep_for` (most of INTERVAL_SECONDS):
    the lease then outlasts the run, so a second beat's run of the same hour skips."""
    now = now or utcnow()
    cutoff = now - timedelta(days=rt.settings.runpod_job_retention_days)
    result = Purged()
    bucket = _Bucket(rt)
    # Renewed every batch: a holder killed mid-run delays the next one by minutes, not an hour.
    with held(rt.engine, LOCK, lease=timedelta(minutes=5), keep_for=keep_for) as mine:
        if not mine:
            return Purged(skipped=True)
        _purge_jobs(rt, mine, bucket, cutoff, batch, result)
        _purge_uploads(rt, mine, bucket, now - UPLOAD_GRACE, batch, result)
        while mine.renew():
            with session_scope(rt.engine) as session:
                deleted = health.purge_before(session, cutoff, batch=batch)
            result.health_rows += deleted
            if deleted < batch:
                break
        for model, age in SNAPSHOT_TABLES:
            result.snapshot_rows += _purge_rows(mine, model, age, cutoff, batch)
    if bucket.error is not None:
        _report_kept(rt, bucket, cutoff, now - UPLOAD_GRACE, result)
    return result


def _purge_rows(mine: Lease, model: type[SQLModel], age: str, cutoff: datetime, batch: int) -> int:
    """Delete the rows of one table whose `age` column is before `cutoff`, `batch` at a time; how many."""
    key, moment = col(getattr(model, "id")), col(getattr(model, age))  # noqa: B009 (the tables differ)
    deleted = 0
    while mine.renew():
        with session_scope(mine.engine) as session:
            ids = session.exec(select(key).where(moment < cutoff).limit(batch)).all()
            if ids:
                session.execute(delete(model).where(key.in_(ids)))
        deleted += len(ids)
        if len(ids) < batch:
            break
    return deleted


class _Bucket:
    """The bucket as one run sees it. Given up on at its first failure: a store that is down then costs one
    failed call per run (each may take seconds of retries and timeouts), not one per batch, and the rest of the
    run goes on with what needs no bucket."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.error: str | None = None
        self.reason: str | None = None

    def usable(self) -> bool:
        """False once it failed, or from the start when no bucket is configured (then saying so)."""
        if self.error is None and not self.rt.has_files:
            # The rows are kept rather than deleted: without a bucket their objects cannot be deleted, and rows
            # deleted now would leave the objects in a bucket with no record of them, forever. Kept, they cost a
            # few rows and one warning a run until the bucket is configured again (or they are deleted by hand).
            self.error, self.reason = NO_BUCKET, "no_bucket"
        return self.error is None

    def delete(self, keys: Sequence[str] | Callable[[ObjectStore], Sequence[str]]) -> int | None:
        """Delete these objects (or those the function names, given the store): how many, or None, the error
        kept, when they were not all deleted."""
        if not self.usable():
            return None
        try:
            store = self.rt.objects
            named = keys(store) if callable(keys) else keys
            store.delete_many(named)
        except RpqError as exc:  # ObjectStoreError, no credentials, or a key the store would refuse
            self.error, self.reason = str(exc), "store_error"
            return None
        return len(named)


#: Whether a job may have objects: inputs, declared outputs, an offloaded input, an output moved to the bucket.
_MAY_HAVE_OBJECTS: ColumnElement[bool] = or_(col(JobRow.has_files), col(JobRow.input_key).is_not(None),
                                             col(JobRow.output_key).is_not(None))


def _past_retention(cutoff: datetime) -> ColumnElement[bool]:
    return and_(col(JobRow.status).in_(sorted(TERMINAL)), col(JobRow.finished_at) < cutoff)


def _purge_jobs(rt: Runtime, mine: Lease, bucket: _Bucket, cutoff: datetime, batch: int, result: Purged) -> None:
    while mine.renew():
        with session_scope(rt.engine) as session:
            query = select(JobRow.id, JobRow.attempt, _MAY_HAVE_OBJECTS.label("objects")).where(_past_retention(cutoff))
            if bucket.error is not None:
                query = query.where(~_MAY_HAVE_OBJECTS)  # kept this run: the batches go on without them
            found = session.exec(query.limit(batch)).all()
            plain = [job_id for job_id, _, objects in found if not objects]
            with_objects = [(job_id, attempt) for job_id, attempt, objects in found if objects]
            _delete_jobs(session, plain)
            files = filerows.of_jobs(session, [job_id for job_id, _ in with_objects]) \
                if with_objects and bucket.usable() else []
        result.jobs += len(plain)
        if with_objects:
            deleted = bucket.delete(partial(jobfiles.object_keys, jobs=with_objects, files=files))
            if deleted is not None:
                with session_scope(rt.engine) as session:
                    _delete_jobs(session, [job_id for job_id, _ in with_objects])
                result.jobs += len(with_objects)
                result.objects += deleted
        if len(found) < batch:
            break


def _delete_jobs(session: Session, ids: Sequence[str]) -> None:
    """Delete these jobs if they are still finished (a retry may have started one again since it was read).
    Their events, files, stream and cancels go with them: ON DELETE CASCADE, which jobs.storage.db has SQLite
    enforce too, so a job a retry kept keeps its history."""
    if ids:
        session.execute(delete(JobRow).where(col(JobRow.id).in_(ids), col(JobRow.status).in_(sorted(TERMINAL))))


def _purge_uploads(rt: Runtime, mine: Lease, bucket: _Bucket, before: datetime, batch: int, result: Purged) -> None:
    while bucket.error is None and mine.renew():
        with session_scope(rt.engine, read_only=True) as session:
            expired = filerows.expired_uploads(session, before, batch)
        keys = [upload.key for upload in expired]
        if not keys:
            return
        deleted = bucket.delete(keys)
        if deleted is None:
            return
        with session_scope(rt.engine) as session:
            filerows.forget_uploads(session, keys)
        result.uploads += len(keys)
        result.objects += deleted
        if len(keys) < batch:
            return


def _report_kept(rt: Runtime, bucket: _Bucket, cutoff: datetime, uploads_before: datetime, result: Purged) -> None:
    """Count what stays because its objects could not be deleted (two counts, only in a run where a deletion
    failed), and say so once: in the result, the counter and one warning."""
    with session_scope(rt.engine, read_only=True) as session:
        result.jobs_kept = int(session.exec(select(func.count()).select_from(JobRow)
                                            .where(_past_retention(cutoff), _MAY_HAVE_OBJECTS)).one())
        result.uploads_kept = int(session.exec(select(func.count()).select_from(Upload)
                                               .where(col(Upload.expires_at) < uploads_before)).one())
    if not (result.jobs_kept or result.uploads_kept):
        return  # a batch failed, and a concurrent purge or retry has since dealt with every one of them
    result.objects_error = bucket.error
    rt.metrics.retention_blocked(bucket.reason or "store_error")
    log.warning("retention: %d finished jobs and %d unused uploads past retention kept, rows and all, because their "
                "objects could not be deleted (%s); the next run tries again",
                result.jobs_kept, result.uploads_kept, bucket.error)
