"""Retention and the bucket, on SQLite and PostgreSQL against moto's S3 server: a job's objects go with it, never
after it; rows whose objects could not be deleted stay for the next run; jobs without files cost the bucket nothing."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import delete, event, update
from sqlmodel import col, select

import jobs
from jobs.bucket import jobfiles
from jobs.observability.metrics import RpqCollector
from jobs.observability.metrics_recorder import COUNTERS_KEY, RedisRecorder
from jobs.runpod.client import RunPodClient
from jobs.runtime import QUEUES, Runtime, set_runtime
from jobs.settings import Endpoint, Settings
from jobs.states import JobStatus
from jobs.storage import filerows, retention
from jobs.storage.db import make_engine, session_scope
from jobs.storage.models import JobEvent, JobFile, JobRow, Lock, Upload, utcnow
from jobs.storage.store import get_row
from tests.conftest import ENDPOINT_ID, ENDPOINT_NAME, FAKE_S3_SECRET, Published, free_port

pytestmark = pytest.mark.integration

PAST_RETENTION = 91  # days; RUNPOD_JOB_RETENTION_DAYS is 90


def no_runpod() -> RunPodClient:
    raise AssertionError("retention never calls RunPod")


def files_runtime(database_url: str, **s3: Any) -> Runtime:
    """A runtime with files in the given bucket (or none), outputs over 1 KB moved there, and no RunPod."""
    settings = Settings(database_url=database_url, endpoints={ENDPOINT_NAME: Endpoint(ENDPOINT_NAME, ENDPOINT_ID)},
                        s3_region="us-east-1", inline_output_max_bytes=1024, **s3)
    return Runtime(settings=settings, engine=make_engine(database_url), publish=Published(), make_client=no_runpod)


@pytest.fixture
def rt(migrated_db: str, s3_endpoint_url: str, s3_bucket: str) -> Iterator[Runtime]:
    runtime = files_runtime(migrated_db, s3_bucket=s3_bucket, s3_endpoint_url=s3_endpoint_url)
    yield runtime
    runtime.close()


def in_bucket(rt: Runtime) -> set[str]:
    store = rt.objects
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def ended(rt: Runtime, job_id: str, status: JobStatus, *, days_ago: float = 0, **values: Any) -> None:
    """The job's attempt ended `days_ago` (set in the row, as the poll that saw it end would have)."""
    with session_scope(rt.engine) as session:
        session.execute(update(JobRow).where(col(JobRow.id) == job_id)
                        .values(status=status, finished_at=utcnow() - timedelta(days=days_ago), **values))


def handler_wrote(rt: Runtime, job_id: str, attempt: int, *names: str) -> None:
    """What the handler of an attempt did with its presigned PUTs: objects at the attempt's output keys."""
    for name in names:
        rt.objects.put(rt.objects.key_for(job_id, attempt, name), b"made by attempt %d" % attempt,
                       jobfiles.content_type_for(name))


def completed_with_files(rt: Runtime, job_id: str, output: Any, *, days_ago: float) -> None:
    """The poll that saw the attempt complete: declared outputs checked by HEAD, a large output moved."""
    with session_scope(rt.engine) as session:
        row = get_row(session, job_id)
        files = filerows.of_job(session, job_id)
    assert row is not None
    found = jobfiles.check_outputs(rt.objects, row, files)
    moved = jobfiles.move_result(rt.objects, row, output)
    with session_scope(rt.engine) as session:
        filerows.add(session, [*found.rows, moved])
    ended(rt, job_id, JobStatus.COMPLETED, days_ago=days_ago, output_key=moved["key"])


def uploaded(rt: Runtime, name: str, data: bytes) -> str:
    """A file a browser put straight into the bucket with `prepare_upload`'s ticket: its key."""
    ticket = jobs.prepare_upload(name, "audio/wav", size=len(data), runtime=rt)
    assert httpx.put(ticket.url, content=data, headers=ticket.headers).status_code == 200
    return ticket.key


def rows(rt: Runtime, model: type[JobRow] | type[JobFile] | type[JobEvent] | type[Upload]) -> list[Any]:
    with session_scope(rt.engine, read_only=True) as session:
        return list(session.exec(select(model)))


