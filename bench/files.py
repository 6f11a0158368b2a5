"""What files cost rpq per job: presigning, a submit with files, the /run block, the completion check.

Everything runs in this process against a local S3 server (moto's, as a child process so its CPU is not
counted here) and a SQLite file, with no Celery: the figures are rpq's own work per job, wall and CPU,
next to the same step for a job without files measured in the same run.

    .venv/bin/python -m bench.files [--jobs 300]
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3.session

from bench.harness import free_port, machine, say, wait_until

N_PRESIGN = 2000


def timed(label: str, count: int, step: Callable[[int], object]) -> tuple[float, float]:
    """Run `step` `count` times; print and return wall and CPU milliseconds per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        step(i)
    wall_ms = (time.perf_counter() - wall) * 1000 / count
    cpu_ms = (time.process_time() - cpu) * 1000 / count
    say(f"  {label:<58} {wall_ms:8.3f} ms wall {cpu_ms:8.3f} ms CPU")
    return wall_ms, cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=300)
    jobs_n = parser.parse_args().jobs

    import subprocess

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
                       "AWS_EC2_METADATA_DISABLED": "true"})
    s3 = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        wait_until(lambda: httpx.get(f"{endpoint}/moto-api/", timeout=1).status_code == 200, timeout=30,
                   what="the S3 server")
        boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="bench")
        with tempfile.TemporaryDirectory() as scratch:
            run(endpoint, Path(scratch) / "bench.db", jobs_n)
    finally:
        s3.terminate()
        s3.wait(10)


def run(endpoint: str, db_path: Path, n: int) -> None:
    import jobs
    from jobs.flow import lifecycle
    from jobs.runtime import Runtime
    from jobs.settings import Endpoint, Secret, Settings
    from jobs.storage.db import make_engine, upgrade
    from jobs.storage.models import JobRow
    from jobs.storage.store import get_row

    url = f"sqlite:///{db_path}"
    upgrade(url)
    settings = Settings(runpod_api_key=Secret("unused"), database_url=url,
                        endpoints={"bench": Endpoint("bench", "bench-endpoint")}, s3_bucket="bench",
                        s3_endpoint_url=endpoint, s3_region="us-east-1")
    rt = Runtime(settings=settings, engine=make_engine(url), publish=lambda *_: None,
                 make_client=lambda: None)  # type: ignore[arg-type,return-value]
    store = rt.objects
    say(", ".join(f"{k}: {v}" for k, v in machine().items()))
    say(f"files bench: {n} jobs per case, S3 = moto server on loopback, SQLite file\n")

    say("presigning (no I/O):")
    key = store.key_for("job-1", 1, "video.mp4")
    timed("presign_get", N_PRESIGN, lambda _: store.presign_get(key))
    timed("presign_put (Content-Type bound)", N_PRESIGN, lambda _: store.presign_put(key, "video/mp4", None))

    say("\njobs.submit():")
    timed("no files", n, lambda _: jobs.submit("bench", {"text": "hi"}, runtime=rt))
    declared = [jobs.submit("bench", {"text": "hi"}, outputs=["video.mp4"], runtime=rt) for _ in range(1)]
    timed("outputs=['video.mp4'] (one row more, no S3 call)", n,
          lambda _: declared.append(jobs.submit("bench", {"text": "hi"}, outputs=["video.mp4"], runtime=rt)))
    payload = os.urandom(64 * 1024)
    timed("files={'audio': 64 KB bytes} (PUT + HEAD at submit)", n,
          lambda _: jobs.submit("bench", {"text": "hi"}, files={"audio": payload}, runtime=rt))

    def row(job_id: str) -> JobRow:
        from jobs.storage.db import session_scope

        with session_scope(rt.engine, read_only=True) as session:
            found = get_row(session, job_id)
        assert found is not None
        return found

    rows = [row(job.id) for job in declared[:n]]
    say("\nbefore /run (read job_files, presign each URL):")
    timed("a job with one declared output", n, lambda i: lifecycle._with_files(rt, rows[i]))

    say("\nat completion:")
    for job_row in rows[: n // 2]:  # half the outputs were written by the handler, half are missing
        store.put(store.key_for(job_row.id, 1, "video.mp4"), b"x" * 1000, "video/mp4")
    timed("HEAD one declared output (half present, half missing)", n,
          lambda i: lifecycle._finish_files(rt, rows[i], {"ok": True}))
    big = {"text": "w" * 2_000_000}
    timed("an output of 2 MB moved to the bucket", 20, lambda i: lifecycle._finish_files(rt, rows[i], big))
    rt.close()


if __name__ == "__main__":
    main()
