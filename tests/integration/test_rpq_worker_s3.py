"""rpq_worker against a real S3 server over HTTP (moto's), with URLs presigned by jobs.bucket.store.

moto checks no signatures, so the headers rpq_worker sends are also checked against the PUT URL's SigV4
signature with botocore's own code (the way test_files_store checks the URLs themselves).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

import rpq_worker
from jobs.bucket.store import ObjectStore
from jobs.settings import Settings
from tests.integration.test_files_store import signature_matches
from tests.object_server import ObjectServer, serving

pytestmark = pytest.mark.integration

FIVE_MB = 5 * 1024 * 1024


@pytest.fixture
def store(s3_endpoint_url: str, s3_bucket: str) -> ObjectStore:
    return ObjectStore.from_settings(Settings(
        s3_bucket=s3_bucket, s3_endpoint_url=s3_endpoint_url, s3_region="us-east-1", s3_prefix="rpq"))


@pytest.fixture
def recorder() -> Iterator[ObjectServer]:
    with serving() as running:
        yield running


def rpq_block(store: ObjectStore, files: dict[str, tuple[str, str, int]],
              outputs: dict[str, tuple[str, str, int]]) -> dict[str, Any]:
    """The block rpq puts in a job's input: {name: (key, content type, size)} for inputs and outputs."""
    return {
        "version": 1,
        "files": {name: {"url": store.presign_get(key), "content_type": content_type, "size": size}
                  for name, (key, content_type, size) in files.items()},
        "outputs": {name: {"url": store.presign_put(key, content_type, size), "method": "PUT",
                           "headers": {"Content-Type": content_type}}
                    for name, (key, content_type, size) in outputs.items()},
    }


def test_a_worker_downloads_its_inputs_and_uploads_its_outputs_through_presigned_urls(
        store: ObjectStore, tmp_path: Path) -> None:
    audio, frame, video = os.urandom(300_000), os.urandom(40_000), os.urandom(FIVE_MB)
    audio_key, frame_key = store.key_for("job-w1", 1, "in/audio.wav"), store.key_for("job-w1", 1, "in/f/0001.png")
    store.put(audio_key, audio, "audio/wav")
    store.put(frame_key, frame, "image/png")
    video_key = store.key_for("job-w1", 1, "video.mp4")
    (tmp_path / "video.mp4").write_bytes(video)
    event_input = {"text": "hello", "rpq": rpq_block(
        store, files={"audio.wav": (audio_key, "audio/wav", len(audio)),
                      "frames/0001.png": (frame_key, "image/png", len(frame))},
        outputs={"video.mp4": (video_key, "video/mp4", FIVE_MB)})}

    params = rpq_worker.job_input(event_input)
    downloaded = rpq_worker.download_all(event_input, tmp_path / "in")
    sent = rpq_worker.upload(event_input, "video.mp4", tmp_path / "video.mp4")

    assert params == {"text": "hello"}
    assert {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in downloaded.items()} == {
        "audio.wav": hashlib.sha256(audio).hexdigest(), "frames/0001.png": hashlib.sha256(frame).hexdigest()}
    stored = httpx.get(store.presign_get(video_key), timeout=30).content
    assert sent == rpq_worker.Uploaded("video.mp4", FIVE_MB, hashlib.sha256(stored).hexdigest())
    assert sent.sha256 == hashlib.sha256(video).hexdigest()
    info = store.head(video_key)
    assert info is not None and (info.size, info.content_type) == (FIVE_MB, "video/mp4")


def test_an_offloaded_input_is_read_from_the_store(store: ObjectStore) -> None:
    document = {"text": "x" * 200_000, "voice": "ana"}
    key = store.key_for("job-w2", 1, "input.json")
    store.put(key, json.dumps(document).encode(), "application/json")

    assert rpq_worker.job_input({"rpq": {"version": 1, "input_url": store.presign_get(key)}}) == document


def test_the_headers_a_worker_sends_are_the_ones_its_put_url_was_signed_for(
        recorder: ObjectServer, s3_credentials: str) -> None:
    # The same store, pointed at a server that records what arrives, so the bytes on the wire can be checked.
    store = ObjectStore.from_settings(Settings(s3_bucket="rpq-signed", s3_endpoint_url=f"http://127.0.0.1:"
                                               f"{recorder.port}", s3_region="us-east-1", s3_prefix="rpq"))
    key = store.key_for("job-w3", 1, "frames/0001.png")
    event_input = {"rpq": rpq_block(store, files={}, outputs={"frames/0001.png": (key, "image/png", 1234)})}
    url = event_input["rpq"]["outputs"]["frames/0001.png"]["url"]

    rpq_worker.upload(event_input, "frames/0001.png", os.urandom(1234))

    (put,) = [seen for seen in recorder.seen if seen.method == "PUT"]
    signed = dict(parse_qsl(urlsplit(url).query))["X-Amz-SignedHeaders"].split(";")
    sent = {name: put.header(name) for name in signed if name != "host"}
    assert sent == {"content-length": "1234", "content-type": "image/png"}
    assert signature_matches(url, "PUT", {name: str(value) for name, value in sent.items()}, s3_credentials)
    assert put.header("Transfer-Encoding") is None and put.body_size == 1234


def test_a_put_the_store_refuses_fails_naming_the_output_without_the_query(store: ObjectStore) -> None:
    # A bucket that does not exist: S3 answers 404, not worth a retry, and the URL still holds a signature.
    url = store.presign_put(store.key_for("job-w4", 1, "video.mp4"), "video/mp4", 1000).replace(
        f"/{store.bucket}/", "/rpq-no-such-bucket/")
    event_input = {"rpq": {"version": 1, "outputs": {"video.mp4": {"url": url, "headers": {"Content-Type":
                                                                                          "video/mp4"}}}}}

    with pytest.raises(rpq_worker.FileTransferError) as raised:
        rpq_worker.upload(event_input, "video.mp4", b"v" * 1000)

    assert str(raised.value).startswith("output 'video.mp4': PUT http://127.0.0.1:")
    assert "/rpq-no-such-bucket/rpq/jobs/job-w4/1/out/video.mp4 answered HTTP 404 NoSuchBucket" in str(raised.value)
    assert raised.value.attempts == 1 and "X-Amz" not in str(raised.value) and "?" not in str(raised.value)
