"""The simulator's engine without HTTP: queues, workers, job lifecycle, deadlines.

Time is driven with ``Engine.advance`` (the simulator clock), so nothing here waits for real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from jobs.simulator.clock import Clock
from jobs.simulator.config import SimulatorConfig
from jobs.simulator.engine import (
    ALLOWED,
    TERMINAL,
    BadRequest,
    EndpointNotFound,
    Engine,
    InvalidTransition,
    Job,
    JobNotFound,
    JobStatus,
    parse_job_request,
    split_stream_chunk,
)
from jobs.simulator.handlers import default_handler

EP = "ep"


def simulate(
    scenario: Callable[[Engine], Awaitable[None]],
    *,
    webhooks: list[dict[str, Any]] | None = None,
    clock: Clock | None = None,
    **config: Any,
) -> None:
    """Run ``scenario`` against a started engine (cold start 1 s unless overridden) on a fresh loop, with
    endpoint ``EP`` created at startup unless ``endpoints`` says otherwise."""

    async def main() -> None:
        settings = {"cold_start_seconds": 1.0, "endpoints": (EP,), **config}
        engine = Engine(
            SimulatorConfig(**settings),
            clock or Clock(),
            default_handler,
            on_webhook=(lambda job, payload: webhooks.append(payload)) if webhooks is not None else None,
        )
        engine.start()
        try:
            await scenario(engine)
        finally:
            await engine.stop()

    asyncio.run(main())


def submit(engine: Engine, job_input: Any = None, *, sync: bool = False, **extra: Any) -> Job:
    body = {"input": {} if job_input is None else job_input, **extra}
    return engine.submit(EP, parse_job_request(body), sync=sync)


def workers(engine: Engine) -> dict[str, int]:
    counts: dict[str, int] = engine.health(EP)["workers"]
    return {state: n for state, n in counts.items() if n}


# -- request validation ---------------------------------------------------------------------------------


def test_a_body_without_input_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="input"):
        parse_job_request({"webhook": "http://x"})


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"ttl": 9_999}, "ttl"),
        ({"executionTimeout": 4_999}, "executionTimeout"),
        ({"ttl": 7 * 24 * 3600 * 1000 + 1}, "ttl"),
        ({"executionTimeout": "soon"}, "executionTimeout"),
        ({"lowPriority": "yes"}, "lowPriority"),
    ],
)
def test_policy_values_outside_runpods_limits_are_refused_naming_the_field(policy: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest, match=f"policy.{field}"):
        parse_job_request({"input": {}, "policy": policy})


def test_the_seven_day_ceiling_can_be_switched_off() -> None:
    request = parse_job_request({"input": 1, "policy": {"ttl": 8 * 24 * 3600 * 1000}}, enforce_policy_max=False)

    assert request.ttl_ms == 8 * 24 * 3600 * 1000


def test_policy_defaults_are_runpods() -> None:
    request = parse_job_request({"input": 1})

    assert (request.ttl_ms, request.execution_timeout_ms, request.low_priority) == (86_400_000, 600_000, False)


def test_only_retry_leads_out_of_a_failed_or_timed_out_job_and_nothing_out_of_completed_or_cancelled() -> None:
    assert ALLOWED[JobStatus.FAILED] == ALLOWED[JobStatus.TIMED_OUT] == {JobStatus.IN_QUEUE}
    assert not ALLOWED[JobStatus.COMPLETED] and not ALLOWED[JobStatus.CANCELLED]
    assert {JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS}.isdisjoint(TERMINAL)


# -- endpoints ------------------------------------------------------------------------------------------


def test_an_endpoint_that_was_never_created_is_not_found_for_every_operation() -> None:
    async def scenario(engine: Engine) -> None:
        request = parse_job_request({"input": {}})
        operations: list[Callable[[], object]] = [
            lambda: engine.submit("nope", request),
            lambda: engine.get("nope", "some-job"),
            lambda: engine.cancel("nope", "some-job"),
            lambda: engine.retry("nope", "some-job"),
            lambda: engine.purge("nope"),
            lambda: engine.health("nope"),
            lambda: engine.configure_endpoint("nope", {"workers_max": 1}),
        ]
        for operation in operations:
            with pytest.raises(EndpointNotFound, match="check your endpoint ID"):
                operation()
        assert "nope" not in engine.endpoints and engine.history == []

    simulate(scenario)


def test_a_created_endpoint_has_the_defaults_plus_the_given_settings_and_a_bad_setting_creates_nothing() -> None:
    async def scenario(engine: Engine) -> None:
        with pytest.raises(BadRequest):
            engine.create_endpoint("new", {"workers_max": "many"})
        assert "new" not in engine.endpoints

        settings = engine.create_endpoint("new", {"workers_min": 1}).settings

        assert (settings.workers_min, settings.workers_max, settings.cold_start_seconds) == (1, 4, 1.0)
        assert settings.return_aggregate_stream is False
        await engine.advance(1.5)
        assert engine.health("new")["workers"]["ready"] == 1

    simulate(scenario, workers_max=4)


def test_a_job_of_one_endpoint_is_not_found_through_another() -> None:
    async def scenario(engine: Engine) -> None:
        engine.create_endpoint("other")
        job = submit(engine, {})

        with pytest.raises(JobNotFound):
            engine.get("other", job.id)

    simulate(scenario)


def test_reset_keeps_the_startup_endpoints_with_their_startup_settings_and_drops_the_others() -> None:
    async def scenario(engine: Engine) -> None:
        engine.configure_endpoint(EP, {"workers_max": 9, "unhealthy": True})
        engine.create_endpoint("made-at-runtime")

        await engine.reset()

        assert sorted(engine.endpoints) == [EP, "second"]
        assert engine.endpoints[EP].settings.workers_max == 3 and not engine.endpoints[EP].settings.unhealthy

    simulate(scenario, endpoints=(EP, "second"))


# -- lifecycle and workers ------------------------------------------------------------------------------


def test_a_job_waits_for_a_cold_start_then_runs_and_completes_with_its_timings() -> None:
    async def scenario(engine: Engine) -> None:
        job = submit(engine, {"sleep": 2, "output": "done"})
        assert job.view() == {"id": job.id, "status": "IN_QUEUE"}
        assert workers(engine) == {"initializing": 1, "idle": 2}

        await engine.advance(1.5)
        assert job.status is JobStatus.IN_PROGRESS
        assert workers(engine) == {"running": 1, "idle": 2}
        assert "executionTime" not in job.view()

        await engine.advance(2.0)
        view = job.view()
        assert view["status"] == "COMPLETED" and view["output"] == "done"
        assert view["delayTime"] == pytest.approx(1000, abs=50)
        assert view["executionTime"] == pytest.approx(2000, abs=50)
        assert view["workerId"] and workers(engine) == {"ready": 1, "idle": 2}

    simulate(scenario)


class CreepingClock(Clock):
    """A clock that is a little later at every reading, as the real one is between two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.t = 1000.0

    def now(self) -> float:
        self.t += 0.001
        return self.t


