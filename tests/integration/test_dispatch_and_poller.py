"""The dispatcher and the poller, in-process, on SQLite and PostgreSQL against the simulator.

They read the job table for their work, so each test sets the table up, runs one of them, and
asserts on what the table and the simulator say afterwards.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, select

import jobs
from jobs.flow import dispatch as dispatching
from jobs.flow import lifecycle
from jobs.flow import poller as polling
from jobs.flow.dispatch import dispatch
from jobs.flow.poller import claim_due, poll_due
from jobs.flow.reconcile import reconcile
from jobs.flow.wakeups import Wakeups, key
from jobs.runpod.budget import Limits, LocalBudget, UnlimitedBudget
from jobs.runtime import DISPATCH_TASK, POLL_DUE_TASK, Runtime
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.models import JobRow, utcnow
from jobs.storage.store import Source, record_event, update_fields
from tests.conftest import ENDPOINT_ID, ENDPOINT_NAME, Published, SimulatorProcess, wait_until

pytestmark = pytest.mark.integration


def published(rt: Runtime) -> Published:
    assert isinstance(rt.publish, Published)
    return rt.publish


def statuses(rt: Runtime, *job_ids: str) -> list[JobStatus]:
    return [jobs.get(job_id, runtime=rt).status for job_id in job_ids]


def make_due(rt: Runtime, *job_ids: str, ago: timedelta = timedelta(0)) -> None:
    with session_scope(rt.engine) as session:
        for job_id in job_ids:
            update_fields(session, job_id, while_status={JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS},
                          values={"next_poll_at": utcnow() - ago})


# -- the dispatcher ------------------------------------------------------------------------------------------


def test_the_dispatcher_sends_every_pending_job_of_its_endpoint_once_and_wakes_the_poller(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    submitted = [jobs.submit("tts", {"output": i}, runtime=runtime) for i in range(5)]
    published(runtime).messages.clear()

    outcome = dispatch(runtime, ENDPOINT_ID)
    again = dispatch(runtime, ENDPOINT_ID)

    assert outcome.sent == 5 and again.sent == 0
    assert statuses(runtime, *(job.id for job in submitted)) == [JobStatus.IN_QUEUE] * 5
    assert len(simulator.jobs()) == 5
    assert published(runtime).of(POLL_DUE_TASK) == [ENDPOINT_ID]


def test_the_dispatchers_and_pollers_log_lines_about_a_job_name_its_tenant(
        runtime: Runtime, simulator: SimulatorProcess) -> None:
    import logging

    from jobs.observability import logcontext
    from jobs.observability.logcontext import ContextFilter

    job = jobs.submit("tts", {"output": 1}, tenant="shop", correlation_id="req-shop", runtime=runtime)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.addFilter(ContextFilter())
    handler.emit = seen.append  # type: ignore[method-assign]
    rpq = logging.getLogger("rpq")
    rpq.addHandler(handler)
    level = rpq.level
    rpq.setLevel(logging.DEBUG)  # setLevel, not .level: it also clears every logger's cached "is it enabled"
    try:
        with logcontext.scope():  # what a task does around its work (tasks/jobs.py)
            dispatch(runtime, ENDPOINT_ID)
            wait_until(lambda: poll_due(runtime, ENDPOINT_ID) is not None and jobs.get(job.id, runtime=runtime)
                       .is_terminal, timeout=30, what="the job to finish")
    finally:
        rpq.removeHandler(handler)
        rpq.setLevel(level)

    about = [r for r in seen if getattr(r, "job_id", None) == job.id]
    assert about and {(getattr(r, "tenant", None), getattr(r, "correlation_id", None)) for r in about} == {
        ("shop", "req-shop")}


def test_runpods_answers_wait_for_a_database_that_stopped_answering_and_are_stored_once_it_does(
    runtime: Runtime, simulator: SimulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted = [jobs.submit("tts", {"output": i}, runtime=runtime) for i in range(3)]
    # The /runs went out; then the first two tries to store their answers find the database gone.
    real_scope, outage = lifecycle.session_scope, iter([True, True])

    @contextmanager
    def scope(engine: Engine, **options: Any) -> Iterator[Session]:
        if next(outage, False):
            raise OperationalError("COMMIT", {}, Exception("the database is not accepting connections"))
        with real_scope(engine, **options) as session:
            yield session

    monkeypatch.setattr(lifecycle, "session_scope", scope)
    monkeypatch.setattr(lifecycle, "STORE_RETRY_FIRST_PAUSE", 0.01)

    outcome = dispatch(runtime, ENDPOINT_ID)

    assert outcome.sent == 3
    assert statuses(runtime, *(job.id for job in submitted)) == [JobStatus.IN_QUEUE] * 3  # none left SUBMITTING
    assert len(simulator.jobs()) == 3


def test_the_dispatcher_sends_oldest_first_in_batches(runtime: Runtime, simulator: SimulatorProcess) -> None:
    submitted = [jobs.submit("tts", {"output": i}, runtime=runtime) for i in range(5)]

    dispatch(runtime, ENDPOINT_ID, batch=2, run_seconds=0)  # one batch, then it hands the worker back

    assert statuses(runtime, *(job.id for job in submitted)) == [JobStatus.IN_QUEUE] * 2 + [JobStatus.PENDING] * 3


def test_higher_priority_jobs_go_first_and_equal_ones_oldest_first(runtime: Runtime,
                                                                   simulator: SimulatorProcess) -> None:
    low = jobs.submit("tts", {"output": "low"}, priority=-5, runtime=runtime)
    first = jobs.submit("tts", {"output": "first"}, runtime=runtime)
    urgent = jobs.submit("tts", {"output": "urgent"}, priority=10, runtime=runtime)
    second = jobs.submit("tts", {"output": "second"}, runtime=runtime)

    order = []
    for _ in range(4):
        dispatch(runtime, ENDPOINT_ID, batch=1, run_seconds=0)
        order += [job.id for job in (low, first, urgent, second)
                  if job.id not in order and jobs.get(job.id, runtime=runtime).status is not JobStatus.PENDING]

    assert order == [urgent.id, first.id, second.id, low.id]
    assert jobs.get(urgent.id, runtime=runtime).priority == 10


@pytest.mark.parametrize(("priority", "problem"), [(True, "type"), (1.5, "type"), ("1", "type"), (1001, "range"),
                                                   (-1001, "range")])
def test_a_priority_that_is_not_a_whole_number_in_range_is_refused_and_nothing_is_written(
    runtime: Runtime, priority: object, problem: str
) -> None:
    with pytest.raises(jobs.InvalidJob) as refused:
        jobs.submit("tts", {"output": 1}, priority=priority, runtime=runtime)  # type: ignore[arg-type]

    assert [(p.field, p.constraint) for p in refused.value.problems] == [("priority", problem)]
    assert jobs.list_jobs(runtime=runtime) == []


def test_two_dispatchers_racing_send_each_job_exactly_once(runtime: Runtime, simulator: SimulatorProcess) -> None:
    submitted = [jobs.submit("tts", {"output": i}, runtime=runtime) for i in range(12)]
    sent: list[int] = []

    def run() -> None:
        sent.append(dispatch(runtime, ENDPOINT_ID, batch=3).sent)

    racers = [threading.Thread(target=run) for _ in range(3)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()

    assert sum(sent) == 12
    assert statuses(runtime, *(job.id for job in submitted)) == [JobStatus.IN_QUEUE] * 12
    assert len(simulator.jobs()) == 12


def test_an_endpoint_at_its_max_in_flight_holds_its_jobs_pending_until_one_ends(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    runtime.settings = runtime.settings.model_copy(update={"max_in_flight": {ENDPOINT_NAME: 2}})
    capped = runtime
    submitted = [jobs.submit("tts", {"output": i}, runtime=capped) for i in range(4)]

    held = dispatch(capped, ENDPOINT_ID)

    assert held.sent == 2 and held.again_in is not None and "max_in_flight" in held.reason
    assert statuses(capped, *(job.id for job in submitted)) == [JobStatus.IN_QUEUE] * 2 + [JobStatus.PENDING] * 2

    def first_two_done() -> bool:
        make_due(capped, submitted[0].id, submitted[1].id)
        poll_due(capped, ENDPOINT_ID)
        return all(status.is_terminal for status in statuses(capped, submitted[0].id, submitted[1].id))

    wait_until(first_two_done, timeout=20, what="the first two jobs to finish")
    assert DISPATCH_TASK in [task for task, _, _ in published(capped).messages]  # a freed slot wakes it

    assert dispatch(capped, ENDPOINT_ID).sent == 2
    assert len(simulator.jobs()) == 4


class Trickle(UnlimitedBudget):
    """A budget with `first` tokens free at the first look and one more at every later look, as a real
    one refills while a batch is out."""

    def __init__(self, first: int) -> None:
        self.looks, self.first = 0, first

    def available(self, endpoint_id: str, op: str) -> int:
        self.looks += 1
        return self.first if self.looks == 1 else 1


def test_when_the_budget_allows_less_than_a_batch_the_dispatcher_sends_that_and_comes_back_for_the_rest(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    submitted = [jobs.submit("tts", {"output": i}, runtime=runtime) for i in range(8)]
    runtime.runpod.budget = Trickle(3)
    try:
        outcome = dispatch(runtime, ENDPOINT_ID)
    finally:
        runtime.runpod.budget = None

    assert outcome.sent == 3 and outcome.again_in == dispatching.NO_BUDGET_RECHECK_SECONDS  # not 3, 1, 1, 1 ...
    assert statuses(runtime, *(job.id for job in submitted)) == [JobStatus.IN_QUEUE] * 3 + [JobStatus.PENDING] * 5


def test_a_pending_job_waiting_out_a_backoff_is_not_sent_early(runtime: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"output": 1}, runtime=runtime)
    with session_scope(runtime.engine) as session:
        update_fields(session, job.id, while_status={JobStatus.PENDING},
                      values={"next_poll_at": utcnow() + timedelta(seconds=30)})

    outcome = dispatch(runtime, ENDPOINT_ID)

    assert outcome.sent == 0 and outcome.again_in is not None and 25 < outcome.again_in <= 30
    assert simulator.jobs() == []


# -- the poller ------------------------------------------------------------------------------------------------


def test_the_poller_polls_only_due_jobs_and_says_when_the_next_is_due(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    due, later = (jobs.submit("tts", {"sleep": 30}, runtime=runtime) for _ in range(2))
    dispatch(runtime, ENDPOINT_ID)
    make_due(runtime, due.id)
    with session_scope(runtime.engine) as session:
        update_fields(session, later.id, while_status={JobStatus.IN_QUEUE},
                      values={"next_poll_at": utcnow() + timedelta(seconds=20)})

    outcome = poll_due(runtime, ENDPOINT_ID)

    assert outcome.polled == 1
    assert (jobs.get(due.id, runtime=runtime).poll_count, jobs.get(later.id, runtime=runtime).poll_count) == (1, 0)
    assert outcome.again_in is not None and 0 < outcome.again_in <= 20


def test_a_claimed_poll_is_not_claimed_again_by_a_second_poller(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=runtime)
    dispatch(runtime, ENDPOINT_ID)
    make_due(runtime, job.id)

    first = claim_due(runtime, ENDPOINT_ID, 10)
    second = claim_due(runtime, ENDPOINT_ID, 10)

    assert [row.id for row in first] == [job.id] and second == []


def test_when_few_polls_can_be_made_first_polls_and_the_most_overdue_go_first(runtime: Runtime) -> None:
    old, older, fresh = (jobs.submit("tts", {"sleep": 30}, runtime=runtime) for _ in range(3))
    dispatch(runtime, ENDPOINT_ID)
    with session_scope(runtime.engine) as session:
        for job_id, ago in ((old.id, 10), (older.id, 20)):
            update_fields(session, job_id, while_status={JobStatus.IN_QUEUE},
                          values={"poll_count": 3, "next_poll_at": utcnow() - timedelta(seconds=ago)})
        update_fields(session, fresh.id, while_status={JobStatus.IN_QUEUE}, values={"next_poll_at": utcnow()})

    order = [claim_due(runtime, ENDPOINT_ID, 1)[0].id for _ in range(3)]

    assert order == [fresh.id, older.id, old.id]


def test_a_poller_run_makes_no_more_calls_than_the_budget_has_tokens_for(runtime: Runtime) -> None:
    many = [jobs.submit("tts", {"sleep": 60}, runtime=runtime) for _ in range(8)]
    dispatch(runtime, ENDPOINT_ID)
    make_due(runtime, *(job.id for job in many))
    runtime.runpod.budget = LocalBudget(Limits(status=30))  # 3 tokens at once, 2.7 a second after that
    try:
        outcome = poll_due(runtime, ENDPOINT_ID)
    finally:
        runpod_polls = sum(jobs.get(job.id, runtime=runtime).poll_count for job in many)
        runtime.runpod.budget = None

    assert outcome.polled == runpod_polls == 3
    assert outcome.again_in is not None and "budget" in outcome.reason


# -- a batch's answers, stored together ------------------------------------------------------------------


@contextmanager
def transactions_updating(engine: Engine, column: str) -> Iterator[list[int]]:
    """For each UPDATE of the job table that sets `column`, run on `engine` in the block, the number of the
    transaction it ran in (transactions numbered as they begin, on any connection)."""
    numbers = itertools.count()
    ran: list[int] = []

    def begun(connection: Connection) -> None:
        connection.info["test_transaction"] = next(numbers)

    def executing(connection: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("UPDATE jobs SET") and column in statement.partition(" WHERE ")[0]:
            ran.append(connection.info["test_transaction"])

    event.listen(engine, "begin", begun)
    event.listen(engine, "before_cursor_execute", executing)
    try:
        yield ran
    finally:
        event.remove(engine, "before_cursor_execute", executing)
        event.remove(engine, "begin", begun)


def all_finished_at_runpod(rt: Runtime, simulator: SimulatorProcess, count: int) -> list[jobs.Job]:
    """`count` jobs of 30 s sent to RunPod, which has finished them all before anyone polled them."""
    submitted = [jobs.submit("tts", {"sleep": 30, "output": i}, runtime=rt) for i in range(count)]
    dispatch(rt, ENDPOINT_ID)

    def all_done() -> bool:
        simulator.advance(31)  # the endpoint's workers take a few jobs at a time: each turn finishes some
        return {job["status"] for job in simulator.jobs(ENDPOINT_ID)} == {"COMPLETED"}

    wait_until(all_done, timeout=10, what="RunPod to finish every job")
    make_due(rt, *(job.id for job in submitted))
    return submitted


def test_a_poller_run_stores_every_answer_of_its_batch_in_one_transaction(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    submitted = all_finished_at_runpod(runtime, simulator, 5)

    with transactions_updating(runtime.engine, "poll_count") as poll_writes:
        outcome = poll_due(runtime, ENDPOINT_ID)

    assert outcome.polled == outcome.finished == 5
    assert statuses(runtime, *(job.id for job in submitted)) == [JobStatus.COMPLETED] * 5
    assert [jobs.get(job.id, runtime=runtime).output for job in submitted] == [0, 1, 2, 3, 4]
    assert len(poll_writes) == 5 and len(set(poll_writes)) == 1
    for job in submitted:  # each job's history and stream, written at the batch's end, are its own and in order
        assert [(e.from_status, e.to_status) for e in jobs.events(job.id, runtime=runtime)] == [
            (None, JobStatus.PENDING), (JobStatus.PENDING, JobStatus.SUBMITTING),
            (JobStatus.SUBMITTING, JobStatus.IN_QUEUE), (JobStatus.IN_QUEUE, JobStatus.COMPLETED)]
        assert [(i.seq, i.kind) for i in jobs.stream_events(job.id, runtime=runtime)[1]] == [
            (1, "started"), (2, "output"), (3, "end")]


def test_a_dispatcher_run_stores_every_answer_of_its_batch_in_one_transaction(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    submitted = [jobs.submit("tts", {"sleep": 30}, runtime=runtime) for _ in range(5)]

    with transactions_updating(runtime.engine, "deadline_at") as answer_writes:
        outcome = dispatch(runtime, ENDPOINT_ID)

    assert outcome.sent == 5
    assert statuses(runtime, *(job.id for job in submitted)) == [JobStatus.IN_QUEUE] * 5
    assert len(answer_writes) == 5 and len(set(answer_writes)) == 1


def test_a_late_answer_about_an_older_attempt_in_a_batch_changes_nothing_and_the_others_are_stored(
    runtime: Runtime, simulator: SimulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, retried, last = all_finished_at_runpod(runtime, simulator, 3)
    ask = lifecycle.ask_status

    def ask_then_retry(rt: Runtime, row: JobRow, **kwargs: Any) -> lifecycle.Findings:
        found = ask(rt, row, **kwargs)
        if row.id == retried.id:  # RunPod said COMPLETED about attempt 1; meanwhile a user retried the job
            jobs.cancel(row.id, runtime=rt)
            jobs.retry(row.id, runtime=rt)
            lifecycle.submit_job(rt, row.id)
        return found

    monkeypatch.setattr(lifecycle, "ask_status", ask_then_retry)
    with transactions_updating(runtime.engine, "poll_count") as poll_writes:
        poll_due(runtime, ENDPOINT_ID)

    assert statuses(runtime, first.id, last.id) == [JobStatus.COMPLETED] * 2
    now = jobs.get(retried.id, runtime=runtime)
    assert (now.attempt, now.status, now.output, now.poll_count) == (2, JobStatus.IN_QUEUE, None, 0)
    assert JobStatus.COMPLETED not in [e.to_status for e in jobs.events(retried.id, runtime=runtime)]
    assert len(poll_writes) == 3 and len(set(poll_writes)) == 1  # the stale write matched nothing


def test_when_one_answer_cannot_be_stored_the_rest_of_its_batch_are_stored_and_the_error_is_raised(
    runtime: Runtime, simulator: SimulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad, also_good = all_finished_at_runpod(runtime, simulator, 3)
    ask = lifecycle.ask_status

    def ask_badly(rt: Runtime, row: JobRow, **kwargs: Any) -> lifecycle.Findings:
        found = ask(rt, row, **kwargs)
        if row.id != bad.id:
            return found

        def store(session: Session) -> lifecycle.Then:
            then = found.store(session)  # the job's own write, then one the database refuses
            record_event(session, "no-such-job", from_status=None, to_status=JobStatus.FAILED, source=Source.POLL)
            return then
        return replace(found, store=store)

    monkeypatch.setattr(lifecycle, "ask_status", ask_badly)
    with pytest.raises(IntegrityError):
        poll_due(runtime, ENDPOINT_ID)

    assert statuses(runtime, good.id, also_good.id) == [JobStatus.COMPLETED] * 2
    assert [[e.to_status for e in jobs.events(job.id, runtime=runtime)].count(JobStatus.COMPLETED)
            for job in (good, also_good)] == [1, 1]  # stored once: the failed batch left nothing behind
    failed = jobs.get(bad.id, runtime=runtime)
    assert (failed.status, failed.poll_count, failed.output) == (JobStatus.IN_QUEUE, 0, None)  # nothing half-stored
    assert [job.id for job in claim_due(runtime, ENDPOINT_ID, 10)] == []  # it keeps its claim until it runs out


def test_when_the_budget_allows_less_than_a_batch_the_poller_polls_that_and_comes_back_for_the_rest(
    runtime: Runtime, simulator: SimulatorProcess
) -> None:
    many = [jobs.submit("tts", {"sleep": 60}, runtime=runtime) for _ in range(8)]
    dispatch(runtime, ENDPOINT_ID)
    make_due(runtime, *(job.id for job in many))
    runtime.runpod.budget = Trickle(3)
    try:
        outcome = poll_due(runtime, ENDPOINT_ID)
    finally:
        runtime.runpod.budget = None

    assert outcome.polled == 3 and outcome.again_in == polling.NO_BUDGET_RECHECK_SECONDS
    assert sorted(jobs.get(job.id, runtime=runtime).poll_count for job in many) == [0] * 5 + [1] * 3


# -- wake-ups ---------------------------------------------------------------------------------------------------


@pytest.fixture
def wakeups(redis_url: str) -> Wakeups:
    redis.Redis.from_url(redis_url).delete(key(POLL_DUE_TASK, "ep-x"), key(DISPATCH_TASK, "ep-x"))
    return Wakeups(Published(), redis_url)


def test_a_wakeup_already_on_its_way_by_then_is_not_published_again(wakeups: Wakeups) -> None:
    sent = wakeups._publish
    assert isinstance(sent, Published)

    wakeups.wake(POLL_DUE_TASK, "ep-x", 5)
    wakeups.wake(POLL_DUE_TASK, "ep-x", 8)  # the one due in 5 s will do
    wakeups.wake(POLL_DUE_TASK, "ep-x", 1)  # sooner: needs its own
    wakeups.wake(DISPATCH_TASK, "ep-x")  # another role: its own

    assert [(task, ident, round(countdown or 0)) for task, ident, countdown in sent.messages] == [
        (POLL_DUE_TASK, "ep-x", 5), (POLL_DUE_TASK, "ep-x", 1), (DISPATCH_TASK, "ep-x", 0)]


def test_a_task_that_starts_lets_the_next_wakeup_through(wakeups: Wakeups) -> None:
    sent = wakeups._publish
    assert isinstance(sent, Published)
    wakeups.wake(DISPATCH_TASK, "ep-x")
    wakeups.wake(DISPATCH_TASK, "ep-x")

    wakeups.started(DISPATCH_TASK, "ep-x")
    wakeups.wake(DISPATCH_TASK, "ep-x")

    assert sent.of(DISPATCH_TASK) == ["ep-x", "ep-x"]


def test_with_redis_unreachable_a_wakeup_is_published_anyway() -> None:
    sent = Published()
    wakeups = Wakeups(sent, "redis://127.0.0.1:1/0")

    wakeups.wake(DISPATCH_TASK, "ep-x")
    wakeups.wake(DISPATCH_TASK, "ep-x")

    assert sent.of(DISPATCH_TASK) == ["ep-x", "ep-x"]  # duplicates are harmless; a lost one is not


# -- the reconciler ---------------------------------------------------------------------------------------------


def test_the_reconciler_wakes_each_endpoint_whose_work_is_overdue_once_per_run(runtime: Runtime) -> None:
    jobs.submit("tts", {"n": 1}, runtime=runtime)
    jobs.submit("tts", {"n": 2}, runtime=runtime)
    published(runtime).messages.clear()

    report = reconcile(runtime, now=utcnow() + timedelta(hours=1))

    assert report.woke_dispatch == [ENDPOINT_ID] and report.woke_poller == []
    assert published(runtime).of(DISPATCH_TASK) == [ENDPOINT_ID]
    with session_scope(runtime.engine, read_only=True) as session:
        rows = session.exec(select(JobRow)).all()
    assert {row.status for row in rows} == {JobStatus.PENDING}  # waking writes nothing


def test_jobs_submitted_through_the_pipeline_finish(runtime: Runtime, simulator: SimulatorProcess) -> None:
    submitted = [jobs.submit("tts", {"output": i}, runtime=runtime) for i in range(3)]
    dispatch(runtime, ENDPOINT_ID)

    def finished() -> bool:
        make_due(runtime, *(job.id for job in submitted))
        poll_due(runtime, ENDPOINT_ID)
        return all(status is JobStatus.COMPLETED for status in statuses(runtime, *(job.id for job in submitted)))

    wait_until(finished, timeout=20, what="all three jobs to complete")
    assert [jobs.get(job.id, runtime=runtime).output for job in submitted] == [0, 1, 2]
