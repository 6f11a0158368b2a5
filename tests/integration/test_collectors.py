"""The management collectors against the simulator's management API, on SQLite and PostgreSQL: every table filled,
failures stored as failures (never zeros), billed hours updated in place, retention, and what the CLI shows."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import timedelta

import httpx
import pytest
from click.testing import CliRunner
from sqlmodel import SQLModel, func, select

from jobs.cli import main
from jobs.runpod import collect
from jobs.runtime import Runtime, set_runtime
from jobs.settings import Endpoint, Secret
from jobs.storage import retention
from jobs.storage.db import make_engine, session_scope
from jobs.storage.models import (
    AccountSnapshot,
    BillingRecordRow,
    CollectorRun,
    EndpointSnapshot,
    GpuPrice,
    PodSnapshot,
    utcnow,
)
from tests.conftest import (
    ENDPOINT_ID,
    ENDPOINT_NAME,
    Published,
    SimulatorProcess,
    fast_client,
    make_settings,
    wait_until,
)

pytestmark = pytest.mark.integration

POD = "pod-collect-test"
TABLES: tuple[type[SQLModel], ...] = (EndpointSnapshot, AccountSnapshot, BillingRecordRow, GpuPrice, PodSnapshot,
                                      CollectorRun)


@pytest.fixture(scope="module")
def sim(start_simulator: Callable[..., SimulatorProcess]) -> SimulatorProcess:
    """A simulator of this module's own: the shared ones list no pods."""
    return start_simulator("--endpoint", ENDPOINT_ID, "--pod", POD, "--gpu-count", "2", "--cold-start-seconds", "0")


def collector_runtime(database_url: str, sim: SimulatorProcess, **overrides: object) -> Runtime:
    fields: dict[str, object] = {"runpod_rest_url": f"{sim.root_url}/mgmt/v2",
                                 "runpod_graphql_url": f"{sim.root_url}/mgmt/graphql", **overrides}
    return Runtime(settings=make_settings(database_url, sim, **fields), engine=make_engine(database_url),
                   publish=Published(), make_client=lambda: fast_client(sim))


@pytest.fixture
def runtimes(migrated_db: str, sim: SimulatorProcess) -> Iterator[Callable[..., Runtime]]:
    """Factory: a runtime on the migrated database and this module's simulator, with settings changed; closed
    after the test."""
    made: list[Runtime] = []
    sim.reset()

    def make(**overrides: object) -> Runtime:
        made.append(collector_runtime(migrated_db, sim, **overrides))
        return made[-1]

    yield make
    for runtime in made:
        runtime.close()


@pytest.fixture
def rt(runtimes: Callable[..., Runtime]) -> Runtime:
    return runtimes()


def count(rt: Runtime, model: type[SQLModel]) -> int:
    with session_scope(rt.engine, read_only=True) as session:
        return int(session.exec(select(func.count()).select_from(model)).one())


def rows(rt: Runtime, model: type[SQLModel]) -> list[object]:
    with session_scope(rt.engine, read_only=True) as session:
        return list(session.exec(select(model)).all())


def run_a_job(sim: SimulatorProcess, seconds: float) -> None:
    """A job straight at the simulator, finished: it is billed to its endpoint's current hour."""
    headers = {"Authorization": f"Bearer {sim.api_key}"}
    job = httpx.post(f"{sim.base_url}/{ENDPOINT_ID}/run", json={"input": {"sleep": seconds}}, headers=headers,
                     timeout=10).json()
    wait_until(lambda: httpx.get(f"{sim.base_url}/{ENDPOINT_ID}/status/{job['id']}", headers=headers,
                                 timeout=10).json()["status"] == "COMPLETED", timeout=30, what="the job to finish")


