"""A Celery app with one task that does nothing: the baseline the pipeline is compared against.

It is built by `tasks.app.make_app`, so it has exactly the pipeline's settings (acks_late, prefetch
multiplier 1, task events on, no result backend, the same three queues; `bench.noop` goes to
`rpq.submit`, the default queue). bench/throughput.py starts it as

    celery -A bench.noop_app worker -P threads -c 16 ...

with CELERY_BROKER_URL pointing at its scratch Redis database.
"""

from __future__ import annotations

from jobs.settings import Settings
from tasks.app import make_app

app = make_app(Settings.from_env())


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Nothing: what is left is Celery's own cost per message (fetch, run, ack, events)."""
