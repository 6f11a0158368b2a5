"""When to poll a job next, placed where the job is likely to end, learned from its endpoint's recent jobs.

The doubling schedule (`jobs.flow.backoff.poll_delay`) knows nothing about the job: a two-minute job is
asked every 7.5-15 s for two minutes, and its end is noticed up to 15 s late. RunPod reports each
finished job's `delayTime` (queued, cold start included) and `executionTime` (ran), and an endpoint's
jobs tend to look alike. So rpq waits long while a job is far from where its endpoint's recent jobs
ended, polls densely across that likely end, and goes back to the doubling schedule past it, or when
there is too little history to learn from.

Pure, like `jobs.flow.backoff`: no I/O and no clocks of its own. Callers pass `now`, a random source and
what was learned (`EndpointTimes`; `jobs.flow.endpoint_times` loads it from the job table).

How a gap is chosen for a job RunPod says is IN_PROGRESS (for one still IN_QUEUE, read "time since
submission" and "delay + execution" for "run time" and "execution"):

* The job has run `elapsed` seconds and has not ended. Only the recent jobs that ran longer than that
  (`rest`) are like it now, so an endpoint whose jobs come in several lengths is taken one length at
  a time.
* `reach`: where the first 2 % of `rest` had ended. The job is unlikely to end before; wait until
  about then, however long that is (up to `cap`). Only a job shorter than nearly all of `rest` is
  noticed late this way.
* Across the likely end, poll every `step`: 0.4 * sqrt(T) s for a job of T s (1.8 s at 20 s, 4.4 s at
  120 s), at least 1 s and at most the schedule's cap (`RPQ_POLL_MAX_SECONDS`). The square root is the
  trade between calls and lag when the spread of run times grows with their length: calls across the
  likely end grow like T / step and the lag like step. A gap never reaches past the end of the bunch
  of recent ends the job is in (ends at most two steps apart), so where recent jobs all ended within a
  second the job is seen within about a second, whatever its length.
* A job that has just outlasted a bunch of recent jobs may be their straggler rather than one of the
  longer jobs ahead: it waits at most 4 times as long as it has overrun them.
* Past where nearly all recent jobs had ended (fewer than 3, or 2 %, ran longer), and with fewer than
  20 recent jobs, the doubling schedule: past the end it restarts from short gaps that grow with the
  overrun, up to the schedule's cap.
* A job just submitted is first looked at when its endpoint's recent jobs typically started (their
  median delayTime), unless it is likely to be over sooner: a job on a warm endpoint is then seen
  running, and RunPod's delayTime for it pins when it started.

Jitter only ever brings a poll earlier, so the bounds above hold: each gap across the likely end is
between 3/4 and all of its step, and a long wait ends up to a quarter step early. Jobs submitted in one
batch therefore drift apart instead of polling RunPod in lock-step. (Equal jitter, half of each gap,
would cost about a fifth more calls for the same bound on the lag.) The result is never below `floor`
(the caller's minimum gap, which keeps RunPod's rate limit) nor above `cap` (which keeps every poll
well inside RunPod's 30-minute result retention and the broker's visibility timeout); a floor above the
cap is taken as the cap, because a 429 costs less than a lost result.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from jobs.flow.backoff import PollSchedule, poll_delay
from jobs.states import JobStatus

#: The longest a learned wait may be. Far below RunPod's 30-minute result retention and the broker's
#: 30-minute visibility timeout, and a job of ten minutes still costs only a few extra polls.
LONG_WAIT_CAP_SECONDS = 180.0


@dataclass(frozen=True)
class Tuning:
    """The plan's constants, in one place so tests and benchmarks can name them."""

    min_samples: int = 20  # fewer recent jobs than this: the doubling schedule
    early: float = 0.02  # the share of the remaining recent jobs a long wait may overshoot
    tail: float = 0.02  # past the point where only this share (and at least `min_tail`) ran longer:
    min_tail: int = 3  # the doubling schedule again
    lag_scale: float = 0.4  # across the likely end of a job of T seconds, poll every 0.4 * sqrt(T) s ...
    min_step: float = 1.0  # ... but not more often than every second
    # Recent ends more than this many steps apart are separate bunches. Not 1: a few dozen ends spread
    # over a wide likely end leave gaps of a step by chance, and each false bunch end costs a poll.
    bunch_gap: float = 2.0
    straggler_factor: float = 4.0  # a job that outlasted a bunch of recent ones waits at most 4x its overrun
    jitter: float = 0.25  # the share of each gap that is random (taken off, never added)


