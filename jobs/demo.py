"""`rpq demo`: the whole pipeline on one machine, against the simulator.

It starts the RunPod simulator, a Celery worker and beat as child processes (and a private Redis
when none answers), submits jobs of mixed durations through `jobs.submit`, cancels a few, shows
progress live, and ends with a summary. Everything it started is stopped on exit and on Ctrl-C.
The exit code is 0 only when every job ended as planned.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

import boto3.session
import httpx
import redis

from jobs import api
from jobs.bucket.access import file_url, files
from jobs.runtime import Runtime
from jobs.settings import Endpoint, Secret, Settings
from jobs.states import JobStatus
from jobs.storage.db import upgrade

Echo = Callable[[str], None]
ENDPOINT = "demo"
ENDPOINT_ID = "demo-endpoint"
VIDEO_BYTES = 5_000_000


class DemoError(Exception):
    """The demo could not start; the message says what to do."""


def run_demo(*, job_count: int, echo: Echo, database_url: str | None = None, seed: int | None = None) -> int:
    rng = random.Random(seed)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="rpq-demo-") as scratch:
        try:
            broker = stack.enter_context(_redis(Settings.from_env().celery_broker_url, Path(scratch), echo))
            api_key = "demo-" + secrets.token_hex(12)
            sim_port = _free_port()
            stack.enter_context(_child(
                "simulator",
                [sys.executable, "-m", "jobs.cli", "simulator", "--port", str(sim_port), "--api-key", api_key,
                 "--workers-max", "6", "--cold-start-seconds", "1", "--endpoint", ENDPOINT_ID],
                Path(scratch), env=None, ready=lambda: _answers(f"http://127.0.0.1:{sim_port}/_sim/health"),
            ))
            files_env = stack.enter_context(_bucket(Path(scratch), echo))
            url = database_url or f"sqlite:///{Path.cwd() / 'rpq-demo.db'}"
            if database_url is None:
                for suffix in ("", "-wal", "-shm"):
                    Path.cwd().joinpath("rpq-demo.db" + suffix).unlink(missing_ok=True)
            upgrade(url)
            settings = Settings(
                runpod_api_key=Secret(api_key), runpod_serverless_url=f"http://127.0.0.1:{sim_port}/v2",
                database_url=url, celery_broker_url=broker, endpoints={ENDPOINT: Endpoint(ENDPOINT, ENDPOINT_ID)},
                reconcile_interval_seconds=5, poll_grace_seconds=5,
                s3_bucket=files_env.get("RPQ_S3_BUCKET"), s3_endpoint_url=files_env.get("RPQ_S3_ENDPOINT_URL"),
                s3_region=files_env.get("RPQ_S3_REGION"),
            )
            env = {**os.environ, "RUNPOD_API_KEY": api_key, "RUNPOD_SERVERLESS_URL": settings.runpod_serverless_url,
                   "DATABASE_URL": url, "CELERY_BROKER_URL": broker, "RUNPOD_ENDPOINTS": f"{ENDPOINT}={ENDPOINT_ID}",
                   "RPQ_RECONCILE_SECONDS": "5", "RPQ_POLL_GRACE_SECONDS": "5", **files_env}
            stack.enter_context(_child(
                "worker",
                [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-P", "threads", "-c", "16",
                 "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
                Path(scratch), env=env, ready=lambda: True,
            ))
            stack.enter_context(_child(
                "beat",
                [sys.executable, "-m", "celery", "-A", "tasks", "beat", "--loglevel", "WARNING",
                 "-s", str(Path(scratch) / "beat-schedule")],
                Path(scratch), env=env, ready=lambda: True,
            ))
        except DemoError as exc:
            echo(f"rpq demo: {exc}")
            return 2
        runtime = stack.enter_context(_closing(Runtime.from_settings(settings)))
        try:
            code = _session(runtime, job_count, rng, echo)
        except KeyboardInterrupt:
            echo("\ninterrupted: stopping the simulator, worker and beat")
            return 130
        echo(f"\nwhere to look next:\n"
             f"  DATABASE_URL={url} rpq jobs list\n"
             f"  DATABASE_URL={url} rpq jobs show <id>      (a job and its history)\n"
             f"  DATABASE_URL={url} rpq jobs files <id>     (a job's files, as recorded)\n"
             f"  celery -A tasks flower --conf=flower.conf    (queues and workers; set FLOWER_BASIC_AUTH)")
        return code


# (label, share of jobs, handler input, final status)
PLAN: list[tuple[str, float, Callable[[random.Random], dict[str, Any]], JobStatus]] = [
    ("tts", 0.45, lambda r: {"sleep": round(r.uniform(0.5, 2.0), 1), "output": {"audio": "s3://demo/a.wav"}},
     JobStatus.COMPLETED),
    ("export", 0.25, lambda r: {"sleep": round(r.uniform(3, 6), 1), "progress": ["25%", "50%", "75%"],
                                 "output": {"video": "s3://demo/v.mp4"}}, JobStatus.COMPLETED),
    ("broken", 0.15, lambda r: {"sleep": round(r.uniform(0.5, 2.0), 1), "fail": "CUDA out of memory"},
     JobStatus.FAILED),
    ("abandoned", 0.15, lambda r: {"sleep": 60}, JobStatus.CANCELLED),
]


def _session(rt: Runtime, job_count: int, rng: random.Random, echo: Echo) -> int:
    labels = rng.choices([p[0] for p in PLAN], weights=[p[1] for p in PLAN], k=job_count)
    by_label = {p[0]: p for p in PLAN}
    expected: dict[str, JobStatus] = {}
    started = time.monotonic()
    echo(f"submitting {job_count} jobs: " + ", ".join(f"{n} {label}" for label, n in Counter(labels).items()))
    for label in labels:
        job = api.submit(ENDPOINT, by_label[label][2](rng), metadata={"kind": label}, runtime=rt)
        expected[job.id] = by_label[label][3]
    submitted = time.monotonic() - started
    echo(f"submitted in {submitted * 1000:.0f} ms ({submitted / job_count * 1000:.1f} ms each)")
    video_job = None
    if rt.has_files:
        # An export with a file: the handler reads its input from the bucket and writes a video there.
        video_job = api.submit(ENDPOINT, {"sleep": 2, "read_inputs": True,
                                          "write_output": {"name": "video.mp4", "bytes": VIDEO_BYTES}},
                               files={"script": b"INT. GPU - NIGHT"}, outputs=["video.mp4"],
                               metadata={"kind": "export-with-file"}, runtime=rt)
        expected[video_job.id] = JobStatus.COMPLETED
        echo(f"submitted 1 export with a file: input script, output video.mp4 ({VIDEO_BYTES // 1_000_000} MB)")

    to_cancel = {job_id for job_id, status in expected.items() if status is JobStatus.CANCELLED}
    deadline = time.monotonic() + 120
    live = sys.stdout.isatty()
    last_line = ""
    while time.monotonic() < deadline:
        found = {job.id: job for job in api.list_jobs(endpoint=ENDPOINT, limit=10_000, runtime=rt)}
        for job_id in list(to_cancel):
            if found[job_id].status is JobStatus.IN_PROGRESS:
                api.cancel(job_id, runtime=rt)
                to_cancel.discard(job_id)
        counts = Counter(job.status for job in found.values())
        line = "  ".join(f"{status.value} {counts[status]}" for status in JobStatus if counts[status])
        if line != last_line:
            elapsed = time.monotonic() - started
            if live:
                sys.stdout.write(f"\r{elapsed:5.1f}s  {line}\033[K")
                sys.stdout.flush()
            else:
                echo(f"{elapsed:5.1f}s  {line}")
            last_line = line
        if all(job.is_terminal for job in found.values()):
            break
        time.sleep(0.25)
    if live:
        sys.stdout.write("\n")

    final = {job_id: api.get(job_id, runtime=rt) for job_id in expected}
    echo("\nsummary")
    for status, count in sorted(Counter(j.status.value for j in final.values()).items()):
        echo(f"  {status:<12} {count}")
    latencies = sorted((j.finished_at - j.created_at).total_seconds() for j in final.values()
                       if j.finished_at and j.status is not JobStatus.CANCELLED)
    if latencies:
        echo(f"  end-to-end latency (submit to stored result): p50 {_pct(latencies, 50):.2f}s, "
             f"p95 {_pct(latencies, 95):.2f}s")
    polls = [j.poll_count for j in final.values()]
    echo(f"  RunPod status calls per job: {sum(polls) / len(polls):.1f} on average, {max(polls)} at most")
    if video_job is not None and final[video_job.id].status is JobStatus.COMPLETED:
        video = next((f for f in files(video_job.id, runtime=rt) if f.name == "video.mp4"), None)
        if video is None or video.state != "stored":
            echo(f"  UNEXPECTED: job {video_job.id} completed without its video.mp4 in the bucket")
            return 1
        url = file_url(video_job.id, "video.mp4", expires=600, runtime=rt)
        digest = hashlib.sha256(httpx.get(url, timeout=60).raise_for_status().content).hexdigest()
        written = (final[video_job.id].output or {}).get("outputs", {}).get("video.mp4", {}).get("sha256")
        echo(f"  the export's video.mp4: {video.size} bytes in the bucket, downloaded through its presigned URL, "
             f"sha256 {'equal to' if digest == written else 'DIFFERENT from'} what the GPU handler wrote")
        echo(f"  its download URL (a credential for 10 minutes; the demo's own S3 server stops with it):\n    {url}")
        if digest != written:
            return 1
    wrong = [(job_id, job.status, expected[job_id]) for job_id, job in final.items() if job.status != expected[job_id]]
    for job_id, got, want in wrong:
        echo(f"  UNEXPECTED: {job_id} ended {got}, planned {want}")
    return 1 if wrong else 0


@contextmanager
def _bucket(scratch: Path, echo: Echo) -> Iterator[dict[str, str]]:
    """The settings of a bucket for the file job: the one RPQ_S3_BUCKET names, else a local S3 server
    (moto's, installed with rpq's development tools), else none (the demo runs without the file job)."""
    if os.environ.get("RPQ_S3_BUCKET"):
        echo(f"files: using the bucket {os.environ['RPQ_S3_BUCKET']}")
        yield {}
        return
    if importlib.util.find_spec("moto") is None:
        echo("files: RPQ_S3_BUCKET is not set and moto is not installed (scripts/setup installs it): no file job")
        yield {}
        return
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Credentials for the local server only, in boto3's own variables (this process reads them too).
    env = {"RPQ_S3_BUCKET": "rpq-demo", "RPQ_S3_ENDPOINT_URL": endpoint, "RPQ_S3_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
    with _child("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], scratch, env=None,
                ready=lambda: _answers(f"{endpoint}/moto-api/")):
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="rpq-demo")
        echo(f"files: a local S3 server at {endpoint}, bucket rpq-demo")
        yield env


def _pct(values: list[float], pct: int) -> float:
    return values[min(len(values) - 1, round(pct / 100 * (len(values) - 1)))]


@contextmanager
def _redis(url: str, scratch: Path, echo: Echo) -> Iterator[str]:
    """Redis at `url`, or a private one when none answers there."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
        echo(f"using Redis at {url}")
        yield url
        return
    except redis.RedisError:
        pass
    finally:
        client.close()
    server = shutil.which("redis-server")
    if server is None:
        raise DemoError(f"no Redis answers at {url} and redis-server is not installed. Install it "
                        "(apt-get install redis-server) or point CELERY_BROKER_URL at a running Redis.")
    port = _free_port()
    private = f"redis://127.0.0.1:{port}/0"
    echo(f"no Redis at {url}; starting a private one at {private}")
    with _child("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(scratch)], scratch, env=None,
                ready=lambda: redis.Redis.from_url(private).ping()):
        yield private


@contextmanager
def _child(name: str, command: list[str], scratch: Path, *, env: dict[str, str] | None,
           ready: Callable[[], object]) -> Iterator[subprocess.Popen[bytes]]:
    log: IO[bytes] = open(scratch / f"{name}.log", "wb")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise DemoError(f"{name} exited at start:\n{(scratch / f'{name}.log').read_text()[-2000:]}")
            try:
                if ready():
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"{name} did not start within 30 s")
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        log.close()


@contextmanager
def _closing(runtime: Runtime) -> Iterator[Runtime]:
    try:
        yield runtime
    finally:
        runtime.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
