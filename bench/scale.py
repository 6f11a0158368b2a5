"""10,000 jobs in flight on one endpoint (issue 9): correctness, RunPod's rate limits, memory, starvation.

    .venv/bin/python bench/scale.py                   # 10,000 jobs of 240 s, polling only: about 20 minutes
    .venv/bin/python bench/scale.py --quick           # 300 jobs of 10 s: a fast look
    .venv/bin/python bench/scale.py --webhooks both   # the same run twice: polling only, then with webhooks

Needs redis-server and PostgreSQL at RPQ_BENCH_POSTGRES (a scratch database is made and dropped per run).
Everything listens on 127.0.0.1 and is started here as a child process, stopped at the end.

What runs is the deployment in DEPLOYMENT below: the README's "Running it" commands, word for word, so
the default deployment is what is measured (the script says so when the README has moved on). `--worker`
(repeatable), `--beat` and `--api` replace them. Each child runs in a scratch directory with the checkout
on PYTHONPATH; a worker gets `-n` (to be pinged) and the API a free `--port`, nothing else is added. The
API runs only with webhooks on: it is where RunPod's webhooks arrive.

The simulator plays RunPod with its real rate limits (its defaults: /run 1,000 per 10 s and 200 at once,
/status 2,000 per 10 s and 400 at once, per endpoint), no cold start, a worker for every job, and
`--no-dynamic-rate-limits`: RunPod raises a limit to running workers x 50 per 10 s, which 10,000 running
workers would lift to 500,000, so the base limits are made to hold.

The jobs: `jobs.submit` from --submit-threads threads (a web app's request handlers), as fast as they go,
spread round-robin over --endpoints endpoints. Job i sleeps --duration + u seconds (u uniform in [0, 1),
seeded, so polls cannot phase-lock with whole seconds) and outputs {"marker": "<run>-<i>"}, which is
also in its input: "its own output" and "reached RunPod once" are checked by that marker, against the
table and against the simulator's record of every job it was sent (`GET /_sim/jobs`). Probe jobs (1 s)
go to the first endpoint every --probe-every seconds while the main jobs are in flight: how long a
new job waits to reach RunPod behind the crowd.

Sampled every --sample-every seconds: the RSS of the worker processes and their children (summed, from
/proc), the Redis queues (messages ready, and the `unacked` hash: fetched by a worker and not yet acked,
countdown polls among them), and rows by status. Read from the simulator at the end: requests per
endpoint and operation with their status codes and the busiest 10 s (`GET /_sim/stats`), and per RunPod
job when it was created, first polled and finished.

Figures: submitted = the row's created_at; reached RunPod = the simulator's created_at; detection lag =
the row's finished_at minus the simulator's finished_at; first-poll overdue = the first /status that
found the job minus (created at RunPod + the first poll delay rpq plans); calls per job = requests the
simulator received (429s included) over jobs.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from harness import (
    ENDPOINT_ID,
    ENDPOINT_NAME,
    ROOT,
    CpuMeter,
    Part,
    RedisServer,
    Simulator,
    child,
    database,
    free_port,
    log_tail,
    percentile,
    pipeline_env,
    postgres_backends,
    print_machine,
    process_group,
    processes,
    redis_server,
    say,
    simulator,
    stop_on_sigterm,
    this_process,
    wait_for_quiet_machine,
    wait_until,
)
from sqlalchemy import text

from jobs import api
from jobs.runtime import QUEUES, Runtime
from jobs.settings import Settings
from jobs.web.auth import new_token
from tasks.app import make_app

#: The deployment measured by default: the README's "Running it" commands, word for word. Update them
#: here when the README changes (the script warns when the two differ). Several workers: several lines.
DEPLOYMENT: dict[str, list[str]] = {
    "worker": ["celery -A tasks worker -P threads -c 16"],
    "beat": ["celery -A tasks beat"],
    "api": ["rpq api --port 8080"],
}

#: Issue 9's targets.
MAX_STATUS_PER_10S = 1500
MAX_WORKER_RSS_MB = 300
MAX_REACH_RUNPOD_S = 180.0
MAX_P95_LAG_POLLING_S = 60.0
MAX_P95_LAG_WEBHOOKS_S = 2.0
MAX_P95_PROBE_S = 2.0

PROBE_SLEEP_S = 1.0
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT", "EXPIRED"}


# -- the deployment -----------------------------------------------------------------------------------------


def readme_deployment() -> dict[str, list[str]]:
    """The worker, beat and api lines of the README's "Running it" block, comments dropped."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Running it\s*\n+```bash\n(.*?)^```", readme, re.S | re.M)
    found: dict[str, list[str]] = {"worker": [], "beat": [], "api": []}
    for line in (block.group(1).splitlines() if block else []):
        command = line.split("#", 1)[0].strip()
        if command.startswith("celery -A tasks worker"):
            found["worker"].append(command)
        elif command.startswith("celery -A tasks beat"):
            found["beat"].append(command)
        elif command.startswith("rpq api"):
            found["api"].append(command)
    return found


