"""The request budget's arithmetic, its in-process form, its limits, and its fallback when Redis is away."""

from __future__ import annotations

import bisect
import logging
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.runpod.budget import (
    MAX_LIMIT,
    OPERATION_OF_PATH,
    WINDOW_US,
    Bucket,
    Limits,
    LocalBudget,
    RedisBudget,
    bucket_for,
    decide,
    expiry_ms,
    parse_limits,
    tokens_free,
)

SECOND = 1_000_000


def most_in_any_window(slots: list[int], window_us: int = WINDOW_US) -> int:
    """The largest number of `slots` (sorted) in any closed window [t, t + window]."""
    return max((bisect.bisect_right(slots, start + window_us) - i for i, start in enumerate(slots)), default=0)


# -- the bucket each limit gets ------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "burst", "interval_us"), [
    (1, 1, 10_000_001),       # one a window: the next only after a full window has passed
    (2, 1, 5_000_001),
    (9, 1, 1_111_112),
    (10, 1, 1_000_001),
    (80, 8, 136_987),
    (800, 80, 13_870),
    (1400, 140, 7_931),
])
def test_each_limit_gets_a_tenth_of_it_as_burst_and_the_rest_spread_over_the_window(
        limit: int, burst: int, interval_us: int) -> None:
    bucket = bucket_for(limit)

    assert (bucket.burst, bucket.interval_us) == (burst, interval_us)
    assert bucket.burst + WINDOW_US // bucket.interval_us == limit


@given(st.integers(1, MAX_LIMIT))
def test_no_bucket_lets_more_than_its_limit_through_a_window_and_small_ones_let_exactly_the_limit(
        limit: int) -> None:
    bucket = bucket_for(limit)
    most = bucket.burst + WINDOW_US // bucket.interval_us

    assert most <= limit
    if limit <= 3500:  # above that, whole microseconds are too coarse to hit the limit exactly
        assert most == limit
    assert most >= 0.99 * limit or limit > 100_000


# -- the guarantee, on generated request sequences --------------------------------------------------------

requests = st.lists(
    st.tuples(st.integers(0, 3 * SECOND),                                   # time since the last request
              st.one_of(st.just(0), st.integers(0, 5 * SECOND), st.just(60 * SECOND))),  # how long it waits
    min_size=1, max_size=400,
)


@given(st.one_of(st.integers(1, 40), st.sampled_from([80, 100, 800, 1400])), requests)
def test_whatever_the_requests_no_10s_window_ever_sends_more_than_the_limit(
        limit: int, sequence: list[tuple[int, int]]) -> None:
    bucket = bucket_for(limit)
    state: int | None = None
    now = 1_700_000_000 * SECOND
    slots: list[int] = []
    for gap, max_wait in sequence:
        now += gap
        decision = decide(bucket, state, now, max_wait)
        if decision.granted:
            assert 0 <= decision.wait_us <= max_wait
            slots.append(now + decision.wait_us)
            state = decision.state_us
        else:
            assert decision.wait_us > max_wait  # and nothing was taken: the state is not moved on

    assert slots == sorted(slots)  # first come, first served: a later request never goes earlier
    assert most_in_any_window(slots) <= limit


@pytest.mark.parametrize("limit", [1, 2, 80, 1400])
def test_a_caller_that_always_asks_again_when_told_sends_exactly_the_limit_in_a_window(limit: int) -> None:
    bucket = bucket_for(limit)
    state: int | None = None
    now = 0
    slots = []
    while now <= 3 * WINDOW_US:
        decision = decide(bucket, state, now, max_wait_us=0)
        if decision.granted:
            slots.append(now)
            state = decision.state_us
        else:
            now += decision.wait_us

    assert most_in_any_window(slots) == limit


def test_a_caller_willing_to_wait_is_given_the_next_free_slot_at_once() -> None:
    bucket = Bucket(burst=2, interval_us=SECOND)
    first = decide(bucket, None, 0, 0)
    second = decide(bucket, first.state_us, 0, 0)
    third = decide(bucket, second.state_us, 0, 5 * SECOND)
    fourth = decide(bucket, third.state_us, 0, 5 * SECOND)

    assert [d.granted for d in (first, second, third, fourth)] == [True, True, True, True]
    assert [d.wait_us for d in (first, second, third, fourth)] == [0, 0, SECOND, 2 * SECOND]


def test_a_denied_request_says_when_a_token_is_free_and_takes_nothing() -> None:
    bucket = Bucket(burst=1, interval_us=SECOND)
    taken = decide(bucket, None, 0, 0)
    denied = decide(bucket, taken.state_us, 250_000, 0)
    again = decide(bucket, denied.state_us, 250_000, 0)

    assert (denied.granted, denied.wait_us) == (False, 750_000)
    assert denied.state_us == taken.state_us
    assert (again.granted, again.wait_us) == (False, 750_000)


def test_a_state_further_ahead_than_any_reservation_means_the_clock_went_back_and_starts_afresh() -> None:
    bucket = Bucket(burst=1, interval_us=SECOND)

    assert decide(bucket, 3600 * SECOND, 0, 0).granted
    assert not decide(bucket, 30 * SECOND, 0, 0).granted  # a long reservation is honoured


