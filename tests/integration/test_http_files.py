"""Files over the HTTP API: direct uploads, a job's files, download links, against moto's S3 over HTTP.

The API runs in a thread as in test_http_api.py; the job goes to the simulator in-process (the functions the
Celery tasks call), so the inputs are checked by HEAD and the outputs looked for, as they are in production.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from sqlmodel import select

import jobs
from jobs.flow.lifecycle import poll_job, submit_job
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.models import Upload, utcnow
from jobs.storage.store import update_fields
from tests.conftest import FAKE_S3_SECRET, wait_until
from tests.integration.test_http_api import CANARY, ApiServer, problems
from tests.integration.test_http_api import start_api as start_api  # the fixture, shared

pytestmark = pytest.mark.integration

REGION = "us-east-1"


@pytest.fixture
def bucket_runtime(runtime: Runtime, s3_bucket: str, s3_endpoint_url: str) -> Runtime:
    """`runtime` with files on: moto's S3 server, a bucket of this test's own."""
    runtime.settings = runtime.settings.model_copy(update={
        "s3_bucket": s3_bucket, "s3_endpoint_url": s3_endpoint_url, "s3_region": REGION})
    return runtime


@pytest.fixture
def api(start_api: Callable[..., ApiServer], bucket_runtime: Runtime) -> httpx.Client:
    return start_api(bucket_runtime).client()


def run_to_the_end(rt: Runtime, job_id: str) -> jobs.Job:
    """Send the job to the simulator and poll it until it is final, as the tasks would."""
    submit_job(rt, job_id)

    def final() -> jobs.Job | None:
        with session_scope(rt.engine) as session:  # its poll is due now, whatever its countdown said
            update_fields(session, job_id, while_status={JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS},
                          values={"next_poll_at": utcnow()})
        poll_job(rt, job_id)
        job = jobs.get(job_id, runtime=rt)
        return job if job.is_terminal else None

    return wait_until(final, timeout=30, interval=0.1, what=f"job {job_id} to finish")  # type: ignore[return-value]


def upload(api: httpx.Client, data: bytes, **request: Any) -> dict[str, Any]:
    """A ticket from POST /v1/uploads, used as a browser would: the bytes go straight to the bucket."""
    answer = api.post("/v1/uploads", json=request)
    assert answer.status_code == 201, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    ticket: dict[str, Any] = answer.json()
    if ticket["method"] == "PUT":
        sent = httpx.put(ticket["url"], content=data, headers=ticket["headers"])
    else:
        sent = httpx.post(ticket["url"], data=ticket["fields"],
                          files={"file": (request["name"], data, ticket["content_type"])})
    assert sent.is_success, sent.text
    return ticket


# -- the whole way: upload, submit, list, download -------------------------------------------------


def test_files_uploaded_with_tickets_and_named_in_a_job_are_listed_and_download_whole(
    api: httpx.Client, bucket_runtime: Runtime
) -> None:
    audio, notes, video = os.urandom(200_000), b"take two, slower", os.urandom(150_000)
    put = upload(api, audio, name="audio.wav", content_type="audio/wav", size=len(audio))
    post = upload(api, notes, name="notes/take-2.txt", content_type="text/plain", max_bytes=1000)

    submitted = api.post("/v1/jobs", json={
        "endpoint": "tts", "input": {"output": "done"}, "outputs": ["video.mp4"],
        "files": {"audio": {"key": put["key"]}, "notes.txt": {"key": post["key"]}}})
    job_id = submitted.json()["id"]
    before = api.get(f"/v1/jobs/{job_id}/files").json()["files"]
    # What a handler does with the URL it was sent: write the output to its attempt's folder.
    bucket_runtime.objects.put(bucket_runtime.objects.key_for(job_id, 1, "video.mp4"), video, "video/mp4")
    finished = run_to_the_end(bucket_runtime, job_id)
    after = api.get(f"/v1/jobs/{job_id}/files").json()["files"]
    redirect = api.get(f"/v1/jobs/{job_id}/files/video.mp4")
    link = api.get(f"/v1/jobs/{job_id}/files/notes.txt", params={"redirect": "false", "expires": 60})

    assert (put["method"], post["method"]) == ("PUT", "POST")
    assert submitted.status_code == 202 and finished.status is JobStatus.COMPLETED
    assert [(f["name"], f["role"], f["state"]) for f in before] == [
        ("audio", "input", "declared"), ("notes.txt", "input", "declared"), ("video.mp4", "output", "declared")]
    assert [(f["name"], f["role"], f["attempt"], f["state"], f["size"], f["content_type"]) for f in after] == [
        ("audio", "input", 0, "stored", len(audio), "audio/wav"),
        ("notes.txt", "input", 0, "stored", len(notes), "text/plain"),
        ("video.mp4", "output", 1, "stored", len(video), "video/mp4")]
    assert all(f["etag"] and f["key"] for f in after)
    assert redirect.status_code == 302 and redirect.headers["Cache-Control"] == "no-store"
    assert httpx.get(redirect.headers["Location"]).content == video
    assert link.status_code == 200 and link.headers["Cache-Control"] == "no-store"
    assert link.json()["expires_in"] == 60
    assert parse_qs(urlsplit(link.json()["url"]).query)["X-Amz-Expires"] == ["60"]
    assert httpx.get(link.json()["url"]).content == notes


def test_curl_style_following_of_the_redirect_downloads_the_file(api: httpx.Client, bucket_runtime: Runtime) -> None:
    data, name = os.urandom(50_000), "take 1/clip ü+%.bin"
    job = jobs.submit("tts", {}, files={name: data}, runtime=bucket_runtime)  # put in the bucket at submit

    # httpx, like curl, sends the API's Authorization header to another host only if told to; S3 refuses two
    # credentials, so following must work without it.
    followed = api.get(f"/v1/jobs/{job.id}/files/{quote(name)}", follow_redirects=True)

    assert followed.status_code == 200 and followed.content == data
    assert "Authorization" not in followed.request.headers


def test_an_offloaded_input_is_kept_in_the_bucket_and_read_back_by_get(api: httpx.Client) -> None:
    submitted = api.post("/v1/jobs", json={"endpoint": "tts", "input": {"text": "long"}, "offload": True}).json()
    read = api.get(f"/v1/jobs/{submitted['id']}").json()
    listed = api.get(f"/v1/jobs/{submitted['id']}/files").json()["files"]

    assert read["input"] == {"text": "long"} and read["input_key"] == submitted["input_key"]
    assert read["input_key"].endswith(f"/jobs/{submitted['id']}/input.json")
    assert (read["files_missing"], read["output_key"]) == (False, None)
    assert [(f["name"], f["role"], f["state"]) for f in listed] == [("input.json", "input_document", "stored")]


# -- the URL is a credential -----------------------------------------------------------------------


def test_no_download_url_reaches_the_log(api: httpx.Client, bucket_runtime: Runtime,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="uvicorn")  # importing the runpod SDK sets it to WARNING
    job = jobs.submit("tts", {}, files={"a.bin": b"a"}, runtime=bucket_runtime)  # boto3 in this process: quiet too

    redirect = api.get(f"/v1/jobs/{job.id}/files/a.bin")
    link = api.get(f"/v1/jobs/{job.id}/files/a.bin", params={"redirect": "false"})

    signatures = [parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
                  for url in (redirect.headers["Location"], link.json()["url"])]
    # The test's own client logs the headers it receives at DEBUG; only the server's lines count.
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert f"GET /v1/jobs/{job.id}/files/a.bin HTTP/1.1\" 302" in logged  # the access log was captured
    assert not [s for s in signatures if s in logged]
    assert "X-Amz-" not in logged and FAKE_S3_SECRET not in logged


# -- refusals --------------------------------------------------------------------------------------


def test_a_bad_upload_request_gets_every_problem_at_once_and_reserves_nothing(
    api: httpx.Client, bucket_runtime: Runtime
) -> None:
    everything_wrong = api.post("/v1/uploads", json={"name": f"../{CANARY}", "content_type": f"no\n{CANARY}",
                                                     "size": -1, "expires": 0})
    no_size = api.post("/v1/uploads", json={"name": "a.wav"})
    unknown_field = api.post("/v1/uploads", json={"name": "a.wav", "size": 1, CANARY: 1})

    assert everything_wrong.status_code == 422
    assert problems(everything_wrong) == {("name", "format"), ("content_type", "format"), ("size", "range"),
                                          ("expires", "range")}
    assert problems(no_size) == {("size", "required")}
    assert problems(unknown_field) == {("body", "unknown")}
    assert CANARY not in everything_wrong.text + unknown_field.text
    with session_scope(bucket_runtime.engine, read_only=True) as session:
        assert session.exec(select(Upload)).all() == []


def test_a_submit_with_bad_files_names_every_problem_jobs_submit_would(api: httpx.Client,
                                                                         bucket_runtime: Runtime) -> None:
    body = {"endpoint": "tts", "input": 5, "files": {"audio": "rpq/uploads/x/audio.wav", "../b": {"key": "rpq/b"}},
            "outputs": ["v.mp4", "v.mp4"]}

    answer = api.post("/v1/jobs", json=body)
    with pytest.raises(jobs.InvalidJob) as python:
        jobs.submit("tts", 5, files={"audio": {"key": 1}, "../b": {"key": "rpq/b"}}, outputs=["v.mp4", "v.mp4"],
                    runtime=bucket_runtime)

    assert answer.status_code == 422
    # The input that is no object is named by the argument that needs one: the outputs (both files were wrong).
    assert problems(answer) == {("files[0]", "type"), ("files[1]", "format"), ("outputs[1]", "unique"),
                                ("outputs", "type")}
    assert "POST /v1/uploads" in answer.text  # over HTTP a file is a key: the answer says how to make one
    # The same fields as the Python API's answer (there, "audio" was a key of the wrong type).
    assert {p.field for p in python.value.problems} == {"files[0].key", "files[1]", "outputs[1]", "outputs"}
    assert jobs.list_jobs(runtime=bucket_runtime) == []


def test_a_key_no_upload_reserved_is_refused_at_submit(api: httpx.Client) -> None:
    answer = api.post("/v1/jobs", json={"endpoint": "tts", "input": {},
                                        "files": {"a": {"key": f"rpq/uploads/{secrets.token_urlsafe(8)}/a"}}})

    assert answer.status_code == 422 and problems(answer) == {("files[0].key", "known")}


def test_a_file_the_job_does_not_have_is_a_404_and_so_is_a_job_that_does_not_exist(
    api: httpx.Client, bucket_runtime: Runtime
) -> None:
    job = jobs.submit("tts", {}, outputs=["video.mp4"], runtime=bucket_runtime)

    not_yet = api.get(f"/v1/jobs/{job.id}/files/video.mp4")
    never = api.get(f"/v1/jobs/{job.id}/files/{CANARY}.bin")
    no_job = api.get("/v1/jobs/no-such-job/files")
    no_job_file = api.get("/v1/jobs/no-such-job/files/a.bin")
    bad_query = api.get(f"/v1/jobs/{job.id}/files/video.mp4", params={"expires": 0, "colour": "red"})

    assert (not_yet.status_code, problems(not_yet)) == (404, {("name", "known")})  # an output: once completed
    assert (never.status_code, problems(never)) == (404, {("name", "known")}) and CANARY not in never.text
    assert (no_job.status_code, problems(no_job)) == (404, {("id", "known")})
    assert (no_job_file.status_code, problems(no_job_file)) == (404, {("id", "known")})
    assert (bad_query.status_code, problems(bad_query)) == (422, {("expires", "range"), ("query", "unknown")})


def test_the_files_routes_need_the_token(start_api: Callable[..., ApiServer], bucket_runtime: Runtime) -> None:
    client = start_api(bucket_runtime).client(token=None)
    job = jobs.submit("tts", {}, files={"a.bin": b"a"}, runtime=bucket_runtime)

    answers = [client.get(f"/v1/jobs/{job.id}/files"), client.get(f"/v1/jobs/{job.id}/files/a.bin"),
               client.post("/v1/uploads", json={"name": "a", "size": 1})]

    assert [a.status_code for a in answers] == [401, 401, 401]
    assert "Location" not in answers[1].headers


# -- the server's side: no bucket, a bucket that fails ---------------------------------------------


def test_without_a_bucket_uploads_and_links_are_503_and_a_submit_with_files_is_refused(
    start_api: Callable[..., ApiServer], runtime: Runtime
) -> None:
    api = start_api(runtime).client()
    job = jobs.submit("tts", {}, runtime=runtime)

    uploads = api.post("/v1/uploads", json={"name": "a.wav", "size": 10})
    link = api.get(f"/v1/jobs/{job.id}/files/a.wav")
    listed = api.get(f"/v1/jobs/{job.id}/files")
    submitted = api.post("/v1/jobs", json={"endpoint": "tts", "input": {}, "outputs": ["v.mp4"]})
    schema = api.get("/openapi.json").json()["components"]["schemas"]["JobRequest"]["properties"]

    assert (uploads.status_code, problems(uploads)) == (503, {("files", "configured")})
    assert "RPQ_S3_BUCKET" in uploads.text
    assert (link.status_code, problems(link)) == (503, {("files", "configured")})
    assert (listed.status_code, listed.json()) == (200, {"files": []})
    assert (submitted.status_code, problems(submitted)) == (422, {("outputs", "configured")})  # what asked for files
    assert schema["offload"]["enum"] == [False] and "RPQ_S3_BUCKET is not set" in schema["files"]["description"]


def test_a_bucket_that_fails_is_a_502_naming_the_operation_and_no_credential(
    start_api: Callable[..., ApiServer], bucket_runtime: Runtime
) -> None:
    bucket_runtime.settings = bucket_runtime.settings.model_copy(update={"s3_bucket": "rpq-no-such-bucket"})
    api = start_api(bucket_runtime).client()

    answer = api.post("/v1/jobs", json={"endpoint": "tts", "input": {"text": "long"}, "offload": True})

    assert answer.status_code == 502 and problems(answer) == {("store", "upstream")}
    assert "PutObject" in answer.text and "NoSuchBucket" in answer.text
    assert FAKE_S3_SECRET not in answer.text and "AKIA" not in answer.text
    assert jobs.list_jobs(runtime=bucket_runtime) == []
