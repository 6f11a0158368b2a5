"""The simulator's default handler moves files over presigned URLs, as a GPU worker would, against moto's S3."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from jobs.bucket.store import ObjectStore
from jobs.settings import Settings
from tests.conftest import SimulatorProcess
from tests.integration.test_simulator import Api, open_api

pytestmark = pytest.mark.integration

FIVE_MB = 5 * 1024 * 1024


@pytest.fixture
def store(s3_endpoint_url: str, s3_bucket: str) -> ObjectStore:
    return ObjectStore.from_settings(Settings(
        s3_bucket=s3_bucket, s3_endpoint_url=s3_endpoint_url, s3_region="us-east-1", s3_prefix="rpq"))


@pytest.fixture
def api(simulator: SimulatorProcess) -> Iterator[Api]:
    with open_api(simulator) as opened:
        yield opened


def test_a_job_reads_its_input_and_writes_its_output_through_presigned_urls(api: Api, store: ObjectStore) -> None:
    audio = os.urandom(300_000)
    audio_key = store.key_for("job-files", 1, "in/audio.wav")
    store.put(audio_key, audio, "audio/wav")
    video_key = store.key_for("job-files", 1, "video.mp4")

    job_id = api.run({
        "read_inputs": {"audio": store.presign_get(audio_key)},
        "write_output": {"name": "video.mp4", "bytes": FIVE_MB, "content_type": "video/mp4",
                         "url": store.presign_put(video_key, "video/mp4", FIVE_MB)},
        "output": {"model": "v1"},
    })
    done = api.wait_status(job_id, "COMPLETED", "FAILED", timeout=60)

    stored = httpx.get(store.presign_get(video_key), timeout=30).content
    assert done["status"] == "COMPLETED", done
    assert done["output"] == {
        "model": "v1",
        "inputs": {"audio": {"bytes": len(audio), "sha256": hashlib.sha256(audio).hexdigest()}},
        "outputs": {"video.mp4": {"bytes": FIVE_MB, "sha256": hashlib.sha256(stored).hexdigest()}},
    }
    info = store.head(video_key)
    assert info is not None and (info.size, info.content_type) == (FIVE_MB, "video/mp4")


def test_a_list_of_outputs_is_written_and_the_output_is_only_the_reports(api: Api, store: ObjectStore) -> None:
    keys = {name: store.key_for("job-list", 1, name) for name in ("a.bin", "b.json")}
    writes = [{"name": name, "bytes": 1000 + i, "content_type": "application/octet-stream",
               "url": store.presign_put(key, "application/octet-stream", 1000 + i)}
              for i, (name, key) in enumerate(keys.items())]

    done = api.wait_status(api.run({"write_output": writes}), "COMPLETED", "FAILED", timeout=30)

    assert done["status"] == "COMPLETED", done
    assert done["output"] == {"outputs": {
        name: {"bytes": 1000 + i, "sha256": hashlib.sha256(httpx.get(store.presign_get(key)).content).hexdigest()}
        for i, (name, key) in enumerate(keys.items())}}


def test_a_refused_put_fails_the_job_naming_the_file_without_the_url_query(api: Api, store: ObjectStore) -> None:
    # A bucket that does not exist: S3 answers 404, and the URL's query still holds a signature.
    url = store.presign_put(store.key_for("job-bad", 1, "video.mp4"), "video/mp4", 1000).replace(
        f"/{store.bucket}/", "/rpq-no-such-bucket/")
    assert "X-Amz-Signature=" in url

    done = api.wait_status(api.run({"write_output": {"name": "video.mp4", "bytes": 1000, "url": url,
                                                     "content_type": "video/mp4"}}), "COMPLETED", "FAILED")

    assert done["status"] == "FAILED"
    assert "'video.mp4'" in done["error"] and "HTTP 404" in done["error"]
    assert "?" not in done["error"] and "X-Amz" not in done["error"] and "output" not in done


def test_an_unreachable_input_fails_the_job_naming_it_without_the_url_query(api: Api) -> None:
    url = "http://127.0.0.1:9/in/audio.wav?X-Amz-Signature=s3cr3t"  # the discard port: nothing listens

    done = api.wait_status(api.run({"read_inputs": {"audio": url}}), "COMPLETED", "FAILED", timeout=30)

    assert done["status"] == "FAILED"
    assert "read_inputs 'audio'" in done["error"] and "http://127.0.0.1:9/in/audio.wav" in done["error"]
    assert "s3cr3t" not in done["error"] and "X-Amz" not in done["error"]


# -- rpq's block: the URLs come with the job, not in the directives ------------------------------------------


def rpq_block(store: ObjectStore, job: str, files: dict[str, bytes] | None = None,
              outputs: dict[str, tuple[str, int]] | None = None, **extra: Any) -> dict[str, Any]:
    """The block rpq puts in a job's input: inputs stored now, outputs ({name: (content type, bytes)}) declared."""
    block: dict[str, Any] = {"version": 1, **extra, "files": {}, "outputs": {}}
    for name, data in (files or {}).items():
        key = store.key_for(job, 1, f"in/{name}")
        store.put(key, data, "application/octet-stream")
        block["files"][name] = {"url": store.presign_get(key), "content_type": "application/octet-stream",
                                "size": len(data)}
    for name, (content_type, size) in (outputs or {}).items():
        block["outputs"][name] = {"url": store.presign_put(store.key_for(job, 1, name), content_type, size),
                                  "method": "PUT", "headers": {"Content-Type": content_type}}
    return block


