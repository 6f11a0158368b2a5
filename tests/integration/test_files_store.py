"""jobs.bucket.store against a real S3 server over HTTP (moto's).

moto checks neither signatures nor expiry, so what a presigned URL allows is checked here by verifying
its signature with botocore's own SigV4 code: that is the part rpq controls. That S3 and R2 then refuse
a request outside the signature rests on them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from jobs.bucket.store import ObjectInfo, ObjectStore
from jobs.errors import FilesNotConfigured, ObjectStoreError
from jobs.settings import Settings

pytestmark = pytest.mark.integration

REGION = "us-east-1"


@pytest.fixture
def store(s3_endpoint_url: str, s3_bucket: str) -> ObjectStore:
    return ObjectStore.from_settings(Settings(
        s3_bucket=s3_bucket, s3_endpoint_url=s3_endpoint_url, s3_region=REGION, s3_prefix="rpq"))


def signature_matches(url: str, method: str, headers: dict[str, str], secret: str) -> bool:
    """Whether `url`'s signature is the one SigV4 gives for this method and these headers."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    given = query.pop("X-Amz-Signature")
    request = AWSRequest(method=method, url=urlunsplit(parts._replace(query=urlencode(query))), headers=headers)
    request.context["timestamp"] = query["X-Amz-Date"]
    access_key = query["X-Amz-Credential"].split("/")[0]
    auth = S3SigV4QueryAuth(Credentials(access_key, secret), "s3", REGION, expires=int(query["X-Amz-Expires"]))
    return auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request) == given


def test_bytes_sent_to_a_presigned_put_come_back_whole_from_a_presigned_get(store: ObjectStore) -> None:
    data = os.urandom(300_000)
    key = store.key_for("job-1", 1, "frames/0001.png")

    put = httpx.put(store.presign_put(key, "image/png", len(data)), content=data,
                    headers={"Content-Type": "image/png"})
    got = httpx.get(store.presign_get(key))

    assert (put.status_code, got.status_code) == (200, 200)
    assert hashlib.sha256(got.content).hexdigest() == hashlib.sha256(data).hexdigest()
    assert store.head(key) == ObjectInfo(key=key, size=len(data), etag=hashlib.md5(data).hexdigest(),
                                         content_type="image/png")


def test_put_stores_bytes_a_path_or_a_file_object_and_head_reports_each(store: ObjectStore, tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    path.write_bytes(b"RIFF" + b"\0" * 2000)
    sources: dict[str, Any] = {"a.json": b'{"ok": true}', "b.wav": path, "c.txt": io.BytesIO(b"hello")}
    expected = {"a.json": b'{"ok": true}', "b.wav": path.read_bytes(), "c.txt": b"hello"}

    for name, data in sources.items():
        store.put(store.key_for("job-2", 1, name), data, "application/octet-stream")

    for name, data in expected.items():
        info = store.head(store.key_for("job-2", 1, name))
        assert info is not None
        assert (info.size, info.etag, info.content_type) == (
            len(data), hashlib.md5(data).hexdigest(), "application/octet-stream")
    assert store.head(store.key_for("job-2", 1, "never-written")) is None


def test_uploads_carry_no_checksum_headers_a_compatible_store_may_refuse(
        store: ObjectStore, tmp_path: Path) -> None:
    sent: list[str] = []
    store.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.extend(name.lower() for name in request.headers))
    path = tmp_path / "out.bin"
    path.write_bytes(b"y" * 1000)

    for data in (b"x" * 1000, path, io.BytesIO(b"z" * 1000)):
        store.put(store.key_for("job-6", 1, "out.bin"), data, "application/octet-stream")

    assert "content-type" in sent
    assert not [name for name in sent if "checksum" in name or name == "x-amz-trailer"]