def test_a_cold_start_that_ends_between_two_readings_of_the_clock_is_not_slept_through() -> None:
    async def scenario(engine: Engine) -> None:
        clock = engine.clock
        assert isinstance(clock, CreepingClock)
        job = submit(engine, {"output": 1})
        [worker] = engine.endpoints[EP].workers.values()
        clock.t = worker.ready_at - 0.0015  # the tick's first reading is just before the end, a second just after

        wait = engine.tick()

        assert job.status is JobStatus.IN_QUEUE  # not warm yet at the tick's reading
        assert wait is not None and wait < 0.01  # so the ticker comes back for it at once, not in 24 h
        clock.t = worker.ready_at
        engine.tick()
        assert job.status is JobStatus.IN_PROGRESS

    simulate(scenario, clock=CreepingClock())


def test_the_queue_is_served_first_in_first_out_by_at_most_workers_max_workers() -> None:
    async def scenario(engine: Engine) -> None:
        jobs = [submit(engine, {"sleep": 5, "output": i}) for i in range(3)]
        assert workers(engine) == {"initializing": 2}

        await engine.advance(1.5)
        assert [j.status for j in jobs] == [JobStatus.IN_PROGRESS, JobStatus.IN_PROGRESS, JobStatus.IN_QUEUE]

        await engine.advance(5.0)
        assert jobs[2].status is JobStatus.IN_PROGRESS
        assert engine.health(EP)["jobs"] == {
            "completed": 2,
            "failed": 0,
            "inProgress": 1,
            "inQueue": 0,
            "retried": 0,
        }

    simulate(scenario, workers_max=2)


