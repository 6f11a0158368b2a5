"""The spend guard: while the account spends too fast or its balance is too low (as the account collector last
saw it), new jobs are held PENDING with the reason shown, and go out in order once the limit clears. In-process,
on SQLite and PostgreSQL, against the simulator."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from prometheus_client import CollectorRegistry

import jobs
from jobs.flow.dispatch import dispatch
from jobs.flow.spend_guard import HOLD_RECHECK_SECONDS
from jobs.flow.waiting import WaitReason
from jobs.observability.metrics import RpqCollector
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.models import AccountSnapshot, utcnow
from tests.conftest import ENDPOINT_ID, SimulatorProcess

pytestmark = pytest.mark.integration


def guarded(rt: Runtime, **limits: float) -> Runtime:
    rt.settings = rt.settings.model_copy(update=limits)
    return rt


def account_seen(rt: Runtime, *, spend_per_hour: float | None = 1.0, balance: float | None = 100.0,
                 ok: bool = True, ago: timedelta = timedelta(0)) -> None:
    with session_scope(rt.engine) as session:
        session.add(AccountSnapshot(observed_at=utcnow() - ago, ok=ok, error=None if ok else "GraphQL: 503",
                                    balance=balance if ok else None, spend_per_hour=spend_per_hour if ok else None))


def holding(rt: Runtime) -> float | None:
    """rpq_spend_guard_holding, as the exporter shows it."""
    registry = CollectorRegistry()
    registry.register(RpqCollector(rt, redis.Redis.from_url(rt.settings.celery_broker_url), []))
    return registry.get_sample_value("rpq_spend_guard_holding")


def test_jobs_wait_while_the_account_spends_over_the_limit_and_go_in_order_once_it_clears(
        runtime: Runtime, simulator: SimulatorProcess) -> None:
    rt = guarded(runtime, budget_max_spend_per_hour=10.0)
    account_seen(rt, spend_per_hour=12.5)
    first, second = (jobs.submit("tts", {"sleep": 0.1}, runtime=rt) for _ in range(2))

    held = dispatch(rt, ENDPOINT_ID)

    assert (held.sent, held.again_in) == (0, HOLD_RECHECK_SECONDS) and "$12.50/h" in held.reason
    waiting = jobs.get(first.id, runtime=rt).waiting
    assert waiting is not None and waiting.reason is WaitReason.SPEND
    assert "RPQ_BUDGET_MAX_SPEND_PER_HOUR" in waiting.message
    assert {j.waiting.reason for j in jobs.list_jobs(runtime=rt) if j.waiting} == {WaitReason.SPEND}
    assert simulator.jobs() == []

    assert holding(rt) == 1.0

    account_seen(rt, spend_per_hour=4.0)
    released = dispatch(rt, ENDPOINT_ID)

    assert released.sent == 2 and holding(rt) == 0.0
    assert [jobs.get(j.id, runtime=rt).status for j in (first, second)] == [JobStatus.IN_QUEUE] * 2


def test_jobs_wait_while_the_balance_is_at_or_below_the_floor(runtime: Runtime, simulator: SimulatorProcess) -> None:
    rt = guarded(runtime, budget_min_balance=20.0)
    account_seen(rt, balance=20.0)
    job = jobs.submit("tts", {}, runtime=rt)

    assert dispatch(rt, ENDPOINT_ID).sent == 0
    waiting = jobs.get(job.id, runtime=rt).waiting
    assert waiting is not None and "balance is $20.00" in waiting.message


def test_without_a_recent_good_snapshot_the_guard_cannot_tell_and_sends(
        runtime: Runtime, simulator: SimulatorProcess) -> None:
    rt = guarded(runtime, budget_max_spend_per_hour=10.0)
    account_seen(rt, spend_per_hour=50.0, ago=timedelta(hours=2))  # too old to hold work on
    account_seen(rt, ok=False)  # the latest read failed
    job = jobs.submit("tts", {}, runtime=rt)

    assert dispatch(rt, ENDPOINT_ID).sent == 1
    assert jobs.get(job.id, runtime=rt).status is JobStatus.IN_QUEUE


def test_with_no_limit_set_the_guard_reads_nothing_and_holds_nothing(
        runtime: Runtime, simulator: SimulatorProcess) -> None:
    account_seen(runtime, spend_per_hour=1e9, balance=0.0)
    jobs.submit("tts", {}, runtime=runtime)

    assert dispatch(runtime, ENDPOINT_ID).sent == 1


def test_an_operator_can_release_one_held_job_past_the_guard_and_the_rest_stay_held(
        runtime: Runtime, simulator: SimulatorProcess) -> None:
    rt = guarded(runtime, budget_min_balance=50.0)
    account_seen(rt, balance=10.0)
    urgent, ordinary = (jobs.submit("tts", {"sleep": 0.1}, runtime=rt) for _ in range(2))

    released = jobs.release(urgent.id, runtime=rt)
    sent = dispatch(rt, ENDPOINT_ID)

    assert released.spend_released and sent.sent == 1
    assert jobs.get(urgent.id, runtime=rt).status is JobStatus.IN_QUEUE
    still = jobs.get(ordinary.id, runtime=rt)
    assert still.status is JobStatus.PENDING and still.waiting and still.waiting.reason is WaitReason.SPEND
    assert any("released past the spend guard" in (e.detail or "") for e in jobs.events(urgent.id, runtime=rt))
    with pytest.raises(jobs.InvalidTransition):
        jobs.release(urgent.id, runtime=rt)  # no longer PENDING
