"""The services every later test stands on are real and reachable."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from sqlalchemy import text
from sqlmodel import create_engine

from jobs.settings import Settings
from tasks.app import QUEUES, make_app
from tests.conftest import WorkerProcess

pytestmark = pytest.mark.integration


def test_redis_answers_on_the_sessions_own_database(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("rpq:harness", "1")

    assert client.get("rpq:harness") == b"1"
    assert client.connection_pool.connection_kwargs["db"] != 0
    client.delete("rpq:harness")
    client.close()


def test_the_database_round_trips_a_transaction(database_url: str) -> None:
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE harness (id INTEGER PRIMARY KEY, note TEXT)"))
        connection.execute(text("INSERT INTO harness (id, note) VALUES (1, 'héllo')"))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT note FROM harness WHERE id = 1")).scalar_one() == "héllo"
        connection.execute(text("DROP TABLE harness"))
        connection.commit()
    engine.dispose()


def test_celery_dash_a_tasks_worker_serves_every_rpq_queue(
    start_worker: Callable[..., WorkerProcess], redis_url: str
) -> None:
    worker = start_worker()
    app = make_app(Settings(celery_broker_url=redis_url))

    replies = app.control.inspect(destination=[worker.name], timeout=5).active_queues() or {}

    assert sorted(queue["name"] for queue in replies[worker.name]) == sorted(QUEUES)
    app.close()