def test_a_flex_worker_stops_after_the_idle_timeout_but_an_active_worker_stays_ready() -> None:
    async def scenario(engine: Engine) -> None:
        engine.configure_endpoint(EP, {"workers_min": 1})
        await engine.advance(1.5)
        assert workers(engine) == {"ready": 1, "idle": 2}

        first, second = submit(engine, {"sleep": 2}), submit(engine, {"sleep": 2})
        assert workers(engine) == {"running": 1, "initializing": 1, "idle": 1}
        await engine.advance(1.5)
        assert first.status is second.status is JobStatus.IN_PROGRESS
        await engine.advance(2.0)
        assert first.status is second.status is JobStatus.COMPLETED
        assert workers(engine) == {"ready": 2, "idle": 1}

        await engine.advance(5.0)
        assert workers(engine) == {"ready": 1, "idle": 2}

    simulate(scenario, idle_timeout_seconds=5.0)


def test_health_reports_warm_waiting_workers_as_ready_and_the_scaled_down_slots_as_idle() -> None:
    async def scenario(engine: Engine) -> None:
        assert workers(engine) == {"idle": 4}  # nothing started: every slot is scaled down

        engine.configure_endpoint(EP, {"workers_min": 1})
        await engine.advance(1.5)
        assert workers(engine) == {"ready": 1, "idle": 3}  # the active worker, warm

        submit(engine, {"sleep": 1}), submit(engine, {"sleep": 1})
        assert workers(engine) == {"running": 1, "initializing": 1, "idle": 2}
        await engine.advance(1.5)
        assert workers(engine) == {"ready": 1, "running": 1, "idle": 2}  # the flex worker runs the second

        await engine.advance(1.0)
        assert workers(engine) == {"ready": 2, "idle": 2}  # a warm flex worker is ready, not idle

        await engine.advance(5.0)
        assert workers(engine) == {"ready": 1, "idle": 3}  # its idle timeout scaled it down

    simulate(scenario, workers_max=4, idle_timeout_seconds=5.0)


def test_a_low_priority_job_never_starts_a_worker_but_runs_on_a_warm_one() -> None:
    async def scenario(engine: Engine) -> None:
        low = submit(engine, {"sleep": 1}, policy={"lowPriority": True})
        await engine.advance(10.0)
        assert low.status is JobStatus.IN_QUEUE and workers(engine) == {"idle": 3}

        engine.configure_endpoint(EP, {"workers_min": 1})
        await engine.advance(1.5)
        assert low.status is JobStatus.IN_PROGRESS

    simulate(scenario)


def test_unhealthy_workers_crash_loop_and_the_job_stays_queued_until_they_recover() -> None:
    async def scenario(engine: Engine) -> None:
        engine.configure_endpoint(EP, {"unhealthy": True})
        job = submit(engine, {"sleep": 1})
        await engine.advance(30.0)
        assert job.status is JobStatus.IN_QUEUE
        assert workers(engine) == {"unhealthy": 1, "idle": 2}

        engine.configure_endpoint(EP, {"unhealthy": False})
        assert workers(engine) == {"initializing": 1, "idle": 2}
        await engine.advance(1.5)
        assert job.status is JobStatus.IN_PROGRESS

    simulate(scenario)


