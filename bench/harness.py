"""What every benchmark script needs: child processes (the simulator, Celery workers, a private
redis-server) that are always stopped, scratch PostgreSQL databases that are always dropped, a CPU
meter, and a few statistics.

Nothing here measures anything; the scripts beside it do. Each script enters everything it starts in
context managers, so it is cleaned up on success, on error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get("RPQ_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")

ENDPOINT_NAME = "bench"
ENDPOINT_ID = "bench-endpoint"

# -- small helpers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], object], *, timeout: float, interval: float = 0.1, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # a service that is still starting may refuse the connection
            pass
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")


def say(message: str) -> None:
    print(message, flush=True)


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the `finally` blocks that stop children run (Ctrl-C already does)."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))


# -- statistics ----------------------------------------------------------------------------------------


def wait_for_quiet_machine(max_load: float, timeout: float) -> None:
    """Poll the 1-minute load average until it is below `max_load`; go on with a warning after `timeout` s."""
    deadline = time.monotonic() + timeout
    while (load := os.getloadavg()[0]) >= max_load:
        if time.monotonic() > deadline:
            say(f"  WARNING: the 1-minute load is still {load:.2f} after {timeout:.0f} s; measuring anyway")
            return
        say(f"  1-minute load {load:.2f}, waiting for it to fall below {max_load}")
        time.sleep(15)
    say(f"  1-minute load {load:.2f}: measuring")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: the value below which `pct` % of the sorted values fall."""
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median_spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """'median (min-max)', how every repeated figure in docs/benchmarks.md is reported."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


# -- child processes -----------------------------------------------------------------------------------


@contextmanager
def child(name: str, command: list[str], log_dir: Path, *, env: dict[str, str] | None = None,
          cwd: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` in its own process group; on exit SIGTERM the group (SIGKILL after 15 s).

    A process group, so a prefork worker's pool children go too.
    """
    log_path = log_dir / f"{name}.log"
    log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        log.close()


def log_tail(log_dir: Path, name: str) -> str:
    path = log_dir / f"{name}.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


@dataclass
class Simulator:
    api_key: str
    port: int
    pid: int = 0

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v2"

    def jobs(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.root_url}/_sim/jobs", timeout=30)
        response.raise_for_status()
        return list(response.json()["jobs"])

    def reset(self) -> None:
        httpx.post(f"{self.root_url}/_sim/reset", timeout=30).raise_for_status()


@contextmanager
def simulator(log_dir: Path, *flags: str) -> Iterator[Simulator]:
    """`rpq simulator` as a child process on a free port, with `flags` added. Like RunPod it answers 404 for
    an endpoint that does not exist, so the benchmarks' endpoint is created at startup."""
    sim = Simulator(api_key="bench-" + secrets.token_hex(12), port=free_port())
    command = [sys.executable, "-m", "jobs.cli", "simulator", "--port", str(sim.port), "--api-key", sim.api_key,
               "--endpoint", ENDPOINT_ID, *flags]
    with child("simulator", command, log_dir) as process:
        sim.pid = process.pid

        def ready() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"the simulator exited at start:\n{log_tail(log_dir, 'simulator')}")
            return httpx.get(f"{sim.root_url}/_sim/health", timeout=1).status_code == 200

        wait_until(ready, timeout=30, what="the simulator")
        yield sim


@dataclass
class Worker:
    node: str  # Celery's node name, for control commands
    pid: int  # the main process; a prefork pool's children share its process group


@contextmanager
def celery_worker(name: str, app_module: str, env: dict[str, str], log_dir: Path, pool: str, concurrency: int
                  ) -> Iterator[Worker]:
    """`celery -A app_module worker -P pool -c concurrency` as a child process, once it answers a ping.
    The other options are the ones `rpq demo` uses."""
    from jobs.settings import Settings
    from tasks.app import make_app

    node = f"{name}-{uuid.uuid4().hex[:6]}@bench"
    command = [sys.executable, "-m", "celery", "-A", app_module, "worker", "-n", node, "-P", pool,
               "-c", str(concurrency), "--loglevel", "WARNING", "--without-mingle", "--without-gossip"]
    control = make_app(Settings(celery_broker_url=env["CELERY_BROKER_URL"]))
    with child(name, command, log_dir, env=env) as process:
        def answers() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"worker {name} exited at start:\n{log_tail(log_dir, name)}")
            return bool(control.control.ping(destination=[node], timeout=0.5))

        try:
            wait_until(answers, timeout=60, interval=0.2, what=f"worker {node} to answer ping")
            yield Worker(node=node, pid=process.pid)
        finally:
            control.close()


