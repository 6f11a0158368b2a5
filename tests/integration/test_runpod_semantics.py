"""RunPod's real semantics in the lifecycle, in-process on SQLite and PostgreSQL against the simulator:
consuming /stream reads, generator output left in /stream, results RunPod dropped, the ttl sent,
and submits whose answer comes late (or only through the job's webhook)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

import jobs
from jobs.flow.lifecycle import DEFAULT_TTL_MS, poll_job, submit_job
from jobs.flow.reconcile import reconcile
from jobs.runpod.client import JobState
from jobs.runtime import POLL_DUE_TASK, Runtime
from jobs.states import JobStatus
from jobs.storage.models import utcnow
from tests.conftest import ENDPOINT_ID, SimulatorProcess, wait_until
from tests.integration.conftest import Interposed
from tests.integration.test_lifecycle import make_due, poll_until_final, published

pytestmark = pytest.mark.integration


def completed_without(output: object = ...) -> Any:
    """A crafted COMPLETED answer for the same RunPod job: no `output` key at all, or the one given."""
    def swap(state: JobState) -> JobState:
        body: dict[str, Any] = {"id": state.id, "status": "COMPLETED", "executionTime": 1200, "delayTime": 80}
        if output is not ...:
            body["output"] = output
        return JobState.from_json(body, operation="status")
    return swap


class CountingMetrics:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def submitted(self, endpoint: str, outcome: str) -> None: ...
    def polled(self, endpoint: str) -> None: ...
    def runpod_error(self, operation: str, error: Exception) -> None: ...
    def finished(self, endpoint: str, status: str, created_at: object) -> None: ...

    def output_missing(self, endpoint: str) -> None:
        self.seen.append(("output_missing", endpoint))

    def stream_gap(self, endpoint: str) -> None:
        self.seen.append(("stream_gap", endpoint))


def details(rt: Runtime, job_id: str) -> str:
    return "\n".join(e.detail or "" for e in jobs.events(job_id, runtime=rt))


# -- /stream is a consuming read --------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [
    {"op": "stream", "kind": "drop", "count": 1, "when": "after"},
    {"op": "stream", "kind": "slow", "delay": 20, "count": 1, "when": "after"},
    {"op": "stream", "kind": "5xx", "status": 502, "count": 1, "when": "after"},
])
def test_a_stream_read_whose_answer_is_lost_is_recorded_as_a_gap_and_the_job_goes_on(
    runtime: Runtime, simulator: SimulatorProcess, fault: dict[str, object]
) -> None:
    metrics = CountingMetrics()
    runtime.metrics = metrics  # type: ignore[assignment]
    job = jobs.submit("tts", {"sleep": 40, "stream": ["a", "b", "c", "d"]}, stream=True, runtime=runtime)
    submit_job(runtime, job.id)
    simulator.advance(9)  # "a" is out at RunPod (one chunk every 8 s), waiting to be read
    simulator.set_faults(fault)

    make_due(runtime, job.id)
    poll_job(runtime, job.id)  # the read took "a" with it, and its answer never came

    assert "chunks RunPod handed out may be missing" in details(runtime, job.id)
    assert metrics.seen == [("stream_gap", "tts")]
    simulator.advance(30)
    done = poll_until_final(runtime, job.id)
    outputs = [i.data for i in jobs.stream_events(job.id, runtime=runtime)[1] if i.kind == "output"]
    assert done.status is JobStatus.COMPLETED and outputs == ["b", "c", "d"]  # "a" is gone, and said so


def test_a_finished_streaming_job_waits_for_its_last_read_before_it_ends(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 4, "stream": ["x", "y"]}, stream=True, runtime=runtime)
    submit_job(runtime, job.id)
    simulator.advance(5)
    simulator.set_faults({"op": "stream", "kind": "429", "count": 3, "retry_after": 0, "when": "before"})

    make_due(runtime, job.id)
    poll_job(runtime, job.id)  # RunPod says COMPLETED, but the last chunks could not be read yet

    assert jobs.get(job.id, runtime=runtime).status is not JobStatus.COMPLETED
    done = poll_until_final(runtime, job.id)
    outputs = [i.data for i in jobs.stream_events(job.id, runtime=runtime)[1] if i.kind == "output"]
    assert done.status is JobStatus.COMPLETED and outputs == ["x", "y"]


# -- a generator's output lives in /stream unless the worker aggregates it -----------------------------------


def test_a_streamed_job_whose_runpod_output_is_empty_keeps_its_chunks_as_its_output(
    runtime: Runtime, interposed: Interposed, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 10, "stream": ["Once ", "upon ", "a time"]}, stream=True, runtime=runtime)
    submit_job(runtime, job.id)
    simulator.advance(11)
    interposed.replace["status"] = completed_without(output=[])  # RunPod without return_aggregate_stream

    done = poll_until_final(runtime, job.id)

    assert done.status is JobStatus.COMPLETED and not done.output_missing
    assert done.output == ["Once ", "upon ", "a time"]


def test_a_plain_job_on_a_generator_endpoint_finds_its_output_in_the_stream(
    runtime: Runtime, interposed: Interposed, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 3, "stream": ["tok1", "tok2"]}, runtime=runtime)  # stream=False
    submit_job(runtime, job.id)
    simulator.advance(4)
    interposed.replace["status"] = completed_without(output=[])

    make_due(runtime, job.id)
    poll_job(runtime, job.id)

    done = jobs.get(job.id, runtime=runtime)
    assert done.status is JobStatus.COMPLETED and done.output == ["tok1", "tok2"]
    assert "the output is the chunks its handler streamed" in details(runtime, job.id)


# -- a result RunPod dropped is not a silent success -----------------------------------------------------------


def test_a_job_runpod_completed_without_output_is_flagged_evented_and_counted(
    runtime: Runtime, interposed: Interposed, simulator: SimulatorProcess
) -> None:
    metrics = CountingMetrics()
    runtime.metrics = metrics  # type: ignore[assignment]
    job = jobs.submit("tts", {"sleep": 2, "output": "a 30 MB video"}, runtime=runtime)
    submit_job(runtime, job.id)
    simulator.advance(3)
    interposed.replace["status"] = completed_without()

    make_due(runtime, job.id)
    poll_job(runtime, job.id)

    done = jobs.get(job.id, runtime=runtime)
    assert (done.status, done.output, done.output_missing) == (JobStatus.COMPLETED, None, True)
    assert done.to_dict()["output_missing"] is True
    assert "flagged output_missing" in details(runtime, job.id)
    assert metrics.seen == [("output_missing", "tts")]
    last = jobs.stream_events(job.id, runtime=runtime)[1][-1]
    assert (last.kind, last.data) == ("end", {"status": "COMPLETED", "output_missing": True})
    assert "gave no output" in show(runtime, job.id)
    assert served(runtime, job.id)["output_missing"] is True


def served(rt: Runtime, job_id: str) -> dict[str, Any]:
    """`GET /v1/jobs/{id}` from the HTTP API, in-process on this test's runtime."""
    from fastapi.testclient import TestClient

    from jobs.web.app import create_app

    with TestClient(create_app(rt, tokens="t0ken-for-this-test")) as client:
        answer = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer t0ken-for-this-test"})
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