def test_a_throttled_endpoint_cannot_start_workers_and_idle_ones_cannot_take_jobs() -> None:
    async def scenario(engine: Engine) -> None:
        engine.configure_endpoint(EP, {"workers_min": 1})
        await engine.advance(1.5)
        engine.configure_endpoint(EP, {"throttled": True})
        jobs = [submit(engine, {"sleep": 1}) for _ in range(2)]
        await engine.advance(30.0)
        assert all(j.status is JobStatus.IN_QUEUE for j in jobs)
        assert workers(engine) == {"throttled": 2, "idle": 1}

        engine.configure_endpoint(EP, {"throttled": False})
        await engine.advance(1.5)
        assert all(j.status is JobStatus.IN_PROGRESS for j in jobs)

    simulate(scenario)


def test_purging_throttled_demand_gives_up_the_flex_workers_it_asked_for() -> None:
    async def scenario(engine: Engine) -> None:
        engine.configure_endpoint(EP, {"throttled": True})
        submit(engine, {}), submit(engine, {})
        assert workers(engine) == {"throttled": 2, "idle": 1}

        assert engine.purge(EP) == 2
        assert workers(engine) == {"idle": 3}

    simulate(scenario)


# -- timeouts, ttl, retention ---------------------------------------------------------------------------


@pytest.mark.parametrize("configured", ["FAILED", "TIMED_OUT"])
def test_a_job_over_its_execution_timeout_ends_with_the_configured_status_and_an_error(configured: str) -> None:
    async def scenario(engine: Engine) -> None:
        job = submit(engine, {"sleep": 60}, policy={"executionTimeout": 5000})
        await engine.advance(7.0)

        assert job.status == configured
        assert "execution timeout" in job.view()["error"]
        assert engine.health(EP)["jobs"]["failed"] == 1

    simulate(scenario, execution_timeout_status=configured)


def test_ttl_deletes_a_queued_job_and_a_running_job_alike() -> None:
    async def scenario(engine: Engine) -> None:
        running = submit(engine, {"sleep": 60}, policy={"ttl": 10_000})
        queued = submit(engine, {"sleep": 60}, policy={"ttl": 10_000, "lowPriority": True})
        await engine.advance(2.0)
        assert running.status is JobStatus.IN_PROGRESS and queued.status is JobStatus.IN_QUEUE

        await engine.advance(9.0)
        for job in (running, queued):
            with pytest.raises(JobNotFound):
                engine.get(EP, job.id)
            assert job.deleted_reason == "ttl"
        assert workers(engine) == {"ready": 1, "idle": 2}
        assert engine.health(EP)["jobs"]["inQueue"] == 0

    simulate(scenario)


def test_run_results_are_kept_30_minutes_and_runsync_results_1_minute() -> None:
    async def scenario(engine: Engine) -> None:
        run, sync = submit(engine, {}), submit(engine, {}, sync=True)
        await engine.advance(1.5)
        assert run.status is sync.status is JobStatus.COMPLETED

        await engine.advance(61.0)
        assert engine.get(EP, run.id) is run
        with pytest.raises(JobNotFound):
            engine.get(EP, sync.id)

        await engine.advance(1800.0)
        with pytest.raises(JobNotFound):
            engine.get(EP, run.id)
        assert [j.deleted_reason for j in engine.history] == ["retention", "retention"]

    simulate(scenario)


# -- cancel, retry, purge -------------------------------------------------------------------------------


def test_cancel_removes_a_queued_job_stops_a_running_one_and_leaves_a_finished_one_alone() -> None:
    async def scenario(engine: Engine) -> None:
        done, running, queued = submit(engine, {}), submit(engine, {"sleep": 60}), submit(engine, {"sleep": 60})
        await engine.advance(1.5)
        assert running.status is JobStatus.IN_PROGRESS
        assert done.status is JobStatus.COMPLETED

        assert engine.cancel(EP, queued.id).status is JobStatus.CANCELLED
        assert engine.cancel(EP, running.id).status is JobStatus.CANCELLED
        assert engine.cancel(EP, done.id).status is JobStatus.COMPLETED
        await engine.advance(60.0)
        assert running.status is JobStatus.CANCELLED and "output" not in running.view()
        assert engine.health(EP)["jobs"]["completed"] == 1

    simulate(scenario, workers_max=1)