# -- a job and everything rpq made for it ----------------------------------------------------------------------


def test_a_job_past_retention_goes_with_every_object_rpq_made_for_it_and_the_callers_own_object_stays(
        rt: Runtime) -> None:
    library = "rpq/library/voice.wav"  # the caller's own object, named by key: theirs, never deleted
    rt.objects.put(library, b"RIFF voice", "audio/wav")
    ref = uploaded(rt, "ref.wav", b"RIFF ref")
    video = jobs.submit("tts", {"text": "hi"}, runtime=rt,
                        files={"audio.wav": b"RIFF audio", "ref.wav": {"key": ref}, "voice.wav": {"key": library}},
                        outputs=["video.mp4", "thumb.png"])
    handler_wrote(rt, video.id, 1, "video.mp4")  # attempt 1 wrote one output, then failed
    ended(rt, video.id, JobStatus.FAILED)
    jobs.retry(video.id, runtime=rt)
    handler_wrote(rt, video.id, 2, "video.mp4", "thumb.png")
    completed_with_files(rt, video.id, {"frames": ["x" * 100] * 20}, days_ago=PAST_RETENTION)
    offloaded = jobs.submit("tts", {"text": "y" * 5000}, offload=True, runtime=rt)
    ended(rt, offloaded.id, JobStatus.FAILED, days_ago=PAST_RETENTION)
    plain = jobs.submit("tts", {"text": "no files"}, runtime=rt)
    ended(rt, plain.id, JobStatus.COMPLETED, days_ago=PAST_RETENTION)
    recent = jobs.submit("tts", {"text": "recent"}, files={"in.txt": b"recent"}, runtime=rt)
    ended(rt, recent.id, JobStatus.COMPLETED, days_ago=1)
    made_for_video = {f"rpq/jobs/{video.id}/in/audio.wav", ref, f"rpq/jobs/{video.id}/1/out/video.mp4",
                      f"rpq/jobs/{video.id}/2/out/video.mp4", f"rpq/jobs/{video.id}/2/out/thumb.png",
                      f"rpq/jobs/{video.id}/2/output.json"}
    assert in_bucket(rt) == {library, *made_for_video, f"rpq/jobs/{offloaded.id}/input.json",
                             f"rpq/jobs/{recent.id}/in/in.txt"}

    purged = retention.purge(rt, batch=2)

    assert in_bucket(rt) == {library, f"rpq/jobs/{recent.id}/in/in.txt"}
    assert {job.id for job in rows(rt, JobRow)} == {recent.id}
    assert {f.job_id for f in rows(rt, JobFile)} == {recent.id}
    assert {e.job_id for e in rows(rt, JobEvent)} == {recent.id}
    # Video's 6 objects, the thumb.png attempt 1 never wrote (asked anyway: an attempt may leave any output),
    # and the offloaded input.
    assert (purged.jobs, purged.objects, purged.jobs_kept, purged.objects_error) == (3, 8, 0, None)


def test_objects_of_a_cancelled_job_stay_until_retention(rt: Runtime) -> None:
    job = jobs.submit("tts", {"text": "hi"}, files={"audio.wav": b"RIFF"}, outputs=["video.mp4"], runtime=rt)
    jobs.cancel(job.id, runtime=rt)
    handler_wrote(rt, job.id, 1, "video.mp4")  # the handler was already running when the cancel came
    made = {f"rpq/jobs/{job.id}/in/audio.wav", f"rpq/jobs/{job.id}/1/out/video.mp4"}

    within = retention.purge(rt, now=utcnow() + timedelta(days=89))

    assert in_bucket(rt) == made and jobs.get(job.id, runtime=rt).status is JobStatus.CANCELLED
    assert len(jobs.files(job.id, runtime=rt)) == 2 and within.jobs == 0

    past = retention.purge(rt, now=utcnow() + timedelta(days=PAST_RETENTION))

    assert in_bucket(rt) == set() and rows(rt, JobRow) == [] and rows(rt, JobFile) == []
    assert (past.jobs, past.objects) == (1, 2)