def show(rt: Runtime, job_id: str) -> str:
    """`rpq jobs show ID`, in-process on this test's runtime."""
    from click.testing import CliRunner

    from jobs.cli import main
    from jobs.runtime import set_runtime

    previous = set_runtime(rt)
    try:
        result = CliRunner().invoke(main, ["jobs", "show", job_id])
    finally:
        set_runtime(previous)
    assert result.exit_code == 0, result.output
    return result.output


def test_a_job_with_real_output_is_not_flagged(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 0.2, "output": {"ok": True}}, runtime=runtime)
    submit_job(runtime, job.id)

    done = poll_until_final(runtime, job.id)

    assert done.output == {"ok": True} and done.output_missing is False


# -- ttl -------------------------------------------------------------------------------------------------------


def test_every_run_carries_an_explicit_ttl_so_the_deadline_never_guesses(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    plain = jobs.submit("tts", {"n": 1}, runtime=runtime)
    own = jobs.submit("tts", {"n": 2}, policy={"ttl": 60_000, "executionTimeout": 30_000}, runtime=runtime)
    submit_job(runtime, plain.id)
    submit_job(runtime, own.id)

    sent = {j["input"]["n"]: j["policy"] for j in simulator.jobs(ENDPOINT_ID)}  # type: ignore[index]
    assert sent == {1: {"ttl": DEFAULT_TTL_MS}, 2: {"ttl": 60_000, "executionTimeout": 30_000}}
    assert jobs.get(plain.id, runtime=runtime).policy is None  # the job keeps what its caller gave


# -- a submit whose answer comes late ------------------------------------------------------------------------


def test_a_slow_run_is_not_called_lost_while_its_answer_can_still_come(runtime: Runtime) -> None:
    from jobs.storage.db import session_scope
    from jobs.storage.store import update_fields

    job = jobs.submit("tts", {"n": 1}, runtime=runtime)
    with session_scope(runtime.engine) as session:
        update_fields(session, job.id, while_status={JobStatus.PENDING}, values={"status": JobStatus.SUBMITTING})
    bound = runtime.settings.submit_bound_seconds

    early = reconcile(runtime, now=utcnow() + timedelta(seconds=bound - 1))
    late = reconcile(runtime, now=utcnow() + timedelta(seconds=runtime.settings.submit_stuck_after_seconds + 1))

    assert early.marked_unknown == [] and late.marked_unknown == [job.id]


def test_a_run_answer_that_arrives_after_the_job_was_called_lost_adopts_it(
    runtime: Runtime, interposed: Interposed, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 0.2, "output": "late but fine"}, runtime=runtime)
    called_lost: dict[str, object] = {}
    interposed.hooks["run"] = lambda: called_lost.setdefault(
        "report", reconcile(runtime, now=utcnow() + timedelta(hours=1)))

    step = submit_job(runtime, job.id)

    report = called_lost["report"]
    assert job.id in report.marked_unknown  # type: ignore[attr-defined]
    adopted = jobs.get(job.id, runtime=runtime)
    assert adopted.status is JobStatus.IN_QUEUE and adopted.runpod_job_id == simulator.jobs()[0]["id"]
    assert step.poll_in is not None and "adopted" in details(runtime, job.id)
    assert poll_until_final(runtime, job.id).output == "late but fine"


