"""The spend guard and the autoscaler with a real beat and worker, against the simulator's management API (on
SQLite):
a balance that falls below the floor mid-run holds new jobs and a top-up releases them, nothing lost; the
autoscaler raises max workers for a queue and lowers it once the queue is gone, without flapping."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlmodel import col, select

import jobs
from jobs.flow.waiting import WaitReason
from jobs.runpod.autoscale import ACTOR
from jobs.settings import AutoscalePolicy
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.models import AccountSnapshot, ScaleChange, utcnow
from tests.conftest import ENDPOINT_ID, ENDPOINT_NAME, Pipeline, SimulatorProcess, _stack, wait_until

pytestmark = pytest.mark.integration

FLOOR_USD = 100.0


# SQLite alone: test_spend_guard.py and test_autoscale.py hold the same rules to both databases in-process; this
# module checks the wiring (beat, worker, collectors, environment) around them, and the suite's time is short.
@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, start_simulator: Callable[..., SimulatorProcess], redis_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """The whole stack, collecting every second, with a spend guard and an autoscaler on the endpoint."""
    policy = AutoscalePolicy(floor=1, ceiling=3, target_wait_seconds=2, cooldown_seconds=3)
    with _stack(request, start_simulator, redis_url, tmp_path_factory, name="capacity", broker_offset=1,
                # Collecting every second asks the management API for far more than RunPod's 60 a minute: the
                # limits are scaled up, as a test's clock is scaled down. Workers stay warm long enough for the
                # autoscaler's steps down to see them idle.
                management=True, simulator_args=("--cold-start-seconds", "0", "--rate-limit-scale", "20",
                                                 "--idle-timeout-seconds", "30"),
                settings={"runpod_collection_interval_seconds": 1, "budget_min_balance": FLOOR_USD,
                          "autoscale": {ENDPOINT_NAME: policy}},
                env={"RUNPOD_COLLECTION_INTERVAL_SECONDS": "1", "RPQ_BUDGET_MIN_BALANCE": str(FLOOR_USD),
                     "RPQ_AUTOSCALE": f"{ENDPOINT_NAME}=1:3:2:3"}) as started:
        yield started


def balance_becomes(stack: Pipeline, usd: float) -> None:
    """Set the simulated account's balance, and wait until the account collector has seen it."""
    stack.simulator.control.post("/_sim/account", json={"balance": usd}).raise_for_status()
    since = utcnow()

    def seen() -> bool:
        with session_scope(stack.runtime.engine, read_only=True) as session:
            latest = session.exec(select(AccountSnapshot).where(col(AccountSnapshot.ok),
                                                                col(AccountSnapshot.observed_at) > since)
                                  .order_by(col(AccountSnapshot.observed_at).desc()).limit(1)).first()
        return latest is not None and latest.balance is not None and abs(latest.balance - usd) < 1
    wait_until(seen, timeout=30, what=f"the account collector to see a balance of ${usd}")


def sent_markers(stack: Pipeline) -> list[object]:
    return [job["input"].get("marker") for job in stack.simulator.jobs(ENDPOINT_ID)  # type: ignore[union-attr]
            if isinstance(job["input"], dict)]


def test_a_balance_below_the_floor_holds_new_jobs_and_a_top_up_releases_them_with_nothing_lost(
        stack: Pipeline) -> None:
    rt = stack.runtime
    balance_becomes(stack, 50.0)
    markers = [f"held-{i}" for i in range(3)]
    ids = [jobs.submit("tts", {"sleep": 0.2, "marker": m, "output": m}, runtime=rt).id for m in markers]

    wait_until(lambda: "held by the spend guard" in stack.logs(tail=None), timeout=30,
               what="the dispatcher to hold the jobs")
    held = [jobs.get(job_id, runtime=rt) for job_id in ids]
    assert {(j.status, j.waiting.reason if j.waiting else None) for j in held} == {
        (JobStatus.PENDING, WaitReason.SPEND)}
    assert not set(markers) & set(sent_markers(stack))

    balance_becomes(stack, 500.0)
    done = [jobs.wait(job_id, timeout=90, runtime=rt) for job_id in ids]

    assert [(j.status, j.output) for j in done] == [(JobStatus.COMPLETED, m) for m in markers]
    assert sorted(m for m in sent_markers(stack) if m in markers) == markers  # each reached RunPod once


def test_the_autoscaler_raises_for_a_queue_and_lowers_once_it_is_gone_without_flapping(stack: Pipeline) -> None:
    rt = stack.runtime
    rt.management.update_workers(ENDPOINT_ID, min=0, max=1)
    started = utcnow()
    # 24 s of work for one worker: long enough that a loaded machine's slow beat still sees the queue.
    ids = [jobs.submit("tts", {"sleep": 3, "output": i}, runtime=rt).id for i in range(8)]

    def autoscaler_changes() -> list[tuple[int | None, int | None]]:
        with session_scope(rt.engine, read_only=True) as session:
            rows = session.exec(select(ScaleChange).where(ScaleChange.actor == ACTOR, col(ScaleChange.ok),
                                                          col(ScaleChange.at) > started)
                                .order_by(col(ScaleChange.at))).all()
        return [(row.before_max, row.after_max) for row in rows]

    wait_until(lambda: any(after > before for before, after in autoscaler_changes()  # type: ignore[operator]
                           if before is not None and after is not None),
               timeout=60, what="the autoscaler to raise max workers")
    assert all(job.status is JobStatus.COMPLETED for job in (jobs.wait(i, timeout=120, runtime=rt) for i in ids))
    wait_until(lambda: rt.management.get_endpoint(ENDPOINT_ID).workers_max == 1, timeout=60,
               what="the autoscaler to bring max workers back to its floor")

    changes = autoscaler_changes()
    ups = [after > before for before, after in changes]  # type: ignore[operator]
    assert ups == sorted(ups, reverse=True), f"raised after lowering: {changes}"  # up, up..., then down, down...
    assert len(changes) <= 4, f"more changes than a queue and its end call for: {changes}"