# -- unused uploads ------------------------------------------------------------------------------------------


def test_unused_uploads_go_with_their_objects_a_day_after_their_url_expired(rt: Runtime) -> None:
    long_expired = uploaded(rt, "old.wav", b"RIFF old")
    just_expired = uploaded(rt, "late.wav", b"RIFF late")
    valid = uploaded(rt, "new.wav", b"RIFF new")
    never_uploaded = jobs.prepare_upload("abandoned.wav", "audio/wav", size=10, runtime=rt).key
    used = uploaded(rt, "used.wav", b"RIFF used")
    job = jobs.submit("tts", {"text": "hi"}, files={"used.wav": {"key": used}}, runtime=rt)
    with session_scope(rt.engine) as session:
        for key, ago in ((long_expired, timedelta(days=1, minutes=1)), (never_uploaded, timedelta(days=3)),
                         (just_expired, timedelta(hours=23))):
            session.execute(update(Upload).where(col(Upload.key) == key).values(expires_at=utcnow() - ago))

    purged = retention.purge(rt)

    assert in_bucket(rt) == {just_expired, valid, used}
    assert {u.key for u in rows(rt, Upload)} == {just_expired, valid}
    assert [f.key for f in rows(rt, JobFile)] == [used] and jobs.get(job.id, runtime=rt).status is JobStatus.PENDING
    assert (purged.uploads, purged.objects) == (2, 2)


# -- when the objects cannot be deleted ------------------------------------------------------------------------