# -- scratch databases ---------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A private `redis-server` (no persistence) on a free port: other sessions on this machine flush
    numbered databases of the shared Redis at 6379 when their tests start, which would eat our messages."""

    port: int
    pid: int
    next_db: int = 0

    def database(self) -> str:
        """A Redis URL on a database number nobody else here has been given."""
        if self.next_db > 15:
            raise RuntimeError("out of Redis database numbers")
        self.next_db += 1
        return f"redis://127.0.0.1:{self.port}/{self.next_db - 1}"


@contextmanager
def redis_server(log_dir: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(log_dir)]
    with child("redis", command, log_dir) as process:
        def ready() -> bool:
            with redis.Redis(port=port, socket_connect_timeout=1) as client:
                return bool(client.ping())

        wait_until(ready, timeout=30, what="the private redis-server")
        yield RedisServer(port=port, pid=process.pid)


@contextmanager
def scratch_postgres() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards (WITH FORCE: any lingering connection goes too)."""
    import psycopg

    name = f"rpq_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database(kind: str, scratch_dir: Path) -> Iterator[str]:
    """A migrated, empty job table on `kind` ("sqlite" or "postgresql")."""
    from jobs.storage.db import upgrade

    if kind == "sqlite":
        url = f"sqlite:///{scratch_dir / f'rpq-{uuid.uuid4().hex[:6]}.db'}"
        upgrade(url)
        yield url
    else:
        with scratch_postgres() as url:
            upgrade(url)
            yield url


def pipeline_env(*, database_url: str, broker: str, sim: Simulator) -> dict[str, str]:
    """The environment a `celery -A tasks worker` of the pipeline runs with."""
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker,
        "RUNPOD_API_KEY": sim.api_key,
        "RUNPOD_SERVERLESS_URL": sim.base_url,
        "RUNPOD_ENDPOINTS": f"{ENDPOINT_NAME}={ENDPOINT_ID}",
    }


# -- where the CPU goes --------------------------------------------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    pid: int
    pgrp: int
    cpu: float  # user + system seconds so far, every thread included


def processes() -> dict[int, Proc]:
    """Every process on the machine, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:  # it ended while we looked
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # [0] state, [2] process group, [11] utime, [12] stime
        found[int(entry.name)] = Proc(int(entry.name), int(fields[2]), (int(fields[11]) + int(fields[12])) / TICKS)
    return found


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (every process, the kernel, interrupts)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = values[:7]
    return (user + nice + system + irq + softirq) / TICKS


#: A part of the benchmark: which pids belong to it, given every process on the machine.
Part = Callable[[dict[int, Proc]], set[int]]


class CpuMeter:
    """CPU seconds each named part used between `start()` and `stop()`, and the whole machine's.

    Parts are looked up at stop time; a process born during the measurement counts from zero.
    "whole machine" includes other tenants and the kernel; "wall" is the elapsed time.
    """

    def __init__(self, parts: dict[str, Part]) -> None:
        self.parts = parts
        self._before: dict[int, Proc] = {}
        self._busy = 0.0
        self._wall = 0.0

    def start(self) -> None:
        self._before, self._busy, self._wall = processes(), machine_busy(), time.monotonic()

    def stop(self) -> dict[str, float]:
        after = processes()
        used = {}
        for name, part in self.parts.items():
            pids = part(after) & after.keys()
            used[name] = sum(after[pid].cpu - (self._before[pid].cpu if pid in self._before else 0.0)
                             for pid in pids)
        used["whole machine"] = machine_busy() - self._busy
        used["wall"] = time.monotonic() - self._wall
        return used


def process_group(pgrp: int) -> Part:
    """A child started by `child()`, with every process it started (a prefork pool's children)."""
    return lambda procs: {pid for pid, p in procs.items() if p.pgrp == pgrp}


def this_process() -> Part:
    return lambda procs: {os.getpid()}


def postgres_backends(database_url: str) -> Part:
    """The PostgreSQL server processes serving connections to this one database."""
    name = database_url.rsplit("/", 1)[1]

    def backends(procs: dict[int, Proc]) -> set[int]:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=5) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)).fetchall()
        return {int(row[0]) for row in rows}

    return backends


# -- the machine ---------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What docs/benchmarks.md reports about where the figures came from."""
    import celery
    import kombu

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            postgres = str(row[0]) if row else "unknown"
    except Exception as exc:  # reported, not fatal: the SQLite figures still stand
        postgres = f"unreachable ({exc})"
    import jobs

    return {
        "rpq code measured": f"{Path(jobs.__file__).parent.parent} at {git_commit()}",
        "cores (nproc)": str(os.cpu_count()),
        "CPU": cpu,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "Python": platform.python_version(),
        "Celery / kombu": f"{celery.__version__} / {kombu.__version__}",
        "Redis (a private redis-server)": next((w[2:] for w in redis_version if w.startswith("v=")), "?"),
        "PostgreSQL": postgres,
        "SQLite": __import__("sqlite3").sqlite_version,
    }


def git_commit() -> str:
    """The checkout's commit, marked "+ uncommitted changes" when jobs/ or tasks/ differ from it."""
    import jobs

    root = Path(jobs.__file__).parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "jobs", "tasks"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"
    return commit + (" + uncommitted changes" if dirty else "")


def print_machine() -> None:
    for key, value in machine().items():
        say(f"  {key}: {value}")