def test_tokens_free_counts_what_could_go_now_without_waiting() -> None:
    bucket = Bucket(burst=3, interval_us=SECOND)

    assert tokens_free(bucket, None, 0) == 3
    assert tokens_free(bucket, SECOND, 0) == 2            # one taken
    assert tokens_free(bucket, 3 * SECOND, 0) == 0        # all taken
    assert tokens_free(bucket, 3 * SECOND, SECOND // 2) == 0
    assert tokens_free(bucket, 3 * SECOND, SECOND) == 1   # one refilled
    assert tokens_free(bucket, 10 * SECOND, 0) == 0       # reserved into the future: none, never negative
    assert tokens_free(bucket, 5, 10) == 3                # a state in the past is a full bucket


def test_a_key_lives_until_its_bucket_is_full_again_and_a_second_more() -> None:
    assert expiry_ms(state_us=10 * SECOND, now_us=0) == 11_000
    assert expiry_ms(state_us=0, now_us=5) == 1000


# -- LocalBudget: the same arithmetic in one process ---------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_local_budget_grants_the_burst_then_sleeps_for_a_slot_or_says_when_one_is_free() -> None:
    time = FakeTime()
    budget = LocalBudget(Limits(status=20), clock=time.clock, sleep=time.sleep)  # burst 2, 526,316 µs apart

    assert budget.available("ep", "status") == 2
    assert [budget.acquire("ep", "status", max_wait=0) for _ in range(2)] == [None, None]
    assert budget.available("ep", "status") == 0
    assert budget.acquire("ep", "status", max_wait=0.1) == pytest.approx(0.526316)
    assert budget.acquire("ep", "status", max_wait=1) is None
    assert time.sleeps == [pytest.approx(0.526316)]
    assert budget.denied == {("ep", "status"): 1}


def test_local_budget_keeps_each_endpoint_and_operation_apart() -> None:
    time = FakeTime()
    budget = LocalBudget(Limits(purge=1, cancel=1), clock=time.clock, sleep=time.sleep)

    assert budget.acquire("ep-a", "purge", max_wait=0) is None
    assert budget.acquire("ep-b", "purge", max_wait=0) is None
    assert budget.acquire("ep-a", "cancel", max_wait=0) is None
    assert budget.acquire("ep-a", "purge", max_wait=0) == pytest.approx(10.000001)


# -- limits ---------------------------------------------------------------------------------------------


def test_the_default_limits_sit_below_runpods_documented_ones() -> None:
    assert (Limits().run, Limits().status, Limits().cancel, Limits().purge) == (800, 1400, 80, 1)
    assert str(Limits()) == "run=800,status=1400,cancel=80,purge=1"


@pytest.mark.parametrize("bad", [0, -1, MAX_LIMIT + 1, True, 2.5])
def test_a_limit_is_a_whole_number_of_requests_of_at_least_one(bad: object) -> None:
    with pytest.raises(ValueError, match="status"):
        Limits(status=bad)  # type: ignore[arg-type]


def test_a_share_of_the_limits_rounds_down_but_never_to_nothing() -> None:
    assert Limits().share(0.25) == Limits(run=200, status=350, cancel=20, purge=1)


def test_limits_are_read_from_any_subset_of_operations() -> None:
    problems: list[str] = []

    assert parse_limits(" status = 1500 , purge=2 ", problems) == Limits(status=1500, purge=2)
    assert parse_limits("", problems) == Limits()
    assert problems == []


def test_every_bad_limit_is_reported_at_once() -> None:
    problems: list[str] = []
    # \u0661 is an Arabic-Indic one: str.isdigit() says yes, but it is no ASCII number
    parse_limits("status=fast,health=10,run=0,cancel,run=5,purge=\u0661", problems)

    assert problems == [
        "RPQ_RUNPOD_LIMITS: status must be a whole number of requests per 10 s from 1 to 1,000,000, got 'fast'",
        "RPQ_RUNPOD_LIMITS: 'health' is not a budgeted operation (run, status, cancel, purge)",
        "RPQ_RUNPOD_LIMITS: run must be a whole number of requests per 10 s from 1 to 1,000,000, got '0'",
        "RPQ_RUNPOD_LIMITS: expected operation=requests, got 'cancel'",
        "RPQ_RUNPOD_LIMITS: run is listed twice",
        "RPQ_RUNPOD_LIMITS: purge must be a whole number of requests per 10 s from 1 to 1,000,000, got '\u0661'",
    ]


def test_every_runpod_path_but_health_spends_a_budget() -> None:
    assert OPERATION_OF_PATH == {
        "run": "run", "runsync": "run", "retry": "run",
        "status": "status", "status-sync": "status", "stream": "status",
        "cancel": "cancel", "purge-queue": "purge",
    }


# -- RedisBudget when Redis does not answer -------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_without_redis_each_process_spends_a_share_of_the_limit_and_says_so_once(
        caplog: pytest.LogCaptureFixture) -> None:
    budget = RedisBudget(f"redis://127.0.0.1:{closed_port()}/0", Limits(status=80), fallback_share=0.25,
                         socket_timeout=0.5)
    budget.RETRY_REDIS_SECONDS = 0.0  # ask Redis every time, so every call meets the refusal
    caplog.set_level(logging.WARNING, logger="rpq.budget")

    granted = [budget.acquire("ep", "status", max_wait=0) is None for _ in range(5)]

    assert granted == [True, True, False, False, False]  # a quarter of 80 is 20 a window: a burst of 2
    assert budget.available("ep", "status") == 0
    assert len(caplog.records) == 1  # five refusals, one warning (at most one a minute)
    assert caplog.records[0].getMessage().startswith("RunPod request budget: Redis did not answer")
    assert "spends 25% of each limit on its own" in caplog.records[0].getMessage()
    assert "127.0.0.1" not in repr(budget)