def stored_report(store: ObjectStore, key: str) -> dict[str, Any]:
    data = httpx.get(store.presign_get(key), timeout=30).content
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_job_reads_the_files_rpq_sent_and_writes_the_outputs_rpq_declared(api: Api, store: ObjectStore) -> None:
    audio, frame = os.urandom(300_000), os.urandom(2_000)
    block = rpq_block(store, "job-rpq1", files={"audio.wav": audio, "frames/0001.png": frame},
                      outputs={"video.mp4": ("video/mp4", FIVE_MB), "frames/out.png": ("image/png", 1234)})

    job_id = api.run({"text": "hello", "read_inputs": True, "rpq": block, "write_output": [
        {"name": "video.mp4", "bytes": FIVE_MB}, {"name": "frames/out.png", "bytes": 1234}]})
    done = api.wait_status(job_id, "COMPLETED", "FAILED", timeout=60)

    assert done["status"] == "COMPLETED", done
    assert done["output"] == {
        "inputs": {"audio.wav": {"bytes": len(audio), "sha256": hashlib.sha256(audio).hexdigest()},
                   "frames/0001.png": {"bytes": len(frame), "sha256": hashlib.sha256(frame).hexdigest()}},
        "outputs": {"video.mp4": stored_report(store, store.key_for("job-rpq1", 1, "video.mp4")),
                    "frames/out.png": stored_report(store, store.key_for("job-rpq1", 1, "frames/out.png"))}}
    info = store.head(store.key_for("job-rpq1", 1, "video.mp4"))
    assert info is not None and (info.size, info.content_type) == (FIVE_MB, "video/mp4")


def test_an_offloaded_input_is_fetched_from_the_store_and_its_directives_followed(
        api: Api, store: ObjectStore) -> None:
    document = {"text": "x" * 100_000, "write_output": {"name": "video.mp4", "bytes": 4096}, "output": {"m": 2}}
    input_key = store.key_for("job-rpq2", 1, "input.json")
    store.put(input_key, json.dumps(document).encode(), "application/json")
    failing_key = store.key_for("job-rpq2", 1, "failing.json")
    store.put(failing_key, json.dumps({"sleep": 0.2, "fail": "from the document"}).encode(), "application/json")

    writing = api.run({"rpq": rpq_block(store, "job-rpq2", outputs={"video.mp4": ("video/mp4", 4096)},
                                        input_url=store.presign_get(input_key))})
    failing = api.run({"rpq": rpq_block(store, "job-rpq2", input_url=store.presign_get(failing_key))})
    written = api.wait_status(writing, "COMPLETED", "FAILED", timeout=30)
    failed = api.wait_status(failing, "COMPLETED", "FAILED", timeout=30)

    assert written["status"] == "COMPLETED", written
    assert written["output"] == {"m": 2, "outputs": {
        "video.mp4": stored_report(store, store.key_for("job-rpq2", 1, "video.mp4"))}}
    assert (failed["status"], failed["error"]) == ("FAILED", "from the document")


def test_an_output_rpq_did_not_declare_fails_the_job_naming_it(api: Api, store: ObjectStore) -> None:
    block = rpq_block(store, "job-rpq3", outputs={"video.mp4": ("video/mp4", 10)})

    done = api.wait_status(api.run({"rpq": block, "write_output": {"name": "x.mp4", "bytes": 10}}),
                           "COMPLETED", "FAILED")

    assert done["status"] == "FAILED" and "output" not in done
    assert done["error"] == ("bad file transfer input: write_output: output 'x.mp4' was not declared at submit; "
                             "declared: 'video.mp4'")
    assert store.head(store.key_for("job-rpq3", 1, "x.mp4")) is None
