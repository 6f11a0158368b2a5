"""RunPod status calls per job and completion-detection lag: rpq's poller against the official SDK.

    .venv/bin/python bench/polling.py                         # 20 measured jobs each of 2 s, 20 s and 120 s
    .venv/bin/python bench/polling.py --spread 0.2            # run times vary +-20 % as well
    .venv/bin/python bench/polling.py --endpoints shared      # all three lengths on one endpoint
    .venv/bin/python bench/polling.py --durations 2,20 --per-duration 5 --warmup 20    # a quicker look
    .venv/bin/python bench/polling.py --replay-only           # the plan alone, in a second, no services

rpq places each poll where the endpoint's recent jobs say the job is likely to end (`jobs.flow.pollplan`),
so it needs history. The run therefore has two phases:

1. **Warm-up** (rpq only, not compared): `--warmup` jobs of each length, all at once, so the job table
   holds finished jobs to learn from. Until enough have finished, these are polled on the doubling
   schedule. After they end, the script waits out the workers' 30 s cache of what was learned, so the
   measured jobs see the whole warm-up.
2. **Measured**: `--per-duration` jobs of each length per client, all at once. A job of "N s" sleeps
   N * (1 + s) + u seconds: s uniform in [-spread, +spread] and u uniform in [0, 1), both seeded, and the
   i-th rpq job and the i-th SDK job of each length get the same sleep. Warm-up jobs are drawn the same
   way. Without u, whole seconds and no cold start would phase-lock the SDK's fixed 1 s polling with the
   job's end and show a lag near zero that real jobs never get.

By default each length has an endpoint of its own (`--endpoints per-duration`), as a RunPod endpoint
usually serves one model whose jobs look alike; `--endpoints shared` puts all three on one endpoint, so
every job's history is a mixture of three lengths.

* rpq: `jobs.submit(endpoint, {"sleep": ..., "output": ...})` through Redis and a real
  `celery -A tasks worker -P threads -c 16` (and beat), on SQLite unless `--database postgresql`.
  Status calls = the job's `poll_count`; lag = its `finished_at` (when the table stored the result)
  minus the simulator's `finished_at` for that RunPod job.
* SDK: `runpod.Endpoint(...).run({"input": ...}).output(timeout=...)`, one thread and one Endpoint per
  job. Status calls = GET .../status/... requests its client made (its `get` is wrapped); lag = when
  `output()` returned minus the simulator's `finished_at`.

One simulator (no cold start, up to 100 workers per endpoint, RunPod's default rate limits). The
simulator's `finished_at` comes from `GET /_sim/jobs`. Both clocks are this machine's wall clock. The
machine is shared: each phase reports the CPU the rest of the machine used meanwhile.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import runpod
from harness import (
    ENDPOINT_ID,
    CpuMeter,
    celery_worker,
    child,
    database,
    percentile,
    pipeline_env,
    print_machine,
    process_group,
    redis_server,
    say,
    simulator,
    stop_on_sigterm,
    this_process,
)

from jobs import api
from jobs.flow.backoff import PollSchedule
from jobs.flow.endpoint_times import CACHE_SECONDS
from jobs.flow.pollplan import LONG_WAIT_CAP_SECONDS, EndpointTimes, JobSeen, next_poll_delay
from jobs.runtime import Runtime
from jobs.settings import Endpoint, Secret, Settings
from jobs.states import JobStatus

# Importing runpod runs logging.basicConfig(level=INFO) (runpod/serverless/utils/rp_upload.py), which
# would print every HTTP request; quiet the root logger again.
logging.getLogger().setLevel(logging.WARNING)

RPQ = "rpq"
SDK = "runpod SDK"
#: The replay's stand-ins for the simulator's queue time (no cold start) and one poll's round trip.
REPLAY_DELAY_SECONDS = 0.02
REPLAY_POLL_SECONDS = 0.03


@dataclass
class Observed:
    client: str  # RPQ or SDK
    duration: int  # the job's nominal length, seconds
    runpod_job_id: str
    status_calls: int
    detected_at: float  # epoch seconds: when the client had the result
    first_look: float | None = None  # rpq: seconds from submission to the poll that first saw it running


def endpoint_for(duration: int, args: argparse.Namespace) -> str:
    return ENDPOINT_ID if args.endpoints == "shared" else f"bench-{duration}s"


def sleeps(duration: int, count: int, rng: random.Random, spread: float) -> list[float]:
    return [duration * (1 + rng.uniform(-spread, spread)) + rng.random() for _ in range(count)]


# -- the official SDK ----------------------------------------------------------------------------------------


def sdk_job(endpoint_id: str, duration: int, sleep: float, out: list[Observed], errors: list[str]) -> None:
    """One job through the SDK, the way its README shows; run in a thread of its own."""
    try:
        endpoint = runpod.Endpoint(endpoint_id)  # reads runpod.api_key and runpod.endpoint_url_base now
        calls = {"status": 0}
        get = endpoint.rp_client.get

        def counting_get(endpoint: str, timeout: int = 10) -> Any:
            if "/status/" in endpoint:
                calls["status"] += 1
            return get(endpoint, timeout=timeout)

        endpoint.rp_client.get = counting_get
        job = endpoint.run({"input": {"sleep": sleep, "output": {"via": "sdk", "sleep": sleep}}})
        job.output(timeout=int(sleep) + 180)
        out.append(Observed(SDK, duration, job.job_id, calls["status"], time.time()))
    except Exception as exc:  # reported at the end; one failed job must not hang the run
        errors.append(f"SDK job of {duration}s: {exc!r}")


# -- rpq -------------------------------------------------------------------------------------------------------


def rpq_jobs(rt: Runtime, plan: list[tuple[int, float]], args: argparse.Namespace, label: str) -> list[tuple[int, str]]:
    return [(d, api.submit(endpoint_for(d, args), {"sleep": sleep, "output": {"via": label, "sleep": sleep}},
                           runtime=rt).id)
            for d, sleep in plan]


def collect(rt: Runtime, ours: list[tuple[int, str]], deadline: float, observed: list[Observed],
            errors: list[str]) -> None:
    for duration, job_id in ours:
        job = api.wait(job_id, timeout=max(1.0, deadline - time.monotonic()), runtime=rt)
        if job.status != "COMPLETED" or job.finished_at is None or job.runpod_job_id is None:
            errors.append(f"rpq job {job_id} of {duration}s ended {job.status}: {job.error}")
            continue
        first_look = (job.started_at - job.submitted_at).total_seconds() if job.started_at and job.submitted_at \
            else None
        observed.append(Observed(RPQ, duration, job.runpod_job_id, job.poll_count, job.finished_at.timestamp(),
                                 first_look))


# -- the whole run ---------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    observed: list[Observed]
    rest_of_machine: float  # cores
    seconds: float


def measure(args: argparse.Namespace, scratch: Path) -> tuple[list[Phase], dict[str, dict[str, Any]]]:
    durations = [int(d) for d in args.durations.split(",")]
    rng = random.Random(args.seed)
    warmup = [(d, s) for d in durations for s in sleeps(d, args.warmup, rng, args.spread)]
    measured = [(d, s) for d in durations for s in sleeps(d, args.per_duration, rng, args.spread)]
    endpoints = sorted({endpoint_for(d, args) for d in durations} - {ENDPOINT_ID})
    errors: list[str] = []
    phases: list[Phase] = []
    with ExitStack() as stack:
        server = stack.enter_context(redis_server(scratch))
        broker = server.database()
        sim = stack.enter_context(simulator(scratch, "--cold-start-seconds", "0", "--workers-max", "100",
                                           *(flag for e in endpoints for flag in ("--endpoint", e))))
        url = stack.enter_context(database(args.database, scratch))
        env = pipeline_env(database_url=url, broker=broker, sim=sim)
        worker = stack.enter_context(celery_worker("rpq-worker", "tasks", env, scratch, "threads", 16))
        beat = stack.enter_context(child("beat", [sys.executable, "-m", "celery", "-A", "tasks", "beat", "--loglevel",
                                                  "WARNING", "-s", str(scratch / "beat-schedule")], scratch, env=env))
        settings = Settings(runpod_api_key=Secret(sim.api_key), runpod_serverless_url=sim.base_url,
                            database_url=url, celery_broker_url=broker,
                            endpoints={e: Endpoint(e, e) for e in [ENDPOINT_ID, *endpoints]})
        rt = Runtime.from_settings(settings)
        stack.callback(rt.close)
        meter = CpuMeter({"worker": process_group(worker.pid), "beat": process_group(beat.pid),
                          "simulator": process_group(sim.pid), "redis-server": process_group(server.pid),
                          "this script": this_process()})

        def rest(cpu: dict[str, float]) -> float:
            ours = sum(v for k, v in cpu.items() if k not in ("whole machine", "wall"))
            return max(0.0, cpu["whole machine"] - ours) / cpu["wall"]

        # 1. Warm-up: history for the endpoints to learn from.
        meter.start()
        started = time.monotonic()
        ours = rpq_jobs(rt, warmup, args, "warm-up")
        say(f"  warm-up: {len(ours)} rpq jobs ({args.warmup} of each length) so each endpoint has recent jobs "
            f"to learn from; not compared with the SDK")
        warm: list[Observed] = []
        collect(rt, ours, started + max(durations) * (1 + args.spread) + 240, warm, errors)
        cpu = meter.stop()
        phases.append(Phase("warm-up", warm, rest(cpu), cpu["wall"]))
        say(f"  warm-up done after {cpu['wall']:.0f} s; waiting {CACHE_SECONDS:.0f} s for the workers' cache of "
            "what was learned to expire, so the measured jobs see the whole warm-up")
        time.sleep(CACHE_SECONDS + 1)

        # 2. Measured: rpq and the SDK side by side.
        runpod.api_key = sim.api_key
        runpod.endpoint_url_base = sim.base_url  # before any Endpoint is built
        observed: list[Observed] = []
        meter.start()
        started = time.monotonic()
        threads = [threading.Thread(target=sdk_job, args=(endpoint_for(d, args), d, sleep, observed, errors),
                                    daemon=True) for d, sleep in measured]
        for thread in threads:
            thread.start()
        ours = rpq_jobs(rt, measured, args, "rpq")
        say(f"  measured: {len(threads)} SDK jobs and {len(ours)} rpq jobs started; the longest takes "
            f"{max(s for _, s in measured):.0f} s")
        deadline = started + max(s for _, s in measured) + 240
        collect(rt, ours, deadline, observed, errors)
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        cpu = meter.stop()
        phases.append(Phase("measured", observed, rest(cpu), cpu["wall"]))
        say(f"  measured jobs done after {cpu['wall']:.0f} s")
        at_runpod = {job["id"]: job for job in sim.jobs()}
    for message in errors:
        say(f"  ERROR: {message}")
    return phases, at_runpod


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def report(phases: list[Phase], at_runpod: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    durations = [int(d) for d in args.durations.split(",")]
    spread = f"run times {args.durations.replace(',', '/')} s x (1 +- {args.spread:g}) + [0, 1) s"
    say(f"\n{spread}; endpoints: {args.endpoints}; database: {args.database}")
    for phase in phases:
        say(f"{phase.name}: {phase.seconds:.0f} s, rest of machine {phase.rest_of_machine:.2f} cores")
    say("\n| job length | client | jobs | status calls per job: median / p95 / max | detection lag, s: "
        "p50 / p95 / max | run time at \"RunPod\", s: median (min-max) |")
    say("|---|---|---|---|---|---|")
    rows = [("rpq, warm-up (learning)", RPQ, phases[0].observed), ("rpq", RPQ, phases[1].observed),
            (SDK, SDK, phases[1].observed)]
    for duration in durations:
        for label, client, observed in rows:
            jobs = [o for o in observed if o.duration == duration and o.client == client]
            if not jobs:
                continue
            sim_jobs = [at_runpod[o.runpod_job_id] for o in jobs]
            lags = [o.detected_at - epoch(j["finished_at"]) for o, j in zip(jobs, sim_jobs, strict=True)]
            ran = [epoch(j["finished_at"]) - epoch(j["started_at"]) for j in sim_jobs]
            calls = [float(o.status_calls) for o in jobs]
            strong = "**" if label in (RPQ, SDK) else ""
            say(f"| {duration} s | {label} | {len(jobs)} | {strong}{statistics.median(calls):.0f}{strong} / "
                f"{percentile(calls, 95):.0f} / {max(calls):.0f} | {statistics.median(lags):.2f} / "
                f"{strong}{percentile(lags, 95):.2f}{strong} / {max(lags):.2f} | "
                f"{statistics.median(ran):.1f} ({min(ran):.1f}-{max(ran):.1f}) |")
    say("")
    looks = [o.first_look for o in phases[1].observed if o.client == RPQ and o.first_look is not None]
    if looks:
        # Planned half a second after /run answered: a late one means the worker (or the machine) was busy.
        say(f"measured, rpq: the poll that first saw a job running came {statistics.median(looks):.2f} s after "
            f"submission at the median, {percentile(looks, 95):.2f} s at p95, {max(looks):.2f} s at most")
    for client in (RPQ, SDK):
        jobs = [o for o in phases[1].observed if o.client == client]
        if jobs:
            lags = [o.detected_at - epoch(at_runpod[o.runpod_job_id]["finished_at"]) for o in jobs]
            say(f"measured, {client}: {sum(o.status_calls for o in jobs)} status calls for {len(jobs)} jobs, "
                f"mean lag {statistics.mean(lags):.2f} s")


def replay(args: argparse.Namespace) -> None:
    """The same measured jobs through `jobs.flow.pollplan` alone, with no worker, broker or machine in the way:
    each poll happens exactly when planned and takes `REPLAY_POLL_SECONDS`. What the plan itself does,
    to set beside what the pipeline did on a busy machine."""
    durations = [int(d) for d in args.durations.split(",")]
    rng = random.Random(args.seed)
    warmup = {d: sleeps(d, args.warmup, rng, args.spread) for d in durations}
    measured = {d: sleeps(d, args.per_duration, rng, args.spread) for d in durations}
    jitter = random.Random(args.seed)
    schedule, cap, submitted = PollSchedule(), max(LONG_WAIT_CAP_SECONDS, PollSchedule().cap), datetime.now(UTC)
    say("\nthe plan alone, replayed: the measured jobs' run times, the warm-up as history, polls exactly on time\n")
    say("| job length | jobs | status calls per job: median / p95 / max | detection lag, s: p50 / p95 / max |")
    say("|---|---|---|---|")
    for duration in durations:
        history = [s for d in durations for s in warmup[d] if args.endpoints == "shared" or d == duration]
        times = EndpointTimes.from_ms((round(s * 1000), round(REPLAY_DELAY_SECONDS * 1000))
                                      for s in history)
        calls, lags = [], []
        for sleep in measured[duration]:
            ends = REPLAY_DELAY_SECONDS + sleep  # seconds after submission
            seen = JobSeen(JobStatus.IN_QUEUE, submitted)
            at = REPLAY_POLL_SECONDS  # /run answered
            polls = 0
            while True:
                at += next_poll_delay(seen, times, schedule=schedule, now=submitted + timedelta(seconds=at),
                                      floor=schedule.base / 2, cap=cap, rand=jitter.random) + REPLAY_POLL_SECONDS
                polls += 1
                if at >= ends:
                    calls.append(float(polls))
                    lags.append(at - ends)
                    break
                started = seen.started_at or submitted + timedelta(seconds=at)
                seen = JobSeen(JobStatus.IN_PROGRESS, submitted, started, REPLAY_DELAY_SECONDS, polls,
                               0 if seen.status is JobStatus.IN_QUEUE else seen.polls_since_change + 1)
        say(f"| {duration} s | {len(calls)} | {statistics.median(calls):.0f} / {percentile(calls, 95):.0f} / "
            f"{max(calls):.0f} | {statistics.median(lags):.2f} / {percentile(lags, 95):.2f} / {max(lags):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--durations", default="2,20,120", help="job lengths in seconds (default 2,20,120)")
    parser.add_argument("--per-duration", type=int, default=20,
                        help="measured jobs of each length per client (default 20)")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up rpq jobs of each length (default 30)")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="run times vary uniformly by this fraction either way (default 0; 0.2 = +-20%%)")
    parser.add_argument("--endpoints", default="per-duration", choices=["per-duration", "shared"],
                        help="an endpoint per job length (default), or one for all")
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--seed", type=int, default=8, help="seed for the jobs' run times")
    parser.add_argument("--replay-only", action="store_true",
                        help="only replay the measured jobs through the plan (seconds, no services)")
    args = parser.parse_args()
    if not 0 <= args.spread < 1:
        parser.error("--spread must be in [0, 1)")
    if args.replay_only:
        replay(args)
        return
    stop_on_sigterm()
    say("machine:")
    print_machine()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rpq-bench-") as scratch:
        phases, at_runpod = measure(args, Path(scratch))
    report(phases, at_runpod, args)
    replay(args)
    say(f"\nwhole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