def unknown_submit(rt: Runtime, simulator: SimulatorProcess) -> tuple[jobs.Job, str, str]:
    """A job whose /run reached RunPod but whose answer was lost; its token and RunPod id, as RunPod has them."""
    simulator.set_faults({"op": "run", "kind": "slow", "delay": 10, "count": 1, "when": "after"})
    job = jobs.submit("tts", {"sleep": 0.2, "output": "found"}, runtime=rt)
    submit_job(rt, job.id)
    assert jobs.get(job.id, runtime=rt).status is JobStatus.SUBMIT_UNKNOWN
    [sent] = simulator.jobs(ENDPOINT_ID)
    return job, str(sent["webhook"]).split("?")[0].rsplit("/", 1)[-1], str(sent["id"])


def test_a_submit_unknown_job_resolves_itself_when_its_webhook_arrives(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job, token, runpod_id = unknown_submit(webhook_runtime, simulator)

    assert jobs.webhook_received(token, runpod_job_id=runpod_id, runtime=webhook_runtime) is True

    adopted = jobs.get(job.id, runtime=webhook_runtime)
    assert (adopted.status, adopted.runpod_job_id) == (JobStatus.IN_QUEUE, runpod_id)
    assert published(webhook_runtime).of(POLL_DUE_TASK) == [ENDPOINT_ID]  # its first poll: due now
    assert "/status confirms it" in details(webhook_runtime, job.id)
    assert poll_until_final(webhook_runtime, job.id).output == "found"
    assert len(simulator.jobs()) == 1  # adopted, never resubmitted


def test_a_webhook_faster_than_the_lost_run_answer_still_resolves_the_submit(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    import threading

    simulator.set_faults({"op": "run", "kind": "slow", "delay": 10, "count": 1, "when": "after"})
    job = jobs.submit("tts", {"sleep": 0.2, "output": "quick"}, runtime=webhook_runtime)
    submitter = threading.Thread(target=submit_job, args=(webhook_runtime, job.id))
    submitter.start()
    wait_until(lambda: simulator.jobs(ENDPOINT_ID), timeout=10, what="the job to reach RunPod")
    [sent] = simulator.jobs(ENDPOINT_ID)
    token = str(sent["webhook"]).split("?")[0].rsplit("/", 1)[-1]

    # RunPod finishes and calls the webhook while our /run is still waiting for its (lost) answer.
    jobs.webhook_received(token, runpod_job_id=str(sent["id"]), runtime=webhook_runtime)
    assert jobs.get(job.id, runtime=webhook_runtime).status is JobStatus.SUBMITTING
    submitter.join(30)

    adopted = jobs.get(job.id, runtime=webhook_runtime)
    assert (adopted.status, adopted.runpod_job_id) == (JobStatus.IN_QUEUE, sent["id"])
    assert [e.to_status for e in jobs.events(job.id, runtime=webhook_runtime)][-2:] == [
        JobStatus.SUBMIT_UNKNOWN, JobStatus.IN_QUEUE]
    assert poll_until_final(webhook_runtime, job.id).output == "quick"


@pytest.mark.parametrize("named", [None, "not-a-runpod-job-u1"])
def test_a_webhook_naming_no_job_runpod_confirms_adopts_nothing(
    webhook_runtime: Runtime, simulator: SimulatorProcess, named: str | None
) -> None:
    job, token, _ = unknown_submit(webhook_runtime, simulator)

    assert jobs.webhook_received(token, runpod_job_id=named, runtime=webhook_runtime) is True

    still = jobs.get(job.id, runtime=webhook_runtime)
    assert (still.status, still.runpod_job_id) == (JobStatus.SUBMIT_UNKNOWN, None)
    assert "not adopted" in details(webhook_runtime, job.id)


def test_repeated_webhooks_keep_one_history_row_and_the_reconcilers_wakeups_write_none(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 60}, runtime=webhook_runtime)
    submit_job(webhook_runtime, job.id)
    [sent] = simulator.jobs(ENDPOINT_ID)
    token = str(sent["webhook"]).split("?")[0].rsplit("/", 1)[-1]

    for _ in range(5):
        jobs.webhook_received(token, runtime=webhook_runtime)
    for minutes in range(1, 6):
        reconcile(webhook_runtime, now=utcnow() + timedelta(minutes=10 * minutes))

    history = jobs.events(job.id, runtime=webhook_runtime)
    webhooks = [e for e in history if e.source == "webhook"]
    resends = [e for e in history if e.source == "reconciler"]
    assert [e.repeats for e in webhooks] == [5] and webhooks[0].last_at is not None
    assert resends == []  # it wakes the endpoint's poller; a job's history is not the place for that
    assert "(x5, last " in show(webhook_runtime, job.id)


# -- end to end against the simulator's RunPod behaviours ------------------------------------------------------


@pytest.fixture(scope="module")
def small_results_simulator(start_simulator: Any) -> SimulatorProcess:
    """A simulator whose RunPod drops any result over 2,000 bytes, as RunPod does over about 20 MB."""
    from tests.conftest import endpoint_flags

    sim: SimulatorProcess = start_simulator("--cold-start-seconds", "0.2", "--max-result-bytes", "2000",
                                            *endpoint_flags(ENDPOINT_ID))
    return sim


@pytest.fixture
def small_results_runtime(migrated_db: str, small_results_simulator: SimulatorProcess) -> Any:
    from tests.conftest import make_runtime

    small_results_simulator.reset()
    rt = make_runtime(migrated_db, small_results_simulator)
    yield rt
    rt.close()


def test_a_result_runpod_drops_for_its_size_is_flagged_not_stored_as_success(small_results_runtime: Runtime) -> None:
    rt = small_results_runtime
    big = jobs.submit("tts", {"sleep": 0.2, "output": "x" * 5000}, runtime=rt)
    small = jobs.submit("tts", {"sleep": 0.2, "output": "fits"}, runtime=rt)
    submit_job(rt, big.id)
    submit_job(rt, small.id)

    big_done, small_done = poll_until_final(rt, big.id), poll_until_final(rt, small.id)

    assert (big_done.status, big_done.output, big_done.output_missing) == (JobStatus.COMPLETED, None, True)
    assert (small_done.output, small_done.output_missing) == ("fits", False)


def test_a_streaming_job_on_runpods_default_worker_keeps_its_chunks_as_output(runtime: Runtime) -> None:
    # The simulator, like RunPod, shows output [] for a generator whose worker does not aggregate.
    job = jobs.submit("tts", {"sleep": 1, "stream": ["Καλη", "μέρα", "🐉"]}, stream=True, runtime=runtime)
    submit_job(runtime, job.id)

    done = poll_until_final(runtime, job.id)

    assert (done.status, done.output, done.output_missing) == (JobStatus.COMPLETED, ["Καλη", "μέρα", "🐉"], False)


def test_a_run_to_an_endpoint_runpod_does_not_know_fails_saying_so(runtime: Runtime) -> None:
    job = jobs.submit("abcdef123456", {"n": 1}, runtime=runtime)  # a bare id that no endpoint has

    submit_job(runtime, job.id)

    failed = jobs.get(job.id, runtime=runtime)
    assert failed.status is JobStatus.FAILED
    assert "RunPod does not know endpoint abcdef123456 (404)" in (failed.error or "")


def test_a_404_for_the_endpoint_itself_holds_the_job_instead_of_expiring_it(runtime: Runtime) -> None:
    from jobs.storage.db import session_scope
    from jobs.storage.store import update_fields

    job = jobs.submit("tts", {"sleep": 60}, runtime=runtime)
    submit_job(runtime, job.id)
    with session_scope(runtime.engine) as session:  # the endpoint was deleted at RunPod meanwhile
        update_fields(session, job.id, while_status={JobStatus.IN_QUEUE}, values={"endpoint_id": "deleted-endpoint"})

    make_due(runtime, job.id)
    step = poll_job(runtime, job.id)

    held = jobs.get(job.id, runtime=runtime)
    assert held.status is JobStatus.IN_QUEUE and step.poll_in is not None
    assert "RunPod does not know endpoint deleted-endpoint" in details(runtime, job.id)

    with session_scope(runtime.engine) as session:  # ... and stays unknown past the job's ttl
        update_fields(session, job.id, while_status={JobStatus.IN_QUEUE},
                      values={"deadline_at": utcnow() - timedelta(seconds=1)})
    make_due(runtime, job.id)
    poll_job(runtime, job.id)

    failed = jobs.get(job.id, runtime=runtime)
    assert failed.status is JobStatus.FAILED and "deleted, or the id is wrong" in (failed.error or "")
    assert JobStatus.EXPIRED not in [e.to_status for e in jobs.events(job.id, runtime=runtime)]


# -- faults around adoption and the cancel outbox -----------------------------------------------------------


def post_webhook(rt: Runtime, token: str, body: bytes) -> Any:
    """RunPod calling `POST /v1/webhooks/runpod/{token}` on the HTTP API, in-process on this test's runtime."""
    from fastapi.testclient import TestClient

    from jobs.web.app import create_app

    with TestClient(create_app(rt, tokens="t0ken-for-this-test")) as client:
        return client.post(f"/v1/webhooks/runpod/{token}", content=body,
                           headers={"Content-Type": "application/json"})


def test_a_webhook_that_cannot_be_confirmed_for_now_is_asked_for_again_then_adopts(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    import json

    job, token, runpod_id = unknown_submit(webhook_runtime, simulator)
    simulator.set_faults({"op": "status", "kind": "5xx", "count": 10, "when": "before"})

    refused = post_webhook(webhook_runtime, token, json.dumps({"id": runpod_id, "status": "COMPLETED"}).encode())

    assert refused.status_code == 503 and refused.headers["Retry-After"]  # RunPod sends it again on non-200
    assert jobs.get(job.id, runtime=webhook_runtime).status is JobStatus.SUBMIT_UNKNOWN
    simulator.set_faults()
    again = post_webhook(webhook_runtime, token, json.dumps({"id": runpod_id, "status": "COMPLETED"}).encode())
    assert again.status_code == 200
    assert jobs.get(job.id, runtime=webhook_runtime).runpod_job_id == runpod_id


@pytest.mark.parametrize("body", [b"{not json", b"null", b'{"id": 42}', b'{"id": "a/b"}', b"[" * 100_000])
def test_a_malformed_webhook_body_is_answered_and_adopts_nothing(
    webhook_runtime: Runtime, simulator: SimulatorProcess, body: bytes
) -> None:
    job, token, _ = unknown_submit(webhook_runtime, simulator)

    answer = post_webhook(webhook_runtime, token, body)

    assert answer.status_code == 200  # a 200 so RunPod stops; the body named no job we could confirm
    still = jobs.get(job.id, runtime=webhook_runtime)
    assert (still.status, still.runpod_job_id) == (JobStatus.SUBMIT_UNKNOWN, None)
    assert "named no RunPod job" in details(webhook_runtime, job.id)


def test_a_cancel_runpod_cannot_take_now_stays_in_the_outbox_and_is_sent_later(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    from jobs.flow.lifecycle import cancel_on_runpod
    from tests.integration.test_fencing import outbox

    job = jobs.submit("tts", {"sleep": 60}, runtime=runtime)
    submit_job(runtime, job.id)
    runpod_id = jobs.get(job.id, runtime=runtime).runpod_job_id
    jobs.cancel(job.id, runtime=runtime)
    simulator.set_faults({"op": "cancel", "kind": "5xx", "count": 10, "when": "before"})

    later = cancel_on_runpod(runtime, job.id)

    assert later.again_in is not None and outbox(runtime, job.id) == [(1, runpod_id, False)]
    simulator.set_faults()
    cancel_on_runpod(runtime, job.id)
    assert outbox(runtime, job.id) == [(1, runpod_id, True)]
    assert [j["status"] for j in simulator.jobs(ENDPOINT_ID)] == ["CANCELLED"]
