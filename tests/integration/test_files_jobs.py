"""A job's files step by step, in-process, on SQLite and PostgreSQL, against the simulator and a real S3
server (moto's, over HTTP, with real presigned URLs).

These call the functions the Celery tasks call, so each step's effect on the table and the bucket can be
asserted exactly; test_files_pipeline.py runs the export path through a real worker.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3.session
import httpx
import pytest
from sqlalchemy import MetaData, select

import jobs
from jobs.bucket.jobfiles import RPQ_KEY
from jobs.errors import FilesNotConfigured, RunPodRejected
from jobs.flow.lifecycle import poll_job, submit_job
from jobs.runtime import Runtime
from jobs.settings import Secret
from jobs.states import JobStatus
from jobs.storage.db import make_engine, session_scope
from jobs.storage.models import utcnow
from jobs.storage.store import get_row, update_fields
from tests.conftest import Published, SimulatorProcess, fast_client, free_port, make_settings, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def rt(migrated_db: str, simulator: SimulatorProcess, s3_bucket: str, s3_endpoint_url: str) -> Iterator[Runtime]:
    """A runtime with files on: the bucket on the S3 server, outputs over 2,000 bytes moved to it."""
    settings = make_settings(migrated_db, simulator, s3_bucket=s3_bucket, s3_endpoint_url=s3_endpoint_url,
                             s3_region="us-east-1", inline_output_max_bytes=2000)
    runtime = Runtime(settings=settings, engine=make_engine(migrated_db), publish=Published(),
                      make_client=lambda: fast_client(simulator))
    yield runtime
    runtime.close()


def sent_input(simulator: SimulatorProcess, runpod_job_id: str | None) -> Any:
    """The input the simulator (RunPod) received for a job."""
    return next(job["input"] for job in simulator.jobs() if job["id"] == runpod_job_id)


def run_to_the_end(rt: Runtime, job_id: str) -> jobs.Job:
    submit_job(rt, job_id)

    def step() -> jobs.Job | None:
        with session_scope(rt.engine) as session:
            update_fields(session, job_id, while_status={JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS},
                          values={"next_poll_at": utcnow()})
        poll_job(rt, job_id)
        job = jobs.get(job_id, runtime=rt)
        return job if job.is_terminal else None

    return wait_until(step, timeout=30, interval=0.1, what=f"job {job_id} to finish")  # type: ignore[return-value]


def bucket_keys(rt: Runtime) -> list[str]:
    answer = rt.objects.client.list_objects_v2(Bucket=rt.objects.bucket)
    return sorted(item["Key"] for item in answer.get("Contents", []))


def every_stored_text(rt: Runtime) -> str:
    """Every value of every row of every table, as text: what a leak into the database would show up in."""
    metadata = MetaData()
    metadata.reflect(rt.engine)
    with rt.engine.connect() as connection:
        return "\n".join(repr(tuple(row)) for table in metadata.sorted_tables
                         for row in connection.execute(select(table)))


# -- submit ---------------------------------------------------------------------------------------------------


def test_submit_puts_given_inputs_in_the_job_folder_and_records_them_with_the_declared_outputs(
        rt: Runtime, tmp_path: Path) -> None:
    path = tmp_path / "voice.wav"
    path.write_bytes(b"RIFF" + bytes(996))

    job = jobs.submit("tts", {"text": "hi"}, files={"voice": path, "notes.txt": b"hello", "raw": io.BytesIO(b"xyz")},
                      outputs=["video.mp4"], runtime=rt)

    prefix = f"rpq/jobs/{job.id}/in"
    assert bucket_keys(rt) == [f"{prefix}/notes.txt", f"{prefix}/raw", f"{prefix}/voice"]
    files = {f.name: f for f in jobs.files(job.id, runtime=rt)}
    assert (files["voice"].role, files["voice"].state, files["voice"].size, files["voice"].content_type) == (
        "input", "stored", 1000, "audio/x-wav")
    assert (files["notes.txt"].size, files["notes.txt"].content_type) == (5, "text/plain")
    assert files["raw"].content_type == "application/octet-stream"
    assert (files["video.mp4"].role, files["video.mp4"].state, files["video.mp4"].key) == (
        "output", "declared", f"rpq/jobs/{job.id}/1/out/video.mp4")


def test_every_problem_with_files_is_reported_at_once_and_nothing_is_written(rt: Runtime) -> None:
    with pytest.raises(jobs.InvalidJob) as caught:
        jobs.submit("tts", ["not", "an", "object"], files={"a": "relative/path.wav", "../b": b"x", "c": 42},
                    outputs=["ok.mp4", "ok.mp4", "/abs"], offload="yes", runtime=rt)  # type: ignore[arg-type]

    fields = sorted(p.field for p in caught.value.problems)
    assert fields == ["files[0]", "files[1]", "files[2]", "offload", "outputs", "outputs[1]", "outputs[2]"]
    assert jobs.list_jobs(runtime=rt) == [] and bucket_keys(rt) == []


def test_with_no_bucket_files_are_refused_by_name_of_the_variable_and_plain_jobs_still_work(
        runtime: Runtime) -> None:
    with pytest.raises(jobs.InvalidJob) as caught:
        jobs.submit("tts", {}, outputs=["a.png"], runtime=runtime)
    assert "RPQ_S3_BUCKET" in str(caught.value)
    with pytest.raises(FilesNotConfigured, match="RPQ_S3_BUCKET"):
        jobs.prepare_upload("a.png", "image/png", size=3, runtime=runtime)
    assert jobs.submit("tts", {"text": "still fine"}, runtime=runtime).status is JobStatus.PENDING


# -- /run ----------------------------------------------------------------------------------------------------------


def test_run_carries_fresh_urls_that_reach_the_files_and_no_url_is_stored(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"text": "hi"}, files={"audio": b"abc"}, outputs={"video.mp4": "video/mp4"}, runtime=rt)

    submit_job(rt, job.id)

    sent = sent_input(simulator, jobs.get(job.id, runtime=rt).runpod_job_id)
    block = sent[RPQ_KEY]
    assert sent["text"] == "hi" and block["version"] == 1
    assert httpx.get(block["files"]["audio"]["url"]).content == b"abc"
    put = block["outputs"]["video.mp4"]
    assert (put["method"], put["headers"]) == ("PUT", {"Content-Type": "video/mp4"})
    assert httpx.put(put["url"], content=b"frames", headers=put["headers"]).status_code == 200
    assert f"rpq/jobs/{job.id}/1/out/video.mp4" in bucket_keys(rt)
    assert "X-Amz-Signature" not in every_stored_text(rt)
    assert "X-Amz-Signature" not in str(published_messages(rt))


def published_messages(rt: Runtime) -> list[tuple[str, str, float | None]]:
    assert isinstance(rt.publish, Published)
    return list(rt.publish.messages)


def test_an_offloaded_input_reaches_the_handler_by_url_and_reads_back_whole(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    big = {"text": "x" * 50_000, "settings": {"voice": "calm"}}

    job = jobs.submit("tts", big, offload=True, runtime=rt)
    submit_job(rt, job.id)

    sent = sent_input(simulator, jobs.get(job.id, runtime=rt).runpod_job_id)
    assert list(sent) == [RPQ_KEY] and list(sent[RPQ_KEY]) == ["version", "input_url"]
    assert httpx.get(sent[RPQ_KEY]["input_url"]).json() == big
    assert jobs.get(job.id, runtime=rt).input == big
    assert jobs.get(job.id, runtime=rt).input_key == f"rpq/jobs/{job.id}/input.json"
    assert "x" * 1000 not in every_stored_text(rt)  # the input lives in the bucket, not in a row


# -- completion ----------------------------------------------------------------------------------------------------


def test_a_declared_output_the_handler_wrote_is_recorded_with_the_stores_size_etag_and_type(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"sleep": 0.5}, outputs=["video.mp4"], runtime=rt)
    submit_job(rt, job.id)
    put = sent_input(simulator, jobs.get(job.id, runtime=rt).runpod_job_id)[RPQ_KEY]["outputs"]["video.mp4"]
    body = bytes(range(256)) * 40
    httpx.put(put["url"], content=body, headers=put["headers"]).raise_for_status()  # what the handler would do

    done = run_to_the_end(rt, job.id)

    assert done.status is JobStatus.COMPLETED and not done.files_missing
    video = next(f for f in jobs.files(job.id, runtime=rt) if f.name == "video.mp4")
    assert (video.state, video.attempt, video.size, video.content_type) == ("stored", 1, len(body), "video/mp4")
    assert video.etag == hashlib.md5(body).hexdigest()
    assert httpx.get(jobs.file_url(job.id, "video.mp4", runtime=rt)).content == body


def test_a_declared_output_missing_at_completion_is_flagged_evented_and_the_job_stays_completed(
        rt: Runtime) -> None:
    job = jobs.submit("tts", {"output": {"done": True}}, outputs=["video.mp4", "thumb.png"], runtime=rt)

    done = run_to_the_end(rt, job.id)

    assert (done.status, done.output, done.files_missing) == (JobStatus.COMPLETED, {"done": True}, True)
    states = {f.name: (f.state, f.attempt) for f in jobs.files(job.id, runtime=rt)}
    assert states == {"video.mp4": ("missing", 1), "thumb.png": ("missing", 1)}
    assert any("missing from the bucket" in (e.detail or "") for e in jobs.events(job.id, runtime=rt))
    with pytest.raises(jobs.FileNotFound):
        jobs.file_url(job.id, "video.mp4", runtime=rt)


def test_an_output_over_the_inline_limit_is_moved_to_the_bucket_and_get_still_returns_it(rt: Runtime) -> None:
    output = {"transcript": "word " * 1000}

    job = jobs.submit("tts", {"output": output}, runtime=rt)
    done = run_to_the_end(rt, job.id)

    assert done.output == output and done.output_key == f"rpq/jobs/{job.id}/1/output.json"
    listed = next(j for j in jobs.list_jobs(runtime=rt) if j.id == job.id)
    assert (listed.output, listed.output_key) == (None, done.output_key)
    with session_scope(rt.engine, read_only=True) as session:
        assert get_row(session, job.id).output is None  # type: ignore[union-attr]  # the row keeps the key alone
    assert jobs.wait(job.id, timeout=5, runtime=rt).output == output


def test_a_presigned_url_a_handler_hands_back_is_stored_without_its_query(rt: Runtime) -> None:
    signed = "http://s3.example/b/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123"
    job = jobs.submit("tts", {"output": {"log": f"read {signed} ok", "urls": [signed]}}, files={"a": b"1"},
                      runtime=rt)

    done = run_to_the_end(rt, job.id)  # a handler that echoes its input's "rpq" block does the same

    assert done.output == {"log": "read http://s3.example/b/k?<presigned query removed> ok",
                           "urls": ["http://s3.example/b/k?<presigned query removed>"]}


def test_a_refusal_that_quotes_the_run_body_is_stored_without_the_urls_in_it(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"text": "hi"}, outputs=["video.mp4"], runtime=rt)
    real_run = rt.runpod.run

    def run_refused_quoting_its_body(endpoint_id: str, input: Any, **options: Any) -> Any:
        raise RunPodRejected(f"400 input is invalid: {json.dumps(input)}")

    rt.runpod.run = run_refused_quoting_its_body  # type: ignore[method-assign]
    try:
        submit_job(rt, job.id)
    finally:
        rt.runpod.run = real_run  # type: ignore[method-assign]

    failed = jobs.get(job.id, runtime=rt)
    assert failed.status is JobStatus.FAILED and "presigned query removed" in (failed.error or "")
    assert "X-Amz-Signature" not in every_stored_text(rt)


def test_a_retry_writes_its_outputs_in_a_folder_of_its_own(rt: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"fail": "out of memory"}, outputs=["video.mp4"], runtime=rt)
    assert run_to_the_end(rt, job.id).status is JobStatus.FAILED

    jobs.retry(job.id, runtime=rt)
    submit_job(rt, job.id)

    again = jobs.get(job.id, runtime=rt)
    url = sent_input(simulator, again.runpod_job_id)[RPQ_KEY]["outputs"]["video.mp4"]["url"]
    assert again.attempt == 2 and f"/jobs/{job.id}/2/out/video.mp4?" in url


def test_s3_config_sends_the_workers_own_credentials_and_where_to_write_and_stores_neither(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    rt.settings = rt.settings.model_copy(update={"worker_s3_access_key_id": Secret("AKIAWORKERONLY"),
                                                 "worker_s3_secret_access_key": Secret("worker-secret-xyz")})

    job = jobs.submit("tts", {"text": "hi"}, outputs=["video.mp4"], s3_config=True, runtime=rt)
    submit_job(rt, job.id)

    record = next(j for j in simulator.jobs() if j["id"] == jobs.get(job.id, runtime=rt).runpod_job_id)
    assert record["s3_config"] == {"accessId": "AKIAWORKERONLY", "bucketName": rt.objects.bucket,
                                   "endpointUrl": rt.settings.s3_endpoint_url}
    assert record["input"][RPQ_KEY]["s3"] == {"bucket": rt.objects.bucket, "prefix": f"rpq/jobs/{job.id}/1/out/"}
    stored = every_stored_text(rt)
    assert "AKIAWORKERONLY" not in stored and "worker-secret-xyz" not in stored


def test_s3_config_without_the_worker_credentials_is_refused_naming_them(rt: Runtime) -> None:
    with pytest.raises(jobs.InvalidJob, match="RPQ_WORKER_S3_ACCESS_KEY_ID"):
        jobs.submit("tts", {}, outputs=["a.bin"], s3_config=True, runtime=rt)


# -- direct uploads --------------------------------------------------------------------------------------------------


def test_a_direct_upload_by_put_is_checked_by_head_before_the_job_is_sent(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    body = b"\x00\x01" * 500
    ticket = jobs.prepare_upload("clip.wav", "audio/wav", size=len(body), runtime=rt)
    assert "X-Amz-Signature" not in repr(ticket)
    httpx.put(ticket.url, content=body, headers=ticket.headers).raise_for_status()

    job = jobs.submit("tts", {"text": "hi"}, files={"clip": {"key": ticket.key}}, runtime=rt)
    submit_job(rt, job.id)

    assert jobs.get(job.id, runtime=rt).status is JobStatus.IN_QUEUE
    clip = next(f for f in jobs.files(job.id, runtime=rt) if f.name == "clip")
    assert (clip.state, clip.size, clip.content_type) == ("stored", len(body), "audio/wav")
    with pytest.raises(jobs.InvalidJob, match="no unused upload"):  # an upload serves one job
        jobs.submit("tts", {}, files={"clip": {"key": ticket.key}}, runtime=rt)


def test_a_direct_upload_by_post_policy_works_for_a_size_not_known_up_front(rt: Runtime) -> None:
    ticket = jobs.prepare_upload("photo.png", "image/png", max_bytes=10_000, runtime=rt)

    answer = httpx.post(ticket.url, data=ticket.fields, files={"file": ("photo.png", b"\x89PNG" + bytes(100))})

    assert ticket.method == "POST" and answer.status_code == 204
    assert rt.objects.head(ticket.key) is not None


def test_a_job_whose_upload_never_came_or_is_larger_than_allowed_fails_before_run_naming_each_file(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    missing = jobs.prepare_upload("a.wav", "audio/wav", size=10, runtime=rt)
    too_big = jobs.prepare_upload("b.wav", "audio/wav", max_bytes=10, runtime=rt)
    rt.objects.put(too_big.key, bytes(50), "audio/wav")  # a store that did not enforce the policy

    job = jobs.submit("tts", {}, files={"a": {"key": missing.key}, "b": {"key": too_big.key}}, runtime=rt)
    submit_job(rt, job.id)

    failed = jobs.get(job.id, runtime=rt)
    assert failed.status is JobStatus.FAILED and failed.runpod_job_id is None
    assert "'a' is not in the bucket" in (failed.error or "") and "'b' is 50 bytes" in (failed.error or "")
    assert simulator.jobs() == []


def test_a_key_outside_the_prefix_is_refused(rt: Runtime) -> None:
    boto3.session.Session().client("s3", endpoint_url=rt.settings.s3_endpoint_url, region_name="us-east-1") \
        .put_object(Bucket=rt.objects.bucket, Key="elsewhere/secret.txt", Body=b"x")

    with pytest.raises(jobs.InvalidJob, match="under the prefix rpq/"):
        jobs.submit("tts", {}, files={"s": {"key": "elsewhere/secret.txt"}}, runtime=rt)


# -- the bucket failing --------------------------------------------------------------------------------------------


def bucket_goes_down(rt: Runtime) -> None:
    """From now on the bucket's endpoint refuses every connection (a port nothing listens on)."""
    rt.settings = rt.settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    rt._objects = None  # built again, on the dead endpoint


