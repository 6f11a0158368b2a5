from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.flow.backoff import PollSchedule, poll_delay
from jobs.flow.pollplan import (
    DEFAULT_TUNING,
    LONG_WAIT_CAP_SECONDS,
    NO_HISTORY,
    EndpointTimes,
    JobSeen,
    Mode,
    Plan,
    plan_next_poll,
)
from jobs.states import JobStatus

SUBMITTED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SCHEDULE = PollSchedule()  # 1 s first, doubling from 1 s up to 15 s
FLOOR = 0.5
CAP = LONG_WAIT_CAP_SECONDS


def history(*seconds: float, delay: float = 0.05) -> EndpointTimes:
    """Recent jobs that ran these many seconds each, after `delay` seconds queued."""
    return EndpointTimes.from_ms((round(s * 1000), round(delay * 1000)) for s in seconds)


def spread(low: float, high: float, n: int = 40, *, delay: float = 0.05) -> EndpointTimes:
    """n recent jobs whose run times are evenly spread from `low` to `high` seconds."""
    return history(*(low + (high - low) * i / (n - 1) for i in range(n)), delay=delay)


def running(elapsed: float, *, delay: float = 0.0, polls: int = 3) -> JobSeen:
    """A job RunPod started `delay` s after submission and that has run `elapsed` s by now (`at(...)`)."""
    return JobSeen(JobStatus.IN_PROGRESS, SUBMITTED, started_at=SUBMITTED + timedelta(seconds=delay + 0.5),
                   delay=delay, polls=polls, polls_since_change=polls - 1)


def at(seconds: float) -> datetime:
    return SUBMITTED + timedelta(seconds=seconds)


def plan(job: JobSeen, times: EndpointTimes, now: datetime, *, rand: float = 0.0, floor: float = FLOOR,
         cap: float = CAP, schedule: PollSchedule = SCHEDULE) -> Plan:
    return plan_next_poll(job, times, schedule=schedule, now=now, floor=floor, cap=cap, rand=lambda: rand)


def step_for(run_time: float) -> float:
    return min(SCHEDULE.cap, max(DEFAULT_TUNING.min_step, DEFAULT_TUNING.lag_scale * math.sqrt(run_time)))


# -- what is learned ---------------------------------------------------------------------------------


def test_recent_jobs_are_read_in_seconds_and_sorted_with_delay_plus_run_time_paired_per_job() -> None:
    times = EndpointTimes.from_ms([(20_000, 500), (2_000, None), (None, 300), (-5, 100), (10_000, 1_000)])

    assert times.execution == (2.0, 10.0, 20.0)
    assert times.delay == (0.1, 0.3, 0.5, 1.0)
    assert times.total == (11.0, 20.5)
    assert times.samples == 3


# -- too little to learn from ------------------------------------------------------------------------


@pytest.mark.parametrize("polls_since_change", [0, 1, 2, 5])
@pytest.mark.parametrize("rand", [0.0, 0.3, 1.0])
def test_with_too_few_recent_jobs_the_doubling_schedule_is_kept(polls_since_change: int, rand: float) -> None:
    job = JobSeen(JobStatus.IN_PROGRESS, SUBMITTED, polls=4, polls_since_change=polls_since_change)
    few = spread(20, 21, n=DEFAULT_TUNING.min_samples - 1)

    for times in (NO_HISTORY, few):
        chosen = plan(job, times, at(30), rand=rand)
        assert chosen.mode is Mode.NO_HISTORY
        assert chosen.delay == poll_delay(SCHEDULE, polls_since_change=polls_since_change, rand=lambda: rand)


def test_with_too_few_recent_jobs_the_first_poll_comes_when_the_schedule_says() -> None:
    assert plan(JobSeen(JobStatus.IN_QUEUE, SUBMITTED), NO_HISTORY, at(0.05)).delay == SCHEDULE.first


# -- a running job -----------------------------------------------------------------------------------


def test_a_job_far_from_where_recent_jobs_ended_waits_until_just_before_that_beyond_the_schedules_cap() -> None:
    times = spread(120, 121)

    latest = plan(running(1.0), times, at(1.0), rand=0.0)
    earliest = plan(running(1.0), times, at(1.0), rand=1.0)

    assert latest.mode is Mode.WAIT and latest.delay == pytest.approx(119.0)
    assert earliest.delay == pytest.approx(119.0 - step_for(120) / 4)
    assert earliest.delay > SCHEDULE.cap


def test_where_recent_jobs_all_ended_within_a_second_a_job_is_seen_within_about_a_second_whatever_its_length() -> None:
    times = spread(120, 121)

    first = plan(running(119.0), times, at(119.0))

    assert first.mode is Mode.ACROSS_END
    assert first.delay <= 2.0 < step_for(120)


