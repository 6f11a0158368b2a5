"""The RunPod client spends its request budget: a token before every attempt, nothing sent without one."""

from __future__ import annotations

import httpx
import pytest

from jobs.errors import RunOutcomeUnknown, RunPodBudgetExhausted, RunPodTransient
from jobs.flow.backoff import RetryPolicy
from jobs.runpod.budget import Limits, LocalBudget
from tests.unit.test_budget import FakeTime
from tests.unit.test_runpod_client import Recorder, make_client, ok

JOB = {"id": "job-1-u1", "status": "IN_QUEUE"}


class CountingBudget:
    """Grants while it has tokens left (then says one is free in 3 s); remembers every request for one."""

    def __init__(self, tokens: int = 1000) -> None:
        self.tokens = tokens
        self.asked: list[tuple[str, str, float]] = []

    def acquire(self, endpoint_id: str, op: str, *, max_wait: float) -> float | None:
        self.asked.append((endpoint_id, op, max_wait))
        if self.tokens <= 0:
            return 3.0
        self.tokens -= 1
        return None

    def available(self, endpoint_id: str, op: str) -> int:
        return self.tokens


def test_a_status_call_with_no_token_in_time_raises_budget_exhausted_and_sends_nothing() -> None:
    recorder = Recorder(ok({**JOB, "status": "COMPLETED", "output": 1}))
    time = FakeTime()
    client = make_client(recorder, budget=LocalBudget(Limits(status=1), clock=time.clock, sleep=time.sleep),
                         budget_wait=2.0)

    client.status("ep123abc", "job-1-u1")
    with pytest.raises(RunPodBudgetExhausted) as caught:
        client.status("ep123abc", "job-1-u1")

    assert len(recorder.requests) == 1
    assert isinstance(caught.value, RunPodTransient)
    assert caught.value.retry_after == pytest.approx(10.000001)
    assert caught.value.operation == "status"
    assert time.sleeps == []  # a token 10 s away is not waited for with a 2 s wait


def test_a_run_refused_by_the_budget_provably_never_reached_runpod() -> None:
    recorder = Recorder(ok(JOB))
    client = make_client(recorder, budget=CountingBudget(tokens=0))

    with pytest.raises(RunPodBudgetExhausted) as caught:
        client.run("ep123abc", {"x": 1}, budget_seconds=70)

    assert recorder.requests == []
    assert not isinstance(caught.value, RunOutcomeUnknown)  # the submit path sends it later
    assert caught.value.retry_after == 3.0


def test_a_call_waits_up_to_budget_wait_for_a_token_then_sends() -> None:
    recorder = Recorder(ok(JOB))
    time = FakeTime()
    client = make_client(recorder, budget=LocalBudget(Limits(cancel=20), clock=time.clock, sleep=time.sleep),
                         budget_wait=1.0)

    for _ in range(3):
        client.cancel("ep123abc", "job-1-u1")

    assert len(recorder.requests) == 3
    assert time.sleeps == [pytest.approx(0.526316)]  # a burst of 2, then the next slot


def test_every_attempt_takes_a_token_retries_included() -> None:
    recorder = Recorder(httpx.Response(503), httpx.Response(429, headers={"Retry-After": "0"}), ok(JOB))
    budget = CountingBudget()
    client = make_client(recorder, budget=budget, retry=RetryPolicy(max_attempts=3, base_delay=0.01))

    client.status("ep123abc", "job-1-u1")

    assert len(recorder.requests) == 3
    assert [op for _, op, _ in budget.asked] == ["status", "status", "status"]


def test_a_retry_the_budget_refuses_is_not_sent() -> None:
    recorder = Recorder(httpx.Response(503), ok(JOB))
    client = make_client(recorder, budget=CountingBudget(tokens=1), retry=RetryPolicy(max_attempts=3))

    with pytest.raises(RunPodBudgetExhausted):
        client.status("ep123abc", "job-1-u1")

    assert len(recorder.requests) == 1


def test_each_operation_spends_its_own_budget_and_health_spends_none() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/health"):
            return ok({"jobs": {}, "workers": {}})
        if path.endswith("/purge-queue"):
            return ok({"removed": 0})
        if "/stream/" in path:
            return ok({"status": "IN_PROGRESS", "stream": []})
        return ok(JOB)

    budget = CountingBudget()
    client = make_client(Recorder(answer), budget=budget)

    client.run("ep-a1", {})
    client.runsync("ep-a1", {})
    client.retry("ep-a1", "job-1-u1")
    client.status("ep-b2", "job-1-u1")
    client.stream("ep-b2", "job-1-u1")
    client.cancel("ep-c3", "job-1-u1")
    client.purge_queue("ep-d4")
    client.health("ep-e5")

    assert [(endpoint, op) for endpoint, op, _ in budget.asked] == [
        ("ep-a1", "run"), ("ep-a1", "run"), ("ep-a1", "run"),
        ("ep-b2", "status"), ("ep-b2", "status"),
        ("ep-c3", "cancel"),
        ("ep-d4", "purge"),
    ]


def test_a_run_waits_for_a_token_no_longer_than_what_is_left_of_its_time_budget() -> None:
    budget = CountingBudget()
    client = make_client(Recorder(ok(JOB)), budget=budget, budget_wait=2.0, clock=lambda: 100.0)

    client.run("ep123abc", {}, budget_seconds=0.5)
    client.status("ep123abc", "job-1-u1")

    assert [wait for _, _, wait in budget.asked] == [0.5, 2.0]


def test_without_a_budget_nothing_is_counted() -> None:
    recorder = Recorder(ok(JOB))
    client = make_client(recorder)

    for _ in range(5):
        client.status("ep123abc", "job-1-u1")

    assert client.budget is None
    assert len(recorder.requests) == 5
