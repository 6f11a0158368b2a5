"""Throughput: instant jobs through the whole pipeline against raw Celery no-op tasks, same broker and worker.

    .venv/bin/python bench/throughput.py                       # -P threads -c 16; SQLite and PostgreSQL
    .venv/bin/python bench/throughput.py --pools prefork:8 --repeats 1
    .venv/bin/python bench/throughput.py --modes live,backlog  # also what one worker drains from a backlog

Three targets, each with a worker of its own started with the same options (`--pools`) and a database
of its own on the same private redis-server (see harness.redis_server for why not the shared one):

* raw Celery: `bench.noop` tasks (bench/noop_app.py, built by `tasks.app.make_app`) through
  `celery -A bench.noop_app worker`; done when the queue and Redis's unacked hash are both empty.
* the pipeline on SQLite, and on PostgreSQL: `jobs.submit("bench", {"output": 1})` -> Redis ->
  `celery -A tasks worker` -> `/run` on the simulator over HTTP -> first poll 1 s later -> COMPLETED in
  the table; done when every row is COMPLETED, and the end is the newest `finished_at`.

Each round measures every target once, one after the other, so that a ratio compares figures taken
a minute apart on this shared, noisy machine; `--repeats` rounds. Modes:

* live (the default): the worker is consuming while this script produces; the clock starts before the
  first publish or `submit()`, so the producer's cost is inside the figure, as it is in production.
* backlog: the worker's consumer of `rpq.submit` is cancelled, every message is queued, the consumer is
  added back, and the clock starts when the first message leaves the queue: what one worker drains.

Each measurement also records the CPU time of every part (the worker, the simulator, Redis,
PostgreSQL, this script) per job, and of the rest of the machine (other tenants, the kernel), and the
Redis commands per job (INFO commandstats, less the LLEN/HLEN/INFO this script sends to watch; the
idle workers of the other targets add a few BRPOPs and event PUBLISHes a second).

The simulator runs with no cold start, 100 workers and RunPod's rate limits off (RunPod's real /run
limit is 1,000 requests per 10 s per endpoint, so 100 jobs/s per endpoint is the ceiling there).
Beat is not started: the reconciler has nothing to do when no message is lost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from harness import (
    ENDPOINT_ID,
    ENDPOINT_NAME,
    CpuMeter,
    Part,
    RedisServer,
    Simulator,
    Worker,
    celery_worker,
    database,
    median_spread,
    pipeline_env,
    postgres_backends,
    print_machine,
    process_group,
    redis_server,
    say,
    simulator,
    stop_on_sigterm,
    this_process,
)
from sqlalchemy import create_engine, text

from jobs import api
from jobs.runtime import SUBMIT_QUEUE, Runtime
from jobs.settings import Endpoint, Secret, Settings
from tasks.app import make_app

RUN_TIMEOUT = 300.0  # seconds one measurement may take before the script gives up
WATCHER_COMMANDS = {"llen", "hlen", "info"}  # what this script sends to watch the queue: not counted
OUR_PARTS = ["worker", "simulator", "redis-server", "postgres", "this script"]


@dataclass
class Target:
    """One thing to measure: a worker, the broker database it consumes, and how to run one measurement."""

    name: str  # "raw Celery no-op", "pipeline, sqlite", "pipeline, postgresql"
    app: Celery  # a client app on this target's broker database: publishing and control commands
    broker: redis.Redis
    worker: Worker
    meter: CpuMeter
    produce: Callable[[int], None]  # publish or submit n messages or jobs
    finished: Callable[[int], tuple[float, float] | None]  # (end wall time, status calls per job) once done
    prepare: Callable[[], None] = lambda: None  # before each measurement
    describe: Callable[[], str] = lambda: ""  # where things stand, for an error message


@dataclass
class Result:
    pool: str  # "-P threads -c 16"
    what: str
    mode: str  # "live" or "backlog"
    rates: list[float] = field(default_factory=list)  # per second, one per round
    cpu_ms: list[dict[str, float]] = field(default_factory=list)  # CPU ms per job by part, one per round
    background: list[float] = field(default_factory=list)  # cores used by the rest of the machine
    polls: list[float] = field(default_factory=list)  # mean status calls per job (pipeline only)
    redis_calls: list[dict[str, float]] = field(default_factory=list)  # Redis commands per job, by command


# -- one measurement ----------------------------------------------------------------------------------------


def measure_once(target: Target, mode: str, n: int, result: Result) -> None:
    target.prepare()
    calls_before = redis_calls(target.broker)
    target.meter.start()
    started = start_clock(target, mode, n)
    deadline = time.monotonic() + RUN_TIMEOUT
    while (done := target.finished(n)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target.name}: not done after {RUN_TIMEOUT:.0f}s ({target.describe()})")
        time.sleep(0.005)
    cpu = target.meter.stop()
    calls = redis_calls(target.broker)
    result.redis_calls.append({name: (count - calls_before.get(name, 0)) / n for name, count in calls.items()
                               if name not in WATCHER_COMMANDS and count > calls_before.get(name, 0)})
    ended, polls = done
    result.rates.append(n / (ended - started))
    ours = {part: cpu[part] for part in OUR_PARTS}
    result.cpu_ms.append({part: seconds * 1000 / n for part, seconds in ours.items()})
    result.background.append(max(0.0, cpu["whole machine"] - sum(ours.values())) / cpu["wall"])
    if target.name.startswith("pipeline"):
        result.polls.append(polls)


def start_clock(target: Target, mode: str, n: int) -> float:
    """Produce every message and return the wall time the measurement starts at (see the module doc)."""
    if mode == "live":
        started = time.time()
        target.produce(n)
        return started
    node = target.worker.node
    target.app.control.cancel_consumer(SUBMIT_QUEUE, destination=[node], reply=True, timeout=5)
    target.produce(n)
    if not target.app.control.add_consumer(SUBMIT_QUEUE, destination=[node], reply=True, timeout=5):
        raise RuntimeError(f"worker {node} did not confirm add_consumer")
    # The worker picks the queue up at its next BRPOP, up to a second later: start the clock when the
    # first message leaves the queue, not when the consumer was added.
    deadline = time.monotonic() + 10
    while target.broker.llen(SUBMIT_QUEUE) >= n:
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not start consuming rpq.submit again")
        time.sleep(0.001)
    return time.time()


# -- the targets ----------------------------------------------------------------------------------------------


def raw_target(stack: ExitStack, pool: str, concurrency: int, sim: Simulator, server: RedisServer, scratch: Path
               ) -> Target:
    broker_url = server.database()
    app, broker = client(stack, broker_url)
    env = {**os.environ, "CELERY_BROKER_URL": broker_url}
    worker = stack.enter_context(celery_worker(f"noop-{pool}", "bench.noop_app", env, scratch, pool, concurrency))

    def produce(n: int) -> None:
        for _ in range(n):
            app.send_task("bench.noop")

    def drained() -> bool:
        """No message waiting in rpq.submit and none delivered but unacknowledged (acks_late)."""
        return broker.llen(SUBMIT_QUEUE) == 0 and broker.hlen("unacked") == 0

    def finished(n: int) -> tuple[float, float] | None:
        # Seen drained twice 10 ms apart: the second look covers the instant between a worker's BRPOP
        # and its write to the unacked hash.
        if not drained():
            return None
        seen = time.time()
        time.sleep(0.01)
        return (seen, 0.0) if drained() else None

    return Target("raw Celery no-op", app, broker, worker, meter(worker, sim, server), produce, finished)


def pipeline_target(stack: ExitStack, kind: str, pool: str, concurrency: int, sim: Simulator, server: RedisServer,
                    scratch: Path) -> Target:
    broker_url = server.database()
    app, broker = client(stack, broker_url)
    url = stack.enter_context(database(kind, scratch))
    settings = Settings(runpod_api_key=Secret(sim.api_key), runpod_serverless_url=sim.base_url, database_url=url,
                        celery_broker_url=broker_url, endpoints={ENDPOINT_NAME: Endpoint(ENDPOINT_NAME, ENDPOINT_ID)})
    rt = Runtime.from_settings(settings, publish=lambda task, ident, countdown: app.send_task(
        task, args=[ident], countdown=countdown))
    stack.callback(rt.close)
    # The observer reads the table with a plain engine: rpq's SQLite engine opens every transaction
    # with BEGIN IMMEDIATE, and the watcher must not take the write lock.
    observer = create_engine(url)
    stack.callback(observer.dispose)
    env = pipeline_env(database_url=url, broker=broker_url, sim=sim)
    worker = stack.enter_context(celery_worker(f"rpq-{pool}-{kind}", "tasks", env, scratch, pool, concurrency))
    last_look = [0.0]

    def prepare() -> None:
        """Every measurement starts from an empty job table and a simulator that forgot every job."""
        with observer.begin() as conn:
            conn.execute(text("DELETE FROM job_events"))
            conn.execute(text("DELETE FROM jobs"))
        sim.reset()

    def produce(n: int) -> None:
        for _ in range(n):
            api.submit(ENDPOINT_NAME, {"output": 1}, runtime=rt)

    def finished(n: int) -> tuple[float, float] | None:
        if time.monotonic() - last_look[0] < 0.1:  # a COUNT every 100 ms is plenty
            return None
        last_look[0] = time.monotonic()
        with observer.connect() as conn:
            result = conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status"))
            counts: dict[str, int] = {row[0]: row[1] for row in result}
            if counts.get("COMPLETED", 0) < n:
                if set(counts) - {"PENDING", "SUBMITTING", "IN_QUEUE", "IN_PROGRESS", "COMPLETED"}:
                    raise RuntimeError(f"pipeline jobs ended badly: {counts}")
                return None
            last, polls = conn.execute(text("SELECT max(finished_at), avg(poll_count) FROM jobs")).one()
        return as_epoch(last), float(polls)

    def describe() -> str:
        with observer.connect() as conn:
            return str(dict(conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all()))

    postgres = postgres_backends(url) if kind == "postgresql" else None
    return Target(f"pipeline, {kind}", app, broker, worker, meter(worker, sim, server, postgres), produce, finished,
                  prepare, describe)


def client(stack: ExitStack, broker_url: str) -> tuple[Celery, redis.Redis]:
    app = make_app(Settings(celery_broker_url=broker_url))
    stack.callback(app.close)
    broker = redis.Redis.from_url(broker_url)
    stack.callback(broker.close)
    return app, broker


def meter(worker: Worker, sim: Simulator, server: RedisServer, postgres: Part | None = None) -> CpuMeter:
    return CpuMeter({
        "worker": process_group(worker.pid),
        "simulator": process_group(sim.pid),
        "redis-server": process_group(server.pid),
        "postgres": postgres or (lambda procs: set()),
        "this script": this_process(),
    })


def redis_calls(broker: redis.Redis) -> dict[str, int]:
    """Commands the redis-server has run since it started, by name (INFO commandstats; server-wide)."""
    stats: dict[str, dict[str, Any]] = broker.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def as_epoch(value: Any) -> float:
    """A timestamp column as epoch seconds: a datetime from PostgreSQL, naive UTC text from SQLite."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