@pytest.fixture(params=["a bucket that does not exist", "a store that does not answer"])
def failing_rt(request: pytest.FixtureRequest, migrated_db: str, s3_endpoint_url: str) -> Iterator[Runtime]:
    if request.param == "a bucket that does not exist":
        runtime = files_runtime(migrated_db, s3_bucket="rpq-no-such-bucket", s3_endpoint_url=s3_endpoint_url)
    else:
        runtime = files_runtime(migrated_db, s3_bucket="rpq-files", s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    yield runtime
    runtime.close()


def test_when_the_store_fails_the_rows_stay_the_run_says_so_once_and_the_next_run_deletes_both(
        rt: Runtime, failing_rt: Runtime, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with_files = [jobs.submit("tts", {"n": n}, files={"audio.wav": b"RIFF"}, outputs=["out.wav"], runtime=rt).id
                  for n in range(3)]
    plain = [jobs.submit("tts", {"n": n}, runtime=rt).id for n in range(3)]
    for job_id in with_files + plain:
        ended(rt, job_id, JobStatus.FAILED, days_ago=PAST_RETENTION)
    upload = uploaded(rt, "old.wav", b"RIFF old")
    with session_scope(rt.engine) as session:
        session.execute(update(Upload).values(expires_at=utcnow() - timedelta(days=2)))
    before = in_bucket(rt)
    counters = redis.Redis.from_url(redis_url)
    counters.delete(COUNTERS_KEY)
    failing_rt.metrics = RedisRecorder(redis_url)
    calls: list[str] = []
    failing_rt.objects.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    caplog.set_level(logging.DEBUG)
    previous = set_runtime(failing_rt)
    try:
        from tasks.jobs import purge as purge_task

        result = purge_task()  # beat's task, run here: its result is what Flower shows
    finally:
        set_runtime(previous)

    assert (result["jobs"], result["jobs_kept"], result["uploads_kept"]) == (3, 3, 1)
    assert "DeleteObjects" in result["objects_error"]
    assert calls == ["DeleteObjects"]  # one failed call, and the rest of the run went on without the bucket
    assert {job.id for job in rows(rt, JobRow)} == set(with_files)
    assert {f.job_id for f in rows(rt, JobFile)} == set(with_files) and [u.key for u in rows(rt, Upload)] == [upload]
    assert in_bucket(rt) == before
    warnings = [r.getMessage() for r in caplog.records if r.name == "rpq.retention" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 finished jobs and 1 unused uploads" in warnings[0]
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("rpq")]
    assert ours and not [line for line in ours if "http" in line or "127.0.0.1" in line or "X-Amz" in line]
    assert FAKE_S3_SECRET not in caplog.text
    registry = CollectorRegistry()
    registry.register(RpqCollector(rt, counters, QUEUES))
    assert 'rpq_retention_blocked_total{reason="store_error"} 1.0' in generate_latest(registry).decode()

    # The next run is beat's next hour: the lease beat's run keeps for most of its hour has lapsed by then.
    with session_scope(rt.engine) as session:
        session.execute(delete(Lock).where(col(Lock.name) == retention.LOCK))
    again = retention.purge(rt)

    assert in_bucket(rt) == set() and rows(rt, JobRow) == [] and rows(rt, JobFile) == [] and rows(rt, Upload) == []
    assert (again.jobs, again.uploads, again.jobs_kept, again.objects_error) == (3, 1, 0, None)


def test_without_a_bucket_jobs_with_files_are_kept_and_one_warning_names_rpq_s3_bucket(
        rt: Runtime, migrated_db: str, caplog: pytest.LogCaptureFixture) -> None:
    with_files = [jobs.submit("tts", {"n": n}, files={"a.txt": b"a"}, runtime=rt).id for n in range(3)]
    plain = jobs.submit("tts", {"n": "plain"}, runtime=rt).id
    for job_id in [*with_files, plain]:
        ended(rt, job_id, JobStatus.COMPLETED, days_ago=PAST_RETENTION)
    files_off = files_runtime(migrated_db, s3_bucket=None)
    caplog.set_level(logging.INFO, logger="rpq.retention")
    try:
        purged = retention.purge(files_off, batch=2)
    finally:
        files_off.close()

    assert (purged.jobs, purged.jobs_kept) == (1, 3) and "RPQ_S3_BUCKET" in (purged.objects_error or "")
    assert {job.id for job in rows(rt, JobRow)} == set(with_files)
    assert len(in_bucket(rt)) == 3
    [warning] = [r.getMessage() for r in caplog.records if r.name == "rpq.retention"]
    assert "RPQ_S3_BUCKET is not set" in warning


# -- what a job without files costs ------------------------------------------------------------------------------


def test_a_job_without_files_is_purged_without_a_store_call_or_a_look_at_job_files(rt: Runtime) -> None:
    plain = [jobs.submit("tts", {"n": n}, runtime=rt).id for n in range(5)]
    for job_id in plain:
        ended(rt, job_id, JobStatus.COMPLETED, days_ago=PAST_RETENTION)
    calls: list[str] = []
    rt.objects.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    statements: list[str] = []
    event.listen(rt.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))

    purged = retention.purge(rt, batch=2)

    assert purged.jobs == 5 and rows(rt, JobRow) == []
    assert calls == []
    assert not [sql for sql in statements if "job_files" in sql]


# -- many objects ---------------------------------------------------------------------------------------------


def test_more_than_1000_objects_of_a_job_are_deleted_in_batches_of_1000(rt: Runtime) -> None:
    names = [f"frames/{n:04d}.png" for n in range(256)]
    job = jobs.submit("tts", {"text": "film"}, outputs=names, files={"script.txt": b"scene 1"}, runtime=rt)
    ended(rt, job.id, JobStatus.FAILED, days_ago=PAST_RETENTION, attempt=5)  # five attempts, each left every frame
    # Attempts 1 and 5 left their frames; the keys of all five are derived from the table all the same.
    keys = [rt.objects.key_for(job.id, attempt, name) for attempt in (1, 5) for name in names]
    with ThreadPoolExecutor(max_workers=4) as pool:  # one client shared by threads, as boto3 allows
        list(pool.map(lambda key: rt.objects.put(key, os.urandom(8), "image/png"), keys))
    assert len(in_bucket(rt)) == 513
    batches: list[int] = []
    rt.objects.client.meta.events.register(
        "provide-client-params.s3.DeleteObjects", lambda params, **_: batches.append(len(params["Delete"]["Objects"])))

    purged = retention.purge(rt)

    assert batches == [1000, 281]
    assert in_bucket(rt) == set() and rows(rt, JobRow) == [] and rows(rt, JobFile) == []
    assert (purged.jobs, purged.objects) == (1, 1281)