def as_child_command(line: str) -> list[str]:
    """A README command as this checkout's interpreter runs it (`celery` and `rpq` are console scripts)."""
    words = shlex.split(line)
    if words[0] == "celery":
        return [sys.executable, "-m", "celery", *words[1:]]
    if words[0] == "rpq":
        return [sys.executable, "-m", "jobs.cli", *words[1:]]
    return words


def with_option(words: list[str], names: tuple[str, ...], value: str) -> list[str]:
    """`words` with the option `names[0]` set to `value` (replacing any of `names` already there)."""
    out: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
            continue
        if word in names:
            skip = True
            continue
        if any(word.startswith(name + "=") for name in names):
            continue
        out.append(word)
    return [*out, names[0], value]


@dataclass
class Deployment:
    workers: list[int] = field(default_factory=list)  # process group ids (each child leads its own)
    others: dict[str, int] = field(default_factory=dict)  # "beat", "api": process group ids
    api_url: str | None = None


def deploy(stack: ExitStack, commands: dict[str, list[str]], env: dict[str, str], scratch: Path,
           webhooks: bool, api_port: int) -> Deployment:
    """Start the deployment's processes (in a directory of their own, stopped with `stack`) and wait
    until each answers."""
    run_dir = scratch / f"run-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir()
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    deployment = Deployment()
    control = make_app(Settings(celery_broker_url=env["CELERY_BROKER_URL"]))
    stack.callback(control.close)
    if webhooks:
        for i, line in enumerate(commands["api"]):
            words = with_option(as_child_command(line), ("--port",), str(api_port if i == 0 else free_port()))
            process = stack.enter_context(child(f"api{i}", words, scratch, env=env, cwd=run_dir))
            deployment.others[f"api{i}"] = process.pid
        deployment.api_url = f"http://127.0.0.1:{api_port}"

        def api_answers() -> bool:
            return httpx.get(f"{deployment.api_url}/healthz", timeout=1).status_code == 200

        wait_until(api_answers, timeout=60, what="rpq api")
    nodes = []
    for i, line in enumerate(commands["worker"]):
        node = f"worker{i}-{uuid.uuid4().hex[:6]}@bench"
        words = with_option(as_child_command(line), ("-n", "--hostname"), node)
        process = stack.enter_context(child(f"worker{i}", words, scratch, env=env, cwd=run_dir))
        deployment.workers.append(process.pid)
        nodes.append((node, process, f"worker{i}"))
    for node, process, name in nodes:
        def answers(node: str = node, process: Any = process, name: str = name) -> bool:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited at start:\n{log_tail(scratch, name)}")
            return bool(control.control.ping(destination=[node], timeout=0.5))

        wait_until(answers, timeout=90, interval=0.2, what=f"{node} to answer ping")
    for i, line in enumerate(commands["beat"]):
        process = stack.enter_context(child(f"beat{i}", as_child_command(line), scratch, env=env, cwd=run_dir))
        deployment.others[f"beat{i}"] = process.pid
    return deployment


# -- sampling -----------------------------------------------------------------------------------------------


def rss_mb(pgrps: set[int]) -> float:
    """Resident memory of every process in these process groups, summed, in MB."""
    total_kb = 0
    for pid, proc in processes().items():
        if proc.pgrp not in pgrps:
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total_kb / 1024


@dataclass
class Sample:
    at: float  # seconds since the run started
    rss_mb: float
    queues: dict[str, int]  # ready messages per queue, and "unacked" (held by workers)
    rows: dict[str, int]  # rows by status


