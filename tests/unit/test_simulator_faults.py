"""Fault rules, the fault picker and RunPod's rate limits, without HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from jobs.simulator.faults import FaultInjector, FaultRule, RateLimited, RateLimiter


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ({"kind": "boom"}, "kind"),
        ({"kind": "5xx", "op": "launch"}, "op"),
        ({"kind": "5xx", "rate": 1.5}, "rate"),
        ({"kind": "5xx", "count": 0}, "count"),
        ({"kind": "5xx", "status": 404}, "status"),
        ({"kind": "slow", "delay": -1}, "delay"),
        ({"kind": "429", "when": "during"}, "when"),
        ({"kind": "429", "colour": "red"}, "unknown"),
        ("5xx", "object"),
    ],
)
def test_a_malformed_fault_rule_is_refused_with_the_reason(raw: Any, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        FaultRule.parse(raw)


def test_a_rule_applies_only_to_its_operation_and_endpoint() -> None:
    injector = FaultInjector(seed=0, defaults=[])
    injector.replace([FaultRule.parse({"kind": "5xx", "op": "run", "endpoint": "a"})])

    assert injector.pick("status", "a") is None
    assert injector.pick("run", "b") is None
    assert injector.pick("run", "a") is not None


def test_a_counted_rule_expires_after_that_many_matching_requests() -> None:
    injector = FaultInjector(seed=0, defaults=[])
    injector.replace([FaultRule.parse({"kind": "429", "op": "*", "count": 2})])

    picks = [injector.pick("status", "ep") for _ in range(3)]

    assert [p is not None for p in picks] == [True, True, False]
    assert injector.rules == []


def test_random_faults_repeat_exactly_for_the_same_seed_and_reset_restarts_the_sequence() -> None:
    def draws(injector: FaultInjector) -> list[bool]:
        return [injector.pick("run", "ep") is not None for _ in range(40)]

    first = FaultInjector.from_config(seed=7, rate_5xx=0.3, rate_429=0, rate_slow=0, slow_seconds=1, rate_drop=0)
    second = FaultInjector.from_config(seed=7, rate_5xx=0.3, rate_429=0, rate_slow=0, slow_seconds=1, rate_drop=0)
    sequence = draws(first)

    assert sequence == draws(second)
    assert 0 < sum(sequence) < 40
    first.reset()
    assert draws(first) == sequence


def test_config_rates_apply_to_every_operation_before_it_runs() -> None:
    injector = FaultInjector.from_config(seed=0, rate_5xx=0, rate_429=0, rate_slow=1.0, slow_seconds=3, rate_drop=0)

    rule = injector.pick("purge-queue", "any")

    assert rule is not None and (rule.kind, rule.delay, rule.when) == ("slow", 3, "before")


def test_runtime_rules_take_precedence_over_config_rates() -> None:
    injector = FaultInjector.from_config(seed=0, rate_5xx=1.0, rate_429=0, rate_slow=0, slow_seconds=1, rate_drop=0)
    injector.replace([FaultRule.parse({"kind": "drop", "op": "run"})])

    picked = injector.pick("run", "ep")

    assert picked is not None and picked.kind == "drop"


# -- rate limits ----------------------------------------------------------------------------------------


def test_the_eleventh_run_in_ten_seconds_is_refused_at_a_hundredth_of_runpods_limit() -> None:
    limiter = RateLimiter(scale=0.01)
    for i in range(10):
        limiter.acquire("ep", "run", now=100.0 + i * 0.1, running_workers=0)
        limiter.release("ep", "run")

    with pytest.raises(RateLimited) as refused:
        limiter.acquire("ep", "run", now=101.5, running_workers=0)

    assert refused.value.retry_after == 9  # the oldest request leaves the window at 110.0
    limiter.acquire("ep", "run", now=110.01, running_workers=0)


def test_limits_are_per_endpoint_and_per_operation() -> None:
    limiter = RateLimiter(scale=0.001)  # every limit becomes 1
    limiter.acquire("a", "purge-queue", now=0, running_workers=0)

    limiter.acquire("b", "purge-queue", now=0, running_workers=0)
    limiter.acquire("a", "cancel", now=0, running_workers=0)
    with pytest.raises(RateLimited):
        limiter.acquire("a", "purge-queue", now=1, running_workers=0)


def test_running_workers_raise_the_limit_to_fifty_per_worker() -> None:
    limiter = RateLimiter(scale=0.01)  # purge-queue: 1 per 10 s; 2 workers: 100 x 0.01 = 1; 4 workers: 2
    limiter.acquire("ep", "purge-queue", now=0, running_workers=4)

    limiter.acquire("ep", "purge-queue", now=0, running_workers=4)
    with pytest.raises(RateLimited):
        limiter.acquire("ep", "purge-queue", now=0, running_workers=4)


def test_concurrent_requests_over_the_limit_are_refused_until_one_finishes() -> None:
    limiter = RateLimiter(scale=0.05)  # cancel: 20 concurrent x 0.05 = 1
    assert limiter.acquire("ep", "cancel", now=0, running_workers=0)

    with pytest.raises(RateLimited, match="concurrent") as refused:
        limiter.acquire("ep", "cancel", now=0, running_workers=0)
    assert refused.value.retry_after == 1
    limiter.release("ep", "cancel")
    assert limiter.acquire("ep", "cancel", now=0, running_workers=0)


def test_operations_missing_from_runpods_table_are_not_limited() -> None:
    limiter = RateLimiter(scale=0.0001)

    for _ in range(5):
        assert limiter.acquire("ep", "health", now=0, running_workers=0) is False
        assert limiter.acquire("ep", "retry", now=0, running_workers=0) is False
