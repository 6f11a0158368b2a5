"""The autoscaler against the simulator's management API: it raises max workers for a queue that would wait
past the target, holds still in its cooldown and at its ceiling, and lowers max once workers sit idle with
nothing queued, each change audited. In-process, on SQLite and PostgreSQL; a simulator of its own, since
scaling changes the endpoint for everyone."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import jobs
from jobs.flow.dispatch import dispatch
from jobs.flow.lifecycle import poll_job
from jobs.runpod import autoscale as autoscaler
from jobs.runpod.scaling import recent_changes
from jobs.runtime import Runtime
from jobs.settings import AutoscalePolicy
from jobs.states import JobStatus
from jobs.storage.db import make_engine, session_scope
from jobs.storage.models import utcnow
from jobs.storage.store import update_fields
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


@pytest.fixture(scope="module")
def own_simulator(start_simulator: Callable[..., SimulatorProcess]) -> SimulatorProcess:
    return start_simulator("--endpoint", ENDPOINT_ID, "--cold-start-seconds", "0")


@pytest.fixture
def rt(migrated_db: str, own_simulator: SimulatorProcess) -> Iterator[Runtime]:
    settings = make_settings(migrated_db, own_simulator, runpod_rest_url=f"{own_simulator.root_url}/mgmt/v2",
                             autoscale={ENDPOINT_NAME: AutoscalePolicy(floor=1, ceiling=4, target_wait_seconds=10,
                                                                       cooldown_seconds=0)})
    runtime = Runtime(settings=settings, engine=make_engine(migrated_db), publish=Published(),
                      make_client=lambda: fast_client(own_simulator))
    runtime.management.update_workers(ENDPOINT_ID, min=0, max=1)
    yield runtime
    runtime.close()


def live_max(rt: Runtime) -> int:
    return rt.management.get_endpoint(ENDPOINT_ID).workers_max


def finish_all(rt: Runtime, ids: list[str]) -> None:
    def step() -> bool:
        for job_id in ids:
            with session_scope(rt.engine) as session:
                update_fields(session, job_id, while_status={JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS},
                              values={"next_poll_at": utcnow()})
            poll_job(rt, job_id)
        return all(jobs.get(job_id, runtime=rt).is_terminal for job_id in ids)

    wait_until(step, timeout=60, interval=0.2, what="every job to finish")


def test_the_autoscaler_raises_for_a_long_queue_holds_at_its_ceiling_and_lowers_once_workers_idle(
        rt: Runtime) -> None:
    ids = [jobs.submit("tts", {"sleep": 1}, runtime=rt).id for _ in range(6)]
    dispatch(rt, ENDPOINT_ID)  # six jobs at RunPod, one worker: ~180 s at the default 30 s a run

    raised = autoscaler.autoscale(rt)[ENDPOINT_NAME]
    again = autoscaler.autoscale(rt)[ENDPOINT_NAME]

    assert live_max(rt) == 4  # the ceiling, not the 18 the queue asked for
    assert isinstance(again, str) and "ceiling" in again
    finish_all(rt, ids)
    wait_until(lambda: rt.management.list_workers(ENDPOINT_ID).summary.idle > 0, timeout=30,
               what="a worker to sit idle")
    lowered = autoscaler.autoscale(rt)[ENDPOINT_NAME]

    assert live_max(rt) == 3  # one step down
    with session_scope(rt.engine, read_only=True) as session:
        audit = recent_changes(session, ENDPOINT_NAME)
    changes = [(row.actor, row.before_max, row.after_max, row.ok) for row in reversed(audit)
               if row.actor == autoscaler.ACTOR]
    assert changes == [("autoscaler", 1, 4, True), ("autoscaler", 4, 3, True)]
    assert not isinstance(raised, str) and not isinstance(lowered, str)


def test_with_no_endpoint_named_the_autoscaler_does_nothing(rt: Runtime) -> None:
    rt.settings = rt.settings.model_copy(update={"autoscale": {}})

    assert autoscaler.autoscale_on_schedule(rt) is None
    assert live_max(rt) == 1