class Sampler:
    def __init__(self, every: float, workers: set[int], broker: redis.Redis, rt: Runtime, started: float) -> None:
        self.every, self.workers, self.broker, self.rt, self.started = every, workers, broker, rt, started
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def take(self) -> Sample:
        queues = {name: int(self.broker.llen(name)) for name in QUEUES}
        queues["unacked"] = int(self.broker.hlen("unacked"))
        sample = Sample(time.time() - self.started, rss_mb(self.workers), queues, rows_by_status(self.rt))
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.take()
            except Exception as exc:  # a sample missed is reported, never the end of the run
                say(f"  sample failed: {exc}")


def rows_by_status(rt: Runtime) -> dict[str, int]:
    with rt.engine.connect() as conn:
        result = conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status"))
        return {str(status): int(n) for status, n in result}


# -- one run --------------------------------------------------------------------------------------------------


@dataclass
class Submitted:
    marker: str
    job_id: str
    endpoint: str  # the name
    probe: bool
    # A probe submitted while main jobs still waited to be sent: it queues behind them (oldest first).
    behind_backlog: bool = False


@dataclass
class RunResult:
    mode: str  # "polling" or "webhooks"
    jobs: int
    submitted: list[Submitted]
    rows: dict[str, dict[str, Any]]  # job id -> the columns read at the end
    at_runpod: list[dict[str, Any]]  # GET /_sim/jobs
    stats: dict[str, Any]  # GET /_sim/stats
    webhooks: list[dict[str, Any]]  # GET /_sim/webhooks: every delivery attempt
    samples: list[Sample]
    started: float  # epoch: the first submit
    submit_seconds: float  # how long submitting the main jobs took
    ended: float | None  # epoch: every job final in the table (None: the run timed out)
    first_poll_delay: float  # what rpq plans between /run's answer and the first poll
    cpu: dict[str, float]
    timed_out: bool


def endpoints_for(count: int) -> list[tuple[str, str]]:
    """(name, RunPod id) of each endpoint; the first is the harness's."""
    return [(ENDPOINT_NAME, ENDPOINT_ID)] + [(f"{ENDPOINT_NAME}{i}", f"{ENDPOINT_ID}-{i}") for i in range(2, count + 1)]