def test_across_a_wide_likely_end_polls_come_every_step_of_about_point_four_root_t() -> None:
    times = spread(96, 144)  # two-minute jobs, give or take 20 %
    job = running(110.0)

    gaps = [plan(job, times, at(110.0), rand=r).delay for r in (0.0, 0.5, 1.0)]

    step = step_for(110.0)
    assert gaps[0] == pytest.approx(step, rel=0.05)
    assert all(0.75 * step * 0.95 <= gap <= step * 1.05 for gap in gaps)
    assert 4.0 < step < 5.0


def test_a_gap_of_a_step_or_so_between_recent_ends_is_chance_not_a_separate_bunch() -> None:
    times = history(*[100 + i / 4 for i in range(41)], *[114 + i / 4 for i in range(41)])  # 4 s apart at 110-114

    chosen = plan(running(109.5), times, at(109.5))

    assert chosen.mode is Mode.ACROSS_END and chosen.delay == pytest.approx(step_for(109.75))


def test_a_gap_wider_than_two_steps_ends_a_bunch_and_the_poll_comes_at_its_end() -> None:
    times = history(*[20 + i / 40 for i in range(41)], *[30 + i / 40 for i in range(41)])

    chosen = plan(running(20.5), times, at(20.5))

    assert chosen.mode is Mode.ACROSS_END and chosen.delay == pytest.approx(1.0)
    assert chosen.delay < step_for(20.5)


def test_a_job_that_outlasted_nearly_every_recent_job_goes_back_to_doubling_from_short_gaps() -> None:
    times = spread(20, 21)

    just_past = plan(running(21.2), times, at(21.2), rand=1.0)
    long_past = plan(running(80.0), times, at(80.0), rand=1.0)

    assert just_past.mode is Mode.PAST_LIKELY_END and just_past.delay <= 1.0
    assert long_past.mode is Mode.PAST_LIKELY_END and long_past.delay == SCHEDULE.cap


def test_on_an_endpoint_with_two_lengths_of_job_a_job_past_the_shorter_waits_for_the_longer() -> None:
    times = history(*[20 + i / 40 for i in range(40)], *[120 + i / 40 for i in range(40)])

    chosen = plan(running(60.0), times, at(60.0))

    assert chosen.mode is Mode.WAIT and chosen.delay == pytest.approx(60.0)


def test_a_straggler_of_the_shorter_jobs_waits_at_most_a_few_times_its_overrun_not_for_the_longer_ones() -> None:
    times = history(*[20 + i / 40 for i in range(40)], *[120 + i / 40 for i in range(40)])

    just_past = plan(running(21.5), times, at(21.5))
    further = plan(running(25.0), times, at(25.0))

    assert just_past.delay < 5.0
    assert just_past.delay < further.delay < 20.0


def test_runpods_delay_time_pins_when_the_job_started() -> None:
    times = spread(20, 21)
    # rpq first saw it running 10 s after submission; RunPod says it waited only 0.1 s.
    pinned = JobSeen(JobStatus.IN_PROGRESS, SUBMITTED, started_at=at(10.0), delay=0.1, polls=2)
    unpinned = JobSeen(JobStatus.IN_PROGRESS, SUBMITTED, started_at=at(10.0), delay=None, polls=2)

    assert plan(pinned, times, at(10.0)).delay == pytest.approx(20.0 - 9.9)
    assert plan(unpinned, times, at(10.0)).delay == pytest.approx(20.0)  # the latest it can have started


# -- a queued job --------------------------------------------------------------------------------------


def test_a_job_just_submitted_is_first_looked_at_when_recent_jobs_typically_started() -> None:
    times = spread(60, 61, delay=4.0)

    first = plan(JobSeen(JobStatus.IN_QUEUE, SUBMITTED), times, at(0.0), rand=0.0)

    assert first.mode is Mode.FIRST_LOOK and first.delay == pytest.approx(4.0)


def test_a_first_look_on_a_warm_endpoint_comes_as_soon_as_the_floor_allows() -> None:
    first = plan(JobSeen(JobStatus.IN_QUEUE, SUBMITTED), spread(60, 61, delay=0.02), at(0.05))

    assert first.mode is Mode.FIRST_LOOK and first.delay == FLOOR


def test_a_job_still_queued_after_its_first_look_is_planned_from_submission_on_delay_plus_run_time() -> None:
    times = spread(20, 21, delay=5.0)
    queued = JobSeen(JobStatus.IN_QUEUE, SUBMITTED, polls=1, polls_since_change=1)

    chosen = plan(queued, times, at(5.0))

    assert chosen.mode is Mode.WAIT and chosen.delay == pytest.approx(25.0 - 5.0)


# -- bounds ----------------------------------------------------------------------------------------------


def test_the_floor_wins_over_the_plan_and_the_cap_over_the_floor() -> None:
    times = spread(20, 21)

    assert plan(running(20.2), times, at(20.2), floor=3.0).delay == 3.0
    assert plan(running(1.0), times, at(1.0), floor=400.0, cap=120.0).delay == 120.0