def test_retry_requeues_a_failed_job_under_its_id_with_its_input_and_clears_the_old_result() -> None:
    async def scenario(engine: Engine) -> None:
        job = submit(engine, {"fail": "boom", "sleep": 1})
        await engine.advance(2.5)
        assert job.view()["error"] == "boom"

        assert engine.retry(EP, job.id) is job
        assert job.status is JobStatus.IN_PROGRESS  # the warm worker takes it at once
        assert "error" not in job.view() and job.view()["delayTime"] == 0
        await engine.advance(1.5)
        assert job.status is JobStatus.FAILED and job.attempts == 2
        assert engine.health(EP)["jobs"]["retried"] == 1
        assert engine.health(EP)["jobs"]["failed"] == 2

    simulate(scenario)


def test_only_failed_or_timed_out_jobs_can_be_retried() -> None:
    async def scenario(engine: Engine) -> None:
        job = submit(engine, {})
        with pytest.raises(InvalidTransition):
            engine.retry(EP, job.id)
        await engine.advance(1.5)
        with pytest.raises(InvalidTransition, match="COMPLETED"):
            engine.retry(EP, job.id)

    simulate(scenario)


def test_purge_cancels_only_queued_jobs() -> None:
    async def scenario(engine: Engine) -> None:
        running = submit(engine, {"sleep": 5})
        await engine.advance(1.5)
        queued = [submit(engine, {}) for _ in range(3)]

        assert engine.purge(EP) == 3
        assert all(j.status is JobStatus.CANCELLED for j in queued)
        assert running.status is JobStatus.IN_PROGRESS

    simulate(scenario, workers_max=1)


def test_the_queue_is_full_past_50_jobs_and_workers_max_times_500() -> None:
    async def scenario(engine: Engine) -> None:
        engine.configure_endpoint(EP, {"workers_max": 0})
        for _ in range(50):
            submit(engine, {})
        assert not engine.queue_full(EP)
        submit(engine, {})
        assert engine.queue_full(EP)

    simulate(scenario)


# -- stream, progress, webhooks -------------------------------------------------------------------------


def test_stream_chunks_are_drained_once_and_the_final_output_is_empty_as_on_runpod() -> None:
    async def scenario(engine: Engine) -> None:
        job = submit(engine, {"sleep": 3, "stream": ["a", "b"]})
        await engine.advance(2.5)
        assert engine.drain_stream(job) == ["a"]
        assert engine.drain_stream(job) == []
        await engine.advance(3.0)
        assert engine.drain_stream(job) == ["b"]
        assert job.view()["status"] == "COMPLETED" and job.view()["output"] == []

    simulate(scenario)


def test_an_endpoint_set_to_aggregate_shows_every_chunk_as_the_output_unless_a_job_says_otherwise() -> None:
    async def scenario(engine: Engine) -> None:
        engine.configure_endpoint(EP, {"return_aggregate_stream": True})
        aggregated = submit(engine, {"stream": ["a", "b"]})
        opted_out = submit(engine, {"stream": ["a", "b"], "return_aggregate_stream": False})
        await engine.advance(1.5)

        assert aggregated.view()["output"] == ["a", "b"] and opted_out.view()["output"] == []

    simulate(scenario)


def test_the_aggregate_flag_sets_the_default_and_a_job_can_ask_for_aggregation() -> None:
    async def scenario(engine: Engine) -> None:
        by_default = submit(engine, {"stream": ["x"]})
        engine.create_endpoint("plain", {"return_aggregate_stream": False})
        asked = engine.submit("plain", parse_job_request({"input": {"stream": ["y"], "return_aggregate_stream": True}}))
        await engine.advance(1.5)

        assert by_default.view()["output"] == ["x"] and asked.view()["output"] == ["y"]

    simulate(scenario, return_aggregate_stream=True)


