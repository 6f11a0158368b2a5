"""The export path end to end: a client uploads an input straight to the bucket, a real Celery worker sends
the job to the simulator, whose GPU handler reads the input and writes a 50 MB video over presigned URLs,
and the client downloads the video through a presigned GET. Real Redis, SQLite and PostgreSQL, a real S3
server (moto's) over HTTP.

Then the secrets check: no presigned URL, S3 credential, RunPod API key, API bearer token or webhook token in
any log line of the stack, any row of any table, or any Celery message the stack sent (read off the broker with
Redis's MONITOR). The stack logs in text on SQLite and in JSON (RPQ_LOG_FORMAT=json) on PostgreSQL, so each
format is checked once without a third run: in JSON every line of every process must be one object with every
field, and each line about the job must name it and its correlation id.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3.session
import httpx
import pytest
import redis
from sqlalchemy import MetaData, select

import jobs
from jobs.simulator.transfers import generated_sha256
from jobs.states import JobStatus
from tests.conftest import ENDPOINT_ID, FAKE_S3_SECRET, Pipeline, SimulatorProcess, _stack

pytestmark = pytest.mark.integration

VIDEO_BYTES = 50_000_000
AUDIO = hashlib.sha256(b"seed").digest() * 100_000  # 3.2 MB of input
ACCESS_KEY = "AKIARPQPIPELINEKEY"
#: The log format of each run of the stack: both are checked, with no run of the stack for the second alone.
LOG_FORMAT = {"sqlite": "text", "postgresql": "json"}
LOG_FIELDS = {"time", "level", "logger", "message", "job_id", "correlation_id", "tenant"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def files_stack(request: pytest.FixtureRequest, start_simulator: Callable[..., SimulatorProcess], redis_url: str,
                tmp_path_factory: pytest.TempPathFactory, s3_endpoint_url: str) -> Iterator[Pipeline]:
    """The whole stack with files on, and the HTTP API: a bucket of its own, credentials only in boto3's variables,
    every process (the simulator too) logging in the run's LOG_FORMAT."""
    bucket = f"rpq-pipeline-{uuid.uuid4().hex[:12]}"
    credentials = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_S3_SECRET,
                   "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                   "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**credentials, "RPQ_LOG_FORMAT": LOG_FORMAT[request.param]}.items():
            patch.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
            patch.delenv(name, raising=False)
        boto3.session.Session().client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1") \
            .create_bucket(Bucket=bucket)
        env = {**credentials, "RPQ_S3_BUCKET": bucket, "RPQ_S3_ENDPOINT_URL": s3_endpoint_url,
               "RPQ_S3_REGION": "us-east-1"}
        with _stack(request, start_simulator, redis_url, tmp_path_factory, name="files", broker_offset=1,
                    with_api=True, env=env,
                    settings={"s3_bucket": bucket, "s3_endpoint_url": s3_endpoint_url, "s3_region": "us-east-1"}
                    ) as stack:
            yield stack


class BrokerTraffic:
    """Every command the stack's Redis database receives while it runs, Celery message bodies decoded."""

    def __init__(self, url: str) -> None:
        self.db = int(url.rsplit("/", 1)[1])
        self.client = redis.Redis.from_url(url)
        self.commands: list[str] = []
        self.monitor = self.client.monitor()
        self.monitor.__enter__()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                command = self.monitor.next_command()
                if command.get("db") == self.db:
                    self.commands.append(str(command.get("command", "")))
        except (redis.RedisError, OSError, ValueError, AttributeError):
            return  # the connection was closed: the test is over

    def stop(self) -> str:
        """Stop listening; all that was seen, with each Celery message's base64 body decoded beside it."""
        self.monitor.connection.disconnect()  # type: ignore[union-attr]
        self.thread.join(10)
        seen = list(self.commands)
        decoded: list[str] = []
        for command in seen:
            for start in (i for i, c in enumerate(command) if c == "{"):
                try:
                    message = json.loads(command[start:].rsplit("}", 1)[0] + "}")
                except ValueError:
                    continue
                if isinstance(message, dict) and isinstance(message.get("body"), str):
                    decoded.append(base64.b64decode(message["body"]).decode(errors="replace"))
                    decoded.append(json.dumps(message.get("headers", {})))
                break
        return "\n".join(seen + decoded)


def every_row(stack: Pipeline) -> str:
    metadata = MetaData()
    metadata.reflect(stack.runtime.engine)
    with stack.runtime.engine.connect() as connection:
        return "\n".join(repr(tuple(row)) for table in metadata.sorted_tables
                         for row in connection.execute(select(table)))


def log_files(stack: Pipeline) -> list[Path]:
    """Every log of the stack's processes: worker, beat, the HTTP API and the simulator."""
    assert stack.simulator.log_path is not None
    return [*stack.log_dir.glob("*.log"), stack.simulator.log_path]