# -- the whole run ------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, scratch: Path) -> list[Result]:
    results: list[Result] = []
    with ExitStack() as stack:
        server = stack.enter_context(redis_server(scratch))
        sim = stack.enter_context(simulator(
            scratch, "--cold-start-seconds", "0", "--workers-max", "100", "--no-rate-limits"))
        say(f"redis-server on port {server.port}, simulator {sim.base_url}, logs in {scratch}")
        for pool_spec in args.pools.split(","):
            pool, concurrency = pool_spec.split(":")
            label = f"-P {pool} -c {concurrency}"
            with ExitStack() as workers:
                targets = [raw_target(workers, pool, int(concurrency), sim, server, scratch)]
                targets += [pipeline_target(workers, kind, pool, int(concurrency), sim, server, scratch)
                            for kind in args.databases.split(",")]
                mine = {(t.name, mode): Result(label, t.name, mode) for t in targets for mode in args.modes.split(",")}
                for round_number in range(1, args.repeats + 1):
                    for target in targets:
                        for mode in args.modes.split(","):
                            result = mine[target.name, mode]
                            measure_once(target, mode, args.jobs, result)
                            say(f"  round {round_number}, {label}, {target.name}, {mode}: "
                                f"{result.rates[-1]:.1f}/s, rest of machine {result.background[-1]:.2f} cores")
                results += mine.values()
    return results


