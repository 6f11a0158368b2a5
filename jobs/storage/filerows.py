"""Reads and writes of `job_files` and `file_uploads`. Like `jobs.storage.store`, nothing here commits:
each write belongs to a transaction its caller owns (a job's insert, a poll's completion)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, delete, insert, update
from sqlmodel import Session, col, select

from jobs.errors import RpqError
from jobs.storage.models import FileRole, FileState, JobFile, Upload

FILES: Table = JobFile.__table__  # type: ignore[attr-defined]
UPLOADS: Table = Upload.__table__  # type: ignore[attr-defined]


class UploadTaken(RpqError):
    """Another submit used the same upload a moment before this one."""


def add(connection: Connection | Session, rows: Sequence[Mapping[str, Any]]) -> None:
    if rows:
        connection.execute(insert(FILES), list(rows))


def take_uploads(connection: Connection, keys: Sequence[str]) -> None:
    """Mark these uploads used (their reservations go; the job's rows now describe them), or raise
    UploadTaken, rolling the caller's transaction back, when one is gone: an upload serves one job."""
    if not keys:
        return
    result = connection.execute(delete(UPLOADS).where(UPLOADS.c.key.in_(list(keys))))
    if result.rowcount != len(set(keys)):
        raise UploadTaken("an upload named in files was used by another job a moment ago; prepare another")


def reserve(session: Session, upload: Upload) -> None:
    session.add(upload)


def uploads_named(session: Session, keys: Iterable[str]) -> dict[str, Upload]:
    wanted = list(set(keys))
    if not wanted:
        return {}
    return {u.key: u for u in session.exec(select(Upload).where(col(Upload.key).in_(wanted)))}


def of_job(session: Session, job_id: str) -> list[JobFile]:
    """A job's rows, every attempt's, in the order they were written."""
    return list(session.exec(select(JobFile).where(JobFile.job_id == job_id).order_by(col(JobFile.id))))


def of_jobs(session: Session, job_ids: Sequence[str]) -> list[JobFile]:
    if not job_ids:
        return []
    return list(session.exec(select(JobFile).where(col(JobFile.job_id).in_(list(job_ids)))))


def record_inputs_checked(session: Session, job_id: str, checks: Iterable[tuple[str, int, str, str | None]],
                          at: datetime) -> None:
    """What HEAD found of inputs named by key, `(name, size, etag, content_type)`, before the /run it belongs to."""
    for name, size, etag, content_type in checks:
        session.execute(update(FILES)
                        .where(FILES.c.job_id == job_id, FILES.c.attempt == 0, FILES.c.role == FileRole.INPUT.value,
                               FILES.c.name == name)
                        .values(size=size, etag=etag, content_type=content_type, state=FileState.STORED.value,
                                checked_at=at))


def expired_uploads(session: Session, before: datetime, limit: int) -> list[Upload]:
    """Reservations no job used whose URL has expired before `before`: their objects can go."""
    return list(session.exec(select(Upload).where(col(Upload.expires_at) < before)
                             .order_by(col(Upload.created_at)).limit(limit)))


def forget_uploads(session: Session, keys: Sequence[str]) -> None:
    if keys:
        session.execute(delete(UPLOADS).where(UPLOADS.c.key.in_(list(keys))))
