"""Pure functions that decide how long to wait before trying again.

No I/O and no clocks of their own: callers pass the attempt number and a random source, so the
schedule is a table that tests can check line by line.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class RetryPolicy:
    """How the RunPod client retries a failed call that is safe to repeat.

    `max_attempts` counts the first try. A `Retry-After` longer than `max_delay` is not waited
    out in-process: the call fails with the transient error and the caller (a Celery task with
    its own countdown) decides when to come back.
    """

    max_attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("need 0 <= base_delay <= max_delay")


NO_RETRY = RetryPolicy(max_attempts=1)


def exponential_delay(attempt: int, *, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Exponential backoff with "equal jitter": half the step fixed, half random.

    attempt 0 waits between base/2 and base, attempt 1 between base and 2*base, and so on, never
    more than `cap`. Equal jitter, unlike full jitter, never produces a near-zero delay that would
    hammer an API that just said "slow down".
    """
    step = min(cap, base * 2.0 ** max(attempt, 0))
    return step / 2 + rand() * step / 2


def retry_delay(
    attempt: int,
    policy: RetryPolicy,
    *,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """Seconds to wait before attempt `attempt + 1`, or None when the caller should give up.

    `attempt` is the 0-based number of the attempt that just failed. RunPod's `Retry-After`, when
    present, is honoured as a floor.
    """
    if attempt + 1 >= policy.max_attempts:
        return None
    delay = exponential_delay(attempt, base=policy.base_delay, cap=policy.max_delay, rand=rand)
    if retry_after is not None:
        if retry_after > policy.max_delay:
            return None
        delay = max(delay, retry_after)
    return delay


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Read a Retry-After header: delta-seconds or an HTTP date. None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(seconds, 0.0)


@dataclass(frozen=True)
class PollSchedule:
    """When to ask RunPod about a job again.

    Fast at first and again whenever RunPod's status changes (a job that just started is likely
    to finish soon), slower while nothing happens. `cap` keeps the gap far below both the broker's
    visibility timeout and RunPod's 30-minute result retention.
    """

    first: float = 1.0
    base: float = 1.0
    cap: float = 15.0
    error_base: float = 2.0
    error_cap: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap or not 0 < self.error_base <= self.error_cap or self.first <= 0:
            raise ValueError("poll schedule delays must be positive, each base at most its cap")


def poll_delay(
    schedule: PollSchedule, *, polls_since_change: int, rand: Callable[[], float] = random.random
) -> float:
    """The gap before the next poll of a job whose status last changed `polls_since_change` polls ago."""
    return exponential_delay(polls_since_change, base=schedule.base, cap=schedule.cap, rand=rand)


#: The most of a RunPod `Retry-After` a task waits out. RunPod keeps a finished job's result only 30
#: minutes and Redis re-delivers a held countdown after its 30-minute visibility timeout, so one large
#: header (`Retry-After: 7200`) must never park a poll past either; asking again sooner only earns
#: another 429, which RunPod does not act on.
MAX_RETRY_AFTER_SECONDS = 300.0


def poll_error_delay(
    schedule: PollSchedule,
    *,
    consecutive_errors: int,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """The gap after a failed poll: longer with each failure in a row, never under Retry-After (as far
    as `MAX_RETRY_AFTER_SECONDS`)."""
    delay = exponential_delay(max(consecutive_errors - 1, 0), base=schedule.error_base, cap=schedule.error_cap,
                              rand=rand)
    return max(delay, min(retry_after or 0.0, MAX_RETRY_AFTER_SECONDS))