def report(results: list[Result], args: argparse.Namespace) -> None:
    say(f"\n{args.jobs} jobs (tasks) per measurement, {args.repeats} round(s): median (min-max)\n")
    say("| worker | what | mode | per second | pipeline / raw, per round | status calls per job "
        "| rest of machine, cores |")
    say("|---|---|---|---|---|---|---|")
    raw = {(r.pool, r.mode): r.rates for r in results if r.what.startswith("raw")}
    for r in results:
        base = raw.get((r.pool, r.mode))
        ratio = "" if r.what.startswith("raw") or not base else median_spread(
            [p / b for p, b in zip(r.rates, base, strict=True)], "{:.3f}")
        polls = f"{statistics.mean(r.polls):.2f}" if r.polls else ""
        say(f"| `{r.pool}` | {r.what} | {r.mode} | {median_spread(r.rates)} | {ratio} | {polls} "
            f"| {median_spread(r.background, '{:.2f}')} |")

    say("\nCPU milliseconds per job (task), by part: median over the rounds\n")
    say("| worker | what | mode | " + " | ".join(OUR_PARTS) + " | sum |")
    say("|---|---|---|" + "---|" * (len(OUR_PARTS) + 1))
    for r in results:
        cells = [statistics.median(c[part] for c in r.cpu_ms) for part in OUR_PARTS]
        say(f"| `{r.pool}` | {r.what} | {r.mode} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells):.1f} |")

    say("\nRedis commands per job (task): median over the rounds; the commands at 0.5 per job or more\n")
    say("| worker | what | mode | all commands | the main ones |")
    say("|---|---|---|---|---|")
    for r in results:
        names = sorted({name for calls in r.redis_calls for name in calls})
        per_job = {name: statistics.median(calls.get(name, 0.0) for calls in r.redis_calls) for name in names}
        main_ones = ", ".join(f"{name} {count:.1f}" for name, count in sorted(per_job.items(), key=lambda kv: -kv[1])
                              if count >= 0.5)
        total = statistics.median(sum(calls.values()) for calls in r.redis_calls)
        say(f"| `{r.pool}` | {r.what} | {r.mode} | {total:.1f} | {main_ones} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs (tasks) per measurement (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--pools", default="threads:16", help="POOL:CONCURRENCY,... (default threads:16)")
    parser.add_argument("--databases", default="sqlite,postgresql", help="(default sqlite,postgresql)")
    parser.add_argument("--modes", default="live", help="live and/or backlog (default live)")
    args = parser.parse_args()
    stop_on_sigterm()
    say("machine:")
    print_machine()
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="rpq-bench-"))
    results = measure(args, scratch)  # on an error the logs stay in `scratch` to read
    shutil.rmtree(scratch)
    report(results, args)
    say(f"\nwhole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
