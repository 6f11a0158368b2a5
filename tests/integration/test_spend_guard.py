"""The spend guard: while the account spends too fast or its balance is too low (as the account collector last
saw it), or an endpoint spends more than its own limit, new jobs are held PENDING with the reason shown, each spell
of holding is recorded, and they go out in order once the limit clears. With RPQ_BUDGET_LOWER_WORKERS_TO the guard
also lowers held endpoints' max workers and puts them back. In-process, on SQLite and PostgreSQL, against the
simulator (its management API over HTTP for the workers)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry
from sqlmodel import col, select

import jobs
from jobs.flow.dispatch import dispatch
from jobs.flow.spend_guard import ACCOUNT, HOLD_RECHECK_SECONDS
from jobs.flow.waiting import WaitReason
from jobs.observability.metrics import RpqCollector
from jobs.runpod.autoscale import autoscale_on_schedule
from jobs.runpod.guard_workers import ACTOR as GUARD
from jobs.runpod.guard_workers import guard_workers
from jobs.runpod.scaling import Outcome, scale_endpoint
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.storage.db import make_engine, session_scope
from jobs.storage.models import AccountSnapshot, BillingRecordRow, ScaleChange, SpendHoldRow, utcnow
from jobs.storage.store import update_fields
from tests.conftest import ENDPOINT_ID, ENDPOINT_NAME, Published, SimulatorProcess, fast_client, make_settings

pytestmark = pytest.mark.integration


def guarded(rt: Runtime, **limits: float) -> Runtime:
    rt.settings = rt.settings.model_copy(update=limits)
    return rt


def account_seen(rt: Runtime, *, spend_per_hour: float | None = 1.0, balance: float | None = 100.0,
                 ok: bool = True, ago: timedelta = timedelta(0)) -> None:
    with session_scope(rt.engine) as session:
        session.add(AccountSnapshot(observed_at=utcnow() - ago, ok=ok, error=None if ok else "GraphQL: 503",
                                    balance=balance if ok else None, spend_per_hour=spend_per_hour if ok else None))


def holding(rt: Runtime, scope: str = ACCOUNT) -> float | None:
    """rpq_spend_guard_holding{scope}, as the exporter shows it."""
    registry = CollectorRegistry()
    registry.register(RpqCollector(rt, redis.Redis.from_url(rt.settings.celery_broker_url), []))
    return registry.get_sample_value("rpq_spend_guard_holding", {"scope": scope})


def spells(rt: Runtime) -> list[tuple[str, bool]]:
    """The guard's recorded spells, oldest first: (scope, still holding)."""
    with session_scope(rt.engine, read_only=True) as session:
        rows = session.exec(select(SpendHoldRow).order_by(col(SpendHoldRow.id))).all()
        return [(row.scope, row.ended_at is None) for row in rows]


def finished_costing(rt: Runtime, usd: float, *, ago: timedelta = timedelta(minutes=5)) -> str:
    """A job of the endpoint that finished `ago`, with rpq's cost estimate `usd`."""
    job = jobs.submit("tts", {}, runtime=rt)
    with session_scope(rt.engine) as session:
        assert update_fields(session, job.id, while_status={JobStatus.PENDING}, values={
            "status": JobStatus.COMPLETED, "cost_usd": usd, "finished_at": utcnow() - ago})
    return job.id


def billed(rt: Runtime, usd: float, *, hour_ended_ago: timedelta) -> None:
    end = utcnow() - hour_ended_ago
    with session_scope(rt.engine) as session:
        session.add(BillingRecordRow(endpoint_id=ENDPOINT_ID, start=end - timedelta(hours=1), end=end,
                                     total_amount=usd, observed_at=utcnow()))


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


