"""`rpq jobs files` and `rpq jobs download`, run as a user runs them: a child process with its environment,
against moto's S3 over HTTP and a SQLite file the test writes its jobs to with the Python API."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3.session
import httpx
import pytest

import jobs
from jobs.runpod.client import RunPodClient
from jobs.runtime import Runtime
from jobs.settings import Endpoint, Settings
from jobs.storage.db import make_engine, upgrade
from tests.conftest import ENDPOINT_ID, ENDPOINT_NAME, FAKE_S3_SECRET, Published

pytestmark = pytest.mark.integration

REGION = "us-east-1"
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def bucket_env(tmp_path: Path, redis_url: str, s3_bucket: str, s3_endpoint_url: str) -> dict[str, str]:
    """The environment of an rpq with files on (the fake S3 credentials are in os.environ already)."""
    return {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
            "CELERY_BROKER_URL": redis_url.rsplit("/", 1)[0] + "/0",
            "RUNPOD_ENDPOINTS": f"{ENDPOINT_NAME}={ENDPOINT_ID}", "RPQ_S3_BUCKET": s3_bucket,
            "RPQ_S3_ENDPOINT_URL": s3_endpoint_url, "RPQ_S3_REGION": REGION}


@pytest.fixture
def runtime(bucket_env: dict[str, str]) -> Iterator[Runtime]:
    """The Python API on the database and bucket the CLI uses: how the tests make jobs with files."""
    url = bucket_env["DATABASE_URL"]
    upgrade(url)
    settings = Settings(database_url=url, endpoints={ENDPOINT_NAME: Endpoint(ENDPOINT_NAME, ENDPOINT_ID)},
                        s3_bucket=bucket_env["RPQ_S3_BUCKET"], s3_endpoint_url=bucket_env["RPQ_S3_ENDPOINT_URL"],
                        s3_region=REGION)
    rt = Runtime(settings=settings, engine=make_engine(url), publish=Published(),
                 make_client=lambda: RunPodClient(api_key="unused"))
    yield rt
    rt.close()


@pytest.fixture
def rpq(bucket_env: dict[str, str], tmp_path: Path) -> Run:
    """Run `rpq ARGS` in `cwd` (default: a directory of the test's own); returns (exit code, stdout, stderr)."""
    work = tmp_path / "work"
    work.mkdir()

    def run(*args: str, cwd: Path = work, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=env or bucket_env,
                              capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout, done.stderr

    return run


def job_with_files(rt: Runtime, **files: bytes) -> jobs.Job:
    """A job whose inputs were handed to submit (so they are in the bucket, checked), and one declared output."""
    return jobs.submit(ENDPOINT_NAME, {"take": 2}, files=files, outputs=["video.mp4"], runtime=rt)


def test_jobs_files_lists_a_jobs_files_as_a_table_and_as_json(rpq: Run, runtime: Runtime) -> None:
    job = job_with_files(runtime, **{"audio.wav": b"RIFF....", "frames/0001.png": b"\x89PNG"})

    code, table, _ = rpq("jobs", "files", job.id)
    _, listed, _ = rpq("jobs", "files", job.id, "--json")

    assert code == 0
    lines = [line.split() for line in table.splitlines()]
    assert lines[0] == ["NAME", "ROLE", "STATE", "SIZE", "CONTENT-TYPE", "ETAG"]
    assert [line[:5] for line in lines[1:]] == [["audio.wav", "input", "stored", "8", "audio/x-wav"],
                                                 ["frames/0001.png", "input", "stored", "4", "image/png"],
                                                 ["video.mp4", "output", "declared", "-", "video/mp4"]]
    assert [f["name"] for f in jobs_json(listed)] == ["audio.wav", "frames/0001.png", "video.mp4"]
    assert jobs_json(listed) == [info.to_dict() for info in jobs.files(job.id, runtime=runtime)]


def jobs_json(text: str) -> list[dict[str, object]]:
    import json

    loaded: list[dict[str, object]] = json.loads(text)
    return loaded


def test_download_writes_the_file_under_its_base_name_and_overwrites_only_with_force(
    rpq: Run, runtime: Runtime, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    job = job_with_files(runtime, **{"frames/0001.png": data})
    work = tmp_path / "work"

    first = rpq("jobs", "download", job.id, "frames/0001.png")
    (work / "0001.png").write_bytes(b"mine")
    refused = rpq("jobs", "download", job.id, "frames/0001.png")
    kept = (work / "0001.png").read_bytes()
    forced = rpq("jobs", "download", job.id, "frames/0001.png", "--force")

    assert first == (0, "0001.png (300000 bytes)\n", "")  # no progress bar when stderr is not a terminal
    assert refused[0] == 2 and "0001.png exists; pass --force" in refused[2] and kept == b"mine"
    assert forced[0] == 0 and (work / "0001.png").read_bytes() == data
    assert sorted(p.name for p in work.iterdir()) == ["0001.png"]  # no partial file left beside it
    assert oct((work / "0001.png").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_download_to_a_path_prints_what_it_wrote_and_no_url(rpq: Run, runtime: Runtime, tmp_path: Path) -> None:
    job = job_with_files(runtime, **{"audio.wav": b"RIFF" * 1000})
    target = tmp_path / "out" / "take2.wav"
    target.parent.mkdir()

    code, out, err = rpq("-v", "jobs", "download", job.id, "audio.wav", "-o", str(target), "--json")

    assert code == 0 and target.read_bytes() == b"RIFF" * 1000
    assert jobs_json(f"[{out}]")[0] == {"job_id": job.id, "name": "audio.wav", "role": "input", "path": str(target),
                                        "bytes": 4000, "etag": jobs.files(job.id, runtime=runtime)[0].etag}
    # -v logs at DEBUG, httpx and botocore included: neither the URL's signature nor a credential shows.
    assert "X-Amz-" not in out + err and "Signature" not in out + err and FAKE_S3_SECRET not in out + err
    assert "DEBUG httpcore" in err  # it did log at DEBUG


def test_download_shows_a_progress_bar_on_a_terminal_and_no_url(rpq: Run, runtime: Runtime, tmp_path: Path,
                                                                  bucket_env: dict[str, str]) -> None:
    job = job_with_files(runtime, **{"clip.bin": os.urandom(2_000_000)})
    leader, follower = pty.openpty()  # stderr a terminal, as for a person running it
    process = subprocess.Popen([sys.executable, "-m", "jobs.cli", "jobs", "download", job.id, "clip.bin"],
                               cwd=tmp_path / "work", env={**bucket_env, "COLUMNS": "120"},
                               stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        shown += chunk
    out, _ = process.communicate(timeout=60)
    os.close(leader)

    assert process.returncode == 0 and out == b"clip.bin (2000000 bytes)\n"
    assert b"clip.bin" in shown and b"2.0/2.0 MB" in shown  # the bar, with sizes, went to the terminal
    assert b"X-Amz-" not in shown


def test_a_file_the_job_does_not_have_exits_1_and_writes_nothing(rpq: Run, runtime: Runtime, tmp_path: Path) -> None:
    job = job_with_files(runtime, **{"audio.wav": b"RIFF"})

    not_yet = rpq("jobs", "download", job.id, "video.mp4")  # declared: in the bucket once the job has completed
    never = rpq("jobs", "download", job.id, "nope.bin")
    no_job = rpq("jobs", "download", "no-such-job", "audio.wav")
    no_job_files = rpq("jobs", "files", "no-such-job")

    assert not_yet[0] == 1 and "has no file 'video.mp4' in the bucket" in not_yet[2]
    assert never[0] == 1 and "nope.bin" in never[2]
    assert no_job[0] == 1 and "no job with id 'no-such-job'" in no_job[2]
    assert no_job_files[0] == 1 and "no job with id" in no_job_files[2]
    assert "Traceback" not in not_yet[2] + never[2] + no_job[2] + no_job_files[2]
    assert list((tmp_path / "work").iterdir()) == []


def test_bytes_that_do_not_match_the_recorded_size_are_not_written(
    rpq: Run, runtime: Runtime, tmp_path: Path, bucket_env: dict[str, str]
) -> None:
    job = job_with_files(runtime, **{"audio.wav": b"RIFF" * 100})
    (stored,) = [f for f in jobs.files(job.id, runtime=runtime) if f.name == "audio.wav"]
    # Someone replaced the object after the job recorded it.
    boto3.session.Session().client("s3", endpoint_url=bucket_env["RPQ_S3_ENDPOINT_URL"], region_name=REGION
                                   ).put_object(Bucket=bucket_env["RPQ_S3_BUCKET"], Key=stored.key, Body=b"short")

    code, out, err = rpq("jobs", "download", job.id, "audio.wav")

    assert code == 1 and out == ""
    assert "got 5 bytes where the bucket recorded 400; nothing written" in err
    assert list((tmp_path / "work").iterdir()) == []


def test_url_prints_a_presigned_url_that_downloads_the_file(rpq: Run, runtime: Runtime) -> None:
    job = job_with_files(runtime, **{"audio.wav": b"RIFF" * 10})

    code, out, _ = rpq("jobs", "download", job.id, "audio.wav", "--url", "--expires", "60")

    assert code == 0 and "X-Amz-Expires=60" in out
    assert httpx.get(out.strip()).content == b"RIFF" * 10


def test_without_a_bucket_download_names_the_setting_and_exits_2(rpq: Run, runtime: Runtime,
                                                                 bucket_env: dict[str, str]) -> None:
    job = job_with_files(runtime, **{"audio.wav": b"RIFF"})
    no_bucket = {name: value for name, value in bucket_env.items() if name != "RPQ_S3_BUCKET"}

    code, _, err = rpq("jobs", "download", job.id, "audio.wav", env=no_bucket)
    listed = rpq("jobs", "files", job.id, env=no_bucket)  # the table needs no bucket

    assert code == 2 and "RPQ_S3_BUCKET" in err and "Traceback" not in err
    assert listed[0] == 0 and "audio.wav" in listed[1]