def test_one_round_fills_every_table_with_what_the_simulator_reports(rt: Runtime, sim: SimulatorProcess) -> None:
    run_a_job(sim, 0.2)

    done = collect.collect_all(rt)

    assert [(run.collector, run.ok, run.error) for run in done] == [
        (name, True, None) for name, _ in collect.COLLECTORS]
    assert all(count(rt, model) >= 1 for model in TABLES)
    [snapshot] = rows(rt, EndpointSnapshot)
    live = rt.management.get_endpoint(ENDPOINT_ID)
    assert isinstance(snapshot, EndpointSnapshot) and snapshot.ok and snapshot.error is None
    assert (snapshot.endpoint_name, snapshot.workers_min, snapshot.workers_max, snapshot.gpu_count) == (
        ENDPOINT_NAME, live.workers_min, live.workers_max, 2)
    assert snapshot.gpu_pools == ",".join(live.gpu_pools) and snapshot.timeout_ms == live.timeout_ms
    assert snapshot.workers_total is not None and snapshot.workers_total >= 1  # the job's worker
    [account] = rows(rt, AccountSnapshot)
    assert isinstance(account, AccountSnapshot) and account.ok and account.balance is not None
    assert account.balance == pytest.approx(rt.graphql.account().balance)
    [billed] = rows(rt, BillingRecordRow)
    assert isinstance(billed, BillingRecordRow) and billed.endpoint_id == ENDPOINT_ID and billed.total_amount > 0
    [pod] = rows(rt, PodSnapshot)
    assert isinstance(pod, PodSnapshot) and (pod.pod_id, pod.status) == (POD, "RUNNING")
    prices = rows(rt, GpuPrice)
    assert len(prices) == len(rt.management.gpu_catalog())
    assert any(isinstance(p, GpuPrice) and p.pool in live.gpu_pools and p.serverless_per_hour for p in prices)
    assert sorted((r.collector, r.rows) for r in rows(rt, CollectorRun) if isinstance(r, CollectorRun)) == sorted(
        [("account", 1), ("billing", 1), ("catalog", len(prices)), ("endpoints", 1), ("pods", 1)])


def test_an_unknown_endpoint_is_stored_as_a_failure_with_nulls_beside_the_ones_that_answered(
        rt: Runtime) -> None:
    gone = Endpoint("gone", "no-such-endpoint")

    done = collect.collect_endpoints(rt, [rt.settings.endpoints[ENDPOINT_NAME], gone])

    assert not done.ok and done.rows == 2 and "gone: RunPodNotFound" in (done.error or "")
    with session_scope(rt.engine, read_only=True) as session:
        good = collect.latest_endpoint(session, ENDPOINT_NAME)
        failed = collect.latest_endpoint(session, "gone")
    assert good is not None and good.ok and good.workers_max is not None
    assert failed is not None and not failed.ok and "RunPodNotFound" in (failed.error or "")
    assert all(getattr(failed, f"workers_{s}") is None for s in ("min", "max", *collect.WORKER_STATES))
    assert (failed.idle_timeout, failed.gpu_pools, failed.gpu_count, failed.timeout_ms) == (None, None, None, None)
    [run] = rows(rt, CollectorRun)
    assert isinstance(run, CollectorRun) and not run.ok and run.error == done.error


def test_every_collector_stores_a_refused_key_as_a_failure_never_as_zeros_and_never_quotes_the_key(
        runtimes: Callable[..., Runtime]) -> None:
    wrong = "rpq-wrong-key-" + "x" * 20
    rt = runtimes(runpod_api_key=Secret(wrong))

    done = collect.collect_all(rt)

    assert [(run.collector, run.ok) for run in done] == [(name, False) for name, _ in collect.COLLECTORS]
    assert all(run.error and "RunPodAuthError" in run.error for run in done)
    [snapshot] = rows(rt, EndpointSnapshot)
    [account] = rows(rt, AccountSnapshot)
    assert isinstance(snapshot, EndpointSnapshot) and not snapshot.ok and snapshot.workers_max is None
    assert isinstance(account, AccountSnapshot) and not account.ok
    assert (account.balance, account.spend_per_hour, account.spend_limit) == (None, None, None)
    assert count(rt, BillingRecordRow) == count(rt, GpuPrice) == count(rt, PodSnapshot) == 0
    stored = [r.error for r in rows(rt, CollectorRun) if isinstance(r, CollectorRun)] + [snapshot.error,
                                                                                        account.error]
    assert len(stored) == 7 and not any(wrong in (error or "") for error in stored)


def test_a_dead_management_api_is_a_failure_too(runtimes: Callable[..., Runtime]) -> None:
    rt = runtimes(runpod_rest_url="http://127.0.0.1:9/v2")

    done = collect.collect_pods(rt)

    assert not done.ok and done.rows == 0 and "RunPodTransient" in (done.error or "")
    assert count(rt, PodSnapshot) == 0