def test_an_endpoint_over_its_own_limit_by_rpqs_estimates_is_held_alone_and_released_as_they_age_out(
        runtime: Runtime, simulator: SimulatorProcess) -> None:
    rt = guarded(runtime, budget_endpoint_max_spend_per_hour={ENDPOINT_NAME: 2.0})
    first, second = finished_costing(rt, 1.5), finished_costing(rt, 0.75)
    job = jobs.submit("tts", {}, runtime=rt)

    held = dispatch(rt, ENDPOINT_ID)

    assert held.sent == 0 and "endpoint tts spends $2.25/h" in held.reason and "rpq's estimate" in held.reason
    waiting = jobs.get(job.id, runtime=rt).waiting
    assert waiting is not None and waiting.reason is WaitReason.SPEND
    assert "RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR" in waiting.message
    assert (holding(rt, ENDPOINT_NAME), holding(rt, ACCOUNT)) == (1.0, 0.0)
    assert spells(rt) == [(ENDPOINT_NAME, True)]

    for job_id in (first, second):  # an hour later, those costs no longer count
        with session_scope(rt.engine) as session:
            update_fields(session, job_id, while_status={JobStatus.COMPLETED},
                          values={"finished_at": utcnow() - timedelta(minutes=61)})
    released = dispatch(rt, ENDPOINT_ID)

    assert released.sent == 1 and jobs.get(job.id, runtime=rt).status is JobStatus.IN_QUEUE
    assert holding(rt, ENDPOINT_NAME) == 0.0 and spells(rt) == [(ENDPOINT_NAME, False)]


def test_an_endpoint_is_held_when_runpods_bill_for_its_last_hour_is_over_its_limit(
        runtime: Runtime, simulator: SimulatorProcess) -> None:
    rt = guarded(runtime, budget_endpoint_max_spend_per_hour={ENDPOINT_NAME: 2.0})
    billed(rt, 3.1, hour_ended_ago=timedelta(minutes=20))  # idle workers bill too, and rpq estimates nothing
    billed(rt, 50.0, hour_ended_ago=timedelta(hours=3))  # too old to say what it spends now
    job = jobs.submit("tts", {}, runtime=rt)

    held = dispatch(rt, ENDPOINT_ID)

    assert held.sent == 0 and "$3.10/h (RunPod's bill" in held.reason
    assert jobs.get(job.id, runtime=rt).status is JobStatus.PENDING


def test_a_spell_of_holding_is_recorded_once_however_many_dispatchers_see_it_and_ended_when_it_clears(
        runtime: Runtime, simulator: SimulatorProcess) -> None:
    rt = guarded(runtime, budget_max_spend_per_hour=10.0)
    account_seen(rt, spend_per_hour=12.0)
    jobs.submit("tts", {}, runtime=rt)

    for _ in range(3):
        assert dispatch(rt, ENDPOINT_ID).sent == 0
    assert spells(rt) == [(ACCOUNT, True)]

    account_seen(rt, spend_per_hour=3.0)
    assert dispatch(rt, ENDPOINT_ID).sent == 1
    account_seen(rt, spend_per_hour=15.0)
    jobs.submit("tts", {}, runtime=rt)
    assert dispatch(rt, ENDPOINT_ID).sent == 0

    assert spells(rt) == [(ACCOUNT, False), (ACCOUNT, True)]


# -- the guard lowering workers (RPQ_BUDGET_LOWER_WORKERS_TO) ------------------------------------------------


@pytest.fixture
def managed(migrated_db: str, simulator: SimulatorProcess) -> Iterator[Runtime]:
    """A runtime whose management client talks to the simulator's /mgmt/v2, with the guard lowering to 1."""
    settings = make_settings(migrated_db, simulator, runpod_rest_url=f"{simulator.root_url}/mgmt/v2",
                             budget_min_balance=50.0, budget_lower_workers_to=1)
    runtime = Runtime(settings=settings, engine=make_engine(migrated_db), publish=Published(),
                      make_client=lambda: fast_client(simulator))
    yield runtime
    runtime.close()