def run_once(args: argparse.Namespace, mode: str, server: RedisServer, sim: Simulator, scratch: Path,
             token_line: str) -> RunResult:
    webhooks = mode == "webhooks"
    sim.reset()
    endpoints = endpoints_for(args.endpoints)
    with ExitStack() as stack:
        url = stack.enter_context(database("postgresql", scratch))
        broker_url = server.database()
        env = pipeline_env(database_url=url, broker=broker_url, sim=sim)
        env["RUNPOD_ENDPOINTS"] = ",".join(f"{name}={eid}" for name, eid in endpoints)
        env["RPQ_API_TOKENS"] = token_line
        env.pop("RUNPOD_WEBHOOK_BASE_URL", None)
        api_port = free_port()
        if webhooks:
            env["RUNPOD_WEBHOOK_BASE_URL"] = f"http://127.0.0.1:{api_port}"
        commands = {"worker": args.worker or DEPLOYMENT["worker"], "beat": args.beat or DEPLOYMENT["beat"],
                    "api": args.api or DEPLOYMENT["api"]}
        deployment = deploy(stack, commands, env, scratch, webhooks, api_port)
        rt = Runtime.from_settings(Settings.from_env(env))
        stack.callback(rt.close)
        broker = redis.Redis.from_url(broker_url)
        stack.callback(broker.close)
        first_poll_delay = planned_first_poll(rt, webhooks)
        parts: dict[str, Part] = {
            "workers": lambda procs: {pid for pid, proc in procs.items() if proc.pgrp in deployment.workers}}
        for name, pgrp in deployment.others.items():
            parts[name] = process_group(pgrp)
        parts.update({"simulator": process_group(sim.pid), "redis-server": process_group(server.pid),
                      "postgres": postgres_backends(url), "this script": this_process()})
        meter = CpuMeter(parts)
        tag = uuid.uuid4().hex[:8]
        if args.warmup:
            warm_up(rt, args, endpoints, tag)
        wait_for_quiet_machine(args.max_load, args.quiet_timeout)

        rng = random.Random(args.seed)
        sleeps = [args.duration + rng.random() for _ in range(args.jobs)]
        submitted: list[Submitted] = []
        lock = threading.Lock()
        meter.start()
        started = time.time()
        sampler = Sampler(args.sample_every, set(deployment.workers), broker, rt, started)
        sampler.start()

        def submit_share(share: int) -> None:
            for i in range(share, args.jobs, args.submit_threads):
                name = endpoints[i % len(endpoints)][0]
                marker = f"{tag}-{i}"
                job = api.submit(name, {"sleep": sleeps[i], "output": {"marker": marker}}, runtime=rt)
                with lock:
                    submitted.append(Submitted(marker, job.id, name, probe=False))

        submitters = [threading.Thread(target=submit_share, args=(k,), name=f"submit-{k}")
                      for k in range(args.submit_threads)]
        for thread in submitters:
            thread.start()
        all_main_final = threading.Event()

        def probe() -> None:
            n = 0
            while not all_main_final.wait(args.probe_every):
                marker = f"{tag}-probe-{n}"
                behind = main_waiting(rt) > 0
                job = api.submit(ENDPOINT_NAME, {"sleep": PROBE_SLEEP_S, "output": {"marker": marker}}, runtime=rt)
                with lock:
                    submitted.append(Submitted(marker, job.id, ENDPOINT_NAME, probe=True, behind_backlog=behind))
                n += 1

        prober = threading.Thread(target=probe, name="probe")
        prober.start()
        for thread in submitters:
            thread.join()
        submit_seconds = time.time() - started
        say(f"  {args.jobs} jobs submitted in {submit_seconds:.1f} s")

        deadline = time.monotonic() + args.timeout
        last_report = 0.0
        ended: float | None = None
        while time.monotonic() < deadline:
            time.sleep(2)
            counts = rows_by_status(rt)
            with lock:
                probes = [s.job_id for s in submitted if s.probe]
            final = sum(n for status, n in counts.items() if status in FINAL)
            if not all_main_final.is_set() and main_final(rt, args.jobs):
                all_main_final.set()
                prober.join()
                with lock:
                    probes = [s.job_id for s in submitted if s.probe]
            if time.monotonic() - last_report >= args.report_every:
                last_report = time.monotonic()
                sample = sampler.samples[-1] if sampler.samples else sampler.take()
                too_many = sum(int(op.get("responses", {}).get("429", 0))
                               for ops in sim_stats(sim)["endpoints"].values() for op in ops.values())
                say(f"  t={time.time() - started:5.0f} s  rows {dict(sorted(counts.items()))}  queues "
                    f"{sample.queues}  worker RSS {sample.rss_mb:.0f} MB  429s so far {too_many}")
            if all_main_final.is_set() and final >= args.jobs + len(probes) + args.warmup * len(endpoints):
                ended = time.time()
                break
        all_main_final.set()
        prober.join()
        sampler.stop()
        cpu = meter.stop()
        if ended is None:
            say(f"  TIMED OUT after {args.timeout:.0f} s; reporting what there is")
        rows = read_rows(rt)
        at_runpod = sim.jobs()
        stats = sim_stats(sim)
        response = httpx.get(f"{sim.root_url}/_sim/webhooks", timeout=30)
        response.raise_for_status()
        hooks = list(response.json()["webhooks"])
    return RunResult(mode, args.jobs, submitted, rows, at_runpod, stats, hooks, sampler.samples, started,
                     submit_seconds, ended, first_poll_delay, cpu, ended is None)


def planned_first_poll(rt: Runtime, webhooks: bool) -> float:
    """Seconds rpq means to wait between /run's answer and a job's first poll."""
    return float(rt.schedule_for(webhooks=webhooks).first)


def warm_up(rt: Runtime, args: argparse.Namespace, endpoints: list[tuple[str, str]], tag: str) -> None:
    """Give each endpoint a history before the measured run, as a deployed endpoint has: --warmup jobs of
    the same duration, all final before the run begins (they are not among the run's figures)."""
    print(f"  warm-up: {args.warmup} jobs of {args.duration:g} s per endpoint, so rpq has recent jobs to learn "
          "from (jobs.flow.pollplan)", flush=True)
    rng = random.Random(args.seed + 1)
    ids = [api.submit(name, {"sleep": args.duration + rng.random(), "output": {"marker": f"{tag}-warmup-{i}"}},
                      runtime=rt).id
           for name, _ in endpoints for i in range(args.warmup)]
    deadline = time.monotonic() + args.duration + 600
    while time.monotonic() < deadline:
        with rt.engine.connect() as conn:
            left = conn.execute(text(
                "SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status NOT IN "
                "('COMPLETED','FAILED','CANCELLED','TIMED_OUT','EXPIRED')"), {"ids": ids}).scalar_one()
        if not left:
            print("  warm-up: done", flush=True)
            return
        time.sleep(2)
    raise SystemExit("the warm-up jobs did not finish")


