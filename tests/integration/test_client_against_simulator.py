"""The RunPod client against the simulator over real HTTP: every operation, status and error kind."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from jobs.errors import (
    PayloadTooLarge,
    RunOutcomeUnknown,
    RunPodAuthError,
    RunPodNotFound,
    RunPodRejected,
    RunPodTransient,
)
from jobs.flow.backoff import RetryPolicy
from jobs.runpod.client import JobState, RunPodClient, RunPodStatus, describe_error
from tests.conftest import SimulatorProcess, free_port, wait_until

pytestmark = pytest.mark.integration

EP = "ep-client-test"
FAST_RETRIES = RetryPolicy(max_attempts=4, base_delay=0.05, max_delay=2.0)


@pytest.fixture
def client(simulator: SimulatorProcess) -> RunPodClient:
    with RunPodClient(api_key=simulator.api_key, base_url=simulator.base_url, retry=FAST_RETRIES) as c:
        yield c  # type: ignore[misc]


def final_state(client: RunPodClient, job_id: str, *, timeout: float = 20) -> JobState:
    def terminal() -> JobState | None:
        state = client.status(EP, job_id)
        return state if state.is_terminal else None

    return wait_until(terminal, timeout=timeout, interval=0.1, what=f"job {job_id} to end")  # type: ignore[return-value]


def test_a_job_goes_through_queue_and_progress_to_completed_with_output_and_timings(client: RunPodClient) -> None:
    job = client.run(EP, {"sleep": 0.5, "output": {"url": "s3://b/k.wav"}})
    seen = {job.status}
    wait_until(lambda: seen.add(client.status(EP, job.id).status) or RunPodStatus.IN_PROGRESS in seen,
               timeout=10, what="IN_PROGRESS")

    done = final_state(client, job.id)

    assert job.status is RunPodStatus.IN_QUEUE
    assert done.status is RunPodStatus.COMPLETED
    assert done.output == {"url": "s3://b/k.wav"}
    assert done.execution_time_ms is not None and done.execution_time_ms >= 450
    assert done.delay_time_ms is not None and done.delay_time_ms >= 0
    assert done.worker_id


def test_a_failing_handler_ends_failed_with_its_error(client: RunPodClient) -> None:
    job = client.run(EP, {"sleep": 0.1, "fail": "CUDA out of memory"})

    done = final_state(client, job.id)

    assert done.status is RunPodStatus.FAILED
    assert "CUDA out of memory" in describe_error(done.error)


def test_a_running_job_can_be_cancelled(client: RunPodClient) -> None:
    job = client.run(EP, {"sleep": 60})
    wait_until(lambda: client.status(EP, job.id).status is RunPodStatus.IN_PROGRESS, timeout=10, what="start")

    answer = client.cancel(EP, job.id)

    assert answer.status is RunPodStatus.CANCELLED
    assert client.status(EP, job.id).status is RunPodStatus.CANCELLED


@pytest.mark.parametrize("reading", ["FAILED", "TIMED_OUT"])
def test_a_job_over_its_execution_timeout_ends_in_either_documented_reading(
    start_simulator: Callable[..., SimulatorProcess], reading: str
) -> None:
    sim = start_simulator("--cold-start-seconds", "0", "--execution-timeout-status", reading, "--endpoint", EP)
    with RunPodClient(api_key=sim.api_key, base_url=sim.base_url, retry=FAST_RETRIES) as client:
        job = client.run(EP, {"sleep": 600}, policy={"executionTimeout": 5_000})
        wait_until(lambda: client.status(EP, job.id).status is RunPodStatus.IN_PROGRESS, timeout=10, what="start")
        sim.advance(6)

        done = final_state(client, job.id)

    assert done.status.value == reading
    assert done.is_terminal


def test_runsync_returns_the_finished_job(client: RunPodClient) -> None:
    done = client.runsync(EP, {"sleep": 0.1, "output": "hi"}, wait_ms=20_000)

    assert (done.status, done.output) == (RunPodStatus.COMPLETED, "hi")
    assert done.id.startswith("sync-")


def test_runsync_that_outlives_its_wait_returns_a_live_status_to_poll(client: RunPodClient) -> None:
    early = client.runsync(EP, {"sleep": 2.5, "output": "late"}, wait_ms=1_000)

    assert not early.is_terminal
    assert final_state(client, early.id).output == "late"


def test_stream_drains_chunks_in_order_without_repeats(client: RunPodClient) -> None:
    chunks = ["Once ", "upon ", "a ", "tíme ✓"]
    job = client.run(EP, {"sleep": 1.0, "stream": chunks})
    received: list[object] = []

    def drained() -> bool:
        batch = client.stream(EP, job.id, wait_ms=1_000)
        received.extend(batch.chunks)
        return batch.status.is_terminal and len(received) >= len(chunks)

    wait_until(drained, timeout=20, what="the stream to finish")

    assert received == chunks
    assert final_state(client, job.id).output == []  # RunPod's default: the chunks are only in /stream


def test_retry_requeues_a_failed_job_under_the_same_id(client: RunPodClient) -> None:
    job = client.run(EP, {"fail": "flaky"})
    final_state(client, job.id)

    again = client.retry(EP, job.id)

    assert (again.id, again.status) == (job.id, RunPodStatus.IN_QUEUE)
    assert final_state(client, job.id).status is RunPodStatus.FAILED
    assert client.health(EP).jobs.retried == 1


def test_retry_of_a_completed_job_is_rejected(client: RunPodClient) -> None:
    job = client.run(EP, {"output": 1})
    final_state(client, job.id)

    with pytest.raises(RunPodRejected, match="HTTP 400"):
        client.retry(EP, job.id)


def test_purge_queue_removes_queued_jobs_only(client: RunPodClient, simulator: SimulatorProcess) -> None:
    simulator.configure_endpoint(EP, workers_max=1)
    running = client.run(EP, {"sleep": 60})
    wait_until(lambda: client.status(EP, running.id).status is RunPodStatus.IN_PROGRESS, timeout=10, what="start")
    queued = [client.run(EP, {"sleep": 1}) for _ in range(3)]

    removed = client.purge_queue(EP)

    assert removed == 3
    assert client.status(EP, running.id).status is RunPodStatus.IN_PROGRESS
    assert {client.status(EP, j.id).status for j in queued} == {RunPodStatus.CANCELLED}


def test_health_counts_queued_running_and_finished_jobs(client: RunPodClient, simulator: SimulatorProcess) -> None:
    simulator.configure_endpoint(EP, workers_max=1)
    done = client.run(EP, {"output": 1})
    final_state(client, done.id)
    running = client.run(EP, {"sleep": 60})
    wait_until(lambda: client.status(EP, running.id).status is RunPodStatus.IN_PROGRESS, timeout=10, what="start")
    client.run(EP, {"sleep": 1})

    health = client.health(EP)

    assert (health.jobs.completed, health.jobs.in_progress, health.jobs.in_queue) == (1, 1, 1)
    assert health.workers.running == 1


def test_a_wrong_key_is_an_auth_error_and_is_not_retried(simulator: SimulatorProcess) -> None:
    with RunPodClient(api_key="wrong-key", base_url=simulator.base_url, retry=FAST_RETRIES) as client:
        with pytest.raises(RunPodAuthError, match="HTTP 401"):
            client.health(EP)
        with pytest.raises(RunPodAuthError):
            client.run(EP, {"output": 1})

    assert simulator.jobs() == []


def test_an_unknown_job_is_not_found(client: RunPodClient) -> None:
    with pytest.raises(RunPodNotFound):
        client.status(EP, "no-such-job-u1")


def test_an_endpoint_that_does_not_exist_is_not_found_and_nothing_is_queued(
    client: RunPodClient, simulator: SimulatorProcess
) -> None:
    for call in (lambda: client.run("no-such-endpoint", {"output": 1}),
                 lambda: client.status("no-such-endpoint", "any-u1"),
                 lambda: client.health("no-such-endpoint")):
        with pytest.raises(RunPodNotFound):
            call()

    assert simulator.jobs() == []


def test_a_result_is_gone_after_runpods_retention(client: RunPodClient, simulator: SimulatorProcess) -> None:
    job = client.run(EP, {"output": "keep me"})
    assert final_state(client, job.id).output == "keep me"

    simulator.advance(29 * 60)
    assert client.status(EP, job.id).output == "keep me"
    simulator.advance(2 * 60)

    with pytest.raises(RunPodNotFound):
        client.status(EP, job.id)


def test_a_job_past_its_ttl_is_deleted_even_while_running(client: RunPodClient, simulator: SimulatorProcess) -> None:
    job = client.run(EP, {"sleep": 600}, policy={"ttl": 10_000})
    wait_until(lambda: client.status(EP, job.id).status is RunPodStatus.IN_PROGRESS, timeout=10, what="start")

    simulator.advance(11)

    wait_until(lambda: _not_found(client, job.id), timeout=10, what="ttl expiry")


def _not_found(client: RunPodClient, job_id: str) -> bool:
    try:
        client.status(EP, job_id)
    except RunPodNotFound:
        return True
    return False


# -- faults -------------------------------------------------------------------------------------------


def test_status_calls_ride_out_429s_and_5xx(client: RunPodClient, simulator: SimulatorProcess) -> None:
    job = client.run(EP, {"output": 1})
    simulator.set_faults({"op": "status", "kind": "429", "count": 1, "retry_after": 0},
                         {"op": "status", "kind": "5xx", "count": 2, "status": 503})

    # Three failures, then an answer: within FAST_RETRIES' four attempts.
    assert client.status(EP, job.id).id == job.id


def test_status_gives_up_as_transient_when_runpod_keeps_failing(
    client: RunPodClient, simulator: SimulatorProcess
) -> None:
    simulator.set_faults({"op": "status", "kind": "5xx", "status": 500})

    with pytest.raises(RunPodTransient, match="HTTP 500"):
        client.status(EP, "any-u1")


def test_a_run_rate_limited_before_queueing_is_retried_and_queued_once(
    client: RunPodClient, simulator: SimulatorProcess
) -> None:
    simulator.set_faults({"op": "run", "kind": "429", "count": 1, "retry_after": 0, "when": "before"})

    job = client.run(EP, {"output": 1})

    assert [j["id"] for j in simulator.jobs(EP)] == [job.id]


@pytest.mark.parametrize("kind", ["slow", "drop", "5xx"])
def test_a_run_whose_answer_is_lost_raises_outcome_unknown_and_is_sent_once(
    simulator: SimulatorProcess, kind: str
) -> None:
    simulator.set_faults({"op": "run", "kind": kind, "count": 1, "delay": 3, "when": "after"})

    with RunPodClient(api_key=simulator.api_key, base_url=simulator.base_url, timeout=1.0,
                      retry=FAST_RETRIES) as client, pytest.raises(RunOutcomeUnknown):
        client.run(EP, {"output": "paid for once"})

    assert len(simulator.jobs(EP)) == 1  # the job exists at "RunPod", exactly once


def test_a_run_to_a_closed_port_is_transient_and_creates_nothing() -> None:
    closed = f"http://127.0.0.1:{free_port()}/v2"
    with RunPodClient(api_key="k", base_url=closed, retry=FAST_RETRIES) as client, pytest.raises(
        RunPodTransient
    ) as caught:
        client.run(EP, {"output": 1})

    assert not isinstance(caught.value, RunOutcomeUnknown)


def test_an_oversized_input_never_reaches_runpod(client: RunPodClient, simulator: SimulatorProcess) -> None:
    with pytest.raises(PayloadTooLarge):
        client.run(EP, {"blob": "x" * 10_000_001})

    assert simulator.jobs() == []
