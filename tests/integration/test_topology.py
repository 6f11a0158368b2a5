"""Many processes, as on many machines: a Celery worker per queue, each with its own hostname, two beats and two
API processes, all on one PostgreSQL database and one Redis. The Redis is a private `redis-server` the module
starts, stops and starts again; the database is the module's own, which it closes to connections for a while.

The processes start once for the module; the scenarios run in turn on them. Proof comes from outside rpq: the
simulator's own list of the jobs that reached "RunPod" (none twice), the rows each periodic round writes and the
outcome each round's task returns (once per interval), and each process's log (no wake-up rebuilt by the
reconciler during a rolling restart).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

import jobs
from jobs.runpod.collect import COLLECTORS
from jobs.runtime import MAINTENANCE_QUEUE, POLL_QUEUE, SUBMIT_QUEUE
from jobs.states import JobStatus
from tests.conftest import (
    ENDPOINT_ID,
    ENDPOINT_NAME,
    POSTGRES_ADMIN_URL,
    SHARED_ENDPOINTS,
    Pipeline,
    SimulatorProcess,
    all_finished,
    endpoint_flags,
    free_port,
    fresh_postgres_database,
    make_settings,
    service_missing,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.integration

#: One worker per queue, as a deployment scaled out by role runs them.
ROLES = {"submit": SUBMIT_QUEUE, "poll": POLL_QUEUE, "maintenance": MAINTENANCE_QUEUE}
RECONCILE_SECONDS = 1
HEALTH_SECONDS = 2
COLLECT_SECONDS = 10  # a round makes about seven management calls; RunPod allows 60 a minute
#: Long enough that a poll only late because two cores run eight processes is not taken for a lost wake-up.
GRACE_SECONDS = 4


# -- a Redis of the module's own -------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """`redis-server` as a child process on its own port and directory, stopped with or without its data."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=2)

    def start(self) -> None:
        # No automatic snapshots: a stop with data saves one explicitly (SHUTDOWN SAVE), a stop without deletes it.
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                   "--save", "", "--appendonly", "no"]
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.client().ping(), timeout=20, what="the private redis-server to answer PING")

    def stop(self, *, keep_data: bool) -> None:
        assert self.process is not None
        with contextlib.suppress(redis.ConnectionError):  # the connection closes as the server exits
            self.client().shutdown(save=keep_data, nosave=not keep_data)
        self.process.wait(20)
        if not keep_data:
            (self.directory / "dump.rdb").unlink(missing_ok=True)

    def keys(self) -> int:
        return int(self.client().dbsize())


# -- the topology ------------------------------------------------------------------------------------------------


@dataclass
class Topology:
    stack: Pipeline  # the in-process runtime, the simulator, the environment and the logs
    redis: RedisServer
    database_url: str
    database_name: str
    api_urls: list[str]
    workers: dict[str, tuple[str, subprocess.Popen[bytes]]] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # pid: the process's name in the logs
    started: int = 0

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        process = self.stack.spawn(name, command)
        self.processes.append(process)
        self.names[process.pid] = name
        return process

    def running(self) -> dict[str, int]:
        """Every process of the topology that is running now, by name: pid (the simulator and Redis too)."""
        found = {self.names[p.pid]: p.pid for p in self.processes if p.poll() is None}
        for name, process in (("simulator", self.stack.simulator.process), ("redis-server", self.redis.process)):
            if process is not None and process.poll() is None:
                found[name] = process.pid
        return found

    def spawn_worker(self, role: str) -> tuple[str, subprocess.Popen[bytes]]:
        """A worker for one queue only, with a hostname of its own (as on its own machine)."""
        self.started += 1
        name = f"{role}-{self.started}@host-{role}-{self.started}"
        concurrency = "4" if role == "maintenance" else "8"
        process = self.spawn(f"worker-{role}-{self.started}",
                             [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", name, "-Q", ROLES[role],
                              "-P", "threads", "-c", concurrency, "--loglevel", "INFO", "--without-mingle",
                              "--without-gossip"])
        return name, process

    def wait_answering(self, *names: str, timeout: float = 60) -> None:
        from tasks.app import make_app

        app = make_app(self.stack.runtime.settings)
        try:
            for name in names:
                wait_until(lambda name=name: app.control.ping(destination=[name], timeout=0.5),  # type: ignore[misc]
                           timeout=timeout, interval=0.2, what=f"worker {name} to answer ping")
        finally:
            app.close()

    def roll(self) -> list[subprocess.Popen[bytes]]:
        """A rolling restart: the replacements answer first, then each old worker in turn gets SIGTERM (a warm
        shutdown: running tasks finish, held countdown messages go back to Redis) and exits. The old processes."""
        old = dict(self.workers)
        for role in ROLES:
            self.workers[role] = self.spawn_worker(role)
        self.wait_answering(*(name for name, _ in self.workers.values()))
        for _, process in old.values():
            process.send_signal(signal.SIGTERM)
            time.sleep(2)  # in turn: the next one while this one drains (a warm shutdown waits for its tasks)
        for name, process in old.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {name} did not finish its warm shutdown in 60 s:\n{self.stack.logs()}")
        return [process for _, process in old.values()]

    def submit_http(self, client: httpx.Client, api: int, job_input: dict[str, Any]) -> httpx.Response:
        return client.post(f"{self.api_urls[api % len(self.api_urls)]}/v1/jobs",
                           json={"endpoint": ENDPOINT_NAME, "input": job_input})

    def http(self) -> httpx.Client:
        return httpx.Client(headers={"Authorization": f"Bearer {self.stack.api_token}"}, timeout=30)

    def logs(self, pattern: str) -> list[str]:
        """Every line of every process's log that matches `pattern`."""
        found = []
        for path in sorted(self.stack.log_dir.glob("*.log")):
            found += [line for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]
        return found

    def sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url.replace("+psycopg", ""), autocommit=True) as conn:
            return conn.execute(query, args).fetchall()  # type: ignore[arg-type]

    def stop(self) -> None:
        for process in self.processes:  # all at once: each warm shutdown takes a while
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            stop_process(process, grace=20)