def test_a_bucket_that_cannot_be_asked_before_run_puts_the_job_back_to_pending_and_sends_nothing(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    ticket = jobs.prepare_upload("clip.wav", "audio/wav", size=4, runtime=rt)
    httpx.put(ticket.url, content=b"RIFF", headers=ticket.headers).raise_for_status()
    job = jobs.submit("tts", {}, files={"clip": {"key": ticket.key}}, runtime=rt)
    bucket_goes_down(rt)

    submit_job(rt, job.id)

    later = jobs.get(job.id, runtime=rt)
    assert later.status is JobStatus.PENDING and later.waiting and later.waiting.reason.value == "deferred"
    assert any("files could not be prepared" in (e.detail or "") for e in jobs.events(job.id, runtime=rt))
    assert simulator.jobs() == []


def test_a_bucket_that_cannot_be_asked_at_completion_is_asked_again_then_the_job_is_kept_and_flagged(
        rt: Runtime) -> None:
    job = jobs.submit("tts", {"output": {"done": True}}, outputs=["video.mp4"], runtime=rt)
    submit_job(rt, job.id)
    bucket_goes_down(rt)

    done = run_to_the_end(rt, job.id)  # RunPod says COMPLETED at once; the check fails FINAL_DRAIN_TRIES times

    assert (done.status, done.output, done.files_missing) == (JobStatus.COMPLETED, {"done": True}, True)
    details = [e.detail or "" for e in jobs.events(job.id, runtime=rt)]
    assert any("files could not be checked" in d and "trying again" in d for d in details)
    assert any("could not be checked 5 times" in d for d in details)
