from __future__ import annotations

from datetime import UTC, datetime

import pytest

from jobs.flow.backoff import (
    MAX_RETRY_AFTER_SECONDS,
    PollSchedule,
    RetryPolicy,
    exponential_delay,
    parse_retry_after,
    poll_delay,
    poll_error_delay,
    retry_delay,
)


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (0, 0.0, 0.25),  # base 0.5: between 0.25 and 0.5
        (0, 1.0, 0.5),
        (1, 0.0, 0.5),
        (2, 0.5, 1.5),  # step 2.0: 1.0 fixed + 0.5 * 1.0
        (3, 1.0, 4.0),
        (10, 0.0, 15.0),  # capped at 30: never below half the cap
        (10, 1.0, 30.0),
    ],
)
def test_exponential_delay_doubles_with_equal_jitter_up_to_the_cap(attempt: int, rand: float, expected: float) -> None:
    assert exponential_delay(attempt, base=0.5, cap=30.0, rand=lambda: rand) == pytest.approx(expected)


def test_retry_delay_gives_up_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=1.0, max_delay=10.0)

    delays = [retry_delay(n, policy, rand=lambda: 1.0) for n in range(4)]

    assert delays == [1.0, 2.0, None, None]


def test_retry_after_is_a_floor_on_the_delay() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=30.0)

    assert retry_delay(0, policy, retry_after=7.0, rand=lambda: 0.0) == 7.0
    assert retry_delay(3, policy, retry_after=0.1, rand=lambda: 1.0) == 4.0


def test_a_retry_after_longer_than_the_policy_allows_means_give_up_now() -> None:
    policy = RetryPolicy(max_attempts=5, max_delay=30.0)

    assert retry_delay(0, policy, retry_after=120.0) is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("3", 3.0),
        ("1.5", 1.5),
        ("-4", 0.0),
        ("Wed, 21 Oct 2026 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2026 07:27:00 GMT", 0.0),  # in the past: go now
        ("soon", None),
    ],
)
def test_parse_retry_after_reads_seconds_and_http_dates(header: str | None, expected: float | None) -> None:
    now = datetime(2026, 10, 21, 7, 28, 0, tzinfo=UTC)

    assert parse_retry_after(header, now=now) == expected


def test_a_policy_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay=5, max_delay=1)


# -- the poll schedule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("polls_since_change", "low", "high"),
    [
        (0, 0.5, 1.0),  # a status just changed: look again within a second
        (1, 1.0, 2.0),
        (2, 2.0, 4.0),
        (3, 4.0, 8.0),
        (4, 7.5, 15.0),  # reached the cap
        (50, 7.5, 15.0),  # and stays there however long the job runs
    ],
)
def test_polls_slow_down_while_nothing_changes_and_never_exceed_the_cap(
    polls_since_change: int, low: float, high: float
) -> None:
    schedule = PollSchedule()

    assert poll_delay(schedule, polls_since_change=polls_since_change, rand=lambda: 0.0) == pytest.approx(low)
    assert poll_delay(schedule, polls_since_change=polls_since_change, rand=lambda: 1.0) == pytest.approx(high)


def test_the_cap_is_far_below_runpods_retention_and_the_visibility_timeout() -> None:
    from tasks.app import VISIBILITY_TIMEOUT_SECONDS

    schedule = PollSchedule()

    assert schedule.cap * 10 < 30 * 60  # RunPod keeps results 30 minutes
    assert (schedule.error_cap + 180) * 4 < VISIBILITY_TIMEOUT_SECONDS  # longest wait + task time limit


@pytest.mark.parametrize(
    ("errors", "retry_after", "expected"),
    [(1, None, 1.0), (2, None, 2.0), (3, None, 4.0), (10, None, 30.0), (1, 12.0, 12.0), (3, 1.0, 4.0)],
)
def test_failed_polls_back_off_and_respect_retry_after(errors: int, retry_after: float | None, expected: float) -> None:
    assert poll_error_delay(PollSchedule(), consecutive_errors=errors, retry_after=retry_after,
                            rand=lambda: 0.0) == pytest.approx(expected)


def test_a_huge_retry_after_never_parks_a_poll_past_runpods_retention_or_the_visibility_timeout() -> None:
    from tasks.app import VISIBILITY_TIMEOUT_SECONDS

    delay = poll_error_delay(PollSchedule(), consecutive_errors=1, retry_after=7200.0, rand=lambda: 1.0)

    assert delay == MAX_RETRY_AFTER_SECONDS
    assert delay < 30 * 60 and delay < VISIBILITY_TIMEOUT_SECONDS
    assert poll_error_delay(PollSchedule(), consecutive_errors=1, retry_after=45.0, rand=lambda: 0.0) == 45.0
