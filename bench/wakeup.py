"""A stand-in for the deduplicated wake-up that is to replace `submit()`'s Celery publish, to measure
what `submit()` and `POST /v1/jobs` will cost with it (`--publish wakeup` in the benchmarks).

The design: a submit sets a per-endpoint Redis key with `SET key 1 NX PX ms` and publishes the submit
task only when the key was set, so most submits pay one small Redis command instead of `send_task`.
Here the key is per task name (every benchmark uses one endpoint) and lives WAKE_MS; every other
message (polls with a countdown, cancels) is published as before. It is not rpq's code: only a way
to time the rest of the path as it will be.
"""

from __future__ import annotations

from typing import Any

import redis

from jobs import runtime as runtime_module
from jobs.runtime import SUBMIT_TASK, Publisher, Runtime
from jobs.settings import Settings

WAKE_MS = 1000
KEY = "rpq:bench:wake:"


def wakeup_publisher(settings: Settings, publish: Publisher) -> Publisher:
    """`publish`, except that a submit publishes only when its wake-up key was not set already."""
    client = redis.Redis.from_url(settings.celery_broker_url)

    def wake(task: str, job_id: str, countdown: float | None) -> None:
        # Only a submit's message is deduplicated; the SET is short-circuited for every other one.
        if task != SUBMIT_TASK or countdown is not None or client.set(KEY + task, b"1", nx=True, px=WAKE_MS):
            publish(task, job_id, countdown)

    return wake


def install() -> None:
    """Every Runtime built from settings from now on, in this process, publishes through `wakeup_publisher`."""
    built = Runtime.from_settings.__func__  # type: ignore[attr-defined]

    def from_settings(cls: type[Runtime], settings: Settings, *, celery_app: Any = None) -> Runtime:
        rt: Runtime = built(cls, settings, celery_app=celery_app)
        rt.publish = wakeup_publisher(settings, rt.publish)
        return rt

    runtime_module.Runtime.from_settings = classmethod(from_settings)  # type: ignore[method-assign, assignment]