def test_a_billed_hour_seen_again_is_updated_in_place(rt: Runtime, sim: SimulatorProcess) -> None:
    run_a_job(sim, 0.2)
    first = collect.collect_billing(rt)
    [before] = rows(rt, BillingRecordRow)
    run_a_job(sim, 0.4)

    second = collect.collect_billing(rt)

    [after] = rows(rt, BillingRecordRow)
    assert first.ok and second.ok and (first.rows, second.rows) == (1, 1)
    assert isinstance(before, BillingRecordRow) and isinstance(after, BillingRecordRow)
    assert (after.id, after.start) == (before.id, before.start)
    assert after.total_amount > before.total_amount and after.observed_at > before.observed_at
    billed = sum(r.total_amount for r in rt.management.serverless_billing(
        ENDPOINT_ID, start=after.start, end=after.end, bucket="hour"))
    assert after.total_amount == pytest.approx(billed)


def test_retention_purges_collector_rows_past_retention_in_batches(rt: Runtime, sim: SimulatorProcess) -> None:
    run_a_job(sim, 0.2)
    collect.collect_all(rt)
    old = utcnow() - timedelta(days=rt.settings.runpod_job_retention_days + 1)
    fresh = {model: count(rt, model) for model in TABLES}
    with session_scope(rt.engine) as session:
        for n in range(3):
            session.add(EndpointSnapshot(endpoint_name=ENDPOINT_NAME, endpoint_id=ENDPOINT_ID, observed_at=old,
                                         ok=True, workers_max=n))
            session.add(AccountSnapshot(observed_at=old, ok=False, error="old"))
            session.add(GpuPrice(observed_at=old, gpu_id=f"old-{n}"))
            session.add(PodSnapshot(observed_at=old, pod_id=f"old-{n}"))
            session.add(CollectorRun(collector="pods", at=old, ok=True))
            session.add(BillingRecordRow(endpoint_id=ENDPOINT_ID, start=old + timedelta(hours=n),
                                         end=old + timedelta(hours=n + 1), total_amount=1.0, observed_at=utcnow()))

    purged = retention.purge(rt, batch=2)

    assert purged.snapshot_rows == 3 * len(TABLES)
    assert {model: count(rt, model) for model in TABLES} == fresh


def test_endpoints_show_prints_the_latest_configuration_its_age_and_a_failure_after_it(
        rt: Runtime) -> None:
    cli = CliRunner()
    previous = set_runtime(rt)
    try:
        none_yet = cli.invoke(main, ["endpoints", "show", ENDPOINT_NAME])
        collect.collect_endpoints(rt)
        shown = cli.invoke(main, ["endpoints", "show", ENDPOINT_NAME])
        as_json = cli.invoke(main, ["endpoints", "show", ENDPOINT_NAME, "--json"])
        health = cli.invoke(main, ["endpoints", "health", ENDPOINT_NAME, "--json"])
        # The same name with an id RunPod does not know: its next collection fails (404).
        collect.collect_endpoints(rt, [Endpoint(ENDPOINT_NAME, "no-such-endpoint")])
        failed = cli.invoke(main, ["endpoints", "show", ENDPOINT_NAME])
    finally:
        set_runtime(previous)

    live = rt.management.get_endpoint(ENDPOINT_ID)
    assert none_yet.exit_code == 1 and "no configuration collected yet" in none_yet.output
    assert shown.exit_code == 0, shown.output
    assert f"min {live.workers_min}  max {live.workers_max}" in shown.output
    assert re.search(r"configuration observed \d+s ago", shown.output)
    config = json.loads(as_json.output)
    assert (config["workers_max"], config["ok"], config["gpu_count"]) == (live.workers_max, True, 2)
    [panel] = json.loads(health.output)
    assert panel["max_workers"] == live.workers_max and set(panel["worker_states"]) == set(collect.WORKER_STATES)
    assert failed.exit_code == 0 and "latest collection failed" in failed.output and "RunPodNotFound" in failed.output
    assert f"max {live.workers_max}" in failed.output  # the last good configuration is still shown, with its age


def test_a_second_round_within_the_interval_skips_so_two_beats_do_not_collect_twice(rt: Runtime) -> None:
    first = collect.collect_on_schedule(rt)
    second = collect.collect_on_schedule(rt)

    assert first is not None and [run.ok for run in first] == [True] * len(collect.COLLECTORS)
    assert second is None
    assert count(rt, CollectorRun) == len(collect.COLLECTORS)