def test_a_presigned_put_is_signed_for_its_bucket_key_expiry_method_and_both_headers(
        store: ObjectStore, s3_credentials: str) -> None:
    key = store.key_for("job-3", 2, "result 1.bin")

    url = store.presign_put(key, "application/pdf", 1234, expires=600)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))

    assert parts.path == f"/{store.bucket}/{quote(key)}"  # path style: the bucket in the path
    assert query["X-Amz-Expires"] == "600"
    assert query["X-Amz-Credential"].endswith(f"/{REGION}/s3/aws4_request")
    assert query["X-Amz-SignedHeaders"].split(";") == ["content-length", "content-type", "host"]
    assert not [name for name in query if "checksum" in name.lower()]  # R2 refuses default checksums
    headers = {"Content-Type": "application/pdf", "Content-Length": "1234"}
    assert signature_matches(url, "PUT", headers, s3_credentials)
    assert not signature_matches(url, "GET", headers, s3_credentials)
    assert not signature_matches(url, "PUT", {**headers, "Content-Type": "text/html"}, s3_credentials)
    assert not signature_matches(url, "PUT", {**headers, "Content-Length": "1235"}, s3_credentials)
    assert s3_credentials not in url


def test_a_presigned_get_lasts_the_configured_time_unless_told_otherwise(store: ObjectStore) -> None:
    key = store.key_for("job-4", 1, "a.txt")

    assert dict(parse_qsl(urlsplit(store.presign_get(key)).query))["X-Amz-Expires"] == "3600"
    assert dict(parse_qsl(urlsplit(store.presign_get(key, expires=60)).query))["X-Amz-Expires"] == "60"


def test_delete_many_removes_2001_objects_in_three_requests(store: ObjectStore) -> None:
    keys = [store.key_for("job-5", 1, f"part-{n:04d}") for n in range(2001)]
    with ThreadPoolExecutor(max_workers=4) as pool:  # one client shared by threads, as boto3 allows
        list(pool.map(lambda key: store.put(key, b"x", "text/plain"), keys[::10]))  # a key absent counts as deleted
    batches: list[int] = []
    store.client.meta.events.register(
        "provide-client-params.s3.DeleteObjects", lambda params, **_: batches.append(len(params["Delete"]["Objects"])))

    store.delete_many(keys)

    assert batches == [1000, 1000, 1]
    remaining = store.client.list_objects_v2(Bucket=store.bucket, Prefix="rpq/jobs/job-5/")
    assert remaining["KeyCount"] == 0


def test_without_a_bucket_files_are_off_and_the_error_names_the_variable() -> None:
    with pytest.raises(FilesNotConfigured) as caught:
        ObjectStore.from_settings(Settings())

    assert caught.value.problems[0].startswith("RPQ_S3_BUCKET:")


def test_the_secret_key_is_shown_in_no_repr_error_or_log(
        s3_endpoint_url: str, s3_credentials: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)  # botocore logs requests and their headers at DEBUG
    missing = ObjectStore.from_settings(Settings(
        s3_bucket="no-such-bucket", s3_endpoint_url=s3_endpoint_url, s3_region=REGION))
    unreachable = ObjectStore.from_settings(Settings(
        s3_bucket="rpq-files", s3_endpoint_url="http://127.0.0.1:9", s3_region=REGION))
    errors: list[ObjectStoreError] = []

    for attempt in (lambda: missing.put("rpq/a", b"x", "text/plain"),
                    lambda: unreachable.head("rpq/a")):
        with pytest.raises(ObjectStoreError) as caught:
            attempt()
        errors.append(caught.value)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")  # half a pair: boto3 refuses it when the client is made
    with pytest.raises(ObjectStoreError) as caught:
        ObjectStore.from_settings(Settings(s3_bucket="rpq-files", s3_region=REGION))
    errors.append(caught.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # none at all: boto3 finds out at the first request
    with pytest.raises(ObjectStoreError) as caught:
        ObjectStore.from_settings(Settings(s3_bucket="rpq-files", s3_region=REGION)).presign_get("rpq/a")
    errors.append(caught.value)

    assert [error.code for error in errors] == [
        "NoSuchBucket", "EndpointConnectionError", "NoCredentials", "NoCredentials"]
    shown = [repr(missing), repr(unreachable), caplog.text, *(
        text for error in errors for text in (str(error), repr(error), "".join(traceback.format_exception(error))))]
    assert not [text for text in shown if s3_credentials in text]
    assert "AWS_ACCESS_KEY_ID" in str(errors[3])