def live_workers(simulator: SimulatorProcess) -> tuple[int, int]:
    body = httpx.get(f"{simulator.root_url}/mgmt/v2/serverless/{ENDPOINT_ID}", timeout=10,
                     headers={"Authorization": f"Bearer {simulator.api_key}"}).json()
    return body["workers"]["min"], body["workers"]["max"]


def guard_audit(rt: Runtime) -> list[tuple[str, int | None, int | None, bool]]:
    with session_scope(rt.engine, read_only=True) as session:
        rows = session.exec(select(ScaleChange).where(ScaleChange.actor == GUARD).order_by(col(ScaleChange.id)))
        return [((row.reason or "").split(":")[0], row.after_min, row.after_max, row.ok) for row in rows]


def test_the_guard_lowers_a_held_endpoints_workers_once_a_spell_and_puts_back_what_it_found(
        managed: Runtime, simulator: SimulatorProcess) -> None:
    rt = managed
    assert scale_endpoint(rt, ENDPOINT_NAME, max=4, min=2, actor="operator:tester").outcome is Outcome.CHANGED
    account_seen(rt, balance=10.0)

    autoscale_on_schedule(rt)
    guard_workers(rt)  # the same spell: lowered already

    assert live_workers(simulator) == (1, 1)
    assert guard_audit(rt) == [("lower", 1, 1, True)]
    assert spells(rt) == [(ACCOUNT, True)]

    account_seen(rt, balance=80.0)
    guard_workers(rt)
    guard_workers(rt)  # put back already

    assert live_workers(simulator) == (2, 4)
    assert guard_audit(rt) == [("lower", 1, 1, True), ("restore", 2, 4, True)]
    assert spells(rt) == [(ACCOUNT, False)]


def test_the_guard_neither_fights_nor_undoes_an_operators_change_made_while_it_held(
        managed: Runtime, simulator: SimulatorProcess) -> None:
    rt = managed
    assert scale_endpoint(rt, ENDPOINT_NAME, max=4, min=0, actor="operator:tester").outcome is Outcome.CHANGED
    account_seen(rt, balance=10.0)
    guard_workers(rt)
    assert live_workers(simulator) == (0, 1)

    assert scale_endpoint(rt, ENDPOINT_NAME, max=2, actor="operator:tester").outcome is Outcome.CHANGED
    guard_workers(rt)  # still holding: the guard lowers once a spell, so the operator's raise stands
    assert live_workers(simulator) == (0, 2)
    account_seen(rt, balance=80.0)
    said = guard_workers(rt)

    assert live_workers(simulator) == (0, 2)
    assert "whoever changed them decides" in str(said[ENDPOINT_NAME])
    assert guard_audit(rt) == [("lower", 0, 1, True)]


def test_without_a_hold_or_without_the_setting_the_guard_changes_no_workers(
        managed: Runtime, simulator: SimulatorProcess) -> None:
    before = live_workers(simulator)
    assert guard_workers(managed) == {}  # within the limits
    account_seen(managed, balance=10.0)
    off = managed.settings.model_copy(update={"budget_lower_workers_to": None})
    managed.settings = off

    assert guard_workers(managed) == {} and autoscale_on_schedule(managed) is None
    assert live_workers(simulator) == before and guard_audit(managed) == []


def test_when_runpods_management_api_cannot_be_reached_the_guard_changes_and_records_nothing(
        managed: Runtime, simulator: SimulatorProcess) -> None:
    from tests.conftest import free_port

    account_seen(managed, balance=10.0)
    unreachable = managed.settings.model_copy(update={"runpod_rest_url": f"http://127.0.0.1:{free_port()}/mgmt/v2"})
    cut_off = Runtime(settings=unreachable, engine=managed.engine, publish=Published(),
                      make_client=lambda: fast_client(simulator))
    before = live_workers(simulator)

    said = guard_workers(cut_off)

    assert str(said[ENDPOINT_NAME]).startswith("not read:") and live_workers(simulator) == before
    assert guard_audit(managed) == []  # nothing was attempted, so nothing is audited: the next round tries again