def test_a_long_wait_never_exceeds_the_cap() -> None:
    times = spread(1000, 1001)

    assert plan(running(1.0), times, at(1.0), cap=180.0).delay == 180.0


def test_a_cap_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError):
        plan(running(1.0), NO_HISTORY, at(1.0), cap=0.0)


# -- properties -------------------------------------------------------------------------------------------

run_ms = st.integers(min_value=0, max_value=3_600_000)
recent = st.lists(st.tuples(st.one_of(st.none(), run_ms), st.one_of(st.none(), run_ms)), max_size=120)
seconds = st.floats(min_value=-60, max_value=7_200, allow_nan=False)
jobs = st.builds(
    JobSeen,
    status=st.sampled_from([JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS]),
    submitted_at=st.one_of(st.none(), st.just(SUBMITTED)),
    started_at=st.one_of(st.none(), seconds.map(at)),
    delay=st.one_of(st.none(), st.floats(min_value=-1, max_value=7_200, allow_nan=False)),
    polls=st.integers(min_value=0, max_value=1_000),
    polls_since_change=st.integers(min_value=0, max_value=1_000),
)
schedules = st.builds(lambda base, extra, first: PollSchedule(first=first, base=base, cap=base + extra),
                      st.floats(min_value=0.1, max_value=5), st.floats(min_value=0, max_value=300),
                      st.floats(min_value=0.1, max_value=10))


@given(job=jobs, rows=recent, now=seconds, floor=st.floats(min_value=-5, max_value=600, allow_nan=False),
       cap=st.floats(min_value=0.01, max_value=600), rand=st.floats(min_value=0, max_value=1), schedule=schedules)
def test_every_gap_is_a_finite_number_between_the_floor_and_the_cap(
    job: JobSeen, rows: list[tuple[int | None, int | None]], now: float, floor: float, cap: float, rand: float,
    schedule: PollSchedule,
) -> None:
    chosen = plan(job, EndpointTimes.from_ms(rows), at(now), rand=rand, floor=floor, cap=cap, schedule=schedule)

    assert math.isfinite(chosen.delay)
    assert 0 <= min(max(floor, 0), cap) <= chosen.delay <= cap


@given(job=jobs, rows=recent, now=seconds, rand=st.floats(min_value=0, max_value=1))
def test_only_a_wait_or_a_first_look_goes_beyond_the_schedules_cap(
    job: JobSeen, rows: list[tuple[int | None, int | None]], now: float, rand: float
) -> None:
    chosen = plan(job, EndpointTimes.from_ms(rows), at(now), rand=rand)

    if chosen.mode not in (Mode.WAIT, Mode.FIRST_LOOK):
        assert chosen.delay <= max(SCHEDULE.cap, SCHEDULE.first)


@given(job=jobs, rows=st.lists(st.tuples(st.one_of(st.none(), run_ms), st.one_of(st.none(), run_ms)),
                               max_size=DEFAULT_TUNING.min_samples - 1),
       now=seconds, rand=st.floats(min_value=0, max_value=1))
def test_without_enough_samples_the_plan_is_the_doubling_schedule(
    job: JobSeen, rows: list[tuple[int | None, int | None]], now: float, rand: float
) -> None:
    chosen = plan(job, EndpointTimes.from_ms(rows), at(now), rand=rand)

    doubling = SCHEDULE.first if job.polls == 0 else poll_delay(SCHEDULE, polls_since_change=job.polls_since_change,
                                                                 rand=lambda: rand)
    assert chosen.mode is Mode.NO_HISTORY
    assert chosen.delay == min(max(doubling, FLOOR), CAP)


@given(job=jobs, rows=recent, now=seconds)
def test_jitter_only_ever_brings_a_poll_earlier(
    job: JobSeen, rows: list[tuple[int | None, int | None]], now: float
) -> None:
    times = EndpointTimes.from_ms(rows)
    latest = plan(job, times, at(now), rand=0.0)
    earliest = plan(job, times, at(now), rand=1.0)

    if latest.mode is not Mode.NO_HISTORY and latest.mode is not Mode.PAST_LIKELY_END:
        assert earliest.delay <= latest.delay


def test_a_learned_wait_stays_far_inside_runpods_retention_and_the_visibility_timeout() -> None:
    from jobs.settings import MAX_POLL_GAP_SECONDS
    from tasks.app import VISIBILITY_TIMEOUT_SECONDS

    assert LONG_WAIT_CAP_SECONDS <= MAX_POLL_GAP_SECONDS
    assert LONG_WAIT_CAP_SECONDS * 10 <= 30 * 60  # RunPod keeps a result 30 minutes
    assert (LONG_WAIT_CAP_SECONDS + 180) * 4 < VISIBILITY_TIMEOUT_SECONDS  # longest wait + task time limit
