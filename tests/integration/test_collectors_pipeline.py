"""The collectors with a real beat and worker: every table filled on schedule from the simulator's management API,
with nothing but the environment to say where it is."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlmodel import SQLModel, col, func, select

import jobs
from jobs.runpod import collect
from jobs.storage.db import session_scope
from jobs.storage.models import (
    AccountSnapshot,
    BillingRecordRow,
    CollectorRun,
    EndpointSnapshot,
    GpuPrice,
    PodSnapshot,
)
from tests.conftest import Pipeline, SimulatorProcess, _stack, wait_until

pytestmark = pytest.mark.integration

INTERVAL = 2  # seconds between rounds
TABLES: tuple[type[SQLModel], ...] = (EndpointSnapshot, AccountSnapshot, BillingRecordRow, GpuPrice, PodSnapshot)


# SQLite alone: beat and a worker filling the collectors' tables on schedule. The collectors' writes are held to
# both databases in-process (test_collectors.py), and test_topology.py runs them under two beats on PostgreSQL.
@pytest.fixture(scope="module", params=["sqlite"])
def collecting(request: pytest.FixtureRequest, start_simulator: Callable[..., SimulatorProcess], redis_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """The whole stack, its beat collecting every INTERVAL seconds from the simulator's management API."""
    with _stack(request, start_simulator, redis_url, tmp_path_factory, name="collectors", broker_offset=1,
                management=True, simulator_args=("--pod", "pod-pipeline"),
                settings={"runpod_collection_interval_seconds": INTERVAL},
                env={"RUNPOD_COLLECTION_INTERVAL_SECONDS": str(INTERVAL)}) as stack:
        yield stack


def test_beat_fills_every_collector_table_round_after_round(collecting: Pipeline) -> None:
    rt = collecting.runtime
    done = jobs.submit("tts", {"sleep": 0.3, "output": 1}, runtime=rt)
    jobs.wait(done.id, timeout=60, runtime=rt)  # billed, so the billing collector has an hour to store

    def counts() -> dict[str, int]:
        with session_scope(rt.engine, read_only=True) as session:
            found = {model.__name__: int(session.exec(select(func.count()).select_from(model)).one())
                     for model in TABLES}
            for name, _ in collect.COLLECTORS:
                found[name] = int(session.exec(select(func.count()).select_from(CollectorRun).where(
                    CollectorRun.collector == name, col(CollectorRun.ok)).where(
                    CollectorRun.at > done.created_at)).one())
            return found

    def every_table_and_two_rounds_after_the_job() -> dict[str, int] | None:
        found = counts()
        billed = found[BillingRecordRow.__name__]
        return found if all(found.values()) and billed and min(found[n] for n, _ in collect.COLLECTORS) >= 2 \
            else None

    found = wait_until(every_table_and_two_rounds_after_the_job, timeout=10 * INTERVAL + 30, interval=0.5,
                       what="two rounds of every collector after the job, and a row in every table")

    assert isinstance(found, dict)
    with session_scope(rt.engine, read_only=True) as session:
        snapshot = collect.latest_endpoint(session, "tts")
        failed = session.exec(select(CollectorRun).where(~col(CollectorRun.ok))).all()
    assert snapshot is not None and snapshot.ok and snapshot.workers_max is not None
    assert failed == [], [run.error for run in failed]
    shown = collecting.run_cli("endpoints", "show", "tts")
    assert shown.returncode == 0 and "configuration observed" in shown.stdout, shown.stderr