DEFAULT_TUNING = Tuning()


@dataclass(frozen=True)
class EndpointTimes:
    """What an endpoint's recent finished jobs say about how long the next one will take, in seconds.

    `execution` is RunPod's executionTime of each job, `delay` its delayTime (time queued, cold start
    included), and `total` the two added, for jobs that reported both. Each is sorted.
    """

    execution: tuple[float, ...] = ()
    delay: tuple[float, ...] = ()
    total: tuple[float, ...] = ()

    @classmethod
    def from_ms(cls, rows: Iterable[tuple[int | None, int | None]]) -> EndpointTimes:
        """From (execution_time_ms, delay_time_ms) pairs as stored on job rows; None and negative
        figures are skipped (RunPod omits them for a job it never ran)."""
        execution: list[float] = []
        delay: list[float] = []
        total: list[float] = []
        for execution_ms, delay_ms in rows:
            ran = execution_ms / 1000 if execution_ms is not None and execution_ms >= 0 else None
            queued = delay_ms / 1000 if delay_ms is not None and delay_ms >= 0 else None
            if ran is not None:
                execution.append(ran)
            if queued is not None:
                delay.append(queued)
            if ran is not None and queued is not None:
                total.append(ran + queued)
        return cls(tuple(sorted(execution)), tuple(sorted(delay)), tuple(sorted(total)))

    @property
    def samples(self) -> int:
        return len(self.execution)


NO_HISTORY = EndpointTimes()


@dataclass(frozen=True)
class JobSeen:
    """What rpq knows about a job it is about to schedule a poll for.

    `status` is what RunPod said last (IN_QUEUE or IN_PROGRESS); `submitted_at` when /run was sent;
    `started_at` when rpq first saw it IN_PROGRESS; `delay` RunPod's delayTime for it in seconds, when
    RunPod gave one (it does once the job has started); `polls` how many polls it has had (0: the first
    poll after /run is being planned); `polls_since_change` as the doubling schedule counts them.
    """

    status: JobStatus
    submitted_at: datetime | None
    started_at: datetime | None = None
    delay: float | None = None
    polls: int = 0
    polls_since_change: int = 0


class Mode(enum.Enum):
    """Why a gap was chosen (for logs and tests)."""

    NO_HISTORY = "doubling: too few recent jobs to learn from"
    PAST_LIKELY_END = "doubling: past where recent jobs ended"
    FIRST_LOOK = "first look: when recent jobs typically started"
    WAIT = "wait: the job is unlikely to end before then"
    ACROSS_END = "across the likely end"


@dataclass(frozen=True)
class Plan:
    delay: float
    mode: Mode


def next_poll_delay(
    job: JobSeen,
    times: EndpointTimes,
    *,
    schedule: PollSchedule,
    now: datetime,
    floor: float,
    cap: float,
    rand: Callable[[], float],
    tuning: Tuning = DEFAULT_TUNING,
) -> float:
    """Seconds until the job's next poll: between `floor` and `cap` (see the module's docstring)."""
    return plan_next_poll(job, times, schedule=schedule, now=now, floor=floor, cap=cap, rand=rand,
                          tuning=tuning).delay


def plan_next_poll(
    job: JobSeen,
    times: EndpointTimes,
    *,
    schedule: PollSchedule,
    now: datetime,
    floor: float,
    cap: float,
    rand: Callable[[], float],
    tuning: Tuning = DEFAULT_TUNING,
) -> Plan:
    """`next_poll_delay`, saying why."""
    if not cap > 0:
        raise ValueError("the cap on a poll gap must be positive")
    floor = min(max(floor, 0.0), cap)
    plan = _plan(job, times, schedule, now, rand, tuning)
    return Plan(min(max(plan.delay, floor), cap), plan.mode)


