"""The test harness: real Redis, real PostgreSQL and SQLite, the simulator over real HTTP, and a
real Celery worker process.

A missing service fails the run when CI is set (CI must never pass by skipping); on a developer's
machine it skips with a message that says what to start.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from hypothesis import settings as hypothesis_settings

if TYPE_CHECKING:
    import jobs
    from jobs.runpod.client import RunPodClient
    from jobs.runtime import Runtime
    from jobs.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

REDIS_URL = os.environ.get("RPQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")

# Property tests: no per-example deadline (the examples touch real databases on a shared machine); in CI
# the same examples every run, so a red build is reproducible and never a matter of luck.
hypothesis_settings.register_profile("dev", deadline=None)
hypothesis_settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
hypothesis_settings.load_profile("ci" if IN_CI else "dev")
POSTGRES_ADMIN_URL = os.environ.get("RPQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-minutes", type=float, default=0.3,
                     help="how long the topology soak runs at moderate load (default: a short CI setting)")
    parser.addoption("--soak-report", default=None, metavar="PATH",
                     help="write the soak's samples (RSS per process, Redis, queues, table sizes) as Markdown to PATH")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A soak's time limit follows its length; the default limit would cut a long one.
    minutes = float(config.getoption("--soak-minutes"))
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(minutes * 60 + 240))


def service_missing(what: str, how: str) -> None:
    message = f"{what} is not reachable; {how}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def wait_until(condition: Callable[[], object], *, timeout: float, interval: float = 0.05, what: str = "") -> object:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except Exception as exc:  # the condition may fail while a service is starting
            last_error = exc
        else:
            if result:
                return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}" +
                         (f" (last error: {last_error!r})" if last_error else ""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# -- the simulator -------------------------------------------------------------------------------


@dataclass
class SimulatorProcess:
    """A `rpq simulator` child process on a free loopback port."""

    api_key: str
    port: int
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    control: httpx.Client = field(init=False)

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v2"

    def start(self, log_dir: Path) -> SimulatorProcess:
        self.log_path = log_dir / f"simulator-{self.port}.log"
        command = [sys.executable, "-m", "jobs.cli", "simulator", "--host", "127.0.0.1",
                   "--port", str(self.port), "--api-key", self.api_key, *self.args]
        # Without --endpoint flags the simulator would create the ids in RUNPOD_ENDPOINTS: a test's
        # endpoints must not depend on the developer's environment.
        env = {name: value for name, value in os.environ.items() if name != "RUNPOD_ENDPOINTS"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.control = httpx.Client(base_url=self.root_url, timeout=10)

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"simulator exited: {self.logs()}")
            return self.control.get("/_sim/health").status_code == 200

        wait_until(ready, timeout=30, what="the simulator to answer /_sim/health")
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def reset(self) -> None:
        self.control.post("/_sim/reset").raise_for_status()

    def jobs(self, endpoint: str | None = None) -> list[dict[str, object]]:
        params = {"endpoint": endpoint} if endpoint else None
        response = self.control.get("/_sim/jobs", params=params)
        response.raise_for_status()
        return list(response.json()["jobs"])

    def set_faults(self, *rules: dict[str, object]) -> None:
        self.control.post("/_sim/faults", json={"faults": list(rules)}).raise_for_status()

    def configure_endpoint(self, endpoint_id: str, **config: object) -> None:
        """Change an endpoint's settings, creating it (with the defaults plus these) if it does not exist."""
        self.control.post(f"/_sim/endpoints/{endpoint_id}", json=config).raise_for_status()

    def create_endpoint(self, endpoint_id: str | None = None, **config: object) -> str:
        """A new endpoint (a fresh id unless given) with the defaults plus ``config``; returns its id."""
        endpoint_id = endpoint_id or f"ep-{uuid.uuid4().hex[:12]}"
        self.configure_endpoint(endpoint_id, **config)
        return endpoint_id

    def advance(self, seconds: float) -> None:
        self.control.post("/_sim/clock/advance", json={"seconds": seconds}).raise_for_status()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.control.close()


