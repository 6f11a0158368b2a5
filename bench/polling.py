"""RunPod status calls per job and completion-detection lag: rpq's poller against the official SDK.

    .venv/bin/python bench/polling.py                      # 8 jobs each of 2 s, 20 s and 120 s, per client
    .venv/bin/python bench/polling.py --durations 2,20 --per-duration 3    # a quicker look

Every job runs at once on one simulator (no cold start, 100 workers, RunPod's default rate limits), so
the run takes about as long as the longest job plus a poll interval, not the sum of them. A job of
"N s" sleeps N + u seconds, u drawn uniformly from [0, 1) (seeded), and the i-th rpq job and the i-th
SDK job of each length get the same u: with whole seconds and no cold start, the SDK's fixed 1 s
polling would phase-lock with the job's end and show a lag near zero that real jobs never get.

* rpq: `jobs.submit("bench", {"sleep": N, "output": ...})` through Redis and a real
  `celery -A tasks worker -P threads -c 16` (and beat), on SQLite unless `--database postgresql`.
  Status calls = the job's `poll_count`; lag = its `finished_at` (when the table stored the result)
  minus the simulator's `finished_at` for that RunPod job.
* SDK: `runpod.Endpoint(...).run({"input": ...}).output(timeout=...)`, one thread and one Endpoint per
  job. Status calls = GET .../status/... requests its client made (its `get` is wrapped); lag = when
  `output()` returned minus the simulator's `finished_at`.

The simulator's `finished_at` comes from `GET /_sim/jobs`. Both clocks are this machine's wall clock.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import runpod
from harness import (
    ENDPOINT_ID,
    ENDPOINT_NAME,
    celery_worker,
    child,
    database,
    median_spread,
    pipeline_env,
    print_machine,
    redis_server,
    say,
    simulator,
    stop_on_sigterm,
)

from jobs import api
from jobs.runtime import Runtime
from jobs.settings import Endpoint, Secret, Settings

# Importing runpod runs logging.basicConfig(level=INFO) (runpod/serverless/utils/rp_upload.py), which
# would print every HTTP request; quiet the root logger again.
logging.getLogger().setLevel(logging.WARNING)


@dataclass
class Observed:
    client: str  # "rpq" or "runpod SDK"
    duration: int  # the job's sleep, seconds
    runpod_job_id: str
    status_calls: int
    detected_at: float  # epoch seconds: when the client had the result


# -- the official SDK ----------------------------------------------------------------------------------------


def sdk_job(duration: int, sleep: float, out: list[Observed], errors: list[str]) -> None:
    """One job through the SDK, the way its README shows; run in a thread of its own."""
    try:
        endpoint = runpod.Endpoint(ENDPOINT_ID)  # reads runpod.api_key and runpod.endpoint_url_base now
        calls = {"status": 0}
        get = endpoint.rp_client.get

        def counting_get(endpoint: str, timeout: int = 10) -> Any:
            if "/status/" in endpoint:
                calls["status"] += 1
            return get(endpoint, timeout=timeout)

        endpoint.rp_client.get = counting_get
        job = endpoint.run({"input": {"sleep": sleep, "output": {"via": "sdk", "sleep": sleep}}})
        job.output(timeout=duration + 120)
        out.append(Observed("runpod SDK", duration, job.job_id, calls["status"], time.time()))
    except Exception as exc:  # reported at the end; one failed job must not hang the run
        errors.append(f"SDK job of {duration}s: {exc!r}")


# -- the whole run ---------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, scratch: Path) -> tuple[list[Observed], dict[str, dict[str, Any]]]:
    durations = [int(d) for d in args.durations.split(",")]
    rng = random.Random(args.seed)
    plan = [(d, d + rng.random()) for d in durations for _ in range(args.per_duration)]  # (length, sleep)
    observed: list[Observed] = []
    errors: list[str] = []
    with ExitStack() as stack:
        broker = stack.enter_context(redis_server(scratch)).database()
        sim = stack.enter_context(simulator(scratch, "--cold-start-seconds", "0", "--workers-max", "100"))
        url = stack.enter_context(database(args.database, scratch))
        env = pipeline_env(database_url=url, broker=broker, sim=sim)
        stack.enter_context(celery_worker("rpq-worker", "tasks", env, scratch, "threads", 16))
        stack.enter_context(child("beat", [sys.executable, "-m", "celery", "-A", "tasks", "beat", "--loglevel",
                                           "WARNING", "-s", str(scratch / "beat-schedule")], scratch, env=env))
        settings = Settings(runpod_api_key=Secret(sim.api_key), runpod_serverless_url=sim.base_url,
                            database_url=url, celery_broker_url=broker,
                            endpoints={ENDPOINT_NAME: Endpoint(ENDPOINT_NAME, ENDPOINT_ID)})
        rt = Runtime.from_settings(settings)
        stack.callback(rt.close)

        runpod.api_key = sim.api_key
        runpod.endpoint_url_base = sim.base_url  # before any Endpoint is built
        started = time.monotonic()
        threads = [threading.Thread(target=sdk_job, args=(d, sleep, observed, errors), daemon=True)
                   for d, sleep in plan]
        for thread in threads:
            thread.start()
        ours = [(d, api.submit(ENDPOINT_NAME, {"sleep": sleep, "output": {"via": "rpq", "sleep": sleep}},
                               runtime=rt).id)
                for d, sleep in plan]
        say(f"  {len(threads)} SDK jobs and {len(ours)} rpq jobs started; the longest takes {max(durations)} s")

        for duration, job_id in ours:
            job = api.wait(job_id, timeout=max(durations) + 180 - (time.monotonic() - started), runtime=rt)
            if job.status != "COMPLETED" or job.finished_at is None or job.runpod_job_id is None:
                errors.append(f"rpq job {job_id} of {duration}s ended {job.status}: {job.error}")
                continue
            observed.append(Observed("rpq", duration, job.runpod_job_id, job.poll_count, job.finished_at.timestamp()))
        for thread in threads:
            thread.join(timeout=max(1.0, max(durations) + 180 - (time.monotonic() - started)))
        say(f"  all done after {time.monotonic() - started:.0f} s")
        at_runpod = {job["id"]: job for job in sim.jobs()}
    for message in errors:
        say(f"  ERROR: {message}")
    return observed, at_runpod


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def report(observed: list[Observed], at_runpod: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    say(f"\n{args.per_duration} jobs of each duration per client, all at once; median (min-max)\n")
    say("| job length | client | jobs | status calls per job | detection lag, s | RunPod run time, s |")
    say("|---|---|---|---|---|---|")
    for duration in [int(d) for d in args.durations.split(",")]:
        for client in ("rpq", "runpod SDK"):
            rows = [o for o in observed if o.duration == duration and o.client == client]
            if not rows:
                continue
            sim_jobs = [at_runpod[o.runpod_job_id] for o in rows]
            lags = [o.detected_at - epoch(j["finished_at"]) for o, j in zip(rows, sim_jobs, strict=True)]
            ran = [epoch(j["finished_at"]) - epoch(j["started_at"]) for j in sim_jobs]
            calls = [float(o.status_calls) for o in rows]
            say(f"| {duration}-{duration + 1} s | {client} | {len(rows)} | {median_spread(calls)} | "
                f"{median_spread(lags, '{:.2f}')} | {median_spread(ran, '{:.1f}')} |")
    say("")
    for client in ("rpq", "runpod SDK"):
        rows = [o for o in observed if o.client == client]
        if rows:
            lags = [o.detected_at - epoch(at_runpod[o.runpod_job_id]["finished_at"]) for o in rows]
            say(f"{client}: {sum(o.status_calls for o in rows)} status calls for {len(rows)} jobs, "
                f"mean lag {statistics.mean(lags):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--durations", default="2,20,120", help="job lengths in seconds (default 2,20,120)")
    parser.add_argument("--per-duration", type=int, default=8, help="jobs of each length per client (default 8)")
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--seed", type=int, default=8, help="seed for the jobs' fractional seconds")
    args = parser.parse_args()
    stop_on_sigterm()
    say("machine:")
    print_machine()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rpq-bench-") as scratch:
        observed, at_runpod = measure(args, Path(scratch))
    report(observed, at_runpod, args)
    say(f"\nwhole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
