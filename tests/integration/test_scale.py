"""Six hundred jobs at once through the README's deployment, against RunPod's rate limits scaled down so
that they bind within seconds: every job ends with its own output, reaches RunPod once, and rpq stays
inside the limits (no 429). Speed is bench/scale.py's business; nothing here is timed.

The simulator runs with a quarter of RunPod's limits (/run 250 per 10 s and 50 at once, /status 500 per
10 s and 100 at once), a worker for every job and no cold start, and `--no-dynamic-rate-limits`, so
that six hundred running workers do not lift the limits out of reach. Six hundred is more than two windows of
/run at that scale: enough for the limits to bind, and bench/scale.py takes 10,000.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import text

from jobs import api
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.storage.db import upgrade
from tasks.app import make_app
from tests.conftest import (
    ENDPOINT_ID,
    ENDPOINT_NAME,
    ROOT,
    SimulatorProcess,
    fresh_postgres_database,
    stop_process,
    wait_until,
)

JOBS = 600
JOB_SECONDS = 3.0
RATE_LIMIT_SCALE = 0.25
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT", "EXPIRED"}


def readme_deployment() -> list[str]:
    """The worker and beat lines of the README's "Running it" block: the deployment a reader runs."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Running it\s*\n+```bash\n(.*?)^```", readme, re.S | re.M)
    assert block, "the README has no 'Running it' block"
    lines = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line.startswith(("celery -A tasks worker", "celery -A tasks beat"))]


@pytest.fixture
def deployment(start_simulator: Callable[..., SimulatorProcess], redis_url: str, tmp_path: Path
               ) -> Iterator[tuple[Runtime, SimulatorProcess]]:
    """The README's worker(s) and beat on PostgreSQL and a simulator of its own with scaled-down limits."""
    sim = start_simulator("--cold-start-seconds", "0", "--workers-max", str(JOBS + 100), "--no-dynamic-rate-limits",
                          "--rate-limit-scale", str(RATE_LIMIT_SCALE), "--endpoint", ENDPOINT_ID)
    redis_lib.Redis.from_url(redis_url).flushdb()
    with fresh_postgres_database() as database_url:
        upgrade(database_url)
        env = {**os.environ, "DATABASE_URL": database_url, "CELERY_BROKER_URL": redis_url,
               "RUNPOD_API_KEY": sim.api_key, "RUNPOD_SERVERLESS_URL": sim.base_url,
               "RUNPOD_ENDPOINTS": f"{ENDPOINT_NAME}={ENDPOINT_ID}",
               # rpq's budget scaled as the simulator's limits are: its defaults' share of RunPod's.
               "RPQ_RUNPOD_LIMITS": f"run={int(800 * RATE_LIMIT_SCALE)},status={int(1400 * RATE_LIMIT_SCALE)}",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("RUNPOD_WEBHOOK_BASE_URL", None)
        control = make_app(Settings(celery_broker_url=redis_url))
        processes = []
        try:
            for i, line in enumerate(readme_deployment()):
                words = shlex.split(line)
                command = [sys.executable, "-m", *words]
                node = f"scale{i}-{uuid.uuid4().hex[:6]}@localhost"
                if "worker" in words:
                    command += ["-n", node]
                with open(tmp_path / f"process-{i}.log", "wb") as log:
                    # In tmp_path, so beat's schedule file lands there.
                    processes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log,
                                                      stderr=subprocess.STDOUT))
                if "worker" in words:
                    wait_until(answers_ping(control, node), timeout=60, interval=0.2,
                               what=f"worker {node} to answer ping")
            runtime = Runtime.from_settings(Settings.from_env(env))
            try:
                yield runtime, sim
            finally:
                runtime.close()
        finally:
            for process in processes:
                stop_process(process)
            control.close()


def answers_ping(control: Any, node: str) -> Callable[[], bool]:
    return lambda: bool(control.control.ping(destination=[node], timeout=0.5))


def marker_of(job: dict[str, Any]) -> str:
    return str(job["input"]["output"]["marker"])


def statuses(runtime: Runtime, ids: list[str]) -> Counter[str]:
    with runtime.engine.connect() as conn:
        rows = conn.execute(text("SELECT status FROM jobs WHERE id = ANY(:ids)"), {"ids": ids})
        return Counter(str(row.status) for row in rows)


def outputs(runtime: Runtime, ids: list[str]) -> dict[str, tuple[str, Any]]:
    with runtime.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, status, output FROM jobs WHERE id = ANY(:ids)"), {"ids": ids})
        return {row.id: (str(row.status), row.output) for row in rows}


@pytest.mark.timeout(900)
def test_six_hundred_jobs_at_once_all_finish_once_with_their_own_output_and_no_429(
    deployment: tuple[Runtime, SimulatorProcess],
) -> None:
    runtime, sim = deployment
    rng = random.Random(9)
    markers = {}
    for i in range(JOBS):
        marker = f"scale-{i}"
        job = api.submit(ENDPOINT_NAME, {"sleep": JOB_SECONDS + rng.random(), "output": {"marker": marker}},
                         runtime=runtime)
        markers[job.id] = marker
    ids = list(markers)

    def all_final() -> bool:
        return sum(n for status, n in statuses(runtime, ids).items() if status in FINAL) == JOBS

    try:
        wait_until(all_final, timeout=780, interval=1.0, what="every job to be final")
    except TimeoutError:
        pytest.fail(f"not every job is final: {dict(statuses(runtime, ids))}")
    sent = sim.jobs(ENDPOINT_ID)
    at_runpod = Counter(marker_of(job) for job in sent)
    stats = sim.control.get("/_sim/stats").json()["endpoints"][ENDPOINT_ID]
    refused = {op: counts["responses"]["429"] for op, counts in stats.items() if "429" in counts["responses"]}

    assert outputs(runtime, ids) == {job_id: ("COMPLETED", {"marker": marker}) for job_id, marker in markers.items()}
    assert at_runpod == Counter(markers.values()), "each job reached RunPod exactly once"
    assert refused == {}, "RunPod never had to refuse a request (429)"
    assert statuses(runtime, ids)["EXPIRED"] == 0
    # Neither role starves the other: polling began while jobs were still being sent (RunPod's /run
    # limit spreads them over more than a window), and sending went on while polls were made.
    last_sent = max(job["created_at"] for job in sent)
    first_polled = min(job["first_status_at"] for job in sent if job["first_status_at"])
    assert first_polled < last_sent, "the first poll waited for the whole submit backlog"