@pytest.fixture(scope="session")
def start_simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SimulatorProcess]]:
    """Factory: start a simulator with extra `rpq simulator` flags; stopped at session end."""
    started: list[SimulatorProcess] = []
    log_dir = tmp_path_factory.mktemp("simulator-logs")

    def start(*args: str) -> SimulatorProcess:
        sim = SimulatorProcess(api_key="sim-" + secrets.token_hex(16), port=free_port(), args=args)
        started.append(sim)
        return sim.start(log_dir)

    yield start
    for sim in started:
        sim.stop()


def endpoint_flags(*endpoint_ids: str) -> tuple[str, ...]:
    """`--endpoint ID` for each id: endpoints the simulator creates at startup and keeps across resets."""
    return tuple(arg for endpoint_id in endpoint_ids for arg in ("--endpoint", endpoint_id))


@pytest.fixture(scope="session")
def _shared_simulator(start_simulator: Callable[..., SimulatorProcess]) -> SimulatorProcess:
    # Short cold starts keep the suite fast; everything else is RunPod's default. Only the endpoints named
    # here exist (other ids are 404, as on RunPod): tests that want another one create it.
    return start_simulator("--cold-start-seconds", "0.2", *endpoint_flags(*SHARED_ENDPOINTS))


@pytest.fixture
def simulator(_shared_simulator: SimulatorProcess) -> SimulatorProcess:
    """The shared simulator, reset to an empty state for this test."""
    _shared_simulator.reset()
    return _shared_simulator


# -- S3: moto's server over HTTP --------------------------------------------------------------------

#: The secret access key every S3 test signs with: distinctive, so a test can prove it is shown nowhere.
FAKE_S3_SECRET = "rpq-fake-s3-secret-" + secrets.token_hex(12)


@pytest.fixture(scope="session")
def s3_endpoint_url() -> Iterator[str]:
    """A real S3 server over HTTP: moto's, in a thread of this process. It needs no service, so it fails
    rather than skips when it cannot start. It checks neither signatures nor expiry."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
        host, port = server.get_host_and_port()
    except Exception as exc:
        pytest.fail(f"moto's S3 server did not start: {exc!r}", pytrace=False)
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> str:
    """Fake credentials in boto3's standard variables for this test only, and nothing else boto3 could find."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIARPQTESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_S3_SECRET)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return FAKE_S3_SECRET


@pytest.fixture
def s3_bucket(s3_endpoint_url: str, s3_credentials: str) -> str:
    """A new, empty bucket on the S3 server, for this test alone."""
    import boto3.session

    name = f"rpq-test-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1").create_bucket(
        Bucket=name)
    return name


# -- Redis, PostgreSQL, SQLite -------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A block of five Redis databases of this session's own (the first is this URL; pipelines take the
    next four), claimed in database 0 so that two test sessions on one machine never share one."""
    import redis

    base = REDIS_URL.rstrip("/")
    admin = redis.Redis.from_url(base + "/0", socket_connect_timeout=3)
    try:
        admin.ping()
    except redis.RedisError:
        admin.close()
        service_missing(f"Redis at {base}", "start it with: redis-server --daemonize yes --port 6379")
    for first in (1, 6, 11):
        claim = f"rpq:test-session:{first}"
        if admin.set(claim, os.getpid(), nx=True, ex=3 * 3600):
            break
    else:
        admin.close()
        pytest.fail("every block of Redis test databases is claimed by another test session", pytrace=False)
    for db in range(first, first + 5):
        redis.Redis.from_url(f"{base}/{db}").flushdb()
    try:
        yield f"{base}/{first}"
    finally:
        admin.delete(claim)
        admin.close()


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped when the block ends."""
    import psycopg

    name = f"rpq_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        service_missing(f"PostgreSQL at {POSTGRES_ADMIN_URL}",
                        "start it with: pg_ctlcluster <version> main start")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped at the end."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every storage test runs twice: on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'rpq.db'}"
    return str(request.getfixturevalue("postgres_url"))


