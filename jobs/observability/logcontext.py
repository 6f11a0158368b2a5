"""Which job a log line is about: every line logged while a task works on a job carries its id and
correlation id, so one grep follows a request from the web app through every task."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_job: ContextVar[tuple[str, str]] = ContextVar("rpq_job", default=("-", "-"))

FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] [job=%(job_id)s cid=%(correlation_id)s] %(name)s: %(message)s"


def bind(*, job_id: str, correlation_id: str | None) -> None:
    """Tag this task's further log lines; `scope()` around the task undoes it."""
    _job.set((job_id, correlation_id or "-"))


@contextmanager
def scope() -> Iterator[None]:
    token = _job.set(("-", "-"))
    try:
        yield
    finally:
        _job.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id, record.correlation_id = _job.get()
        return True


def install(logger: logging.Logger) -> None:
    """Add the job tags to every handler of `logger` and show them in its format."""
    for handler in logger.handlers:
        handler.addFilter(ContextFilter())
        handler.setFormatter(logging.Formatter(FORMAT))