def main_waiting(rt: Runtime) -> int:
    """Main jobs not yet sent to RunPod (PENDING, or being sent)."""
    with rt.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM jobs WHERE status IN ('PENDING','SUBMITTING') "
            "AND input::text NOT LIKE '%probe%' AND input::text NOT LIKE '%warmup%'")).scalar_one())


def main_final(rt: Runtime, jobs: int) -> bool:
    """Every main job is final in the table (probes are not counted: they have 'probe' in their marker)."""
    with rt.engine.connect() as conn:
        final = conn.execute(text(
            "SELECT count(*) FROM jobs WHERE status IN ('COMPLETED','FAILED','CANCELLED','TIMED_OUT','EXPIRED') "
            "AND input::text NOT LIKE '%probe%' AND input::text NOT LIKE '%warmup%'")).scalar_one()
    return int(final) >= jobs


def read_rows(rt: Runtime) -> dict[str, dict[str, Any]]:
    with rt.engine.connect() as conn:
        result = conn.execute(text(
            "SELECT id, status, output, created_at, finished_at, runpod_job_id, poll_count FROM jobs"))
        return {row.id: dict(row._mapping) for row in result}


def sim_stats(sim: Simulator) -> dict[str, Any]:
    response = httpx.get(f"{sim.root_url}/_sim/stats", timeout=30)
    response.raise_for_status()
    return dict(response.json())


# -- the figures ----------------------------------------------------------------------------------------------


def epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def marker_of(value: Any) -> str | None:
    if isinstance(value, dict):
        if isinstance(value.get("output"), dict):
            return marker_of(value["output"])
        marker = value.get("marker")
        return marker if isinstance(marker, str) else None
    return None


@dataclass
class Figures:
    """Everything the report prints for one run."""

    rows: list[tuple[str, str, str, bool | None]] = field(default_factory=list)  # figure, target, measured, pass
    extra: list[tuple[str, str]] = field(default_factory=list)  # figure, measured


def seconds(values: list[float], pct: float) -> str:
    return f"{percentile(values, pct):.1f} s" if values else "-"


