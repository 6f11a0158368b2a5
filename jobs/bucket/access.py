"""The files side of the Python API: direct uploads, a job's files, and download URLs.

`prepare_upload` reserves a key and returns what a browser needs to put one file straight into the
bucket, bound by the signature to that key, its content type and its size; the web app then submits
the job with `files={"name": {"key": ticket.key}}`. `files` and `file_url` read back what a job has.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from jobs.api import owned_row, tenant_problems
from jobs.bucket.jobfiles import DEFAULT_CONTENT_TYPE, MAX_FILES
from jobs.bucket.store import CONTENT_TYPE_RE, check_name
from jobs.errors import Problem, RpqError
from jobs.runtime import Runtime, get_runtime
from jobs.settings import PRESIGN_MAX_SECONDS
from jobs.storage import filerows
from jobs.storage.db import session_scope
from jobs.storage.models import FileRole, FileState, JobFile, Upload, utcnow

__all__ = ["FileNotFound", "InvalidUpload", "JobFileInfo", "UploadTicket", "file_url", "files", "prepare_upload"]


class InvalidUpload(RpqError):
    """The upload was not prepared; nothing was written."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("upload not prepared:\n" + "\n".join(f"  - {p}" for p in problems))


class FileNotFound(RpqError):
    """The job has no file of that name (or not yet: an output is there once the job completed)."""

    def __init__(self, job_id: str, name: str) -> None:
        self.job_id, self.name = job_id, name
        super().__init__(f"job {job_id} has no file {name!r} in the bucket")


@dataclass(frozen=True)
class UploadTicket:
    """Where and how a client uploads one file. `method` PUT: send the body to `url` with exactly `headers`.
    `method` POST (S3's POST policy, for a size not known up front): a multipart form to `url` with
    `fields` first and the file last, in a field named "file". The URL and fields are a credential until
    `expires_at`: hand them to the one client that uploads, and nowhere else (no log, no row)."""

    key: str
    method: str
    url: str
    headers: dict[str, str]
    fields: dict[str, str]
    content_type: str
    max_bytes: int
    expires_at: datetime

    def __repr__(self) -> str:
        return f"UploadTicket(key={self.key!r}, method={self.method!r}, expires_at={self.expires_at.isoformat()!r})"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "method": self.method, "url": self.url, "headers": self.headers,
                "fields": self.fields, "content_type": self.content_type, "max_bytes": self.max_bytes,
                "expires_at": self.expires_at.isoformat()}


def prepare_upload(name: str, content_type: str | None = None, max_bytes: int | None = None, *,
                   size: int | None = None, expires: int | None = None, tenant: str | None = None,
                   runtime: Runtime | None = None) -> UploadTicket:
    """Reserve a key for one file a client will upload straight to the bucket, and sign its upload.

    With `size` (the file's exact size), a presigned PUT whose signature binds Content-Type and
    Content-Length: S3 and R2 both refuse anything else. Without it, an S3 POST policy allowing up to
    `max_bytes` (R2 has no POST policies: there `size` is required). Either way the submit that names the
    key is checked again by HEAD before /run: the object must exist, fit the size and have the type.
    With `tenant`, only that tenant's submits may use the upload (without, only submits without a tenant).
    Every problem at once in InvalidUpload; FilesNotConfigured without RPQ_S3_BUCKET."""
    rt = runtime or get_runtime()
    store = rt.objects
    limit = rt.settings.upload_max_bytes
    content_type = content_type or DEFAULT_CONTENT_TYPE
    problems: list[Problem] = tenant_problems(tenant)
    if not isinstance(name, str) or check_name(name):
        problems.append(Problem("name", "format", "a file name: printable, at most 255 characters, parts joined "
                                "by '/', none empty, '.' or '..', no leading '/'"))
    if not isinstance(content_type, str) or not CONTENT_TYPE_RE.match(content_type):
        problems.append(Problem("content_type", "format", "a MIME type such as image/png, in printable ASCII"))
    for field, value, low in (("max_bytes", max_bytes, 1), ("size", size, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= limit):
            problems.append(Problem(field, "range", f"a whole number of bytes from {low} to {limit} "
                                    "(RPQ_UPLOAD_MAX_BYTES)"))
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int)
                                or not 1 <= expires <= PRESIGN_MAX_SECONDS):
        problems.append(Problem("expires", "range", f"whole seconds from 1 to {PRESIGN_MAX_SECONDS}"))
    if size is None and max_bytes is None:
        problems.append(Problem("size", "required", "give the file's size, or max_bytes for an upload by POST"))
    elif size is None and store.is_r2:
        problems.append(Problem("size", "required", "R2 has no POST policies: give the file's exact size, which "
                                "the upload URL's signature then binds"))
    elif (isinstance(size, int) and isinstance(max_bytes, int) and not isinstance(size, bool)
          and size > max_bytes):
        problems.append(Problem("size", "range", "larger than max_bytes"))
    if problems:
        raise InvalidUpload(problems)

    key = store.upload_key(secrets.token_urlsafe(18), name)
    seconds = expires or rt.settings.presign_seconds
    now = utcnow()
    if size is not None:
        url = store.presign_put(key, content_type, size, seconds)
        ticket = UploadTicket(key, "PUT", url, {"Content-Type": content_type, "Content-Length": str(size)}, {},
                              content_type, size, now + timedelta(seconds=seconds))
    else:
        assert max_bytes is not None
        url, fields = store.presign_post(key, content_type, max_bytes, seconds)
        ticket = UploadTicket(key, "POST", url, {}, fields, content_type, max_bytes, now + timedelta(seconds=seconds))
    with session_scope(rt.engine) as session:
        filerows.reserve(session, Upload(key=key, tenant=tenant, name=name, content_type=content_type,
                                         max_bytes=ticket.max_bytes, created_at=now, expires_at=ticket.expires_at))
    return ticket