@pytest.fixture(scope="module")
def topology(start_simulator: Callable[..., SimulatorProcess], tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[Topology]:
    if shutil.which("redis-server") is None:
        service_missing("redis-server", "install Redis (its redis-server binary): the topology tests start their own")
    from jobs.runpod.client import RunPodClient
    from jobs.runtime import Runtime, celery_publisher
    from jobs.storage.db import make_engine, upgrade
    from jobs.web.auth import new_token

    log_dir = tmp_path_factory.mktemp("topology")
    server = RedisServer(directory=log_dir)
    server.start()
    with fresh_postgres_database() as database_url:
        upgrade(database_url)
        simulator = start_simulator("--cold-start-seconds", "0.2", "--workers-max", "20",
                                    *endpoint_flags(*SHARED_ENDPOINTS))
        management = {"RUNPOD_REST_URL": f"{simulator.root_url}/mgmt/v2",
                      "RUNPOD_GRAPHQL_URL": f"{simulator.root_url}/mgmt/graphql"}
        settings = make_settings(database_url, simulator, celery_broker_url=server.url, runpod_timeout_seconds=2.0,
                                 reconcile_interval_seconds=RECONCILE_SECONDS, poll_grace_seconds=GRACE_SECONDS,
                                 submit_stuck_seconds=30, runpod_health_poll_seconds=HEALTH_SECONDS,
                                 runpod_collection_interval_seconds=COLLECT_SECONDS)
        token, token_line = new_token()
        env = {
            **os.environ,
            **management,
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": server.url,
            "RUNPOD_API_KEY": simulator.api_key,
            "RUNPOD_SERVERLESS_URL": simulator.base_url,
            "RUNPOD_ENDPOINTS": f"{ENDPOINT_NAME}={ENDPOINT_ID}",
            "RUNPOD_TIMEOUT_SECONDS": "2",
            "RPQ_RECONCILE_SECONDS": str(RECONCILE_SECONDS),
            "RPQ_POLL_GRACE_SECONDS": str(GRACE_SECONDS),
            "RPQ_SUBMIT_STUCK_SECONDS": "30",
            "RUNPOD_HEALTH_POLL_SECONDS": str(HEALTH_SECONDS),
            "RUNPOD_COLLECTION_INTERVAL_SECONDS": str(COLLECT_SECONDS),
            "RPQ_API_TOKENS": token_line,
        }
        env.pop("RUNPOD_WEBHOOK_BASE_URL", None)
        runtime = Runtime(settings=settings, engine=make_engine(database_url), publish=celery_publisher(settings),
                          make_client=lambda: RunPodClient(api_key=simulator.api_key, base_url=simulator.base_url))
        stack = Pipeline(runtime=runtime, simulator=simulator, env=env, log_dir=log_dir, api_token=token)
        ports = [free_port(), free_port()]
        topo = Topology(stack=stack, redis=server, database_url=database_url,
                        database_name=database_url.rsplit("/", 1)[1],
                        api_urls=[f"http://127.0.0.1:{port}" for port in ports])
        try:
            # Everything starts at once: eight interpreters importing on two cores is most of the wait.
            for role in ROLES:
                topo.workers[role] = topo.spawn_worker(role)
            for n in (1, 2):
                topo.spawn(f"beat-{n}", [sys.executable, "-m", "celery", "-A", "tasks", "beat", "--loglevel", "INFO",
                                         "-s", str(log_dir / f"beat-{n}-schedule")])
            for n, port in enumerate(ports, 1):
                topo.spawn(f"api-{n}", [sys.executable, "-m", "jobs.cli", "api", "--port", str(port)])
            topo.wait_answering(*(name for name, _ in topo.workers.values()))
            for url in topo.api_urls:
                wait_until(lambda url=url: httpx.get(f"{url}/healthz", timeout=2).status_code == 200,  # type: ignore[misc]
                           timeout=60, what=f"the API at {url} to answer /healthz")
            yield topo
        finally:
            topo.stop()
            runtime.close()
            if server.process is not None and server.process.poll() is None:
                server.stop(keep_data=False)


# -- what the proofs read -----------------------------------------------------------------------------------


def runs_at_runpod(simulator: SimulatorProcess, tag: str) -> Counter[int]:
    """How many RunPod jobs the simulator created for each of this scenario's jobs (by their input's number)."""
    return Counter(job["input"]["n"] for job in simulator.jobs(ENDPOINT_ID)  # type: ignore[index]
                   if isinstance(job["input"], dict) and job["input"].get("tag") == tag)


def submit_direct(topology: Topology, tag: str, numbers: range, sleep: Callable[[int], float]) -> list[str]:
    return [jobs.submit(ENDPOINT_NAME, {"n": n, "tag": tag, "sleep": sleep(n), "output": n},
                        runtime=topology.stack.runtime).id for n in numbers]


def assert_each_ran_once(topology: Topology, tag: str, job_ids: list[str], count: int, timeout: float) -> None:
    finished = all_finished(topology.stack, job_ids, timeout=timeout)
    assert Counter(job.status for job in finished) == Counter({JobStatus.COMPLETED: count})
    assert sorted(job.output for job in finished) == list(range(count))  # type: ignore[type-var]
    at_runpod = runs_at_runpod(topology.stack.simulator, tag)
    assert at_runpod == Counter(dict.fromkeys(range(count), 1)), "a job reached RunPod twice, or never"


def assert_once_per_interval(times: list[datetime], interval: float, what: str) -> None:
    """Each round holds its lease for 0.8 of its interval: two beats must not make it run twice as often."""
    assert len(times) >= 3, f"{what} ran {len(times)} times"
    times = sorted(times)
    span = (times[-1] - times[0]).total_seconds()
    assert len(times) - 1 <= span / (0.8 * interval) + 1, f"{what} ran {len(times)} times in {span:.1f} s"


def task_outcomes(topology: Topology, task: str) -> list[tuple[datetime, str]]:
    """When each run of a task finished and what it returned, from the workers' logs."""
    # rpq's text format (jobs.observability.logs): "2026-11-30T13:13:07.272Z INFO [tags] celery.app.trace: Task …"
    pattern = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z INFO .*? Task "
                         + re.escape(task) + r"\[[^\]]+\] succeeded in [0-9.e-]+s: (.*)$")
    found = []
    for line in topology.logs(re.escape(task) + r"\["):
        match = pattern.match(line)
        if match:
            found.append((datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S.%f"), match[2]))
    return found


# -- the scenarios -------------------------------------------------------------------------------------------


def test_hundreds_of_jobs_through_two_apis_run_once_each_while_every_worker_is_restarted_in_turn(
        topology: Topology) -> None:
    tag, at_least = uuid.uuid4().hex, 300
    job_ids: dict[int, str] = {}
    refused: list[str] = []
    rolled = threading.Event()
    numbers = iter(range(10_000))
    after_roll: list[int] = []  # an API for each job submitted after the last SIGTERM

    def feed(api: int) -> None:
        # Both APIs take jobs, about twelve a second between them, from before the first restart until after
        # the last (and ten more each after it).
        more = 10
        with topology.http() as client:
            while not rolled.is_set() or more > 0 or len(job_ids) < at_least:
                if rolled.is_set():
                    more -= 1
                    after_roll.append(api)
                n = next(numbers)
                answer = topology.submit_http(client, api, {"n": n, "tag": tag, "sleep": (n % 4) * 0.1, "output": n})
                if answer.status_code != 202:
                    refused.append(f"{answer.status_code} {answer.text}")
                else:
                    job_ids[n] = answer.json()["id"]
                time.sleep(0.15)

    feeders = [threading.Thread(target=feed, args=(api,)) for api in (0, 1)]
    for feeder in feeders:
        feeder.start()
    try:
        wait_until(lambda: job_ids, timeout=30, what="the first submits to be accepted")
        stopped = topology.roll()
    finally:
        rolled.set()
        for feeder in feeders:
            feeder.join(120)
    assert not refused
    count = len(job_ids)
    assert sorted(job_ids) == list(range(count))
    assert after_roll, "every job was in before the restarts ended"

    assert_each_ran_once(topology, tag, [job_ids[n] for n in range(count)], count, timeout=90)
    assert [process.returncode for process in stopped] == [0, 0, 0]
    assert len(topology.logs(r"worker: Warm shutdown")) >= 3
    # The warm shutdowns handed every held wake-up back: the reconciler never had to rebuild one.
    assert topology.logs(r"reconciler: woke") == []


def broker_losses(topology: Topology) -> int:
    return len(topology.logs(r"Connection to broker lost"))


@pytest.mark.parametrize("keep_data", [True, False], ids=["with its data", "without its data"])
def test_redis_restarted_mid_run_the_workers_reconnect_by_themselves_and_every_job_finishes(
        topology: Topology, keep_data: bool) -> None:
    tag = uuid.uuid4().hex
    job_ids = submit_direct(topology, tag, range(20), sleep=lambda n: 0.5 + (n % 3) * 0.5)
    wait_until(lambda: topology.sql("SELECT count(*) FROM jobs WHERE status = 'IN_PROGRESS'")[0][0],
               timeout=30, what="some jobs to start")
    lost_before = broker_losses(topology)

    topology.redis.stop(keep_data=keep_data)
    # A web app still submits while Redis is down: the row is written, and its wake-up is the reconciler's.
    job_ids += submit_direct(topology, tag, range(20, 23), sleep=lambda n: 0.0)
    wait_until(lambda: broker_losses(topology) >= lost_before + len(ROLES), timeout=30,
               what="every worker to notice that the broker is gone")
    topology.redis.start()

    assert_each_ran_once(topology, tag, job_ids, 23, timeout=90)
    topology.wait_answering(*(name for name, _ in topology.workers.values()), timeout=30)


@contextlib.contextmanager
def database_closed(topology: Topology) -> Iterator[None]:
    """The module's database refuses new connections and its open ones are cut, as in a restart or a failover;
    the machine's PostgreSQL server and its other databases are untouched."""
    name = topology.database_name
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def failures(topology: Topology, task: str) -> list[str]:
    """The log lines of the task's runs that failed because the database did not answer."""
    return topology.logs(r"Task " + re.escape(task) + r"\[[^\]]+\] raised unexpected: OperationalError")


def test_postgres_unavailable_for_a_while_the_api_answers_503_nothing_is_half_written_and_every_job_finishes(
        topology: Topology) -> None:
    tag = uuid.uuid4().hex
    job_ids = submit_direct(topology, tag, range(20), sleep=lambda n: 0.5 + (n % 3) * 0.5)
    more: list[str] = []

    def feed() -> None:  # submits go on, from a web app that does not know the database is about to go
        with topology.http() as client:
            for n in range(20, 60):
                answer = topology.submit_http(client, n, {"n": n, "tag": tag, "sleep": 0, "output": n})
                if answer.status_code == 202:
                    more.append(answer.json()["id"])
                else:
                    refusals.append(answer)

    refusals: list[httpx.Response] = []
    wait_until(lambda: topology.sql("SELECT count(*) FROM jobs WHERE status = 'IN_PROGRESS'")[0][0],
               timeout=30, what="some jobs to start")
    polls_failed = len(failures(topology, "rpq.poll_due"))
    stored_late = len(topology.logs(r"RunPod answers once the database answered again"))
    # Jobs whose /run is still being answered when the database goes: their answers have nowhere to go.
    topology.stack.simulator.set_faults({"kind": "slow", "op": "run", "delay": 1.5, "count": 10})
    job_ids += submit_direct(topology, tag, range(60, 70), sleep=lambda n: 0.0)
    wait_until(lambda: topology.sql("SELECT count(*) FROM jobs WHERE status = 'SUBMITTING'")[0][0] == 10,
               timeout=30, what="the slow /runs to be in flight")
    feeder = threading.Thread(target=feed)
    with database_closed(topology):
        feeder.start()
        with topology.http() as client:
            answer = topology.submit_http(client, 0, {"n": -1, "tag": tag})
            health = client.get(f"{topology.api_urls[1]}/healthz")
        wait_until(lambda: len(failures(topology, "rpq.poll_due")) > polls_failed, timeout=30,
                   what="the poller to meet the closed database")
        wait_until(lambda: topology.logs(r"storing \d+ jobs' RunPod answers again when it does"), timeout=30,
                   what="the /runs' answers to find the database closed")
        feeder.join(60)
    wait_until(lambda: len(topology.logs(r"RunPod answers once the database answered again")) > stored_late,
               timeout=60, what="the /runs' answers to be stored once the database is back")
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "5"
    assert [problem["field"] for problem in answer.json()["errors"]] == ["database"]
    assert health.status_code == 503
    assert refusals and {refusal.status_code for refusal in refusals} == {503}

    # Every job accepted before or during the outage finishes, once each; the refused ones were never written.
    numbers = sorted(n for (n,) in topology.sql("SELECT (input->>'n')::int FROM jobs WHERE input->>'tag' = %s", tag))
    accepted = job_ids + more
    assert len(numbers) == len(accepted)
    finished = all_finished(topology.stack, accepted, timeout=90)
    assert {job.status for job in finished} == {JobStatus.COMPLETED}
    assert runs_at_runpod(topology.stack.simulator, tag) == Counter(dict.fromkeys(numbers, 1))
    # Nothing half-written: each job's history ends where its row is, and no cancel is left open.
    last_events = topology.sql(
        "SELECT DISTINCT ON (e.job_id) e.to_status FROM job_events e JOIN jobs j ON j.id = e.job_id "
        "WHERE j.input->>'tag' = %s ORDER BY e.job_id, e.id DESC", tag)
    assert last_events == [("COMPLETED",)] * len(accepted)
    assert topology.sql("SELECT count(*) FROM runpod_cancels WHERE done_at IS NULL") == [(0,)]


# -- the soak ------------------------------------------------------------------------------------------------

#: The tables rpq writes to, whose size the soak follows.
TABLES = ("jobs", "job_events", "endpoint_health", "collector_runs", "endpoint_snapshots", "rpq_locks",
          "runpod_cancels")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Sample:
    seconds: float
    jobs_done: int
    rss: dict[str, float]  # by role (worker-poll, api-1, ...): MB
    redis_keys: int
    redis_mb: float
    queued: int  # messages waiting in the three queues
    held: int  # messages delivered to a worker and not acked yet (countdowns held, tasks running)
    table_kb: dict[str, int]
    dead_rows: int  # in jobs and job_events, not vacuumed yet
    lease_rows: int


def sample(topology: Topology, began: float, tag: str) -> Sample:
    client = topology.redis.client()
    roles = {re.sub(r"-\d+$", "", name) if name.startswith("worker-") else name: pid
             for name, pid in topology.running().items()}
    sizes = dict(topology.sql("SELECT relname::text, pg_total_relation_size(relid) / 1024 FROM pg_statio_user_tables"))
    dead = topology.sql("SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables "
                        "WHERE relname IN ('jobs', 'job_events')")[0][0]
    done = topology.sql("SELECT count(*) FROM jobs WHERE input->>'tag' = %s AND status = 'COMPLETED'", tag)[0][0]
    leases = topology.sql("SELECT count(*) FROM rpq_locks")[0][0]
    return Sample(seconds=time.monotonic() - began, jobs_done=int(done),
                  rss={role: rss_mb(pid) for role, pid in sorted(roles.items())},
                  redis_keys=int(client.dbsize()), redis_mb=int(client.info("memory")["used_memory"]) / 2**20,
                  queued=sum(int(client.llen(queue)) for queue in ROLES.values()),
                  held=int(client.hlen("unacked")), table_kb={name: int(sizes.get(name, 0)) for name in TABLES},
                  dead_rows=int(dead), lease_rows=int(leases))


def report(samples: list[Sample], submitted: int, minutes: float, autovacuum: str) -> str:
    roles = list(samples[0].rss)
    lines = [f"{minutes:g} minutes, {submitted} jobs submitted ({submitted / (minutes * 60):.1f}/s); the server's "
             f"autovacuum: {autovacuum}.", "",
             "| s | jobs done | " + " | ".join(f"{role} MB" for role in roles)
             + " | Redis keys | Redis MB | queued | held | " + " | ".join(f"{t} kB" for t in TABLES) + " | dead rows |",
             "|" + "---:|" * (6 + len(roles) + len(TABLES))]
    for s in samples:
        lines.append(f"| {s.seconds:.0f} | {s.jobs_done} | " + " | ".join(f"{s.rss.get(r, 0):.0f}" for r in roles)
                     + f" | {s.redis_keys} | {s.redis_mb:.1f} | {s.queued} | {s.held} | "
                     + " | ".join(str(s.table_kb[t]) for t in TABLES) + f" | {s.dead_rows} |")
    return "\n".join(lines) + "\n"


@pytest.mark.soak
def test_a_soak_at_moderate_load_keeps_memory_redis_keys_held_messages_and_tables_flat(
        topology: Topology, request: pytest.FixtureRequest) -> None:
    minutes = float(request.config.getoption("--soak-minutes"))
    tag, rate = uuid.uuid4().hex, 5.0  # jobs a second, through both APIs in turn
    every = max(2.0, minutes * 60 / 40)  # about forty samples
    job_ids: list[str] = []
    samples: list[Sample] = []
    began = time.monotonic()
    with topology.http() as client:
        next_sample = began
        while (now := time.monotonic()) - began < minutes * 60:
            if now >= next_sample:
                samples.append(sample(topology, began, tag))
                next_sample += every
            n = len(job_ids)
            answer = topology.submit_http(client, n, {"n": n, "tag": tag, "sleep": (n % 5) * 0.25, "output": n})
            assert answer.status_code == 202, answer.text
            job_ids.append(answer.json()["id"])
            time.sleep(max(0.0, began + (n + 1) / rate - time.monotonic()))
    assert_each_ran_once(topology, tag, job_ids, len(job_ids), timeout=60)
    samples.append(sample(topology, began, tag))
    if path := request.config.getoption("--soak-report"):
        autovacuum = topology.sql("SHOW autovacuum")[0][0]
        Path(path).write_text(report(samples, len(job_ids), minutes, autovacuum))

    # Flat: what the soak leaves is what it found, bar the jobs themselves. The first samples are the warm-up.
    settled, last = samples[len(samples) // 4], samples[-1]
    assert last.redis_keys <= settled.redis_keys + 2, "Redis keys grew with the jobs"
    assert max(s.held for s in samples) <= 20, "messages pile up unacked"
    assert last.queued == 0
    # The leases are a row per name, updated in place (their size on disk is the vacuum's business).
    assert last.lease_rows == settled.lease_rows
    for role, mb in last.rss.items():
        if role in settled.rss:
            grew = f"{role}'s memory grew from {settled.rss[role]:.0f} MB to {mb:.0f} MB"
            assert mb <= settled.rss[role] * 1.25 + 10, grew


def test_every_periodic_round_acted_once_per_interval_though_two_beats_asked_for_each(topology: Topology) -> None:
    """Over the module's whole run (restarts and outages included): never more often than the interval."""
    health = [at for (at,) in topology.sql("SELECT observed_at FROM endpoint_health WHERE endpoint_id = %s",
                                           ENDPOINT_ID)]
    assert_once_per_interval(health, HEALTH_SECONDS, "the health round")
    reconciles = [at for at, outcome in task_outcomes(topology, "rpq.reconcile") if outcome != "None"]
    assert_once_per_interval(reconciles, RECONCILE_SECONDS, "the reconciler")
    collectors = topology.sql("SELECT DISTINCT collector FROM collector_runs")
    assert len(collectors) == len(COLLECTORS)
    for (collector,) in collectors:
        runs = [at for (at,) in topology.sql("SELECT at FROM collector_runs WHERE collector = %s", collector)]
        assert_once_per_interval(runs, COLLECT_SECONDS, f"the {collector} collector")