def figures(result: RunResult) -> Figures:
    out = Figures()
    webhooks = result.mode == "webhooks"
    main = [s for s in result.submitted if not s.probe]
    probes = [s for s in result.submitted if s.probe]
    by_marker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for job in result.at_runpod:
        marker = marker_of(job.get("input"))
        if marker is not None:
            by_marker[marker].append(job)

    # Correctness.
    own = sum(1 for s in result.submitted
              if (row := result.rows.get(s.job_id)) is not None and row["status"] == "COMPLETED"
              and marker_of(row["output"]) == s.marker)
    everyone = len(result.submitted)
    out.rows.append(("jobs COMPLETED with their own output", f"all {everyone}", f"{own}", own == everyone))
    twice = sum(1 for s in result.submitted if len(by_marker.get(s.marker, [])) > 1)
    never = sum(1 for s in result.submitted if not by_marker.get(s.marker))
    out.rows.append(("jobs that reached RunPod more than once", "0", f"{twice} (never reached: {never})", twice == 0))
    codes: Counter[str] = Counter()
    for ops in result.stats["endpoints"].values():
        for op in ops.values():
            codes.update({code: int(n) for code, n in op["responses"].items()})
    out.rows.append(("429s from RunPod", "0", f"{codes.get('429', 0)}", codes.get("429", 0) == 0))
    peak_status = max((ops.get("status", {}).get("peak_10s", 0) for ops in result.stats["endpoints"].values()),
                      default=0)
    out.rows.append(("peak /status calls in any 10 s, per endpoint", f"<= {MAX_STATUS_PER_10S}", f"{peak_status}",
                     peak_status <= MAX_STATUS_PER_10S))
    peak_rss = max((s.rss_mb for s in result.samples), default=0.0)
    out.rows.append(("worker processes' RSS, total (max of samples)", f"< {MAX_WORKER_RSS_MB} MB",
                     f"{peak_rss:.0f} MB", peak_rss < MAX_WORKER_RSS_MB))
    statuses = Counter(row["status"] for row in result.rows.values())
    out.rows.append(("EXPIRED rows", "0", f"{statuses.get('EXPIRED', 0)}", statuses.get("EXPIRED", 0) == 0))

    # Submit to RunPod.
    def reach(items: list[Submitted]) -> tuple[list[float], int]:
        times, missing = [], 0
        for s in items:
            row, found = result.rows.get(s.job_id), by_marker.get(s.marker)
            if row is None or not found:
                missing += 1
                continue
            times.append(min(epoch(j["created_at"]) for j in found) - epoch(row["created_at"]))
        return times, missing

    reach_main, missing_main = reach(main)
    worst = max(reach_main, default=0.0)
    out.rows.append(("every job reached RunPod within, of being submitted (max)", f"<= {MAX_REACH_RUNPOD_S:.0f} s",
                     f"{worst:.1f} s" + (f"; {missing_main} never" if missing_main else ""),
                     worst <= MAX_REACH_RUNPOD_S and missing_main == 0))

    # Detection lag.
    lags = []
    for s in result.submitted:
        row, found = result.rows.get(s.job_id), by_marker.get(s.marker)
        if row is None or not found or row["finished_at"] is None or found[0]["finished_at"] is None:
            continue
        lags.append(epoch(row["finished_at"]) - epoch(found[0]["finished_at"]))
    limit = MAX_P95_LAG_WEBHOOKS_S if webhooks else MAX_P95_LAG_POLLING_S
    p95_lag = percentile(lags, 95) if lags else float("inf")
    out.rows.append((f"detection lag p95 ({'webhooks on' if webhooks else 'polling alone'})", f"<= {limit:.0f} s",
                     seconds(lags, 95), p95_lag <= limit))

    # Starvation: a new job while the main jobs are in flight (all of them sent). One submitted while main
    # jobs still wait to be sent queues behind them, oldest first, at RunPod's /run pace: reported apart.
    in_flight = [s for s in probes if not s.behind_backlog]
    reach_probes, missing_probes = reach(in_flight)
    p95_probe = percentile(reach_probes, 95) if reach_probes else float("inf")
    out.rows.append((f"probe jobs submitted while the main jobs were in flight ({len(in_flight)}, one every few s) "
                     "reached RunPod within, p95", f"<= {MAX_P95_PROBE_S:.0f} s",
                     seconds(reach_probes, 95) + (f"; {missing_probes} never" if missing_probes else ""),
                     p95_probe <= MAX_P95_PROBE_S and missing_probes == 0))
    behind, _ = reach([s for s in probes if s.behind_backlog])
    out.extra.append((f"probes submitted behind the submit backlog ({len(behind)}): reached RunPod, p50 / p95",
                      f"{seconds(behind, 50)} / {seconds(behind, 95)} (in line behind the jobs before them)"))

    # The rest.
    end = result.ended
    out.extra.append(("run: first submit to last job final",
                      f"{end - result.started:.0f} s" if end else "did not finish (timed out)"))
    out.extra.append(("submitting the jobs took", f"{result.submit_seconds:.1f} s "
                      f"({result.jobs / max(result.submit_seconds, 1e-9):.0f} jobs/s)"))
    out.extra.append(("submit to reaching RunPod, p50 / p95 / max",
                      f"{seconds(reach_main, 50)} / {seconds(reach_main, 95)} / {worst:.1f} s"))
    out.extra.append(("probes while in flight: submit to reaching RunPod, p50 / max",
                      f"{seconds(reach_probes, 50)} / {max(reach_probes, default=0):.1f} s"))
    overdue = []
    never_polled = 0
    for s in result.submitted:
        for job in by_marker.get(s.marker, []):
            if job["first_status_at"] is None:
                never_polled += 1
                continue
            planned = epoch(job["created_at"]) + result.first_poll_delay
            overdue.append(epoch(job["first_status_at"]) - planned)
    out.extra.append((f"first-poll overdue (first /status that found the job minus created at RunPod + "
                      f"{result.first_poll_delay:g} s), p50 / p95 / max",
                      f"{seconds(overdue, 50)} / {seconds(overdue, 95)} / {max(overdue, default=0):.1f} s"
                      + (f"; {never_polled} never polled" if never_polled else "")))
    out.extra.append(("detection lag, p50 / max", f"{seconds(lags, 50)} / {max(lags, default=0):.1f} s"))
    if webhooks:
        delivered = sum(1 for w in result.webhooks if w["delivered"])
        out.extra.append(("webhook attempts: delivered (HTTP 200) / not",
                          f"{delivered} / {len(result.webhooks) - delivered}"))
        # Where a webhook job's lag goes: RunPod's side (sending, and rpq's API answering), then rpq's poll.
        answered = {w["job_id"]: epoch(w["at"]) for w in result.webhooks if w["delivered"]}
        sending, polling = [], []
        for s in result.submitted:
            row, found = result.rows.get(s.job_id), by_marker.get(s.marker)
            if row is None or not found or row["finished_at"] is None or found[0]["finished_at"] is None:
                continue
            at = answered.get(str(found[0]["id"]))
            if at is not None:
                sending.append(at - epoch(found[0]["finished_at"]))
                polling.append(epoch(row["finished_at"]) - at)
        out.extra.append(("job ended at RunPod to its webhook answered by rpq's API, p50 / p95",
                          f"{seconds(sending, 50)} / {seconds(sending, 95)}"))
        out.extra.append(("webhook answered to the job final in the table, p50 / p95",
                          f"{seconds(polling, 50)} / {seconds(polling, 95)}"))
    ops_total: Counter[str] = Counter()
    by_op_code: dict[str, Counter[str]] = defaultdict(Counter)
    peak_by_op: dict[str, int] = {}
    for ops in result.stats["endpoints"].values():
        for name, op in ops.items():
            ops_total[name] += int(op["requests"])
            by_op_code[name].update({code: int(n) for code, n in op["responses"].items()})
            peak_by_op[name] = max(peak_by_op.get(name, 0), int(op["peak_10s"]))
    calls = ", ".join(f"{name} {n / max(everyone, 1):.2f}" for name, n in sorted(ops_total.items()))
    out.extra.append(("RunPod calls per job (429s included)", calls or "-"))
    answers = "; ".join(f"{name}: " + ", ".join(f"{code} x{n}" for code, n in sorted(codes.items()))
                        for name, codes in sorted(by_op_code.items()))
    out.extra.append(("answers by operation", answers or "-"))
    out.extra.append(("busiest 10 s by operation (per endpoint)",
                      ", ".join(f"{name} {n}" for name, n in sorted(peak_by_op.items())) or "-"))
    polls = [int(row["poll_count"]) for row in result.rows.values()]
    out.extra.append(("rpq's poll_count per job, mean / max",
                      f"{statistics.mean(polls):.1f} / {max(polls)}" if polls else "-"))
    out.extra.append(("rows by status at the end", ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))))
    for queue in [*QUEUES, "unacked"]:
        depth = max((s.queues.get(queue, 0) for s in result.samples), default=0)
        out.extra.append((f"Redis {queue}: most messages seen", f"{depth}"))
    wall = result.cpu.get("wall", 0.0) or 1.0
    ours = {k: v for k, v in result.cpu.items() if k not in ("whole machine", "wall")}
    rest = max(0.0, result.cpu.get("whole machine", 0.0) - sum(ours.values())) / wall
    out.extra.append(("CPU, cores used on average",
                      ", ".join(f"{k} {v / wall:.2f}" for k, v in ours.items()) + f", rest of machine {rest:.2f}"))
    return out


