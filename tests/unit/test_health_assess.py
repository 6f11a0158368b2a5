from __future__ import annotations

import pytest

from jobs.runpod.health import assess
from jobs.storage.models import EndpointHealthRow


def row(**counters: int) -> EndpointHealthRow:
    return EndpointHealthRow(endpoint_name="tts", endpoint_id="tts-endpoint", ok=True, **counters)


@pytest.mark.parametrize(
    ("counters", "state"),
    [
        ({}, "cold"),
        ({"workers_throttled": 2, "jobs_in_queue": 3}, "cold"),
        ({"workers_initializing": 1, "jobs_in_queue": 1}, "warming"),
        ({"workers_idle": 2}, "cold"),  # RunPod's idle workers are scaled down: the next job cold-starts
        ({"workers_ready": 1}, "ready"),
        ({"workers_ready": 1, "workers_idle": 2}, "ready"),
        ({"workers_running": 3, "jobs_in_queue": 4}, "busy"),
        ({"workers_running": 1, "workers_ready": 1, "jobs_in_queue": 1}, "busy"),
        ({"workers_unhealthy": 3, "jobs_in_queue": 5}, "unhealthy"),
        ({"workers_unhealthy": 2, "workers_idle": 1, "jobs_in_queue": 5}, "unhealthy"),  # idle ones cannot serve
        ({"workers_unhealthy": 1, "workers_running": 1}, "busy"),  # some crash, some work: not stuck
    ],
)
def test_the_label_says_why_jobs_wait(counters: dict[str, int], state: str) -> None:
    assert assess(row(**counters), execution_ms=[], delay_ms=[]).state == state


def test_an_endpoint_whose_health_call_failed_is_unreachable_not_idle() -> None:
    failed = EndpointHealthRow(endpoint_name="tts", endpoint_id="tts-endpoint", ok=False, error="timeout")

    verdict = assess(failed, execution_ms=[1000], delay_ms=[1000])

    assert (verdict.state, verdict.estimated_wait_seconds) == ("unreachable", None)
    assert "timeout" in verdict.reason


def test_only_scaled_down_workers_are_named_as_the_reason_for_a_cold_start() -> None:
    verdict = assess(row(workers_idle=3), execution_ms=[5000], delay_ms=[2000])

    assert verdict.state == "cold" and "3 worker(s) scaled down" in verdict.reason
    assert verdict.estimated_wait_seconds == pytest.approx(2.0)  # the typical (cold) delay, not zero


def test_crash_looping_workers_are_named_as_the_reason() -> None:
    verdict = assess(row(workers_unhealthy=2, jobs_in_queue=4), execution_ms=[5000], delay_ms=[100])

    assert "crashing" in verdict.reason and verdict.estimated_wait_seconds is None


@pytest.mark.parametrize(
    ("counters", "expected"),
    [
        ({"workers_ready": 1}, 0.0),  # a ready worker takes it now
        ({"workers_running": 2, "jobs_in_queue": 0}, 10.0),  # waits for one of two to free up
        ({"workers_running": 2, "jobs_in_queue": 3}, 20.0),  # 3 ahead + itself over 2 workers: 2 waves
        ({"workers_running": 1, "workers_ready": 1, "jobs_in_queue": 3}, 20.0),
        ({"workers_running": 2, "workers_idle": 5, "jobs_in_queue": 3}, 20.0),  # idle ones do not share the queue
        ({}, 4.0),  # cold: the typical delay (cold start included)
        ({"workers_idle": 2}, 4.0),  # scaled down is cold too
        ({"workers_initializing": 2, "jobs_in_queue": 4}, 24.0),  # delay + 2 waves of the queue ahead
    ],
)
def test_the_estimated_wait_comes_from_recent_timings_and_the_queue(counters: dict[str, int],
                                                                     expected: float) -> None:
    verdict = assess(row(**counters), execution_ms=[9000, 10000, 11000], delay_ms=[3000, 4000, 5000])

    assert verdict.estimated_wait_seconds == pytest.approx(expected)


def test_no_recent_jobs_means_no_estimate_rather_than_a_made_up_one() -> None:
    assert assess(row(workers_running=1, jobs_in_queue=2), execution_ms=[], delay_ms=[]).estimated_wait_seconds is None
