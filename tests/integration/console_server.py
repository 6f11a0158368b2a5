"""The console's test server: `rpq api`'s app on SQLite, served by uvicorn in a thread, with jobs made through the
Python API. The console is about pages and authorization; storage is tested on both databases elsewhere."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

import jobs
from jobs.runpod.client import RunPodClient
from jobs.runtime import Runtime
from jobs.settings import Endpoint, Secret, Settings
from jobs.states import JobStatus
from jobs.storage.db import make_engine, session_scope, upgrade
from jobs.storage.models import utcnow
from jobs.storage.store import Source, transition
from jobs.web import create_app, new_token
from tests.conftest import Published, _empty, free_port, wait_until

SECRET = secrets.token_hex(32)
TOKEN, TOKEN_ENTRY = new_token()
FLOWER_URL = "http://flower.example.test:5555"
METRICS_URL = "http://metrics.example.test:9464/metrics"


def console_runtime(tmp: Path, **overrides: Any) -> Runtime:
    """A runtime on a fresh SQLite database with the console on, that records rather than sends Celery messages."""
    url = f"sqlite:///{tmp / 'console.db'}"
    upgrade(url)
    fields: dict[str, Any] = {
        "database_url": url, "endpoints": {"tts": Endpoint("tts", "tts-endpoint"),
                                           "export": Endpoint("export", "export-endpoint")},
        "console_secret": Secret(SECRET), "flower_url": FLOWER_URL, "metrics_url": METRICS_URL, **overrides,
    }
    return Runtime(settings=Settings(**fields), engine=make_engine(url), publish=Published(),
                   make_client=lambda: RunPodClient(api_key="unused"))


def empty(rt: Runtime) -> None:
    _empty(rt.settings.database_url)


@dataclass
class Served:
    base_url: str
    runtime: Runtime


@contextmanager
def serve(rt: Runtime, tokens: list[str] | None = None) -> Iterator[Served]:
    app = create_app(rt, tokens=tokens or [TOKEN_ENTRY])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None))
    thread = threading.Thread(target=server.run, name="rpq-console", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=10, what="the console's server to start")
        yield Served(f"http://127.0.0.1:{server.config.port}", rt)
    finally:
        server.should_exit = True
        thread.join(10)


def make_job(rt: Runtime, endpoint: str = "tts", status: JobStatus = JobStatus.PENDING, **input: Any) -> str:
    """A job submitted through the Python API, then moved to `status` as if RunPod had finished it."""
    job = jobs.submit(endpoint, {"text": "hello", **input}, runtime=rt)
    if status is not JobStatus.PENDING:
        with session_scope(rt.engine) as session:
            left = transition(session, job.id, to=status, source=Source.POLL, expected={JobStatus.PENDING},
                              values={"finished_at": utcnow(), "error": "handler failed: out of memory"
                                      if status is JobStatus.FAILED else None})
        assert left is JobStatus.PENDING
    return job.id