def report(result: RunResult, args: argparse.Namespace) -> None:
    fig = figures(result)
    say(f"\n### {result.jobs} jobs of {args.duration:g} s, {args.endpoints} endpoint(s), "
        f"{'webhooks on' if result.mode == 'webhooks' else 'polling alone'}\n")
    say("| figure | target | measured | |")
    say("|---|---|---|---|")
    for name, target, measured, ok in fig.rows:
        say(f"| {name} | {target} | {measured} | {'PASS' if ok else 'FAIL'} |")
    say("\n| also measured | |")
    say("|---|---|")
    for name, measured in fig.extra:
        say(f"| {name} | {measured} |")
    say("\ntimeline (every ~30 s): seconds, worker RSS MB, Redis ready submit/poll + unacked, rows by status")
    shown = -1e9
    for s in result.samples:
        if s.at - shown >= 30:
            shown = s.at
            q = s.queues
            say(f"  {s.at:5.0f}  {s.rss_mb:5.0f}  {q.get('rpq.submit', 0)}/{q.get('rpq.poll', 0)} + "
                f"{q.get('unacked', 0)}  {dict(sorted(s.rows.items()))}")


# -- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000, help="main jobs (default 10000)")
    parser.add_argument("--duration", type=float, default=240, help="seconds each job runs at RunPod (240)")
    parser.add_argument("--endpoints", type=int, default=1, help="endpoints the jobs are spread over (1)")
    parser.add_argument("--webhooks", choices=["off", "on", "both"], default="off", help="(default off)")
    parser.add_argument("--probe-every", type=float, default=5, help="seconds between probe jobs (5)")
    parser.add_argument("--submit-threads", type=int, default=4, help="threads calling jobs.submit (4)")
    parser.add_argument("--worker", action="append", help="a worker command line (repeatable); default: "
                        + "; ".join(DEPLOYMENT["worker"]))
    parser.add_argument("--beat", action="append", help="the beat command line; default: "
                        + "; ".join(DEPLOYMENT["beat"]))
    parser.add_argument("--api", action="append", help="the API command line (webhooks on only); default: "
                        + "; ".join(DEPLOYMENT["api"]))
    parser.add_argument("--warmup", type=int, default=0,
                        help="jobs of --duration run per endpoint before the measured run, so the endpoint has a "
                             "history to learn poll placement from (0)")
    parser.add_argument("--quick", action="store_true", help="300 jobs of 10 s, a probe every 2 s")
    parser.add_argument("--timeout", type=float, help="give up on a run after this many seconds after the "
                        "last submit (default: duration + 1800)")
    parser.add_argument("--sample-every", type=float, default=5, help="seconds between samples (5)")
    parser.add_argument("--report-every", type=float, default=30, help="seconds between progress lines (30)")
    parser.add_argument("--seed", type=int, default=9, help="seed of the jobs' fractional seconds")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-minute load below this (1.5)")
    parser.add_argument("--quiet-timeout", type=float, default=300, help="...for at most this many seconds (300)")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.duration, args.probe_every = 300, 10.0, 2.0
    if args.timeout is None:
        args.timeout = args.duration + 1800
    stop_on_sigterm()
    say("machine:")
    print_machine()
    if readme_deployment() != DEPLOYMENT:
        say(f"  WARNING: the README's \"Running it\" commands are now {readme_deployment()}; this script's "
            f"DEPLOYMENT is {DEPLOYMENT}: update DEPLOYMENT so the default deployment is the one measured")
    commands = {"worker": args.worker or DEPLOYMENT["worker"], "beat": args.beat or DEPLOYMENT["beat"],
                "api": args.api or DEPLOYMENT["api"]}
    say("deployment: " + "; ".join(f"{line}" for role in ("worker", "beat") for line in commands[role])
        + (f"; {'; '.join(commands['api'])} (webhooks on)" if args.webhooks != "off" else ""))
    workers_max = args.jobs + int(args.timeout / max(args.probe_every, 0.1)) + 100
    flags = ["--cold-start-seconds", "0", "--workers-max", str(workers_max), "--no-dynamic-rate-limits"]
    for _name, endpoint_id in endpoints_for(args.endpoints)[1:]:
        flags += ["--endpoint", endpoint_id]
    say(f"simulator: {' '.join(flags)} (RunPod's base rate limits hold: running workers do not raise them)")
    started = time.monotonic()
    modes = {"off": ["polling"], "on": ["webhooks"], "both": ["polling", "webhooks"]}[args.webhooks]
    _token, token_line = new_token()
    scratch = Path(tempfile.mkdtemp(prefix="rpq-bench-scale-"))
    results = []
    with ExitStack() as stack:
        server = stack.enter_context(redis_server(scratch))
        sim = stack.enter_context(simulator(scratch, *flags))
        say(f"redis-server on port {server.port}, simulator {sim.base_url}, logs in {scratch}")
        for mode in modes:
            say(f"\nrun: {mode}")
            results.append(run_once(args, mode, server, sim, scratch, token_line))
    for result in results:
        report(result, args)
    say(f"\nwhole benchmark: {time.monotonic() - started:.0f} s; load average at the end: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if all(not r.timed_out for r in results):
        shutil.rmtree(scratch)
    else:
        say(f"logs kept in {scratch}")


if __name__ == "__main__":
    main()