def _plan(job: JobSeen, times: EndpointTimes, schedule: PollSchedule, now: datetime, rand: Callable[[], float],
          tuning: Tuning) -> Plan:
    if times.samples < tuning.min_samples or job.submitted_at is None:
        first = schedule.first if job.polls == 0 else poll_delay(schedule, polls_since_change=job.polls_since_change,
                                                                 rand=rand)
        return Plan(first, Mode.NO_HISTORY)
    if job.status is JobStatus.IN_PROGRESS:
        started = _start_of(job, now)
        plan = _toward_end(times.execution, _seconds(now - started), schedule, rand, tuning)
    else:
        plan = _toward_end(times.total or times.execution, _seconds(now - job.submitted_at), schedule, rand,
                           tuning)
        if job.polls == 0 and times.delay:
            # The first look: when recent jobs started, so a job on a warm endpoint is seen running (and
            # RunPod's delayTime pins its start) before the long wait, unless it is likely over sooner.
            look = statistics.median(times.delay) - _seconds(now - job.submitted_at)
            look -= rand() * look * tuning.jitter
            if look < plan.delay:
                plan = Plan(look, Mode.FIRST_LOOK)
    return plan


def _start_of(job: JobSeen, now: datetime) -> datetime:
    """When the job started running at RunPod: submission plus RunPod's delayTime when known (never
    after rpq saw it running), else the moment rpq first saw it running (the latest it can have been)."""
    latest = min(job.started_at or now, now)
    if job.delay is not None and job.submitted_at is not None and math.isfinite(job.delay) and job.delay >= 0:
        try:
            return min(job.submitted_at + timedelta(seconds=job.delay), latest)
        except OverflowError:
            return latest
    return latest


def _toward_end(xs: tuple[float, ...], elapsed: float, schedule: PollSchedule, rand: Callable[[], float],
                tuning: Tuning) -> Plan:
    """The gap for a job `elapsed` seconds along, given how long recent jobs took (`xs`, sorted)."""
    n = len(xs)
    need = max(tuning.min_tail, math.ceil(tuning.tail * n))
    passed = bisect.bisect_right(xs, elapsed)  # recent jobs that were over by now
    rest = xs[passed:]
    # How long since the job outlasted the bulk of the recent jobs it has passed (None: it has not).
    overdue = elapsed - xs[passed - need] if passed >= need else None
    if len(rest) < need:
        # Longer than nearly every recent job: back to doubling, timed from the point it passed them,
        # so the first gaps are short and grow the longer the job overruns.
        step = min(schedule.cap, max(schedule.base, overdue if overdue is not None else elapsed))
        return Plan(step / 2 + rand() * step / 2, Mode.PAST_LIKELY_END)
    reach = rest[int(tuning.early * len(rest))]
    step = min(schedule.cap, max(tuning.min_step, tuning.lag_scale * math.sqrt(reach)))
    wait = reach - elapsed
    if overdue is not None:
        # It may be a straggler of the jobs it just outlasted rather than one of the longer ones ahead:
        # wait at most a few times as long as it has overrun them.
        wait = min(wait, max(step, tuning.straggler_factor * overdue))
    if wait > step:
        return Plan(wait - rand() * step * tuning.jitter, Mode.WAIT)
    # Across the likely end: every step, but no further than where this bunch of recent ends stops
    # (a gap of more than two steps before the next), unless that is less than `min_step` away.
    gap = min(step, max(_bunch_end(rest, tuning.bunch_gap * step) - elapsed, tuning.min_step))
    return Plan(gap - rand() * gap * tuning.jitter, Mode.ACROSS_END)


def _bunch_end(rest: tuple[float, ...], apart: float) -> float:
    """The last of the ends in `rest` (sorted) that follow one another at most `apart` seconds apart."""
    for here, following in itertools.pairwise(rest):
        if following - here > apart:
            return here
    return rest[-1]


def _seconds(delta: timedelta) -> float:
    return delta.total_seconds()
