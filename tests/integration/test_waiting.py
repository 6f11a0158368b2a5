"""A PENDING job says why it waits, on SQLite and PostgreSQL: read from the table when the job is read.

Each test sets the queue up with the real dispatcher (against the simulator) or with stored state,
then reads the jobs and asserts what they say.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

import jobs
from jobs.flow.dispatch import dispatch
from jobs.flow.waiting import Waiting, WaitReason, held_by_cap
from jobs.observability.metrics import RpqCollector
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.models import utcnow
from jobs.storage.store import Source, transition, update_fields
from tests.conftest import ENDPOINT_ID, ENDPOINT_NAME, SimulatorProcess

pytestmark = pytest.mark.integration

LONG = {"sleep": 300}  # a job the simulator keeps running for the whole test


def with_cap(rt: Runtime, cap: int) -> Runtime:
    rt.settings = rt.settings.model_copy(update={"max_in_flight": {ENDPOINT_NAME: cap}})
    return rt


def waiting(rt: Runtime, job: jobs.Job) -> Waiting | None:
    return jobs.get(job.id, runtime=rt).waiting


def defer(rt: Runtime, job: jobs.Job, by: timedelta) -> datetime:
    """As the submit task leaves a job whose /run RunPod turned away: PENDING, tried again later."""
    until = utcnow() + by
    with session_scope(rt.engine) as session:
        assert update_fields(session, job.id, while_status={JobStatus.PENDING}, values={"next_poll_at": until})
    return until


def test_a_job_over_the_cap_says_why_it_waits_and_stops_saying_so_once_sent(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    capped = with_cap(runtime, 2)
    first, _second, third, fourth = (jobs.submit("tts", LONG, runtime=capped) for _ in range(4))
    dispatch(capped, ENDPOINT_ID)

    assert waiting(capped, third) == Waiting(
        WaitReason.MAX_IN_FLIGHT, "endpoint tts has 2 of 2 jobs in flight (max_in_flight); this job is next",
        jobs_ahead=0, in_flight=2, max_in_flight=2)
    assert waiting(capped, fourth) == Waiting(
        WaitReason.MAX_IN_FLIGHT, "endpoint tts has 2 of 2 jobs in flight (max_in_flight); 1 job ahead of this one",
        jobs_ahead=1, in_flight=2, max_in_flight=2)
    assert waiting(capped, first) is None  # at RunPod: it waits there, if at all, not here

    jobs.cancel(first.id, runtime=capped)  # a slot frees
    assert waiting(capped, third) == Waiting(
        WaitReason.NEXT, "next in line for endpoint tts: sent to RunPod when the dispatcher next runs",
        jobs_ahead=0, in_flight=1, max_in_flight=2)

    dispatch(capped, ENDPOINT_ID)
    sent = jobs.get(third.id, runtime=capped)
    assert (sent.status, sent.waiting) == (JobStatus.IN_QUEUE, None)
    still = waiting(capped, fourth)
    assert still is not None and (still.reason, still.in_flight, still.jobs_ahead) == (WaitReason.MAX_IN_FLIGHT, 2, 0)


def test_a_job_not_over_the_cap_but_behind_others_says_how_many_go_first(runtime: Runtime) -> None:
    first, second, third = (jobs.submit("tts", {"n": n}, runtime=runtime) for n in range(3))
    urgent = jobs.submit("tts", {"n": "urgent"}, priority=5, runtime=runtime)

    assert waiting(runtime, urgent) == Waiting(
        WaitReason.NEXT, "next in line for endpoint tts: sent to RunPod when the dispatcher next runs", jobs_ahead=0)
    assert [w.jobs_ahead if (w := waiting(runtime, job)) else None for job in (first, second)] == [1, 2]
    assert waiting(runtime, third) == Waiting(
        WaitReason.QUEUED, "queued behind 3 jobs of endpoint tts (by priority, then age); they go out at up to "
        "800 /run per 10 s", jobs_ahead=3)


def test_free_slots_taken_by_the_jobs_ahead_hold_the_job_behind_them(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    capped = with_cap(runtime, 3)
    jobs.submit("tts", LONG, runtime=capped)
    dispatch(capped, ENDPOINT_ID)  # one in flight, two slots free
    a, b, c = (jobs.submit("tts", LONG, runtime=capped) for _ in range(3))

    said = [waiting(capped, job) for job in (a, b, c)]

    assert [(w.reason, w.jobs_ahead, w.in_flight) if w else None for w in said] == [
        (WaitReason.NEXT, 0, 1), (WaitReason.QUEUED, 1, 1), (WaitReason.MAX_IN_FLIGHT, 2, 1)]
    assert said[2] is not None and said[2].message == (
        "endpoint tts has 1 of 3 jobs in flight (max_in_flight); 2 jobs ahead of this one")
    with session_scope(capped.engine, read_only=True) as session:
        assert held_by_cap(session, capped.settings, utcnow()) == {ENDPOINT_NAME: 1}


def test_a_job_whose_run_was_put_off_says_until_when_and_holds_no_one_up(runtime: Runtime) -> None:
    put_off, behind = (jobs.submit("tts", {"n": n}, runtime=runtime) for n in range(2))
    until = defer(runtime, put_off, timedelta(minutes=10))

    said = waiting(runtime, put_off)
    next_one = waiting(runtime, behind)

    assert said is not None and (said.reason, said.jobs_ahead, said.next_try_at) == (WaitReason.DEFERRED, None, until)
    assert said.message.startswith("its /run was put off: RunPod was unavailable or rpq's /run budget was spent "
                                   "(its history says which); next try in ")
    assert next_one is not None and (next_one.reason, next_one.jobs_ahead) == (WaitReason.NEXT, 0)


def test_a_job_that_is_not_pending_has_no_reason_to_give(runtime: Runtime, simulator: SimulatorProcess) -> None:
    sent, cancelled, failed = (jobs.submit("tts", LONG, runtime=runtime) for _ in range(3))
    jobs.cancel(cancelled.id, runtime=runtime)
    with session_scope(runtime.engine) as session:
        transition(session, failed.id, to=JobStatus.FAILED, source=Source.OPERATOR, expected={JobStatus.PENDING},
                   values={"finished_at": utcnow()})
    dispatch(runtime, ENDPOINT_ID)

    read = [jobs.get(job.id, runtime=runtime) for job in (sent, cancelled, failed)]
    listed = jobs.list_jobs(runtime=runtime)

    assert [(job.status, job.waiting) for job in read] == [
        (JobStatus.IN_QUEUE, None), (JobStatus.CANCELLED, None), (JobStatus.FAILED, None)]
    assert [job.waiting for job in listed] == [None, None, None]


def test_a_list_says_what_reading_each_job_says_and_the_metric_counts_the_held(
    runtime: Runtime, simulator: SimulatorProcess, redis_url: str
) -> None:
    capped = with_cap(runtime, 2)
    for _ in range(2):
        jobs.submit("tts", LONG, runtime=capped)
    dispatch(capped, ENDPOINT_ID)  # the cap is full
    waiting_jobs = [jobs.submit("tts", {"n": n}, priority=n % 3, runtime=capped) for n in range(7)]
    defer(capped, waiting_jobs[4], timedelta(hours=1))
    other = jobs.submit(ENDPOINT_ID + "-2", {"n": "uncapped"}, runtime=capped)  # an endpoint of its own, no cap

    listed = {job.id: job.waiting for job in jobs.list_jobs(runtime=capped)}
    read = {job_id: jobs.get(job_id, runtime=capped).waiting for job_id in listed}

    def facts(said: Waiting | None) -> object:
        # A deferred job's sentence counts down the seconds to its next try: its facts are compared instead.
        return said and (said.reason, said.jobs_ahead, said.in_flight, said.max_in_flight, said.next_try_at,
                         None if said.reason is WaitReason.DEFERRED else said.message)

    assert {job_id: facts(said) for job_id, said in listed.items()} == {
        job_id: facts(said) for job_id, said in read.items()}
    held = [job_id for job_id, said in listed.items() if said and said.reason is WaitReason.MAX_IN_FLIGHT]
    assert len(held) == 6 and listed[other.id] == Waiting(
        WaitReason.NEXT, f"next in line for endpoint {ENDPOINT_ID}-2: sent to RunPod when the dispatcher next runs",
        jobs_ahead=0)
    registry = CollectorRegistry()
    registry.register(RpqCollector(capped, redis.Redis.from_url(redis_url), []))
    assert 'rpq_jobs_held{endpoint="tts"} 6.0' in generate_latest(registry).decode()