def json_lines(paths: list[Path]) -> list[dict[str, Any]]:
    """Every line of every file, each of which must be one JSON object with every field of a log line."""
    lines: list[dict[str, Any]] = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                fields = json.loads(line)
            except ValueError:
                raise AssertionError(f"{path.name}:{number} is not JSON: {line[:300]!r}") from None
            assert isinstance(fields, dict) and set(fields) >= LOG_FIELDS, f"{path.name}:{number}: {line[:300]!r}"
            lines.append(fields)
    return lines


def sha256_of_download(url: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with httpx.stream("GET", url, timeout=60) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def test_an_export_job_runs_end_to_end_with_equal_checksums_and_no_url_or_credential_anywhere(
        files_stack: Pipeline) -> None:
    rt = files_stack.runtime
    correlation_id = f"req-{uuid.uuid4().hex[:10]}"
    traffic = BrokerTraffic(rt.settings.celery_broker_url)
    try:
        ticket = jobs.prepare_upload("talk.wav", "audio/wav", size=len(AUDIO), runtime=rt)
        httpx.put(ticket.url, content=AUDIO, headers=ticket.headers, timeout=60).raise_for_status()

        job = jobs.submit("tts", {"sleep": 0.5, "read_inputs": True,
                                  "write_output": {"name": "video.mp4", "bytes": VIDEO_BYTES}},
                          files={"audio": {"key": ticket.key}}, outputs=["video.mp4"], correlation_id=correlation_id,
                          runtime=rt)
        done = jobs.wait(job.id, timeout=180, runtime=rt)
    finally:
        broker_text = traffic.stop()

    assert done.status is JobStatus.COMPLETED, files_stack.logs()
    assert not done.files_missing
    handler_saw: dict[str, Any] = done.output
    assert handler_saw["inputs"]["audio"] == {"bytes": len(AUDIO), "sha256": hashlib.sha256(AUDIO).hexdigest()}
    assert handler_saw["outputs"]["video.mp4"] == {"bytes": VIDEO_BYTES,
                                                   "sha256": generated_sha256("video.mp4", VIDEO_BYTES)}

    video = next(f for f in jobs.files(job.id, runtime=rt) if f.name == "video.mp4")
    assert (video.state, video.size, video.content_type) == ("stored", VIDEO_BYTES, "video/mp4")
    assert sha256_of_download(jobs.file_url(job.id, "video.mp4", runtime=rt)) == (
        VIDEO_BYTES, handler_saw["outputs"]["video.mp4"]["sha256"])

    # A client asks the HTTP API about the job, with its bearer token and the job's correlation id.
    with files_stack.api_client() as client:
        client.headers["X-Correlation-ID"] = correlation_id
        assert client.get(f"/v1/jobs/{job.id}").json()["status"] == "COMPLETED"
        redirect = client.get(f"/v1/jobs/{job.id}/files/video.mp4")
        assert redirect.status_code == 302 and "X-Amz-Signature" in redirect.headers["location"]
    [at_runpod] = [j for j in files_stack.simulator.jobs() if j["id"] == done.runpod_job_id]
    webhook_token = urlsplit(str(at_runpod["webhook"])).path.rsplit("/", 1)[1]
    assert len(webhook_token) > 20  # the job was sent with its webhook: the check below has a token to look for

    # The secrets check. It could fail: the handler did use URLs, the stack did log and send messages, the worker
    # called RunPod with its key, the API was called with its token, and RunPod called the webhook with its own.
    assert "rpq.dispatch" in broker_text and f'[["{ENDPOINT_ID}"], {{}}' in broker_text  # bodies were read
    logs = "\n".join(path.read_text(errors="replace") for path in log_files(files_stack))
    assert job.id in logs and f"/v1/jobs/{job.id}/files/video.mp4" in logs and "/webhooks/runpod/" in logs
    secrets = ("X-Amz-Signature", "X-Amz-Credential", "Signature=", FAKE_S3_SECRET, ACCESS_KEY,
               files_stack.simulator.api_key, files_stack.api_token, webhook_token)
    for where, text in (("a log line", logs), ("a row", every_row(files_stack)), ("a Celery message", broker_text)):
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in {where}"

    if files_stack.env["RPQ_LOG_FORMAT"] == "json":
        lines = json_lines(log_files(files_stack))
        about_the_job = [line for line in lines if job.id in line["message"]]
        assert {line["logger"].split(".")[0] for line in about_the_job} >= {"rpq", "uvicorn"}  # worker and API
        assert all(line["correlation_id"] == correlation_id for line in about_the_job), about_the_job
        assert all(line["job_id"] == job.id for line in about_the_job if line["logger"].startswith("rpq."))