def test_a_result_over_the_limit_is_dropped_and_the_job_shows_completed_without_output() -> None:
    async def scenario(engine: Engine) -> None:
        small = submit(engine, {"output": "x" * 80})  # {"output": "xx…"} is 94 bytes
        large = submit(engine, {"output": "x" * 90})
        failed = submit(engine, {"fail": "y" * 90})
        await engine.advance(1.5)

        assert small.view()["output"] == "x" * 80
        for job in (large, failed):
            assert job.view()["status"] == "COMPLETED"
            assert "output" not in job.view() and "error" not in job.view()
        assert (large.dropped_result_bytes, small.dropped_result_bytes) == (104, None)
        assert engine.health(EP)["jobs"]["completed"] == 3

    simulate(scenario, max_result_bytes=100)


def test_a_streamed_chunk_over_the_limit_reaches_the_stream_as_string_pieces() -> None:
    async def scenario(engine: Engine) -> None:
        job = submit(engine, {"stream": ["small", "0123456789abcdef", {"k": "vvvvvvvv"}]})
        await engine.advance(1.5)

        assert engine.drain_stream(job) == ["small", "0123456789", "abcdef", '{"k": "vvv', 'vvvvv"}']

    simulate(scenario, max_stream_chunk_bytes=10)


@pytest.mark.parametrize(
    ("chunk", "limit", "pieces"),
    [
        ("abc", 5, ["abc"]),  # "abc" in JSON is 5 bytes: fits
        ("abcd", 5, ["abcd"]),  # its JSON is 6 bytes, its text 4: one piece
        ("abcdefghij", 4, ["abcd", "efgh", "ij"]),
        ("ééé", 4, ["éé", "é"]),  # 2-byte characters: never cut in half
        ("a🐉b🐉", 5, ["a🐉", "b🐉"]),  # 4-byte characters
        ({"n": [1, 2, 3]}, 8, ['{"n": [1', ", 2, 3]}"]),
        (12345678901, 5, ["12345", "67890", "1"]),
    ],
)
def test_a_chunk_is_split_into_pieces_within_the_limit_that_join_back_to_it(
    chunk: Any, limit: int, pieces: list[Any]
) -> None:
    assert split_stream_chunk(chunk, limit) == pieces
    assert all(len(str(piece).encode()) <= limit for piece in pieces)


def test_a_running_job_shows_its_latest_progress_as_output() -> None:
    async def scenario(engine: Engine) -> None:
        job = submit(engine, {"sleep": 3, "progress": ["loading", "halfway"], "output": "final"})
        await engine.advance(2.5)
        assert job.view()["output"] == "loading"
        await engine.advance(1.0)
        assert job.view()["output"] == "halfway"
        await engine.advance(2.0)
        assert job.view()["output"] == "final"

    simulate(scenario)


def test_webhooks_fire_for_completed_and_failed_jobs_with_input_and_webhook_but_not_for_cancelled() -> None:
    sent: list[dict[str, Any]] = []

    async def scenario(engine: Engine) -> None:
        ok = submit(engine, {"output": 1}, webhook="http://hook/ok")
        bad = submit(engine, {"fail": "no"}, webhook="http://hook/bad")
        gone = submit(engine, {"sleep": 9}, webhook="http://hook/gone", policy={"lowPriority": True})
        await engine.advance(1.5)
        engine.cancel(EP, gone.id)

        assert [(p["id"], p["status"]) for p in sent] == [(ok.id, "COMPLETED"), (bad.id, "FAILED")]
        assert sent[0]["input"] == {"output": 1} and sent[0]["webhook"] == "http://hook/ok"
        assert sent[0]["output"] == 1 and sent[1]["error"] == "no"

    simulate(scenario, webhooks=sent)


def test_reset_forgets_everything_and_puts_the_clock_back() -> None:
    async def scenario(engine: Engine) -> None:
        job = submit(engine, {"sleep": 60})
        await engine.advance(100.0)
        await engine.reset()

        assert engine.history == [] and engine.clock.offset == 0
        assert engine.health(EP)["jobs"] == {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0}
        assert engine.health(EP)["workers"]["running"] == 0
        assert job.task is None or job.task.cancelled() or job.task.done()

    simulate(scenario)
