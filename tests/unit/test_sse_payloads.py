"""What each stored stream event becomes on the wire: the shapes of `jobs.web.schemas.STREAM_EVENTS`, from the
event and the job row read with it. Pure: the job is built here, and the renderer never reads the table for a
job without files."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

import jobs
from jobs.states import JobStatus
from jobs.web.events import _Renderer

AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
JOB = jobs.Job(
    id="job-1", status=JobStatus.IN_PROGRESS, endpoint="tts", endpoint_id="tts-endpoint", runpod_job_id="rp-1",
    input={}, output=None, error=None, progress=None, attempt=2, poll_count=1, policy=None, webhook=None,
    correlation_id=None, idempotency_key=None, metadata=None, stream=True, created_at=AT, submitted_at=AT,
    started_at=AT, finished_at=None, delay_time_ms=None, execution_time_ms=None, worker_id=None)
RAN = replace(JOB, delay_time_ms=1500, execution_time_ms=4200, cost_usd=0.0012)


class NoFiles(_Renderer):
    def _files(self) -> list[jobs.JobFileInfo]:
        return []


def wire(job: jobs.Job, *items: tuple[int, str, Any], outputs_before: int = 0) -> list[tuple[int | None, str, Any]]:
    """What the client reads for these stored events: (id, event, data) each."""
    render = NoFiles(None, job, outputs_before=outputs_before)  # type: ignore[arg-type]
    sent = []
    for seq, kind, data in items:
        for chunk in render(jobs.StreamItem(seq, kind, data, AT)):
            lines = dict(line.split(": ", 1) for line in chunk.decode().strip().split("\n"))
            sent.append((int(lines["id"]) if "id" in lines else None, lines["event"], json.loads(lines["data"])))
    return sent


def test_started_names_the_job_its_endpoint_and_attempt_and_outputs_are_numbered_from_where_a_resume_left_off() -> None:
    assert wire(JOB, (1, "started", {}), (5, "output", "a"), (6, "progress", 0.5), (7, "output", {"b": 1}),
                outputs_before=3) == [
        (1, "started", {"job_id": "job-1", "endpoint": "tts", "attempt": 2, "started_at": AT.isoformat()}),
        (5, "output", {"i": 3, "data": "a"}),
        (6, "progress", 0.5),
        (7, "output", {"i": 4, "data": {"b": 1}}),
    ]


def test_the_end_comes_after_the_timings_which_carry_no_id_so_a_resume_gets_them_again() -> None:
    done = replace(RAN, status=JobStatus.COMPLETED)

    assert wire(done, (9, "end", {"status": "COMPLETED"})) == [
        (None, "metrics", {"delay_ms": 1500, "execution_ms": 4200, "cost_usd": 0.0012}),
        (9, "end", {"status": "COMPLETED", "execution_ms": 4200}),
    ]


@pytest.mark.parametrize(("job", "stored", "code", "message"), [
    (replace(RAN, status=JobStatus.FAILED), {"status": "FAILED", "error": "OOM"}, "handler_failed", "OOM"),
    (replace(JOB, status=JobStatus.FAILED, runpod_job_id=None), {"status": "FAILED", "error": "RunPod refused"},
     "rejected", "RunPod refused"),
    (replace(RAN, status=JobStatus.TIMED_OUT), {"status": "TIMED_OUT", "error": None}, "timed_out",
     "RunPod's execution timeout cut the job"),
    (replace(JOB, status=JobStatus.CANCELLED), {"status": "CANCELLED", "error": "cancelled by api"}, "cancelled",
     "cancelled by api"),
    (replace(JOB, status=JobStatus.EXPIRED), {"status": "EXPIRED", "error": None}, "expired",
     "RunPod no longer knows the job (its ttl or retention passed)"),
    (replace(JOB, status=JobStatus.SUBMIT_UNKNOWN, runpod_job_id=None), {"status": "SUBMIT_UNKNOWN", "error": None},
     "submit_unknown", "/run's outcome is unknown: the job is not sent again by itself; an operator decides"),
])
def test_each_way_a_job_can_end_badly_has_its_error_code(job: jobs.Job, stored: dict[str, Any], code: str,
                                                          message: str) -> None:
    *timings, last = wire(job, (4, "error", stored))

    assert last == (4, "error", {"code": code, "message": message, "status": stored["status"]})
    assert [kind for _, kind, _ in timings] == (["metrics"] if job.execution_time_ms is not None else [])


def test_a_completion_runpod_gave_no_output_for_ends_with_the_output_missing_error_not_an_end() -> None:
    done = replace(RAN, status=JobStatus.COMPLETED, output_missing=True)

    [_, last] = wire(done, (9, "end", {"status": "COMPLETED", "output_missing": True}))

    assert last[1:] == ("error", {"code": "output_missing", "status": "COMPLETED",
                                  "message": "RunPod said COMPLETED but gave no output (RunPod drops a result over "
                                             "about 20 MB)"})


def test_an_unknown_submit_settled_since_is_skipped_and_the_stream_goes_on() -> None:
    adopted = replace(JOB, status=JobStatus.IN_PROGRESS)

    assert wire(adopted, (2, "error", {"status": "SUBMIT_UNKNOWN", "error": "lost"}), (3, "started", {}))[0][:2] \
        == (3, "started")


def test_a_finished_job_stored_before_streams_existed_still_gets_a_final_event_without_an_id() -> None:
    render = NoFiles(None, replace(RAN, status=JobStatus.FAILED, error="OOM"), outputs_before=0)  # type: ignore[arg-type]

    last = render.closing()[-1].decode()

    assert not last.startswith("id:") and '"code":"handler_failed"' in last and render.ended
