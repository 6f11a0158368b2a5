"""Webhooks against polling, and the HTTP API under load (issue 5, section 6).

    .venv/bin/python bench/webhooks_and_api.py                    # the whole run, about 5 minutes
    .venv/bin/python bench/webhooks_and_api.py --parts webhooks --durations 2 --per-duration 3
    .venv/bin/python bench/webhooks_and_api.py --parts api --workers 1,2

Needs redis-server and wrk (`apt-get install -y redis-server wrk`) and, for the PostgreSQL figures,
a server at RPQ_BENCH_POSTGRES (a scratch database is made and dropped). Everything listens on
127.0.0.1. Before each part it waits (at most --quiet-timeout s) for the 1-minute load average to
fall below --max-load: the machine is shared.

Part 1, webhooks: two pipelines side by side on one simulator (no cold start, 100 workers,
`--webhook-interval-seconds 1`), each with its own database, Redis database, `celery -A tasks worker
-P threads -c 16` and beat:

* webhook mode: the worker and an `rpq api` both have RUNPOD_WEBHOOK_BASE_URL pointing at that API,
  so the simulator calls `/v1/webhooks/runpod/{token}` on it when a job ends;
* polling mode: no RUNPOD_WEBHOOK_BASE_URL.

Both get the same jobs at the same moment: `jobs.submit("bench", {"sleep": N + u, "output": ...})`,
N in --durations, u uniform in [0, 1) (seeded, the same u for the i-th job of both modes, so the
1-s polls cannot phase-lock with whole-second jobs). Status calls = the row's `poll_count`; lag = the
row's `finished_at` minus the simulator's `finished_at` for that RunPod job (`GET /_sim/jobs`); the
webhook's delivery time comes from `GET /_sim/webhooks`.

Part 2, the API: one `rpq api --workers W` per database (SQLite and PostgreSQL) and per W in
--workers, no Celery worker (the jobs stay PENDING: this measures the API, not the pipeline). wrk,
one thread and `-c N` keep-alive connections for --seconds, sends `POST /v1/jobs` with a bearer
token, or `GET /v1/jobs/{id}` of one job. Each round runs every (database, workers, route,
connections) once, so the ratios compare figures taken minutes apart at most; --repeats rounds. The
CPU the API's processes, wrk and the rest of the machine used meanwhile is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from harness import (
    ENDPOINT_NAME,
    CpuMeter,
    RedisServer,
    Simulator,
    celery_worker,
    child,
    database,
    free_port,
    log_tail,
    median_spread,
    pipeline_env,
    postgres_backends,
    print_machine,
    process_group,
    redis_server,
    say,
    simulator,
    stop_on_sigterm,
    wait_for_quiet_machine,
    wait_until,
)

from jobs import api
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.web.auth import new_token

MODES = ("webhook", "polling")
SUBMIT_BODY = {"endpoint": ENDPOINT_NAME, "input": {"prompt": "a cat in a hat", "n": 1}}


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()



@dataclass
class ApiServer:
    url: str
    pid: int


@contextmanager
def rpq_api(name: str, env: dict[str, str], log_dir: Path, port: int, *, workers: int = 1) -> Iterator[ApiServer]:
    """`rpq api --workers W` as a child process on 127.0.0.1:`port`, once /healthz answers."""
    command = [sys.executable, "-m", "jobs.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    if workers != 1:
        command += ["--workers", str(workers)]
    with child(name, command, log_dir, env=env) as process:
        server = ApiServer(url=f"http://127.0.0.1:{port}", pid=process.pid)

        def ready() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited at start:\n{log_tail(log_dir, name)}")
            return httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200

        wait_until(ready, timeout=60, what=name)
        yield server


# -- part 1: webhooks against polling ----------------------------------------------------------------------


@dataclass
class Observed:
    mode: str  # "webhook" or "polling"
    duration: int  # the job's whole seconds of sleep
    runpod_job_id: str
    status_calls: int  # the row's poll_count
    finished_at: float  # epoch seconds: when the row became COMPLETED


def webhooks_part(args: argparse.Namespace, server: RedisServer, sim: Simulator, token_line: str, scratch: Path
                  ) -> tuple[list[Observed], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    durations = [int(d) for d in args.durations.split(",")]
    rng = random.Random(args.seed)
    plan = [(d, d + rng.random()) for d in durations for _ in range(args.per_duration)]  # (length, sleep)
    observed: list[Observed] = []
    runtimes: dict[str, Runtime] = {}
    with ExitStack() as stack:
        api_port = free_port()
        for mode in MODES:
            url = stack.enter_context(database(args.database, scratch))
            env = pipeline_env(database_url=url, broker=server.database(), sim=sim)
            env.pop("RUNPOD_WEBHOOK_BASE_URL", None)
            if mode == "webhook":
                env["RUNPOD_WEBHOOK_BASE_URL"] = f"http://127.0.0.1:{api_port}"
                env["RPQ_API_TOKENS"] = token_line
                stack.enter_context(rpq_api("api-webhooks", env, scratch, api_port))
            stack.enter_context(celery_worker(f"worker-{mode}", "tasks", env, scratch, "threads", 16))
            stack.enter_context(child(f"beat-{mode}", [sys.executable, "-m", "celery", "-A", "tasks", "beat",
                                                       "--loglevel", "WARNING", "-s", str(scratch / f"beat-{mode}")],
                                      scratch, env=env))
            runtimes[mode] = Runtime.from_settings(Settings.from_env(env))
            stack.callback(runtimes[mode].close)

        wait_for_quiet_machine(args.max_load, args.quiet_timeout)
        started = time.monotonic()
        submitted = []  # (mode, length, job id)
        for i, (duration, sleep) in enumerate(plan):
            for mode in MODES if i % 2 else reversed(MODES):  # alternate which mode goes first
                job = api.submit(ENDPOINT_NAME, {"sleep": sleep, "output": {"mode": mode, "sleep": sleep}},
                                 runtime=runtimes[mode])
                submitted.append((mode, duration, job.id))
        say(f"  {len(plan)} jobs per mode submitted; the longest takes {max(durations)} s")

        deadline = started + max(durations) + 180
        for mode, duration, job_id in submitted:
            job = api.wait(job_id, timeout=max(1.0, deadline - time.monotonic()), runtime=runtimes[mode])
            if job.status != "COMPLETED" or job.finished_at is None or job.runpod_job_id is None:
                say(f"  ERROR: {mode} job {job_id} of {duration} s ended {job.status}: {job.error}")
                continue
            observed.append(Observed(mode, duration, job.runpod_job_id, job.poll_count, job.finished_at.timestamp()))
        say(f"  all done after {time.monotonic() - started:.0f} s")
        at_runpod = {job["id"]: job for job in sim.jobs()}
        response = httpx.get(f"{sim.root_url}/_sim/webhooks", timeout=30)
        response.raise_for_status()
        webhooks = list(response.json()["webhooks"])
    return observed, at_runpod, webhooks


def report_webhooks(observed: list[Observed], at_runpod: dict[str, dict[str, Any]],
                    webhooks: list[dict[str, Any]], args: argparse.Namespace) -> None:
    delivered = {w["job_id"]: epoch(w["at"]) for w in webhooks if w["delivered"]}
    failed = [w for w in webhooks if not w["delivered"]]
    say(f"\n{args.per_duration} jobs of each length per mode, all at once, {args.database}; median (min-max)\n")
    say("| job length | mode | jobs | status calls per job | detection lag, s | webhook answered after, s |")
    say("|---|---|---|---|---|---|")
    for duration in [int(d) for d in args.durations.split(",")]:
        for mode in MODES:
            rows = [o for o in observed if o.mode == mode and o.duration == duration]
            if not rows:
                continue
            ended = [epoch(at_runpod[o.runpod_job_id]["finished_at"]) for o in rows]
            lags = [o.finished_at - end for o, end in zip(rows, ended, strict=True)]
            calls = [float(o.status_calls) for o in rows]
            hooks = [delivered[o.runpod_job_id] - end for o, end in zip(rows, ended, strict=True)
                     if o.runpod_job_id in delivered]
            hook_cell = median_spread(hooks, "{:.3f}") if hooks else "-"
            say(f"| {duration}-{duration + 1} s | {mode} | {len(rows)} | {median_spread(calls)} | "
                f"{median_spread(lags, '{:.2f}')} | {hook_cell} |")
    say(f"\nwebhook attempts: {len(webhooks)}, of which not delivered (not HTTP 200): {len(failed)}")
    for mode in MODES:
        rows = [o for o in observed if o.mode == mode]
        if rows:
            say(f"{mode}: {sum(o.status_calls for o in rows)} status calls for {len(rows)} jobs")


# -- part 2: the HTTP API under load ---------------------------------------------------------------------

WRK_SCRIPT = """\
-- written by bench/webhooks_and_api.py
wrk.method = "{method}"
{body}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {{"requests": %.0f, "duration_us": %.0f, "p50_us": %.0f, "p99_us": %.0f, '
    .. '"errors": %.0f, "non_2xx": %.0f}}\\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass
class Target:
    kind: str  # "sqlite" or "postgresql"
    workers: int  # `rpq api --workers`
    api: ApiServer
    job_id: str  # what GET /v1/jobs/{id} reads
    meter: CpuMeter


def wrk(target: Target, route: str, connections: int, seconds: float, token: str, scratch: Path
        ) -> tuple[dict[str, float], float]:
    """One wrk run of `route` ("POST" or "GET") against `target`; (wrk's summary, wrk's CPU seconds)."""
    script = scratch / f"wrk-{route}.lua"
    if not script.exists():
        body = (f'wrk.body = [[{json.dumps(SUBMIT_BODY)}]]\nwrk.headers["Content-Type"] = "application/json"'
                if route == "POST" else "")
        script.write_text(WRK_SCRIPT.format(method=route, body=body))
    url = f"{target.api.url}/v1/jobs" + (f"/{target.job_id}" if route == "GET" else "")
    command = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:.0f}s", "--timeout", "10s",
               "-s", str(script), "-H", f"Authorization: Bearer {token}", url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return json.loads(line.removeprefix("RESULT ")), cpu


Key = tuple[str, int, str, int]  # database, API workers, route, connections


def api_part(args: argparse.Namespace, server: RedisServer, sim: Simulator, token: str, token_line: str,
             scratch: Path) -> dict[Key, dict[str, list[float]]]:
    """Every (database, workers, route, connections) once per round; figures keyed by that."""
    figures: dict[Key, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    connections = [int(c) for c in args.connections.split(",")]
    with ExitStack() as stack:
        targets = []
        for kind in args.databases.split(","):
            for workers in [int(w) for w in args.workers.split(",")]:
                # Each API its own job table and Redis database: one's backlog never slows another.
                url = stack.enter_context(database(kind, scratch))
                env = {**pipeline_env(database_url=url, broker=server.database(), sim=sim),
                       "RPQ_API_TOKENS": token_line}
                env.pop("RUNPOD_WEBHOOK_BASE_URL", None)
                served = stack.enter_context(rpq_api(f"api-{kind}-{workers}", env, scratch, free_port(),
                                                     workers=workers))
                response = httpx.post(f"{served.url}/v1/jobs", json=SUBMIT_BODY, timeout=30,
                                      headers={"Authorization": f"Bearer {token}"})
                response.raise_for_status()
                meter = CpuMeter({"api": process_group(served.pid), "redis-server": process_group(server.pid)})
                if kind == "postgresql":
                    meter.parts["postgres"] = postgres_backends(url)
                targets.append(Target(kind, workers, served, response.json()["id"], meter))
        for target in targets:  # warm-up, not timed: imports, connection pools, the first pages of the table
            for route in ("POST", "GET"):
                wrk(target, route, max(connections), 2, token, scratch)

        wait_for_quiet_machine(args.max_load, args.quiet_timeout)
        for round_ in range(1, args.repeats + 1):
            for target in targets:
                for route in ("POST", "GET"):
                    for n in connections:
                        target.meter.start()
                        result, wrk_cpu = wrk(target, route, n, args.seconds, token, scratch)
                        cpu = target.meter.stop()
                        wall, requests = cpu["wall"], result["requests"]
                        ours = sum(cpu[part] for part in target.meter.parts) + wrk_cpu
                        cell = figures[(target.kind, target.workers, route, n)]
                        cell["req/s"].append(requests / (result["duration_us"] / 1e6))
                        cell["p50"].append(result["p50_us"] / 1000)
                        cell["p99"].append(result["p99_us"] / 1000)
                        cell["errors"].append(result["errors"] + result["non_2xx"])
                        cell["api cpu ms"].append(cpu["api"] * 1000 / max(requests, 1))
                        cell["wrk cores"].append(wrk_cpu / wall)
                        cell["rest"].append(max(0.0, cpu["whole machine"] - ours) / wall)
            say(f"  round {round_} of {args.repeats} done")
    return figures


def report_api(figures: dict[Key, dict[str, list[float]]], args: argparse.Namespace) -> None:
    say(f"\nwrk, 1 thread, {args.seconds:.0f} s per run, {args.repeats} rounds; median of the rounds (min-max)\n")
    say("| route | database | API workers | connections | requests/s | p50, ms | p99, ms | failed requests | "
        "API CPU per request, ms | wrk, cores | rest of machine, cores |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    for (kind, workers, route, n), cell in sorted(figures.items(), key=lambda item: (item[0][2] != "POST", item[0])):
        path = "POST /v1/jobs" if route == "POST" else "GET /v1/jobs/{id}"
        say(f"| {path} | {kind} | {workers} | {n} | {median_spread(cell['req/s'])} | "
            f"{median_spread(cell['p50'], '{:.1f}')} | "
            f"{median_spread(cell['p99'], '{:.1f}')} | {sum(cell['errors']):.0f} | "
            f"{median_spread(cell['api cpu ms'], '{:.2f}')} | {median_spread(cell['wrk cores'], '{:.2f}')} | "
            f"{median_spread(cell['rest'], '{:.2f}')} |")

    def ratio(a: Key, b: Key) -> str:
        """requests/s of `a` over `b`, round by round: both were measured in the same round."""
        pairs = zip(figures[a]["req/s"], figures[b]["req/s"], strict=True)
        return median_spread([x / y for x, y in pairs], "{:.2f}")

    say("\nratios of requests/s, taken round by round: median (min-max)")
    kinds = args.databases.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    for n in [int(c) for c in args.connections.split(",")]:
        for w in workers:
            setting = f"{w} worker(s), {n} connections"
            if "sqlite" in kinds and "postgresql" in kinds:
                for route in ("POST", "GET"):
                    say(f"  {route}, {setting}, PostgreSQL / SQLite: "
                        f"{ratio(('postgresql', w, route, n), ('sqlite', w, route, n))}")
            for kind in kinds:
                say(f"  {kind}, {setting}, GET / POST: {ratio((kind, w, 'GET', n), (kind, w, 'POST', n))}")
                if w != workers[0]:
                    for route in ("POST", "GET"):
                        more = ratio((kind, w, route, n), (kind, workers[0], route, n))
                        say(f"  {kind}, {route}, {n} connections, {w} workers / {workers[0]}: {more}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="webhooks,api", help="which parts to run (default webhooks,api)")
    parser.add_argument("--durations", default="2,60", help="part 1: job lengths in seconds (default 2,60)")
    parser.add_argument("--per-duration", type=int, default=8, help="part 1: jobs of each length per mode (8)")
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgresql"], help="part 1 (sqlite)")
    parser.add_argument("--seed", type=int, default=5, help="part 1: seed of the jobs' fractional seconds")
    parser.add_argument("--databases", default="sqlite,postgresql", help="part 2 (default sqlite,postgresql)")
    parser.add_argument("--connections", default="1,16", help="part 2: wrk connections (default 1,16)")
    parser.add_argument("--seconds", type=float, default=8, help="part 2: seconds per wrk run (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="part 2: rounds (default 3)")
    parser.add_argument("--workers", default="1", help="part 2: `rpq api --workers` values, e.g. 1,2 (default 1)")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-minute load below this (1.5)")
    parser.add_argument("--quiet-timeout", type=float, default=600, help="...for at most this many seconds (600)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "api" in parts and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    stop_on_sigterm()
    say("machine:")
    print_machine()
    started = time.monotonic()
    token, token_line = new_token()
    with tempfile.TemporaryDirectory(prefix="rpq-bench-") as tmp, ExitStack() as stack:
        scratch = Path(tmp)
        server = stack.enter_context(redis_server(scratch))
        sim = stack.enter_context(simulator(scratch, "--cold-start-seconds", "0", "--workers-max", "100",
                                            "--webhook-interval-seconds", "1"))
        if "webhooks" in parts:
            say("\npart 1: webhooks against polling")
            observed, at_runpod, webhooks = webhooks_part(args, server, sim, token_line, scratch)
            report_webhooks(observed, at_runpod, webhooks, args)
        if "api" in parts:
            say("\npart 2: the HTTP API under load (no worker)")
            report_api(api_part(args, server, sim, token, token_line, scratch), args)
    say(f"\nwhole run: {time.monotonic() - started:.0f} s; load average at the end: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