@dataclass(frozen=True)
class JobFileInfo:
    """One of a job's files: an input, an output of its current attempt, or its output moved to the bucket."""

    name: str
    role: str  # input, output, input_document, result
    attempt: int  # 0: shared by every attempt (inputs)
    key: str | None
    state: str  # declared (not written or not checked yet), stored, missing
    size: int | None
    etag: str | None
    content_type: str | None
    checked_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "attempt": self.attempt, "key": self.key, "state": self.state,
                "size": self.size, "etag": self.etag, "content_type": self.content_type,
                "checked_at": self.checked_at.isoformat() if self.checked_at else None}


def files(job_id: str, *, tenant: str | None = None, runtime: Runtime | None = None) -> list[JobFileInfo]:
    """The job's inputs, then its current attempt's outputs: each found one with the store's size, ETag and
    content type; a declared one not checked yet (the job has not completed) as `declared`."""
    rt = runtime or get_runtime()
    with session_scope(rt.engine, read_only=True) as session:
        row = owned_row(session, job_id, tenant)
        rows = filerows.of_job(session, job_id) if row.has_files or row.output_key else []
    found = {(f.role, f.name) for f in rows if f.attempt == row.attempt}
    shown: list[JobFileInfo] = []
    for f in rows:
        if f.attempt == row.attempt or (f.attempt == 0 and f.role != FileRole.OUTPUT):
            shown.append(_info(f))
        elif f.attempt == 0 and (f.role, f.name) not in found:
            key = rt.objects.key_for(job_id, row.attempt, f.name) if rt.has_files else None
            shown.append(JobFileInfo(f.name, f.role, row.attempt, key, FileState.DECLARED.value, None, None,
                                     f.content_type, None))
    order = {FileRole.INPUT.value: 0, FileRole.INPUT_DOCUMENT.value: 1, FileRole.OUTPUT.value: 2,
             FileRole.RESULT.value: 3}
    return sorted(shown, key=lambda info: (order.get(info.role, 9), info.name))[: 3 * MAX_FILES]


def _info(f: JobFile) -> JobFileInfo:
    return JobFileInfo(f.name, f.role, f.attempt, f.key, f.state, f.size, f.etag, f.content_type, f.checked_at)


def file_url(job_id: str, name: str, *, expires: int | None = None, tenant: str | None = None,
             runtime: Runtime | None = None) -> str:
    """A presigned GET of the job's file `name` (an output of its current attempt first, then an input),
    valid `expires` seconds (default RPQ_PRESIGN_SECONDS). FileNotFound when there is none in the bucket.
    The URL is a credential until it expires: hand it to the one client that downloads."""
    rt = runtime or get_runtime()
    store = rt.objects
    found = [info for info in files(job_id, tenant=tenant, runtime=rt)
             if info.name == name and info.state == FileState.STORED.value and info.key is not None]
    found.sort(key=lambda info: info.role != FileRole.OUTPUT.value)  # an output before an input of the same name
    if found:
        return store.presign_get(found[0].key or "", expires)
    raise FileNotFound(job_id, name)
