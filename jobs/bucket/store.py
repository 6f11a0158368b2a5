"""Objects in S3 or an S3-compatible store (Cloudflare R2, MinIO), through one boto3 client.

An `ObjectStore` puts, inspects and deletes objects under the configured prefix, and hands out presigned
URLs so clients and workers move the bytes themselves. Credentials come from boto3's own chain only
(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role): rpq never holds them, so
they cannot reach a repr, a log line, a row or an error. Every boto3 failure is turned into an
ObjectStoreError at this boundary, built from the operation, the key and S3's error code.

R2's documented differences, handled in `from_settings`:
- it signs with region "auto" (set when an R2 endpoint is configured with no region);
- it does not accept the request checksums boto3 >= 1.36 adds by default, so checksums are computed
  only where an operation requires them ("when_required"), which also keeps them out of presigned URLs;
- it has no POST policies, so an upload is a presigned PUT whose signature binds Content-Type and
  Content-Length: a client must send exactly those headers or the store refuses the upload.
Custom endpoints use path-style addressing (bucket in the path), which R2 and MinIO both accept
without DNS set up for each bucket; AWS itself keeps boto3's default (virtual-hosted).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

import boto3.session
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from jobs.errors import FilesNotConfigured, InvalidObjectName, ObjectStoreError
from jobs.settings import PRESIGN_MAX_SECONDS, Settings, redact_url

DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys a request
MAX_KEY_BYTES = 1024  # S3's limit on a key, in UTF-8
MAX_NAME_CHARS = 255
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
# A MIME type as a client would send it in a header: visible ASCII and spaces, e.g. "text/plain; charset=utf-8".
CONTENT_TYPE_RE = re.compile(r"^[!-~][ -~]{0,254}\Z")
R2_HOST_SUFFIX = ".r2.cloudflarestorage.com"

Data = bytes | os.PathLike[str] | IO[bytes]


@dataclass(frozen=True)
class ObjectInfo:
    """What the store says about one object."""

    key: str
    size: int
    etag: str  # without S3's surrounding quotes
    content_type: str | None


def check_name(name: str) -> list[str]:
    """What is wrong with `name` as a file name inside a job's folder (empty: nothing).

    Subfolders are allowed ("frames/0001.png"), but never a way out: no leading "/", no "." or ".." part,
    no empty part, only printable characters, at most MAX_NAME_CHARS."""
    problems: list[str] = []
    if not name:
        return ["name: must not be empty"]
    if len(name) > MAX_NAME_CHARS:
        problems.append(f"name: at most {MAX_NAME_CHARS} characters")
    if not name.isprintable():
        problems.append("name: only printable characters (no control characters or line breaks)")
    if name.startswith("/"):
        problems.append("name: must not start with '/'")
    if any(part in ("", ".", "..") for part in name.removeprefix("/").split("/")):
        problems.append("name: no '.', '..' or empty part between slashes")
    return problems


def check_key(key: str) -> list[str]:
    """What is wrong with `key` as a whole object key (empty: nothing)."""
    if not key:
        return ["key: must not be empty"]
    problems = [problem.replace("name:", "key:", 1) for problem in check_name(key)
                if not problem.startswith("name: at most")]
    if len(key.encode()) > MAX_KEY_BYTES:
        problems.append(f"key: at most {MAX_KEY_BYTES} bytes in UTF-8")
    return problems


def _require(problems: list[str]) -> None:
    if problems:
        raise InvalidObjectName(problems)


class ObjectStore:
    """One bucket under one prefix. Safe to share between threads: boto3 clients are thread-safe."""

    def __init__(self, client: Any, *, bucket: str, prefix: str, presign_seconds: int,
                 endpoint_url: str | None = None) -> None:
        self.client = client  # boto3's S3 client: for what this class does not offer (and for tests to watch)
        self.bucket = bucket
        self.prefix = prefix
        self.presign_seconds = presign_seconds
        self.endpoint_url = endpoint_url

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStore:
        """The store the settings name, or FilesNotConfigured when RPQ_S3_BUCKET is not set."""
        if settings.s3_bucket is None:
            raise FilesNotConfigured()
        endpoint = settings.s3_endpoint_url
        region = settings.s3_region
        if region is None and endpoint is not None and (urlsplit(endpoint).hostname or "").endswith(R2_HOST_SUFFIX):
            region = "auto"  # R2 signs with "auto"; boto3's chain would otherwise pick (or lack) an AWS region
        config = Config(
            signature_version="s3v4",  # boto3 presigns with SigV2 on some AWS endpoints otherwise; R2 has only v4
            s3={"addressing_style": "path" if endpoint else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
        )
        # A session of its own: boto3's default session is shared module state, and creating clients from one
        # session is not thread-safe (using the client is).
        with _translated("creating the S3 client", f"s3://{settings.s3_bucket}"):  # it reads the credentials
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)
        return cls(client, bucket=settings.s3_bucket, prefix=settings.s3_prefix,
                   presign_seconds=settings.presign_seconds, endpoint_url=endpoint)

    def __repr__(self) -> str:
        endpoint = f", endpoint_url={redact_url(self.endpoint_url)!r}" if self.endpoint_url else ""
        return f"ObjectStore(bucket={self.bucket!r}, prefix={self.prefix!r}{endpoint})"

    def __reduce__(self) -> tuple[object, ...]:
        # A client holds resolved credentials; build the store again from settings where it is needed.
        raise TypeError("an ObjectStore cannot be pickled")

    @property
    def is_r2(self) -> bool:
        """Cloudflare R2, which has no POST policies: a direct upload is then a PUT of a size known up front."""
        return self.endpoint_url is not None and (urlsplit(self.endpoint_url).hostname or "").endswith(R2_HOST_SUFFIX)

    def key_for(self, job_id: str, attempt: int, name: str) -> str:
        """Where output `name` of a job's attempt lives: {prefix}/jobs/{job_id}/{attempt}/out/{name}."""
        problems = (check_name(name) if isinstance(name, str) else ["name: must be a string"]) + _job_problems(job_id)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            problems.append("attempt: a whole number from 1")
        _require(problems)
        return self._checked(f"{self.prefix}/jobs/{job_id}/{attempt}/out/{name}")

    def input_key(self, job_id: str, name: str) -> str:
        """Where rpq puts input `name` it was handed at submit: {prefix}/jobs/{job_id}/in/{name}."""
        _require(_job_problems(job_id) + (check_name(name) if isinstance(name, str) else ["name: must be a string"]))
        return self._checked(f"{self.prefix}/jobs/{job_id}/in/{name}")

    def input_document_key(self, job_id: str) -> str:
        """Where a job's input sent with offload=True lives: {prefix}/jobs/{job_id}/input.json."""
        _require(_job_problems(job_id))
        return self._checked(f"{self.prefix}/jobs/{job_id}/input.json")

    def result_key(self, job_id: str, attempt: int) -> str:
        """Where an attempt's output too large for its row is moved: {prefix}/jobs/{job_id}/{attempt}/output.json."""
        return self.key_for(job_id, attempt, "x").removesuffix("/out/x") + "/output.json"

    def upload_key(self, token: str, name: str) -> str:
        """A key for a direct upload: {prefix}/uploads/{token}/{name}, the token unguessable."""
        _require(check_name(name) if isinstance(name, str) else ["name: must be a string"])
        return self._checked(f"{self.prefix}/uploads/{token}/{name}")

    def is_upload_key(self, key: str) -> bool:
        return key.startswith(f"{self.prefix}/uploads/")

    def owns(self, key: str) -> bool:
        """Whether `key` is under this store's prefix, the only place rpq reads from or writes to."""
        return key.startswith(f"{self.prefix}/")

    def _checked(self, key: str) -> str:
        _require(check_key(key))
        return key

    def put(self, key: str, data: Data, content_type: str) -> None:
        """Store `data` (bytes, a file's path, or a binary file object read from its position) at `key`."""
        _require(check_key(key) + _check_content_type(content_type))
        with self._translated("PutObject", key):
            if isinstance(data, bytes):
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
            elif isinstance(data, os.PathLike):
                # boto3's transfer manager: multipart for large files, parts retried on their own.
                self.client.upload_file(os.fspath(data), self.bucket, key, ExtraArgs={"ContentType": content_type})
            else:
                self.client.upload_fileobj(data, self.bucket, key, ExtraArgs={"ContentType": content_type})

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag and content type, or None when there is no object at `key`."""
        _require(check_key(key))
        try:
            with self._translated("HeadObject", key):
                answer = self.client.head_object(Bucket=self.bucket, Key=key)
        except ObjectStoreError as exc:
            if exc.status_code == 404:
                return None
            raise
        return ObjectInfo(key=key, size=int(answer["ContentLength"]), etag=str(answer["ETag"]).strip('"'),
                          content_type=answer.get("ContentType"))

    def presign_get(self, key: str, expires: int | None = None) -> str:
        """A URL anyone holding it can GET the object with until it expires. Treat it as a secret."""
        _require(check_key(key) + self._check_expires(expires))
        with self._translated("presign GetObject", key):
            return str(self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=expires or self.presign_seconds, HttpMethod="GET"))

    def presign_put(self, key: str, content_type: str, content_length: int | None,
                    expires: int | None = None) -> str:
        """A URL to PUT an object of `content_type` at `key` until it expires: exactly `content_length` bytes
        of it when given (a direct upload's size), any size when None (a handler's output, not yet made).

        The headers given are in the signature: S3 and R2 refuse an upload that sends others. Treat it as a secret."""
        problems = check_key(key) + _check_content_type(content_type) + self._check_expires(expires)
        if content_length is not None and (isinstance(content_length, bool) or not isinstance(content_length, int)
                                           or content_length < 0):
            problems.append("content_length: a whole number of bytes from 0")
        _require(problems)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "ContentType": content_type}
        if content_length is not None:
            params["ContentLength"] = content_length
        with self._translated("presign PutObject", key):
            return str(self.client.generate_presigned_url("put_object", Params=params,
                                                          ExpiresIn=expires or self.presign_seconds, HttpMethod="PUT"))

    def presign_post(self, key: str, content_type: str, max_bytes: int,
                     expires: int | None = None) -> tuple[str, dict[str, str]]:
        """A URL and form fields for a browser's multipart POST of at most `max_bytes` of `content_type` to
        `key`: the policy S3 signs holds the key, the content type and the size range, and S3 refuses a POST
        outside them. R2 has no POST policies (use presign_put there). Treat the fields as a secret."""
        problems = check_key(key) + _check_content_type(content_type) + self._check_expires(expires)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            problems.append("max_bytes: a whole number of bytes from 1")
        _require(problems)
        with self._translated("presign PostObject", key):
            answer = self.client.generate_presigned_post(
                Bucket=self.bucket, Key=key, Fields={"Content-Type": content_type},
                Conditions=[{"Content-Type": content_type}, ["content-length-range", 0, max_bytes]],
                ExpiresIn=expires or self.presign_seconds)
        return str(answer["url"]), {str(k): str(v) for k, v in answer["fields"].items()}

    def get_bytes(self, key: str) -> bytes:
        """The whole object at `key` (for rpq's own small documents: an offloaded input, a moved output)."""
        _require(check_key(key))
        with self._translated("GetObject", key):
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            return bytes(answer["Body"].read())

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete every key (absent ones count as deleted), 1,000 to a request. Every batch is tried; keys
        the store refused are reported together at the end."""
        unique = list(dict.fromkeys(keys))
        _require([problem for key in unique for problem in check_key(key)][:10])
        failed: list[str] = []
        for start in range(0, len(unique), DELETE_BATCH):
            batch = unique[start:start + DELETE_BATCH]
            with self._translated("DeleteObjects", f"{len(batch)} keys from {batch[0]}"):
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True})
            failed += [f"{error.get('Key')}: {error.get('Code')}" for error in answer.get("Errors", [])]
        if failed:
            raise ObjectStoreError(f"DeleteObjects: {len(failed)} of {len(unique)} keys not deleted "
                                   f"({', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''})",
                                   operation="DeleteObjects")

    def _translated(self, operation: str, key: str) -> AbstractContextManager[None]:
        return _translated(operation, f"s3://{self.bucket}/{key}")

    def _check_expires(self, expires: int | None) -> list[str]:
        if expires is None:
            return []
        if isinstance(expires, bool) or not isinstance(expires, int) or not 1 <= expires <= PRESIGN_MAX_SECONDS:
            return [f"expires: whole seconds from 1 to {PRESIGN_MAX_SECONDS}"]
        return []

@contextmanager
def _translated(operation: str, where: str) -> Iterator[None]:
    """boto3's exceptions as ObjectStoreError, worded from the operation, key and S3's error code only."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.get("Code")
        raise ObjectStoreError(f"{operation} {where}: the store answered {status} {code}",
                               operation=operation, code=code, status_code=status) from exc
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise ObjectStoreError(
            f"{operation} {where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) for boto3", operation=operation, code="NoCredentials") from exc
    except (BotoCoreError, Boto3Error) as exc:
        # Connection failures, timeouts, a failed upload: the class names it; its text may repeat the URL.
        cause = exc.__context__ if isinstance(exc.__context__, ClientError) else None
        code = cause.response.get("Error", {}).get("Code") if cause is not None else type(exc).__name__
        raise ObjectStoreError(f"{operation} {where}: {code}", operation=operation, code=code) from exc


def _job_problems(job_id: object) -> list[str]:
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        return ["job_id: letters, digits, '-' and '_', at most 64"]
    return []


def _check_content_type(content_type: str) -> list[str]:
    if not isinstance(content_type, str) or not CONTENT_TYPE_RE.match(content_type):
        return ["content_type: a MIME type such as image/png, in printable ASCII, at most 255 characters"]
    return []