# -- a real Celery worker --------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    name: str
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_worker(
    redis_url: str, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: start `celery -A tasks worker` as a child process and wait until it answers ping."""
    from jobs.settings import Settings
    from tasks.app import make_app

    workers: list[WorkerProcess] = []
    app = make_app(Settings(celery_broker_url=redis_url))

    def start(*, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> WorkerProcess:
        name = f"test-{uuid.uuid4().hex[:8]}@localhost"
        log_path = tmp_path / f"worker-{len(workers)}.log"
        environment = {**os.environ, "CELERY_BROKER_URL": redis_url, **(env or {})}
        command = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", name,
                   "--loglevel", "INFO", "--without-mingle", "--without-gossip", *args]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
        worker = WorkerProcess(process=process, name=name, log_path=log_path)
        workers.append(worker)

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited: {worker.logs()}")
            return any(name in reply for reply in app.control.ping(destination=[name], timeout=0.5))

        wait_until(answers, timeout=60, interval=0.2, what=f"Celery worker {name} to answer ping")
        return worker

    yield start
    for worker in workers:
        stop_process(worker.process)
    app.close()


# -- the job table -----------------------------------------------------------------------------------


@pytest.fixture
def migrated_db(database_url: str) -> Iterator[str]:
    """`database_url` with the schema at head and no rows, emptied again afterwards. PostgreSQL is one database
    per test process, which the module-scoped pipelines write to as well: their rows are gone before a test
    that counts every row of a table begins."""
    from jobs.storage.db import upgrade

    upgrade(database_url)
    _empty(database_url)
    yield database_url
    _empty(database_url)


def _empty(database_url: str) -> None:
    from sqlmodel import SQLModel

    from jobs.storage.db import make_engine

    engine = make_engine(database_url)
    with engine.begin() as connection:
        for table in reversed(SQLModel.metadata.sorted_tables):
            connection.execute(table.delete())
    engine.dispose()


@dataclass
class Published:
    """Messages a runtime would have sent to Celery, for tests that run the lifecycle in-process."""

    messages: list[tuple[str, str, float | None]] = field(default_factory=list)

    def __call__(self, task: str, job_id: str, countdown: float | None) -> None:
        self.messages.append((task, job_id, countdown))

    def of(self, task: str) -> list[str]:
        return [job_id for name, job_id, _ in self.messages if name == task]


ENDPOINT_NAME = "tts"
ENDPOINT_ID = "tts-endpoint"
#: The endpoints the shared simulators create at startup: rpq's configured one, and the fixed ids of the
#: simulator and client tests.
SHARED_ENDPOINTS = (ENDPOINT_ID, "ep", "ep-client-test")


def make_settings(database_url: str, simulator: SimulatorProcess, **overrides: object) -> Settings:
    from jobs.settings import Endpoint, Secret, Settings

    fields: dict[str, object] = {
        "runpod_api_key": Secret(simulator.api_key),
        "runpod_serverless_url": simulator.base_url,
        "database_url": database_url,
        "endpoints": {ENDPOINT_NAME: Endpoint(ENDPOINT_NAME, ENDPOINT_ID)},
        **overrides,
    }
    return Settings(**fields)  # type: ignore[arg-type]


def fast_client(simulator: SimulatorProcess, kind: type[RunPodClient] | None = None) -> RunPodClient:
    """A RunPod client (or a subclass of it) for in-process tests: short timeouts, quick retries."""
    from jobs.flow.backoff import RetryPolicy
    from jobs.runpod.client import RunPodClient

    return (kind or RunPodClient)(api_key=simulator.api_key, base_url=simulator.base_url, timeout=3.0,
                                  retry=RetryPolicy(max_attempts=2, base_delay=0.05, max_delay=1.0))


def make_runtime(database_url: str, simulator: SimulatorProcess) -> Runtime:
    """A runtime on `database_url` and `simulator` that records, not sends, Celery messages."""
    from jobs.runtime import Runtime
    from jobs.storage.db import make_engine

    return Runtime(settings=make_settings(database_url, simulator), engine=make_engine(database_url),
                   publish=Published(), make_client=lambda: fast_client(simulator))


@pytest.fixture
def runtime(migrated_db: str, simulator: SimulatorProcess) -> Iterator[Runtime]:
    """A runtime on a migrated database and the simulator that records, not sends, Celery messages."""
    rt = make_runtime(migrated_db, simulator)
    yield rt
    rt.close()


# -- the whole pipeline: a real worker and beat, Redis, the simulator, SQLite or PostgreSQL ---------------


@dataclass
class Pipeline:
    """The whole stack for a test module; `run_cli` and `spawn` start more processes with its environment."""

    runtime: Runtime
    simulator: SimulatorProcess
    env: dict[str, str]
    log_dir: Path
    api_token: str = ""
    api_url: str | None = None
    worker: subprocess.Popen[bytes] | None = None
    beat: subprocess.Popen[bytes] | None = None
    api: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start_api(self, port: int) -> None:
        self.api = self.spawn("api", [sys.executable, "-m", "jobs.cli", "api", "--port", str(port)])
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200,
                   timeout=60, what="the HTTP API to answer /healthz")

    def api_client(self) -> httpx.Client:
        assert self.api_url
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.api_token}"},
                            timeout=30)

    def start_worker(self) -> None:
        self.starts += 1
        name = f"pipeline-{self.starts}-{uuid.uuid4().hex[:6]}@localhost"
        command = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", name, "-P", "threads",
                   "-c", "8", "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
        with open(self.log_dir / f"worker-{self.starts}.log", "wb") as log:
            self.worker = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        from tasks.app import make_app

        app = make_app(self.runtime.settings)
        try:
            wait_until(lambda: app.control.ping(destination=[name], timeout=0.5), timeout=60, interval=0.2,
                       what=f"worker {name} to answer ping")
        finally:
            app.close()

    def start_beat(self) -> None:
        command = [sys.executable, "-m", "celery", "-A", "tasks", "beat", "--loglevel", "INFO",
                   "-s", str(self.log_dir / "beat-schedule")]
        with open(self.log_dir / "beat.log", "wb") as log:
            self.beat = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def run_cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=self.env, input=stdin,
                              capture_output=True, text=True, timeout=60)

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            return subprocess.Popen(command, cwd=ROOT, env={**self.env, **(env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT)

    def kill_worker(self) -> None:
        """SIGKILL: no warm shutdown, nothing handed back to Redis; held countdown polls are lost."""
        assert self.worker is not None
        self.worker.kill()
        self.worker.wait(10)

    def logs(self, tail: int | None = 4000) -> str:
        """Every log of the stack; the last `tail` characters of each (None: all of it)."""
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-(tail or 0):]}"
                         for p in self.log_dir.glob("*.log"))

    def stop(self) -> None:
        for process in (self.worker, self.beat, self.api):
            if process is not None:
                stop_process(process)


def all_finished(pipeline: Pipeline, job_ids: list[str], timeout: float) -> list[jobs.Job]:
    """Every job, once each is in a final status; on a timeout the stack's logs are printed."""
    import jobs

    def done() -> list[jobs.Job] | None:
        found = [jobs.get(job_id, runtime=pipeline.runtime) for job_id in job_ids]
        return found if all(job.is_terminal for job in found) else None

    try:
        return wait_until(done, timeout=timeout, interval=0.5, what="every job to finish")  # type: ignore[return-value]
    except AssertionError:
        print(pipeline.logs())
        raise


@contextmanager
def _stack(request: pytest.FixtureRequest, start_simulator: Callable[..., SimulatorProcess], redis_url: str,
           tmp_path_factory: pytest.TempPathFactory, *, name: str, broker_offset: int,
           with_api: bool = False, settings: Mapping[str, object] | None = None,
           env: Mapping[str, str] | None = None, simulator_args: tuple[str, ...] = (),
           management: bool = False) -> Iterator[Pipeline]:
    """The stack; `settings` (Settings fields) and `env` (their variables, for the child processes) add to it,
    and `simulator_args` to the simulator's flags. With `management`, RunPod's management API (REST v2 and
    GraphQL) is the simulator's too."""
    import redis as redis_lib

    from jobs.runpod.client import RunPodClient
    from jobs.runtime import Runtime, celery_publisher
    from jobs.storage.db import make_engine, upgrade
    from jobs.web.auth import new_token

    log_dir = tmp_path_factory.mktemp(f"{name}-{request.param}")
    if request.param == "sqlite":
        database_url = f"sqlite:///{log_dir / 'rpq.db'}"
    else:
        database_url = str(request.getfixturevalue("postgres_url"))
    upgrade(database_url)
    # A Redis database of this stack's own, so a message meant for one never reaches another.
    base, db = redis_url.rsplit("/", 1)
    broker = f"{base}/{int(db) + broker_offset + request.param_index}"  # inside redis_url's block of five
    redis_lib.Redis.from_url(broker).flushdb()
    simulator = start_simulator("--cold-start-seconds", "0.2", "--webhook-interval-seconds", "1",
                                *endpoint_flags(*SHARED_ENDPOINTS), *simulator_args)
    if management:
        mgmt = {"runpod_rest_url": f"{simulator.root_url}/mgmt/v2",
                "runpod_graphql_url": f"{simulator.root_url}/mgmt/graphql"}
        settings = {**mgmt, **(settings or {})}
        env = {**{name.upper(): url for name, url in mgmt.items()}, **(env or {})}
    api_port = free_port()
    webhook_base = f"http://127.0.0.1:{api_port}" if with_api else None
    settings = make_settings(database_url, simulator, celery_broker_url=broker, runpod_timeout_seconds=2.0,
                             reconcile_interval_seconds=1, poll_grace_seconds=2, submit_stuck_seconds=30,
                             runpod_health_poll_seconds=2, runpod_webhook_base_url=webhook_base, **(settings or {}))
    token, token_line = new_token()
    extra_env = env or {}
    env = {
        **os.environ,
        **extra_env,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker,
        "RUNPOD_API_KEY": simulator.api_key,
        "RUNPOD_SERVERLESS_URL": simulator.base_url,
        "RUNPOD_ENDPOINTS": f"{ENDPOINT_NAME}={ENDPOINT_ID}",
        "RUNPOD_TIMEOUT_SECONDS": "2",
        "RPQ_RECONCILE_SECONDS": "1",
        "RPQ_POLL_GRACE_SECONDS": "2",
        "RPQ_SUBMIT_STUCK_SECONDS": "30",
        "RUNPOD_HEALTH_POLL_SECONDS": "2",
        "RPQ_API_TOKENS": token_line,
    }
    if webhook_base:
        env["RUNPOD_WEBHOOK_BASE_URL"] = webhook_base
    runtime = Runtime(
        settings=settings, engine=make_engine(database_url), publish=celery_publisher(settings),
        make_client=lambda: RunPodClient(api_key=simulator.api_key, base_url=simulator.base_url),
    )
    stack = Pipeline(runtime=runtime, simulator=simulator, env=env, log_dir=log_dir, api_token=token,
                     api_url=webhook_base)
    try:
        stack.start_worker()
        stack.start_beat()
        if with_api:
            stack.start_api(api_port)
        yield stack
    finally:
        stack.stop()
        runtime.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def pipeline(
    request: pytest.FixtureRequest,
    start_simulator: Callable[..., SimulatorProcess],
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    """The whole stack for a test module: `celery -A tasks worker` and `beat` as child processes."""
    with _stack(request, start_simulator, redis_url, tmp_path_factory, name="pipeline", broker_offset=1) as stack:
        yield stack


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def web_pipeline(
    request: pytest.FixtureRequest,
    start_simulator: Callable[..., SimulatorProcess],
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    """The whole stack with `rpq api` serving too, and jobs submitted with webhooks pointing at it."""
    with _stack(request, start_simulator, redis_url, tmp_path_factory, name="web", broker_offset=3,
                with_api=True) as stack:
        yield stack
